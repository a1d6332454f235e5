"""Every loss and advantage computation of the pipeline, as pure functions (tensors in, tensors out).

Each is unit-tested against a naive reference implementation written in tests/. Conventions: `mask` tensors
are 1 on valid response tokens and 0 on padding; masked means divide by the number of valid tokens.
"""
import torch
import torch.nn.functional as F


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (all of them when dim is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ============================================================================ reward model (Bradley-Terry)


# ============================================================================ PPO (GAE, clipped objectives, KL)


# ============================================================================ DPO family
