"""Log-probabilities, values and rewards of responses, on the [prompt left-padded | response right-padded] layout.

The logits at column t predict the token at column t + 1, so response token j (column P + j) is scored by the
logits at column P + j - 1. Getting this off by one, or scoring with a different temperature or filtering than
the one sampled with, shows up as a PPO ratio != 1 at the first step or a negative KL (TRL #925, #1857).
"""
import torch
import torch.nn.functional as F


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


def sampling_logprobs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Log-probs (..., V) of the distribution actually sampled from, in float32 (bf16 log-softmax loses the
    small differences the KL and the PPO ratio are made of; TRL #878). temperature 0 (greedy) scores at T=1."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return F.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)


def concat(prompt_ids, prompt_mask, resp_ids, resp_mask):
    """(B, P) + (B, R) -> ids, mask (B, P + R)."""
    return torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask, resp_mask], 1)


def response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Logits (B, R, V) predicting each response token."""
    ids, mask = concat(prompt_ids, prompt_mask, resp_ids, resp_mask)
    P, R = prompt_ids.size(1), resp_ids.size(1)
    return model(ids, attention_mask=mask)[:, P - 1:P + R - 1]


def response_logprobs(model, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs (B, R) of the response tokens (0 on padding); with_entropy also returns the
    per-token entropy (B, R) of the same distribution."""
    logp_all = sampling_logprobs(response_logits(model, prompt_ids, prompt_mask, resp_ids, resp_mask),
                                 temperature, top_k, top_p)
    logp = logp_all.gather(-1, resp_ids.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(resp_mask == 0, 0.0)  # not `* mask`: PAD may be filtered out (-inf), and -inf * 0 = nan
    if not with_entropy:
        return logp
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy


def response_values(value_model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Values (B, R): V_t is read at the column that predicts response token t (the state before emitting it)."""
    ids, mask = concat(prompt_ids, prompt_mask, resp_ids, resp_mask)
    P, R = prompt_ids.size(1), resp_ids.size(1)
    return value_model(ids, attention_mask=mask)[:, P - 1:P + R - 1] * resp_mask


def last_index(resp_mask):
    """Index (B,) of each row's last response token: its EOS, or the last real token if it was cut off."""
    return (resp_mask.sum(1) - 1).clamp(min=0)


def reward_at_eos(reward_model, prompt_ids, prompt_mask, resp_ids, resp_mask):
    """Sequence reward (B,): the scalar head read at the response's EOS token (last real token if truncated).
    Independent of how much left padding the prompts or right padding the responses carry."""
    ids, mask = concat(prompt_ids, prompt_mask, resp_ids, resp_mask)
    scores = reward_model(ids, attention_mask=mask)  # (B, P + R)
    col = prompt_ids.size(1) + last_index(resp_mask)
    return scores.gather(1, col[:, None]).squeeze(1)
