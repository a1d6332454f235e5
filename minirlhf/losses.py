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
# Shapes: (B,) = one reward per sequence of each preference pair, read at the response's EOS.


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef: float = 0.0):
    """Reward-model loss, averaged over the B pairs:

        L = mean_i[ -log sigmoid(r_c,i - r_r,i - m_i) ]  +  c * mean_i[ (r_c,i + r_r,i)^2 ]

    The first term is the negative log-likelihood of the labels under the Bradley-Terry model
    P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry 1952; Christiano et al. 2017; Ouyang et al. 2022).
    margin m (a float, or (B,) per pair) asks the chosen reward to win by at least m (Llama 2, 2307.09288, uses
    a larger margin for pairs rated as clearly better). The second term is reward centering (Eisenstein et al.
    2023, 2312.09244, c ~ 0.01): BT only sees differences, so without it the rewards' offset drifts freely.
    r_chosen, r_rejected (B,) float. Returns a scalar."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ============================================================================ PPO (GAE, clipped objectives, KL)


# ============================================================================ DPO family
