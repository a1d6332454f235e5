"""Preference data for the reward model: collect comparisons from the simulated human, batch and score them.

Collection (InstructGPT, Ouyang et al. 2022, 2203.02155, sec. 3.5): for each prompt sample k responses from the
SFT policy at temperature 1 (no top-k/top-p), and let the annotator label all k-choose-2 pairs. The pairs of one
prompt stay together (consecutive records, one "group"), so training can put them in the same batch: scoring the k
responses once serves all k(k-1)/2 comparisons, and the pairs of one prompt, which are strongly correlated, are
not spread over many steps (InstructGPT found that shuffling them in as independent pairs over-fits).

Truncated samples: a response that did not emit EOS within the budget is left out before pairing. The gold reward
depends on EOS (a penalty when missing), while every consumer of prefs.jsonl (RM, DPO) re-encodes a response as
text + EOS; dropping them keeps that re-encoding exact. PPO handles the no-EOS case itself (its "EOS trick").
The count is reported as n_dropped_no_eos.

Record written to prefs.jsonl (one per pair):
    {"prompt", "chosen", "rejected", "split": "train" | "test", "chosen_gold", "rejected_gold", "label_prob",
     "chosen_eos", "rejected_eos", "group"}
chosen/rejected are decoded response texts without EOS (starting with the space the model produced);
label_prob = P(annotator prefers chosen) = task.preference_prob(chosen_gold, rejected_gold).
"""
import itertools
import random

import numpy as np
import torch

from .data import DataError, encode_prompt, encode_response, right_pad
from .evaluation import sample_policy
from .utils import autocast, progress


# ----------------------------------------------------------------------------------------------- collection
def sample_many(policy, tok, prompts, max_new_tokens: int, seed: int = 0, batch_size: int = 512, device="cpu",
                dtype="float32", desc: str = "sampling"):
    """evaluation.sample_policy at temperature 1 (no top-k/top-p) over a long prompt list, with a progress bar on a terminal;
    chunk i is sampled with seed (seed, i), so the result depends on the seed and batch size only."""
    out = []
    starts = range(0, len(prompts), batch_size)
    for i, start in enumerate(progress(starts, desc=desc, leave=False)):
        out += sample_policy(policy, tok, prompts[start:start + batch_size], max_new_tokens, temperature=1.0,
                             batch_size=batch_size, seed=seed * 1_000_003 + i, device=device, dtype=dtype)
    return out


def label_pairs(task, prompts, samples, k: int, split: str, seed: int = 0):
    """The annotator's labels for all pairs of the distinct, EOS-ended responses of each prompt.

    samples: k consecutive samples per prompt (dicts with "response" text and "eos"), i.e. samples[g*k:(g+1)*k]
    answer prompts[g]. Returns (records, stats) with stats = {"n_samples", "n_dropped_no_eos", "n_duplicates"}."""
    assert len(samples) == k * len(prompts)
    rng = random.Random(f"annotate-{split}-{seed}")
    records, n_no_eos, n_dup = [], 0, 0
    for g, prompt in enumerate(prompts):
        responses = []
        for s in samples[g * k:(g + 1) * k]:
            if not s["eos"]:
                n_no_eos += 1
            elif s["response"] in responses:  # the same text twice: a pair of it carries no preference
                n_dup += 1
            else:
                responses.append(s["response"])
        gold = [task.gold_reward(prompt, r, True) for r in responses]
        for i, j in itertools.combinations(range(len(responses)), 2):
            c, r = (i, j) if task.annotate(gold[i], gold[j], rng) else (j, i)
            records.append({"prompt": prompt, "chosen": responses[c], "rejected": responses[r], "split": split,
                            "chosen_gold": gold[c], "rejected_gold": gold[r],
                            "label_prob": task.preference_prob(gold[c], gold[r]),
                            "chosen_eos": True, "rejected_eos": True, "group": f"{split}-{g}"})
    return records, {"n_samples": len(samples), "n_dropped_no_eos": n_no_eos, "n_duplicates": n_dup}


def collect_preferences(policy, tok, task, prompts, k: int, max_new_tokens: int, split: str, seed: int = 0,
                        batch_size: int = 512, device="cpu", dtype="float32"):
    """Sample k responses per prompt from `policy` and label their pairs (label_pairs). Returns (records, stats)."""
    # k copies of each prompt next to each other: sample i answers prompt i // k.
    samples = sample_many(policy, tok, [p for p in prompts for _ in range(k)], max_new_tokens, seed, batch_size,
                          device, dtype, desc=f"collect {split}")
    return label_pairs(task, prompts, samples, k, split, seed)


def groups_of(records) -> list:
    """Lists of record indices sharing a comparison group: the "group" field when present, else runs of
    consecutive records with the same prompt (how a user's file usually lists the pairs of one prompt)."""
    groups, last = [], None
    for i, r in enumerate(records):
        key = r.get("group", r["prompt"])
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(i)
    return groups


def split_prefs(records, test_frac: float, seed: int):
    """(train, test) records of a preference file. A file with a "split" field ("train" | "test") on every line is
    used as is; otherwise a seeded share `test_frac` of the *prompts* is held out, so the pairs of one prompt stay
    on one side and no test prompt is trained on. Returns copies of the records with "split" set."""
    with_split = [r for r in records if "split" in r]
    if with_split:
        if len(with_split) != len(records):
            r = next(r for r in records if "split" not in r)
            raise DataError(f"{r['_where']}: missing field 'split' (other lines have one; give it on all or none)")
        for r in records:
            if r["split"] not in ("train", "test"):
                raise DataError(f"{r['_where']}: split must be 'train' or 'test', got {r['split']!r}")
    else:
        prompts = sorted({r["prompt"] for r in records})
        random.Random(seed).shuffle(prompts)
        held_out = set(prompts[:max(1, round(test_frac * len(prompts)))]) if len(prompts) > 1 else set()
        records = [dict(r, split="test" if r["prompt"] in held_out else "train") for r in records]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    if not train:
        raise DataError(f"{records[0]['_where'].rsplit(':', 1)[0]}: no training pairs (every pair is in the test split)")
    return train, test


def has_gold_columns(records) -> bool:
    """Do all records carry the simulated human's columns (chosen_gold, rejected_gold, label_prob)? Then the Bayes
    ceiling and the gold comparisons exist. A column that is present must be a number (file:line error)."""
    for r in records:
        for k in ("chosen_gold", "rejected_gold", "label_prob"):
            if k in r and (isinstance(r[k], bool) or not isinstance(r[k], (int, float))):
                raise DataError(f"{r.get('_where', 'prefs')}: field {k!r} must be a number")
    return all(k in r for r in records for k in ("chosen_gold", "rejected_gold", "label_prob"))


def bayes_accuracy(records) -> float:
    """The accuracy ceiling on noisy labels: the expected accuracy of predicting the likelier label of each pair,
    mean of max(p, 1 - p) with p = label_prob (what the gold reward itself scores on average)."""
    return sum(max(r["label_prob"], 1 - r["label_prob"]) for r in records) / len(records)


# ----------------------------------------------------------------------------------------------- encoding
def encode_pairs(records, tok, block_size: int):
    """Token sequences BOS + prompt + response + EOS for each record's chosen and rejected response.
    Returns ([(chosen_seq, rejected_seq)], number of responses cut to fit block_size, which then lack EOS)."""
    out, n_cut = [], 0
    for r in records:
        p = encode_prompt(tok, r["prompt"], block_size, r.get("_where", "prompt"))
        pair = []
        for key in ("chosen", "rejected"):
            ids, cut = encode_response(tok, r[key], block_size - len(p))
            n_cut += cut
            pair.append(p + ids)
        out.append(tuple(pair))
    return out, n_cut


# ----------------------------------------------------------------------------------------------- scoring
def sequence_rewards(rm, seqs, pad_id: int, device="cpu"):
    """Rewards (N,) of full sequences (lists of token ids), read at each one's last token: its EOS, or the last
    real token of a truncated response. Right-padded, so plain causal attention is exact (PAD only ever follows
    real tokens) and the batch is never longer than its longest sequence; this equals scoring.reward_at_eos on
    the [prompt left-padded | response right-padded] layout (tests/test_rm.py checks it)."""
    ids, mask = right_pad(seqs, pad_id, device)  # (N, T)
    scores = rm(ids)  # (N, T) float32
    return scores.gather(1, (mask.sum(1) - 1)[:, None]).squeeze(1)


def pair_rewards(rm, pairs, pad_id: int, device="cpu"):
    """(r_chosen, r_rejected), each (B,), for [(chosen_seq, rejected_seq)]. Every distinct sequence goes through
    the model once, in one forward: with all pairs of a prompt in the batch, k responses serve k(k-1)/2 pairs."""
    index, seqs = {}, []
    for pair in pairs:
        for s in pair:
            if tuple(s) not in index:
                index[tuple(s)] = len(seqs)
                seqs.append(s)
    r = sequence_rewards(rm, seqs, pad_id, device)  # (U,)
    ic = torch.tensor([index[tuple(c)] for c, _ in pairs], device=r.device)
    ir = torch.tensor([index[tuple(rj)] for _, rj in pairs], device=r.device)
    return r[ic], r[ir]


@torch.no_grad()
def all_pair_rewards(rm, pairs, pad_id: int, batch_size: int = 512, device="cpu", dtype="float32"):
    """pair_rewards over a whole list in chunks, eval mode; returns two float32 CPU tensors (B,)."""
    was_training = rm.training
    rm.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        with autocast(device, dtype):
            c, r = pair_rewards(rm, pairs[i:i + batch_size], pad_id, device)
        rc.append(c.float().cpu())
        rr.append(r.float().cpu())
    rm.train(was_training)
    return torch.cat(rc), torch.cat(rr)


# ----------------------------------------------------------------------------------------------- normalisation
@torch.no_grad()
def set_normalisation(rm, rewards):
    """Fold an affine map into the model's gain/bias buffers so that the rewards it gave (`rewards`, computed with
    the current gain/bias) become mean 0, std 1 (population std), as lm-human-preferences does with samples of
    the initial policy: PPO's KL coefficient and no-EOS penalty are then in known units.
    r = g*h + b  ->  (r - mean)/std = (g/std)*h + (b - mean)/std. Returns (mean, std) of the raw rewards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    mean, std = rewards.mean().item(), rewards.std(unbiased=False).item()
    if not std > 1e-12:
        raise DataError(f"all {len(rewards)} normalisation samples got the same reward ({mean:.4g}); "
                        "the reward model did not learn anything")
    rm.gain.copy_(rm.gain / std)
    rm.bias.copy_((rm.bias - mean) / std)
    return mean, std


# ----------------------------------------------------------------------------------------------- statistics
def pairwise_accuracy(r_chosen, r_rejected) -> float:
    """Fraction of pairs where the chosen response scores higher; exact ties count half."""
    d = torch.as_tensor(r_chosen, dtype=torch.float64) - torch.as_tensor(r_rejected, dtype=torch.float64)
    return ((d > 0).double() + 0.5 * (d == 0).double()).mean().item()


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def ranks(x) -> np.ndarray:
    """Ranks 0..n-1, ties get the average of the ranks they span (the gold reward has many exact ties)."""
    x = np.asarray(x, dtype=np.float64)
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=r) / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))
