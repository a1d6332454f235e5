"""Sampling a policy over many prompts, and scoring samples with a policy (log-probs) or a reward model.

Prompts are batched by length so that little of each forward is padding; PAD, BOS and unused ids are never sampled
(Tokenizer.unsampleable_ids), so tok.decode(tokens) is exactly the response and a sample's log-probs are those of
the distribution it was drawn from.
"""
import torch

from minirlhf.data import encode_prompt, in_input_order, left_pad, length_batches, right_pad
from minirlhf.generation import generate
from minirlhf.harness import dist
from minirlhf.harness.cli import progress
from minirlhf.scoring import banned_mask, response_logprobs, reward_at_eos
from minirlhf.utils import autocast, evaluating


# ----------------------------------------------------------------------------------------------- model passes
def unsampleable_mask(tok, model, device):
    """(V,) bool mask of tok.unsampleable_ids for `model`'s vocabulary; None for a tokenizer without that method
    (a duck-typed stand-in), which then bans nothing."""
    if not hasattr(tok, "unsampleable_ids"):
        return None
    return banned_mask(tok.unsampleable_ids(model.config.vocab_size), model.config.vocab_size, device)


def _record_padding(stats, key, real: int, total: int):
    """Accumulate real/total token counts in `stats` (a dict or None) and keep stats[key] = the padding share."""
    if stats is None:
        return
    stats[key + "_real"] = stats.get(key + "_real", 0) + real
    stats[key + "_total"] = stats.get(key + "_total", 0) + total
    stats[key] = 1.0 - stats[key + "_real"] / max(stats[key + "_total"], 1)


@torch.no_grad()
def sample_policy(model, tok, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, batch_size: int = 64, seed: int = 0, device="cpu", dtype="float32",
                  compile: bool = False, stats: dict = None, distributed: bool = False):
    """One sample per prompt (repeat a prompt in the list for several). Returns a list of dicts, in the order of
    `prompts`: prompt, response (text, no EOS), eos (bool: ended with EOS within the budget), length (response tokens,
    EOS included), tokens, logprobs (sampling). Prompts are batched by length (data.length_batches, seeded).
    compile: the compiled decode step (generation.generate). stats: receives "sampling_padding_share". distributed:
    under torchrun the batches are shared out as sample_many does (every rank gets all samples)."""
    if distributed and dist.enabled():
        return sample_many(model, tok, prompts, max_new_tokens, seed, batch_size, device, dtype, compile=compile,
                           stats=stats, temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator(device=device).manual_seed(seed)
    banned = unsampleable_mask(tok, model, device)
    encoded = [encode_prompt(tok, p, model.config.block_size) for p in prompts]
    out = [None] * len(prompts)
    for idx in length_batches([len(e) for e in encoded], batch_size, seed=seed):
        ids, mask = left_pad([encoded[i] for i in idx], tok.pad_id, device)
        with autocast(device, dtype):
            resp, resp_mask, logp = generate(model, ids, mask, max_new_tokens, tok.eos_id, tok.pad_id,
                                             temperature, top_k, top_p, generator=gen, banned=banned, compile=compile)
        lengths, resp, logp = resp_mask.sum(1).tolist(), resp.tolist(), logp.tolist()  # one transfer per batch
        _record_padding(stats, "sampling_padding_share", sum(len(encoded[i]) for i in idx) + sum(lengths),
                        len(idx) * (ids.size(1) + len(resp[0])))
        for j, i in enumerate(idx):
            n = lengths[j]
            toks = resp[j][:n]
            out[i] = {"prompt": prompts[i], "response": tok.decode(toks), "eos": bool(n and toks[-1] == tok.eos_id),
                      "length": n, "tokens": toks, "logprobs": logp[j][:n]}
    return out


def sample_batches(tok, samples, block_size: int, batch_size: int, device, batches=None):
    """Samples (dicts from sample_policy) as scoring batches: (prompt ids, prompt mask) left-padded (B, P) and
    (response ids, response mask) right-padded (B, R), in chunks of batch_size, or of the index lists `batches`
    (e.g. from scoring_batches) when given."""
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
    for idx in batches:
        chunk = [samples[i] for i in idx]
        p_ids, p_mask = left_pad([encode_prompt(tok, s["prompt"], block_size) for s in chunk], tok.pad_id, device)
        r_ids, r_mask = right_pad([s["tokens"] for s in chunk], tok.pad_id, device)
        yield p_ids, p_mask, r_ids, r_mask


def scoring_batches(tok, samples, block_size: int, batch_size: int, seed: int = 0, stats: dict = None):
    """Index batches of samples with similar prompt and response lengths (data.length_batches), so the scoring
    passes compute little padding; stats receives "scoring_padding_share" of the [prompt | response] layout."""
    p_len = [len(encode_prompt(tok, s["prompt"], block_size)) for s in samples]
    r_len = [max(len(s["tokens"]), 1) for s in samples]
    batches = length_batches([p + r for p, r in zip(p_len, r_len)], batch_size, seed=seed)
    for b in batches:
        _record_padding(stats, "scoring_padding_share", sum(p_len[i] + len(samples[i]["tokens"]) for i in b),
                        len(b) * (max(p_len[i] for i in b) + max(r_len[i] for i in b)))
    return batches


@torch.no_grad()
def response_logprob_sums(model, tok, samples, batch_size: int = 64, device="cpu", dtype="float32",
                          stats: dict = None):
    """Sequence log-prob (sum over response tokens, EOS included) of each sample's tokens under `model` at T=1,
    under the same distribution sample_policy samples from (the unsampleable ids banned)."""
    banned = unsampleable_mask(tok, model, device)
    batches = scoring_batches(tok, samples, model.config.block_size, batch_size, stats=stats)
    with autocast(device, dtype):
        return in_input_order(batches, (response_logprobs(model, *batch, banned=banned).sum(1).tolist() for batch in
                                        sample_batches(tok, samples, model.config.block_size, batch_size, device,
                                                       batches)))


@evaluating
def reward_model_scores(rm, tok, samples, batch_size: int = 64, device="cpu", dtype="float32", stats: dict = None):
    """The reward model's score of each sample (read at its EOS, or its last token when it was cut off), on the
    sampled tokens themselves. Truncated samples get their raw score here (PPO replaces it by a penalty)."""
    batches = scoring_batches(tok, samples, rm.config.block_size, batch_size, stats=stats)
    with autocast(device, dtype):
        return in_input_order(batches, (reward_at_eos(rm, *batch).float().tolist() for batch in
                                        sample_batches(tok, samples, rm.config.block_size, batch_size, device,
                                                       batches)))


# ----------------------------------------------------------------------------------------------- collection
def sample_many(policy, tok, prompts, max_new_tokens: int, seed: int = 0, batch_size: int = 512, device="cpu",
                dtype="float32", desc: str = "sampling", compile: bool = False, stats: dict = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """sample_policy over a long prompt list, with a progress bar: batched by length (windows of 16 batches, seeded),
    batch i sampled with seed (seed, i). Under torchrun each rank samples a contiguous share of the batches and every
    rank gets all samples in order: the one-process result (stats count this rank's share)."""
    lengths = [len(encode_prompt(tok, p, policy.config.block_size)) for p in prompts]
    out = [None] * len(prompts)
    batches = length_batches(lengths, batch_size, window=16 * batch_size, seed=seed)
    done = []  # (prompt index, sample) of this rank's batches
    for i in progress(dist.shard_range(len(batches)), desc=desc, leave=False):
        idx = batches[i]
        got = sample_policy(policy, tok, [prompts[j] for j in idx], max_new_tokens, temperature, top_k, top_p,
                            batch_size=batch_size, seed=seed * 1_000_003 + i, device=device, dtype=dtype,
                            compile=compile, stats=stats)
        done += zip(idx, got)
    for j, sample in dist.all_gather_objects(done):
        out[j] = sample
    return out
