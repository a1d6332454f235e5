"""Preference data for the reward model: collect comparisons from the simulated human, batch and score them.

Collection (InstructGPT, Ouyang et al. 2022, 2203.02155, sec. 3.5): k responses per prompt from the SFT policy at
temperature 1, and the annotator labels all k-choose-2 pairs. The pairs of one prompt stay together (one "group"),
so one batch scores the k responses once for all k(k-1)/2 comparisons, and strongly correlated pairs are not
spread over many steps (InstructGPT found that shuffling them in as independent pairs over-fits). A response
without EOS within the budget is left out (n_dropped_no_eos): PPO replaces its score by a fixed penalty anyway.
Records keep the sampled ids (chosen_ids / rejected_ids, EOS included, with the tokenizer's fingerprint), and the
RM and DPO train on those ids, since decode -> re-encode is not the identity under BPE.

Record written to prefs.jsonl (one per pair):
    {"prompt", "chosen", "rejected", "split": "train" | "test", "chosen_gold", "rejected_gold", "label_prob",
     "chosen_eos", "rejected_eos", "group", "chosen_ids", "rejected_ids", "tokenizer_fingerprint"}
chosen/rejected are decoded response texts without EOS; label_prob = P(annotator prefers chosen).
"""
import itertools
import json
import random

import numpy as np
import torch

from minirlhf.data import (DataError, encode_prompt, encode_response, in_input_order, length_batches, load_pref_jsonl,
                           padding_share, right_pad)
from minirlhf.harness import dist
from minirlhf.harness.files import read_json, write_json
from minirlhf.sampling import reward_model_scores, sample_many
from minirlhf.scoring import last_index
from minirlhf.utils import UserError, autocast, evaluating


def distinct_ended(samples) -> tuple:
    """(indices of the EOS-ended samples, each distinct response once -- by its token ids, else its text --, the
    number without EOS, the number of duplicates): a pair of a response with itself carries no preference."""
    keep, seen, n_no_eos = [], set(), 0
    for i, s in enumerate(samples):
        key = tuple(s["tokens"]) if "tokens" in s else s["response"]
        if not s["eos"]:
            n_no_eos += 1
        elif key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, n_no_eos, len(samples) - n_no_eos - len(keep)


def label_pairs(task, prompts, samples, k: int, split: str, seed: int = 0, tokenizer_fingerprint: str = None):
    """The annotator's labels for all pairs of the distinct, EOS-ended responses of each prompt.

    samples[g*k:(g+1)*k] answer prompts[g] (dicts with "response", "eos" and, from sample_policy, "tokens": the sampled
    ids, EOS included, kept as chosen_ids / rejected_ids of the tokenizer `tokenizer_fingerprint`). Two distinct id
    sequences that decode to the same text (BPE has several spellings of a word) have the same gold reward, so their
    label would be a coin flip: that pair is not formed (n_same_text_pairs). Returns (records, stats) with stats =
    {"n_samples", "n_dropped_no_eos", "n_duplicates", "n_same_text_pairs"}."""
    assert len(samples) == k * len(prompts)
    rng = random.Random(f"annotate-{split}-{seed}")
    records, n_no_eos, n_dup, n_same_text = [], 0, 0, 0
    for g, prompt in enumerate(prompts):
        group = samples[g * k:(g + 1) * k]
        keep, no_eos, dup = distinct_ended(group)
        n_no_eos, n_dup, responses = n_no_eos + no_eos, n_dup + dup, [group[i] for i in keep]
        gold = [task.gold_reward(prompt, s["response"], True) for s in responses]
        for i, j in itertools.combinations(range(len(responses)), 2):
            if responses[i]["response"] == responses[j]["response"]:
                n_same_text += 1
                continue
            c, r = (i, j) if task.annotate(gold[i], gold[j], rng) else (j, i)
            rec = {"prompt": prompt, "chosen": responses[c]["response"], "rejected": responses[r]["response"],
                   "split": split, "chosen_gold": gold[c], "rejected_gold": gold[r],
                   "label_prob": task.preference_prob(gold[c], gold[r]),
                   "chosen_eos": True, "rejected_eos": True, "group": f"{split}-{g}"}
            if "tokens" in responses[c]:
                rec.update(chosen_ids=list(responses[c]["tokens"]), rejected_ids=list(responses[r]["tokens"]),
                           tokenizer_fingerprint=tokenizer_fingerprint)
            records.append(rec)
    return records, {"n_samples": len(samples), "n_dropped_no_eos": n_no_eos, "n_duplicates": n_dup,
                     "n_same_text_pairs": n_same_text}


def rank_pairs(prompts, samples, scores, k: int, pairs: str = "all", tokenizer_fingerprint: str = None):
    """Pairs labelled by a learned reward model instead of the annotator (online / iterative DPO, Xu et al. 2024,
    2404.10719; Xiong et al. 2024, 2312.11456): for each prompt, the distinct EOS-ended responses among its k
    samples, the higher RM score chosen; the gold reward never enters. scores: the RM score of each sample.
    pairs: "all" (every pair with different scores) or "best-worst" (highest vs lowest per prompt, the rejection-
    sampling pairs of iterative DPO). Records keep the sampled ids and each response's sampling log-prob
    (chosen_logp / rejected_logp). Returns (records, stats)."""
    assert len(samples) == len(scores) == k * len(prompts) and pairs in ("all", "best-worst")
    records, n_no_eos, n_dup = [], 0, 0
    for g, prompt in enumerate(prompts):
        keep, no_eos, dup = distinct_ended(samples[g * k:(g + 1) * k])
        n_no_eos, n_dup = n_no_eos + no_eos, n_dup + dup
        responses = [(samples[g * k + i], float(scores[g * k + i])) for i in keep]
        if pairs == "best-worst":
            ranked = sorted(responses, key=lambda x: x[1])
            candidates = [(ranked[-1], ranked[0])] if len(ranked) >= 2 else []
        else:
            candidates = [(a, b) if a[1] >= b[1] else (b, a) for a, b in itertools.combinations(responses, 2)]
        for (c, rc), (rj, rr) in candidates:
            if rc == rr or c["response"] == rj["response"]:
                continue
            records.append({"prompt": prompt, "chosen": c["response"], "rejected": rj["response"], "split": "train",
                            "chosen_rm": rc, "rejected_rm": rr, "chosen_ids": list(c["tokens"]),
                            "rejected_ids": list(rj["tokens"]), "tokenizer_fingerprint": tokenizer_fingerprint,
                            "chosen_logp": float(sum(c["logprobs"])), "rejected_logp": float(sum(rj["logprobs"])),
                            "group": f"online-{g}"})
    return records, {"n_samples": len(samples), "n_dropped_no_eos": n_no_eos, "n_duplicates": n_dup,
                     "n_pairs": len(records)}


def collect_preferences(policy, tok, task, prompts, k: int, max_new_tokens: int, split: str, seed: int = 0,
                        batch_size: int = 512, device="cpu", dtype="float32"):
    """Sample k responses per prompt from `policy` and label their pairs (label_pairs). Returns (records, stats).
    Under torchrun sample_many shares the sampling out (the same records as one process, on every rank)."""
    # k copies of each prompt next to each other: sample i answers prompt i // k.
    samples = sample_many(policy, tok, [p for p in prompts for _ in range(k)], max_new_tokens, seed, batch_size,
                          device, dtype, desc=f"collect {split}")
    return label_pairs(task, prompts, samples, k, split, seed, tokenizer_fingerprint=tok.fingerprint())


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


def subsample(records, n: int, seed: int):
    """A seeded random subset of at most n records (all of them when n is 0), in file order."""
    if not n or len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def group_batches(groups: list, batch_size: int, seed: int, skip: int = 0):
    """Endless training batches of pair indices: each takes `batch_size` whole comparison groups (all pairs of a
    prompt together, as InstructGPT trains); an epoch is one shuffled pass over the groups. The order is a
    function of the seed; `skip` batches are drawn and dropped first (a resumed run continues the order)."""
    rng, n = random.Random(seed), 0
    while True:
        perm = list(range(len(groups)))
        rng.shuffle(perm)
        for i in range(0, len(perm), batch_size):
            n += 1
            if n > skip:
                yield [j for g in perm[i:i + batch_size] for j in groups[g]]


def subsample_groups(records, n: int, seed: int = 0) -> list:
    """Indices (in file order) of a seeded random subset of n records that takes whole comparison groups
    (groups_of): the pairs of one prompt stay together, as the RM trains on them together; only the last group
    taken is cut to make exactly n. All indices when n is 0 or at least len(records)."""
    if not n or n >= len(records):
        return list(range(len(records)))
    groups = groups_of(records)
    random.Random(f"subsample-{seed}").shuffle(groups)
    keep = []
    for g in groups:
        keep.extend(g[:n - len(keep)])
        if len(keep) == n:
            break
    return sorted(keep)


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
        where = records[0]['_where'].rsplit(':', 1)[0]
        raise DataError(f"{where}: no training pairs (every pair is in the test split)")
    return train, test


def has_gold_columns(records) -> bool:
    """Do all records carry the simulated human's columns (chosen_gold, rejected_gold, label_prob)? Then the Bayes
    ceiling and the gold comparisons exist. A column that is present must be a number (file:line error)."""
    for r in records:
        for k in ("chosen_gold", "rejected_gold", "label_prob"):
            if k in r and (isinstance(r[k], bool) or not isinstance(r[k], (int, float))):
                raise DataError(f"{r.get('_where', 'prefs')}: field {k!r} must be a number")
        if "label_prob" in r and not 0 <= r["label_prob"] <= 1:
            raise DataError(f"{r.get('_where', 'prefs')}: field 'label_prob' {r['label_prob']} must be a probability "
                            f"in [0, 1]")
    return all(k in r for r in records for k in ("chosen_gold", "rejected_gold", "label_prob"))


def bayes_accuracy(records) -> float:
    """The accuracy ceiling on noisy labels: the expected accuracy of predicting the likelier label of each pair,
    mean of max(p, 1 - p) with p = label_prob (what the gold reward itself scores on average)."""
    return sum(max(r["label_prob"], 1 - r["label_prob"]) for r in records) / len(records)


# ----------------------------------------------------------------------------------------------- encoding
def token_id_counts(records, tok) -> tuple:
    """(records whose response ids are used, records whose ids belong to another tokenizer and are re-encoded).
    A record's ids are used when its tokenizer_fingerprint is this tokenizer's (see response_ids)."""
    fp = tok.fingerprint()
    has_ids = [r for r in records if "chosen_ids" in r or "rejected_ids" in r]
    n_same = sum(r.get("tokenizer_fingerprint") == fp for r in has_ids)
    return n_same, len(has_ids) - n_same


def response_ids(tok, rec, key: str, max_len: int, fingerprint: str = None, vocab_size: int = None) -> tuple:
    """Response tokens of rec[key] ("chosen" or "rejected"), cut to max_len. Returns (ids, truncated). The sampled ids
    rec[key + "_ids"] (EOS included) when the record carries them for this tokenizer (rec["tokenizer_fingerprint"]):
    re-encoding decoded text is not the identity under BPE (sampled "Ġ g o o d" comes back as "Ġ g oo d"), and the
    RM/DPO must learn on the sequences the policy produced. Otherwise the text is encoded + EOS. fingerprint:
    tok.fingerprint(), computed once by the caller; ids must lie below vocab_size (the model's, else tok's)."""
    ids = rec.get(f"{key}_ids")
    if ids is None or rec.get("tokenizer_fingerprint") != (fingerprint or tok.fingerprint()):
        return encode_response(tok, rec[key], max_len)
    where, V = rec.get("_where", "preference record"), vocab_size or tok.vocab_size
    if not (isinstance(ids, list) and ids and all(type(i) is int and 0 <= i < V for i in ids)):
        raise DataError(f"{where}: field '{key}_ids' must be a non-empty list of token ids in [0, {V})")
    if tok.eos_id in ids[:-1]:
        raise DataError(f"{where}: field '{key}_ids' has EOS before its last token")
    return ids[:max_len], len(ids) > max_len


def encode_pairs(records, tok, block_size: int, vocab_size: int = None, targets: bool = False):
    """(prompt ids BOS + prompt, chosen ids, rejected ids) of each record, a response from its sampled ids when present
    for this tokenizer (response_ids), else its text + EOS. Prompt + response fit block_size tokens, or block_size + 1
    with targets=True (the SFT layout). Returns (triples, number of responses cut to fit, which then lack EOS)."""
    out, n_cut, fp = [], 0, tok.fingerprint()
    for r in records:
        p = encode_prompt(tok, r["prompt"], block_size, r.get("_where", "prompt"), reserve=1 + targets)
        c, cut_c = response_ids(tok, r, "chosen", block_size + targets - len(p), fp, vocab_size)
        rj, cut_r = response_ids(tok, r, "rejected", block_size + targets - len(p), fp, vocab_size)
        out.append((p, c, rj))
        n_cut += cut_c + cut_r
    return out, n_cut


def encode_splits(splits: dict, tok, block_size: int, vocab_size: int, targets: bool = False):
    """{what: records} -> ({what: (records, triples)}, number of uninformative pairs left out): encode_pairs, then
    informative_pairs; warns once about responses cut to fit the context."""
    out, n_cut, n_same = {}, 0, 0
    for what, records in splits.items():
        triples, cut = encode_pairs(records, tok, block_size, vocab_size, targets)
        records, triples, same = informative_pairs(records, triples, what)
        out[what], n_cut, n_same = (records, triples), n_cut + cut, n_same + same
    if n_cut:
        print(f"warning: {n_cut} responses were longer than the context and were cut (no EOS; scored at their last "
              f"token)")
    return out, n_same


def informative_pairs(records, pairs, what: str):
    """Drop the pairs whose chosen and rejected response are the same (text or token sequence): no preference, only ln 2
    of loss. Warns with the count; a DataError when nothing is left. pairs[i] encodes records[i] (its last two
    elements are the chosen and rejected sequences). Returns (records, pairs, number dropped)."""
    keep = [i for i, (r, p) in enumerate(zip(records, pairs))
            if r["chosen"] != r["rejected"] and list(p[-2]) != list(p[-1])]
    n_drop = len(records) - len(keep)
    if n_drop:
        print(f"warning: {n_drop} of {len(records)} {what} have chosen == rejected (same text or same tokens); "
              "they carry no preference and are left out")
    if records and not keep:
        where = records[0].get("_where", "preferences").rsplit(":", 1)[0]
        raise DataError(f"{where}: none of the {len(records)} {what} is informative (chosen == rejected in all)")
    return [records[i] for i in keep], [pairs[i] for i in keep], n_drop


# ----------------------------------------------------------------------------------------------- scoring
def sequence_rewards(rm, seqs, pad_id: int, device="cpu"):
    """Rewards (N,) of full sequences (lists of token ids), read at each one's last token (its EOS, or the last real
    token of a truncated response). Right-padded, so plain causal attention is exact; equal to scoring.reward_at_eos
    on the [prompt left-padded | response right-padded] layout (tests/test_rm.py checks it)."""
    ids, mask = right_pad(seqs, pad_id, device)  # (N, T)
    scores = rm(ids)  # (N, T) float32
    return scores.gather(1, last_index(mask)[:, None]).squeeze(1)


def distinct_sequences(pairs):
    """The distinct sequences of [(chosen_seq, rejected_seq)] and, per pair, the positions of its two among them:
    (seqs, chosen index list, rejected index list). With all pairs of a prompt together, k responses serve
    k(k-1)/2 pairs, and each is scored once."""
    index, seqs = {}, []
    for pair in pairs:
        for s in pair:
            if tuple(s) not in index:
                index[tuple(s)] = len(seqs)
                seqs.append(s)
    return seqs, [index[tuple(c)] for c, _ in pairs], [index[tuple(rj)] for _, rj in pairs]


def pair_rewards(rm, pairs, pad_id: int, device="cpu"):
    """(r_chosen, r_rejected), each (B,), for [(chosen_seq, rejected_seq)]: every distinct sequence (of
    distinct_sequences) goes through the model once, in one forward."""
    seqs, ic, ir = distinct_sequences(pairs)
    r = sequence_rewards(rm, seqs, pad_id, device)  # (U,)
    return r[torch.tensor(ic, device=r.device)], r[torch.tensor(ir, device=r.device)]


@evaluating
def all_pair_rewards(rm, pairs, pad_id: int, batch_size: int = 512, device="cpu", dtype="float32", seed: int = 0,
                     stats: dict = None):
    """Rewards of every pair, eval mode; returns two float32 CPU tensors (B,) (r_chosen, r_rejected).
    Each distinct sequence is scored once, in batches of batch_size sequences of similar length
    (data.length_batches); stats receives "padding_share" (padding tokens / all tokens of those batches)."""
    seqs, ic, ir = distinct_sequences(pairs)
    lengths = [len(seq) for seq in seqs]
    batches = length_batches(lengths, batch_size, seed=seed)
    with autocast(device, dtype):
        r = torch.tensor(in_input_order(batches, (sequence_rewards(rm, [seqs[i] for i in idx], pad_id, device).tolist()
                                                  for idx in batches)), dtype=torch.float32)
    if stats is not None:
        stats["padding_share"] = padding_share(lengths, batches)
    return r[torch.tensor(ic, dtype=torch.long)], r[torch.tensor(ir, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------- normalisation
@torch.no_grad()
def set_normalisation(rm, rewards):
    """Fold an affine map into the gain/bias buffers so that `rewards` (computed with the current ones) become mean 0,
    std 1 (population), as lm-human-preferences does on the initial policy's samples: PPO's KL coefficient and no-EOS
    penalty are then in known units. r = g*h + b -> (r - mean)/std. Returns the raw (mean, std)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    mean, std = rewards.mean().item(), rewards.std(unbiased=False).item()
    if not std > 1e-12:
        raise DataError(f"all {len(rewards)} normalisation samples got the same reward ({mean:.4g}); "
                        "the reward model did not learn anything")
    rm.gain.copy_(rm.gain / std)
    rm.bias.copy_((rm.bias - mean) / std)
    return mean, std


def fit_normalisation(rm, tok, samples, batch_size: int = 512, device="cpu", dtype="float32"):
    """set_normalisation on the RM's scores of the EOS-ended `samples` only: the RM never trained on cut-off responses
    and PPO replaces their score by a fixed penalty, so their scores must not set the units. Returns (raw mean, raw
    std, number of samples used); a DataError when none of the samples ended."""
    ended = [s for s in samples if s["eos"]]
    if not ended:
        raise DataError(f"none of the {len(samples)} normalisation samples ended with EOS within the budget "
                        "(raise --max-new-tokens, or train the SFT model longer)")
    # under torchrun each rank scores its share, every rank gets all scores (and so the same gain and bias)
    scores = dist.sharded(lambda mine: reward_model_scores(rm, tok, mine, batch_size, device, dtype), ended)
    mean, std = set_normalisation(rm, scores)
    return mean, std, len(ended)


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


# ----------------------------------------------------------------------------------------------- train_rm.py's data
def read_collected(path):
    """The preferences collected before a crash (collected.json in the staging folder), checked before reuse."""
    saved = read_json(path, "--resume")
    ok = isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("train", "test")) \
        and isinstance(saved.get("stats"), dict) and all(isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                                         for r in saved["train"] + saved["test"])
    if not ok:
        raise UserError(f"--resume: {path} is damaged; run without --resume to collect the preferences again")
    return saved


def _records(args, run_dir, policy, tok, task, kw: dict):
    """(train records, test records, collection stats, prompts to normalise on, whether the file carries the task's
    gold columns), from the simulated human's labels of the policy's samples (kept in the staging folder `run_dir`
    across --resume) or from the user's --prefs file."""
    collected = run_dir / "collected.json"  # the simulated human's labels, kept across --resume (~20 s of sampling)
    # under torchrun rank 0 reads its staging folder and every rank gets the same pairs
    saved = dist.broadcast_object(read_collected(collected) if args.resume and not args.prefs and dist.is_main()
                                  and collected.is_file() else None)
    if saved is not None:
        print(f"reusing the {len(saved['train']) + len(saved['test'])} preference pairs collected in {collected}")
        norm_prompts = task.sample_prompts("train", args.n_norm, args.seed + 1)
        return saved["train"], saved["test"], saved["stats"], norm_prompts, False
    if args.prefs:
        records = load_pref_jsonl(args.prefs)
        # checks the optional numeric columns now (FILE:LINE), not after training; with gold columns the file
        # comes from the built-in task, whose gold reward then also scores the RM on fresh samples
        task_file = has_gold_columns(records)
        train_recs, test_recs = split_prefs(records, args.test_frac, args.seed)
        if not test_recs:
            raise DataError(f"--prefs {args.prefs}: no test pairs (add more prompts, or set the \"split\" field)")
        prompts = sorted({r["prompt"] for r in train_recs})  # fresh samples for normalisation on these
        return train_recs, test_recs, {}, [prompts[i % len(prompts)] for i in range(args.n_norm)], task_file
    train_recs, s_train = collect_preferences(policy, tok, task, task.sample_prompts("train", args.n_prompts,
                                                                                     args.seed),
                                              args.k, args.max_new_tokens, "train", seed=args.seed, **kw)
    test_recs, s_test = collect_preferences(policy, tok, task, task.sample_prompts("test", args.n_test_prompts,
                                                                                   args.seed),
                                            args.k, args.max_new_tokens, "test", seed=args.seed + 1, **kw)
    stats = {k: s_train[k] + s_test[k] for k in s_train}
    if stats["n_dropped_no_eos"] > 0.5 * stats["n_samples"]:
        print(f"warning: {stats['n_dropped_no_eos']} of {stats['n_samples']} samples did not end with EOS "
              f"within --max-new-tokens {args.max_new_tokens} and were not paired")
    if not train_recs or not test_recs:
        raise DataError(f"no preference pairs: of {stats['n_samples']} samples, {stats['n_dropped_no_eos']} "
                        f"lacked EOS and {stats['n_duplicates']} were duplicates (train the SFT model longer or "
                        f"raise --max-new-tokens / --k)")
    write_json(collected, {"train": train_recs, "test": test_recs, "stats": stats})
    return train_recs, test_recs, stats, task.sample_prompts("train", args.n_norm, seed=args.seed + 1), False


def preference_records(args, run_dir, policy, tok, task, kw: dict):
    """train_rm.py's pairs: (train records, train pairs, test records, test pairs, stats, prompts to normalise on,
    whether the file carries the task's gold columns); a pair is (chosen, rejected) token sequences BOS + prompt +
    response. Both splits go to run_dir/prefs.jsonl; under torchrun every rank holds the same records."""
    cfg = policy.config
    train_recs, test_recs, stats, norm_prompts, task_file = _records(args, run_dir, policy, tok, task, kw)
    with open(run_dir / "prefs.jsonl", "w") as f:
        for r in train_recs + test_recs:
            f.write(json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n")
    n_ids, n_other = token_id_counts(train_recs + test_recs, tok)
    if n_other:
        print(f"warning: {n_other} pairs carry token ids of another tokenizer than --policy {args.policy}'s; their "
              f"text is re-encoded instead")
    splits, n_same = encode_splits({"train pairs": train_recs, "test pairs": test_recs}, tok, cfg.block_size,
                                   cfg.vocab_size)
    (train_recs, train_pairs), (test_recs, test_pairs) = [(r, [(p + c, p + rj) for p, c, rj in t])
                                                          for r, t in splits.values()]
    stats.update(n_pairs_from_ids=n_ids, n_uninformative_pairs=n_same)
    if args.max_pairs and len(train_pairs) > args.max_pairs:
        keep = subsample_groups(train_recs, args.max_pairs, args.seed)
        print(f"--max-pairs {args.max_pairs}: training on {len(keep)} of the {len(train_pairs)} train pairs")
        stats["n_train_pairs_available"] = len(train_pairs)
        train_recs, train_pairs = [train_recs[i] for i in keep], [train_pairs[i] for i in keep]
    return train_recs, train_pairs, test_recs, test_pairs, stats, norm_prompts, task_file
