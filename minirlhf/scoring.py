"""Log-probabilities, values and rewards of responses, on the [prompt left-padded | response right-padded] layout.

The logits at column t predict the token at column t + 1, so response token j (column P + j) is scored by the
logits at column P + j - 1. Getting this off by one, or scoring with a different temperature or filtering than
the one sampled with, shows up as a PPO ratio != 1 at the first step or a negative KL (TRL #925, #1857).
"""
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Top-k then nucleus (top-p) filtering: removed tokens get -inf. logits (..., V), already temperature-scaled."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# How far the first PPO ratio pi_new / pi_old (and exp of the gap between the KV-cache sampling log-probs and the
# full-forward scoring pass) may stray from 1 before it means a bug rather than rounding (largest |ratio - 1| over
# the first minibatch's tokens). float32: exact up to summation order (~1e-6). bfloat16: measured 0.004-0.008
# nats on the CPU; 0.05 leaves room for GPU kernels' other reduction orders and still catches real mismatches (a
# wrong temperature or an off-by-one column moves log-probs by tenths of a nat). Measurements: docs/performance.md.
RATIO_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}

# Float32 logits held at once by the chunked log-prob path: 2^24 values = 64 MB, 333 rows at vocab 50,304
# (the full (B, T, V) tensor at B 64, T 256 would be 3.3 GB); a CPU-sized model fits in one chunk.
LOGIT_CHUNK_ELEMENTS = 1 << 24


_BANNED_MASKS = {}  # (ids, vocab size, device) -> mask: built and copied to the device once, not per call


def banned_mask(banned, vocab_size: int, device=None):
    """The ids never to sample, as a (V,) bool mask: from a list/tuple of ids, a tensor of ids or a (V,) bool mask;
    None stays None. A list's mask is cached (read-only: callers never write into it)."""
    if banned is None:
        return None
    if isinstance(banned, torch.Tensor) and banned.dtype == torch.bool:
        assert banned.shape == (vocab_size,), f"banned mask of shape {tuple(banned.shape)} for vocab {vocab_size}"
        return banned.to(device)
    key = (tuple(banned), vocab_size, str(device)) if isinstance(banned, (list, tuple)) else None
    if key in _BANNED_MASKS:
        return _BANNED_MASKS[key]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.as_tensor(banned, dtype=torch.long)] = True
    mask = mask.to(device)
    if key is not None and len(_BANNED_MASKS) < 64:
        _BANNED_MASKS[key] = mask
    return mask


def sampling_logprobs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, banned=None):
    """Log-probs (..., V) of the distribution actually sampled from, in float32 (bf16 log-softmax loses the
    small differences the KL and the PPO ratio are made of; TRL #878). temperature 0 (greedy) scores at T=1.
    banned: ids (list / long tensor) or a (V,) bool mask of tokens never to sample (PAD, BOS and the unused ids
    past the tokenizer's vocabulary: Tokenizer.unsampleable_ids); their logits become -inf before top-k/top-p,
    so sampling and every scoring pass that gets the same `banned` use one distribution."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:  # (dividing by 1 would cost a pass over (n, V) for nothing)
        logits = logits / temperature
    if banned is not None:
        logits = logits.masked_fill(banned_mask(banned, logits.size(-1), logits.device), float("-inf"))
    return F.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)


def chunk_logprobs(hc, yc, weight, temperature: float, top_k: int, top_p: float, ban, with_entropy: bool):
    """One chunk of token_logprobs: hc (n, C), yc (n,) -> log-probs (n,) [, entropies (n,)], lm_head in float32."""
    with torch.autocast(hc.device.type, enabled=False):
        logits = F.linear(hc.float(), weight.float())  # (n, V) float32
    logp_all = sampling_logprobs(logits, temperature, top_k, top_p, ban)
    logp = logp_all.gather(1, yc[:, None]).squeeze(1)
    if not with_entropy:
        return logp
    p = logp_all.exp()
    return logp, -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)


@functools.cache
def compiled_chunk_logprobs():
    """chunk_logprobs through torch.compile: eagerly it is a chain of ~17 kernels with several (n, V) float32
    temporaries; compiled, the softmax, gather and entropy fuse (2.4x faster on the CPU)."""
    return torch.compile(chunk_logprobs, dynamic=True)


def token_logprobs(h, weight, targets, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, banned=None,
                   with_entropy: bool = False, chunk_rows: int = None, compile: bool = False):
    """Log-probs (B, T) float32 of `targets` under sampling_logprobs(h @ weight.T) without ever holding the (B, T, V)
    float32 logits: the B*T positions go through lm_head (in float32) a chunk of rows at a time, and with gradients on
    each chunk runs under activation checkpointing (its logits recomputed in the backward, not kept). h (B, T, C);
    weight (V, C) (lm_head); targets (B, T) long; chunk_rows default LOGIT_CHUNK_ELEMENTS // V. with_entropy also
    returns the per-position entropy (B, T); compile: each chunk through compiled_chunk_logprobs. Banned or filtered
    targets get -inf: mask them with masked_fill (not `* mask`: -inf * 0 = nan)."""
    B, T, C = h.shape
    V = weight.size(0)
    rows = chunk_rows or max(1, LOGIT_CHUNK_ELEMENTS // V)
    ban = banned_mask(banned, V, h.device)
    h_flat, y_flat = h.reshape(B * T, C), targets.reshape(B * T)
    chunk = functools.partial(compiled_chunk_logprobs() if compile else chunk_logprobs, weight=weight,
                              temperature=temperature, top_k=top_k, top_p=top_p, ban=ban, with_entropy=with_entropy)

    remat = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and B * T > rows
    outs = []
    for s in range(0, B * T, rows):
        args = (h_flat[s:s + rows], y_flat[s:s + rows])
        outs.append(checkpoint(chunk, *args, use_reentrant=False) if remat else chunk(*args))
    if not with_entropy:
        return torch.cat(outs).view(B, T)
    return torch.cat([o[0] for o in outs]).view(B, T), torch.cat([o[1] for o in outs]).view(B, T)


def concat(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """(B, P) + (B, R) -> ids, mask (B, P + R), checked on the host to fit `model`'s context: each row's real tokens
    must fit, and only a batch wider than block_size pays that host sync, here rather than in the forward, where
    under torch.compile it would break the graph (GPT.hidden_states skips its own check while compiling)."""
    ids, mask = torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask, resp_mask], 1)
    block = model.config.block_size
    if mask.size(1) > block:
        longest = int(mask.long().sum(1).max())
        if longest > block:
            raise ValueError(f"sequence of {longest} tokens exceeds the model's block_size {block}")
    return ids, mask


def response_logprobs(model, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, with_entropy: bool = False, banned=None,
                      chunk_rows: int = None):
    """Per-token log-probs (B, R) float32 of the response tokens (0 on padding) [and the entropies (B, R)], chunked over
    positions with a float32 lm_head (token_logprobs: no (B, R, V) tensor, exact under bf16; a compiled model gets
    compiled chunks). banned: as in sampling_logprobs (pass what generate got)."""
    ids, mask = concat(model, prompt_ids, prompt_mask, resp_ids, resp_mask)
    P, R = prompt_ids.size(1), resp_ids.size(1)
    h = model(ids, attention_mask=mask, hidden=True)[:, P - 1:P + R - 1]  # (B, R, C)
    out = token_logprobs(h, model.lm_head.weight, resp_ids, temperature, top_k, top_p, banned, with_entropy,
                         chunk_rows, compile=is_compiled(model))
    logp, entropy = out if with_entropy else (out, None)
    logp = logp.masked_fill(resp_mask == 0, 0.0)  # not `* mask`: PAD is banned/filtered (-inf), and -inf * 0 = nan
    return (logp, entropy) if with_entropy else logp


def is_compiled(model) -> bool:
    """Whether `model` is a torch.compile wrapper (model.compile_model), possibly inside DDP."""
    return hasattr(model, "_orig_mod")


def response_values(value_model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Values (B, R): V_t is read at the column that predicts response token t (the state before emitting it)."""
    ids, mask = concat(value_model, prompt_ids, prompt_mask, resp_ids, resp_mask)
    P, R = prompt_ids.size(1), resp_ids.size(1)
    return value_model(ids, attention_mask=mask)[:, P - 1:P + R - 1] * resp_mask


def last_index(resp_mask):
    """Index (B,) of each row's last response token: its EOS, or the last real token if it was cut off."""
    return (resp_mask.sum(1) - 1).clamp(min=0)


def reward_at_eos(reward_model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Sequence reward (B,): the scalar head read at the response's EOS token (last real token if truncated).
    Independent of how much left padding the prompts or right padding the responses carry."""
    ids, mask = concat(reward_model, prompt_ids, prompt_mask, resp_ids, resp_mask)
    scores = reward_model(ids, attention_mask=mask)  # (B, P + R)
    col = prompt_ids.size(1) + last_index(resp_mask)
    return scores.gather(1, col[:, None]).squeeze(1)
