"""What the core modules share: the user-facing error, autocast, and the optimizer with its schedule."""
import contextlib
import functools
import math

import torch


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data line, missing or mismatched checkpoint).
    Scripts print its message in one line instead of a traceback."""


def check(ok: bool, message: str):
    """Validate a flag or input before any work is done: raise UserError(message) unless ok.
    Message style: "--flag value: must be ..." (one line, names the flag and the bad value)."""
    if not ok:
        raise UserError(message)


def autocast(device: str, dtype: str):
    """Mixed precision context: bf16 autocast for the matmuls, parameters and optimizer state stay fp32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluating(fn):
    """@torch.no_grad() that also runs fn's first argument, a model, in eval mode and restores its training flag."""
    @functools.wraps(fn)
    @torch.no_grad()
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at total_steps (nanoGPT's schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_lr(step: int, total_steps: int, lr: float) -> float:
    """lr annealed linearly to 0 at total_steps (CleanRL's anneal_lr; the RL stages)."""
    return lr * (1.0 - step / total_steps)


def adamw(model, lr: float, weight_decay: float, device: str):
    """AdamW with weight decay on matrices only (not on biases and LayerNorm gains); fused kernels on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), fused=device.startswith("cuda"))
