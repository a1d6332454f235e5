"""Sampling a policy on a list of prompts, and the comparisons every stage reports (shared by all scripts)."""
import torch

from .data import encode_prompt, left_pad, right_pad
from .generation import generate
from .scoring import response_logprobs
from .utils import autocast


@torch.no_grad()
def sample_policy(model, tok, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, batch_size: int = 64, seed: int = 0, device="cpu", dtype="float32"):
    """One sample per prompt. Returns a list of dicts: prompt, response (text, no EOS), eos (bool: the response
    ended with EOS within the budget), length (response tokens, EOS included), tokens, logprobs (sampling)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = left_pad([encode_prompt(tok, p, model.config.block_size) for p in chunk], tok.pad_id, device)
        with autocast(device, dtype):
            resp, resp_mask, logp = generate(model, ids, mask, max_new_tokens, tok.eos_id, tok.pad_id,
                                             temperature, top_k, top_p, generator=gen)
        for j, p in enumerate(chunk):
            n = int(resp_mask[j].sum())
            toks = resp[j, :n].tolist()
            out.append({"prompt": p, "response": tok.decode(toks), "eos": bool(n and toks[-1] == tok.eos_id),
                        "length": n, "tokens": toks, "logprobs": logp[j, :n].tolist()})
    return out


def paired_win_rate(scores_a, scores_b) -> float:
    """Fraction of paired comparisons (same prompt, one sample each) that a wins; ties count half."""
    assert len(scores_a) == len(scores_b) and len(scores_a) > 0
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b))
    return wins / len(scores_a)


def _mean_sem(xs):
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / max(1, n - 1)
    return mean, (var / n) ** 0.5


@torch.no_grad()
def response_logprob_sums(model, tok, samples, batch_size: int = 64, device="cpu", dtype="float32"):
    """Sequence log-prob (sum over response tokens, EOS included) of each sample's tokens under `model` at T=1."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        p_ids, p_mask = left_pad([encode_prompt(tok, s["prompt"], model.config.block_size) for s in chunk],
                                 tok.pad_id, device)
        r_ids, r_mask = right_pad([s["tokens"] for s in chunk], tok.pad_id, device)
        with autocast(device, dtype):
            logp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask)
        out += logp.sum(1).tolist()
    return out


@torch.no_grad()
def compare_to_reference(policy, ref, tok, task, prompts, max_new_tokens: int, seed: int = 0, batch_size: int = 64,
                         device="cpu", dtype="float32"):
    """The numbers every policy-training stage reports on held-out prompts, against the reference (SFT) policy.

    One sample per prompt from each policy at temperature 1 (paired by prompt). KL(policy || ref) is estimated per
    sequence as sum_t log pi(y_t) - log pi_ref(y_t) on the policy's own samples (unbiased for the sequence KL).
    win_rate_vs_ref compares the two samples of each prompt under the task's gold reward (ties count half).
    Returns (metrics dict, policy samples)."""
    kw = dict(batch_size=batch_size, device=device, dtype=dtype)
    samples = sample_policy(policy, tok, prompts, max_new_tokens, 1.0, seed=seed, **kw)
    ref_samples = sample_policy(ref, tok, prompts, max_new_tokens, 1.0, seed=seed + 1, **kw)
    kl = [a - b for a, b in zip(response_logprob_sums(policy, tok, samples, **kw),
                                response_logprob_sums(ref, tok, samples, **kw))]
    gold = [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in samples]
    ref_gold = [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in ref_samples]
    for s, k, g in zip(samples, kl, gold):
        s["kl"], s["gold"] = k, g
    (kl_mean, kl_sem), (gold_mean, gold_sem) = _mean_sem(kl), _mean_sem(gold)
    metrics = {"win_rate_vs_ref": paired_win_rate(gold, ref_gold), "kl_mean": kl_mean, "kl_sem": kl_sem,
               "gold_mean": gold_mean, "gold_sem": gold_sem, "ref_gold_mean": _mean_sem(ref_gold)[0],
               "eos_rate": sum(s["eos"] for s in samples) / len(samples),
               "mean_len": sum(s["length"] for s in samples) / len(samples), "n_prompts": len(prompts)}
    return metrics, samples
