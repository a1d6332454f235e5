"""Direct Preference Optimization: train the policy straight on preference pairs (no reward model, no sampling).

    python train_dpo.py                                   # out/rm/prefs.jsonl on top of out/sft, CPU-sized defaults
    python train_dpo.py --prefs my_prefs.jsonl --task none   # your {"prompt", "chosen", "rejected"} records
    python train_dpo.py --loss ipo --beta 0.5             # IPO; also --loss hinge, --label-smoothing 0.1, --nll-coef
    python train_dpo.py --rounds 3 --reward out/rm        # online DPO: rounds 2-3 on fresh pairs ranked by the RM

Rafailov et al. 2023 (2305.18290) show that the KL-regularised RLHF objective max E[r] - beta KL(pi || ref) has the
optimum pi*(y|x) = ref(y|x) exp(r(x, y) / beta) / Z(x), so r = beta log(pi / ref) + beta log Z(x). Put this
"implicit reward" into the Bradley-Terry likelihood of the labels and Z cancels: the policy is fitted to the
preferences directly, by a classification loss on delta = log-ratio(chosen) - log-ratio(rejected).

The reference is the starting policy. Its log-probs of every chosen/rejected response are computed once before
training and cached in the run directory (ref_logps.pt), so no second model sits in memory while training.

Why --nll-coef defaults to 0.2 (DPO + NLL on the chosen response, after Pang et al. 2024, 2404.19733; the NLL here is
the per-token mean pooled over all chosen tokens of the batch, as RPO computes it, not Pang et al.'s mean over pairs
of each response's length-normalised NLL, so a long chosen response weighs more): plain DPO
only constrains the *difference* of two log-ratios, and pushing a rejected response down raises the logsumexp,
i.e. every other token's probability (the "squeezing" of Ren & Sutherland 2024, 2407.10490). Here 372 of the 438
tokens never occur in the data; Adam scales their tiny, sign-noisy output gradients up to full-size steps, and
plain DPO (3,600 pairs, 3 epochs at lr 3e-4) ended up sampling byte garbage: 11% of next-token mass on unused
tokens, gold -1.3 vs -0.2 for SFT, KL 26 nats. The chosen-NLL term pushes those tokens down consistently; with it
lr 1e-3 for 170-190 steps beat SFT in 75-79% of paired gold comparisons at 1.4-1.6 nats of KL on three
preference files. Chosen log-probs still fall a little (expected, DPO reference repo #8); watch logps/chosen and
test/logps/chosen in metrics.jsonl.

Online / iterative DPO (--rounds N): offline DPO learns from pairs the SFT policy sampled, and once the policy has
moved those pairs say little about its own samples. Each round after the first samples --round-k responses per
fresh train prompt from the *current* policy, lets the learned reward model (--reward, never the gold reward) rank
them, and trains on those pairs against the same fixed reference (its log-probs of the new pairs come from a frozen
copy of the starting policy): Xu et al. 2024 (2404.10719), Xiong et al. 2024 (2312.11456). Each round's pairs are
written to round<N>_prefs.jsonl; --resume is not supported with --rounds > 1.
"""
import copy
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.data import DataError, collate_sft, encode_prompt, length_batches, load_pref_jsonl
from minirlhf.evaluation.metrics import compare_to_reference
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import check_compatible, load_policy, load_scalar, save_run
from minirlhf.harness.cli import (FRACTION, NON_NEGATIVE, POSITIVE, MetricsLog, Progress, arg, check_flags, parse_args,
                                  resolve_device, resolve_dtype, run, set_seed)
from minirlhf.harness.files import torch_save, write_json
from minirlhf.harness.runs import FiniteCheck, Run, rng_state, set_rng_state
from minirlhf.losses import preference_loss
from minirlhf.preferences import (bayes_accuracy, has_gold_columns, informative_pairs, rank_pairs, response_ids,
                                  split_prefs, token_id_counts)
from minirlhf.sampling import reward_model_scores, sample_many
from minirlhf.scoring import token_logprobs
from minirlhf.tasks import get_task
from minirlhf.utils import UserError, adamw, autocast, check, cosine_lr

LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class Args:
    """Direct Preference Optimization (DPO, IPO, hinge) on preference pairs."""
    out_dir: str = arg("out/dpo", "run directory to write")
    prefs: str = arg("out/rm/prefs.jsonl", "JSONL of {prompt, chosen, rejected} (+ optional split, chosen_gold, "
                                           "rejected_gold, label_prob), as written by train_rm.py")
    policy: str = arg("out/sft", "run directory of the starting policy, which is also the frozen reference")
    task: str = arg("reviews", "built-in task whose gold reward scores the final policy; 'none' to skip (own data)")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(25, "steps between resume checkpoints in <out-dir>.partial (0 = none)")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    seed: int = arg(0, "random seed")
    compile: bool = arg(False, "torch.compile the model")
    # loss
    loss: str = arg("sigmoid", "sigmoid (DPO), ipo or hinge")
    beta: float = arg(0.1, "beta: strength of the implicit KL penalty (rewards are beta * log-ratios)")
    label_smoothing: float = arg(0.0, "sigmoid loss: assumed label-flip rate eps (conservative DPO)")
    ipo_length_average: bool = arg(True, "ipo: average log-ratios over response tokens (as TRL) instead of summing")
    nll_coef: float = arg(0.2, "add this times the NLL of the chosen responses, pooled per token over the batch (RPO "
                               "style, not Pang et al.'s per-pair length-normalised mean); 0 = plain DPO")
    # data
    test_frac: float = arg(0.1, "share of prompts held out as test pairs when the file has no 'split' field")
    max_pairs: int = arg(8000, "train on a seeded random subset of at most this many training pairs (0 = all); "
                               "the reference pass costs a forward per pair, and the default fits the 2-core CPU budget")
    max_test_pairs: int = arg(1000, "evaluate on a seeded random subset of at most this many test pairs (0 = all)")
    # optimisation
    epochs: float = arg(1.5, "passes over the training pairs")
    batch_size: int = arg(64, "preference pairs per step (2x sequences per forward)")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr: float = arg(3e-5, "final learning rate of the cosine schedule")
    warmup_steps: int = arg(10, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay (0: decay pulls weights to 0, not towards the reference)")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)")
    log_interval: int = arg(10, "steps between metrics.jsonl lines")
    eval_interval: int = arg(50, "steps between evaluations on the test pairs")
    eval_batch_size: int = arg(256, "pairs per forward when computing reference log-probs and test metrics")
    # end-of-run evaluation against the reference (built-in task only)
    n_eval_prompts: int = arg(512, "held-out task prompts for the paired gold comparison with the reference")
    max_new_tokens: int = arg(48, "response budget when sampling for the evaluation (and for --rounds > 1)")
    # online / iterative DPO (rounds after the first sample fresh pairs from the current policy)
    rounds: int = arg(1, "training rounds: 1 = offline DPO on --prefs; each later round samples --round-k "
                         "responses per train prompt from the current policy, labels the pairs with --reward and "
                         "trains on them against the same reference")
    reward: str = arg("out/rm", "reward model run directory that labels the online pairs (--rounds > 1 only)")
    round_prompts: int = arg(1000, "task train prompts sampled per online round")
    round_k: int = arg(4, "responses sampled per prompt in an online round")
    round_pairs: str = arg("all", "pairs of an online round: all (every pair of distinct responses) or best-worst")


# ----------------------------------------------------------------------------------------------- data
def subsample(records, n: int, seed: int):
    """A seeded random subset of at most n records (all of them when n is 0), in file order."""
    if not n or len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def encode_pairs(records, tok, block_size: int, vocab_size: int = None):
    """[(prompt_ids, chosen_ids, rejected_ids)] with BOS + prompt and response + EOS, each sequence cut to fit the
    context (a cut response has no EOS). The responses are the sampled token ids when the record carries them for
    this tokenizer (train_rm.py's prefs.jsonl), else the encoded text (preferences.response_ids; vocab_size = the
    model's, which bounds the ids).
    Returns (pairs, number of responses cut)."""
    pairs, n_cut, fp = [], 0, tok.fingerprint()
    for r in records:
        p = encode_prompt(tok, r["prompt"], block_size, r["_where"], reserve=2)
        c, cut_c = response_ids(tok, r, "chosen", block_size + 1 - len(p), fp, vocab_size)
        rj, cut_r = response_ids(tok, r, "rejected", block_size + 1 - len(p), fp, vocab_size)
        pairs.append((p, c, rj))
        n_cut += cut_c + cut_r
    return pairs, n_cut


# ----------------------------------------------------------------------------------------------- log-probs
def pair_batch(pairs, pad_id: int, device):
    """One batch of 2B sequences: the B chosen, then the B rejected, in the SFT layout (BOS + prompt + response,
    right-padded, loss_mask on response tokens and EOS). Right padding with plain causal attention gives the
    same positions and logits as the left-padded scoring layout, and every sequence fits the context."""
    return collate_sft([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id, device)


def pair_logps(model, batch, device, dtype, banned=None):
    """One forward over chosen and rejected together. Returns summed log-probs (2B,) and response lengths (2B,).
    The log-probs come from scoring.token_logprobs: lm_head in float32, a chunk of positions at a time (no full
    (2B, T, V) float32 logits), and in training each chunk is recomputed in the backward instead of stored.
    banned: the unsampleable ids (Tokenizer.unsampleable_ids), so DPO's log-probs are those of the distribution
    the policy is sampled from."""
    with autocast(device, dtype):
        h = model(batch["idx"], hidden=True)  # (2B, T, C)
        logp = token_logprobs(h, model.lm_head.weight, batch["targets"], banned=banned)  # (2B, T) float32
    mask = batch["loss_mask"]
    return logp.masked_fill(mask == 0, 0.0).sum(1), mask.sum(1)  # masked_fill: PAD targets are banned (-inf)


@torch.no_grad()
def all_pair_logps(model, pairs, pad_id, device, dtype, batch_size, banned=None, seed: int = 0, stats: dict = None):
    """Log-probs and lengths of every pair: two tensors (N, 2), column 0 = chosen, 1 = rejected, in the order of
    `pairs`. Pairs are batched by length (data.length_batches) so little of each forward is padding; stats
    receives "padding_share" (padding / all positions of those forwards)."""
    was_training = model.training
    model.eval()
    N = len(pairs)
    logps, lens = torch.zeros(N, 2, device=device), torch.zeros(N, 2, device=device)
    lengths = [len(p) + max(len(c), len(r)) - 1 for p, c, r in pairs]  # the batch width this pair needs
    batches = length_batches(lengths, batch_size, seed=seed)
    real = total = 0
    for idx in batches:
        chunk = [pairs[i] for i in idx]
        batch = pair_batch(chunk, pad_id, device)
        lp, n = pair_logps(model, batch, device, dtype, banned)
        rows = torch.tensor(idx, device=device)
        logps[rows], lens[rows] = torch.stack(lp.split(len(chunk)), 1), torch.stack(n.split(len(chunk)), 1)
        real += sum(len(p) + len(c) + len(p) + len(r) - 2 for p, c, r in chunk)
        total += batch["idx"].numel()
    if stats is not None:
        stats["padding_share"] = 1.0 - real / total if total else 0.0
    model.train(was_training)
    return logps, lens


def reference_logps(model, train_pairs, test_pairs, a: Args, tok, device, dtype, out: Path, also=()):
    """Reference log-probs (N, 2) of the train and test pairs, computed once with the starting policy (before any
    update) and cached in the run directory `out`; the cache is reused only when the prefs file, the reference
    weights and the split are the same. A cache in one of the folders `also` (the finished run a rerun will
    replace) is reused too, and copied into `out`. The key hashes the loaded weights, not a file, so a Hugging Face
    directory (safetensors) as --policy is keyed like a run directory."""
    h = hashlib.sha256(Path(a.prefs).read_bytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([a.test_frac, a.max_pairs, a.max_test_pairs, a.seed, model.config.block_size, dtype,
                         "banned-unsampleable"]).encode())  # log-probs over the sampling distribution
    key, cache = h.hexdigest(), out / "ref_logps.pt"
    hit = None
    for found in [cache] + [Path(d) / "ref_logps.pt" for d in also] if dist.is_main() else []:
        if not found.is_file():
            continue
        try:
            saved = torch.load(found, map_location="cpu", weights_only=True)
        except Exception:  # unreadable (e.g. a damaged file): recompute it
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"reference log-probs: reusing {found}")
            if found != cache:
                torch_save(cache, saved)
            hit = saved
            break
    hit = dist.broadcast_object(hit)  # under torchrun: rank 0's cache, so every rank decides alike
    if hit is not None:
        return hit["train"].to(device), hit["test"].to(device)
    t0 = time.time()
    pad = {}
    banned = tok.unsampleable_ids(model.config.vocab_size)
    # under torchrun each rank scores a contiguous share of the pairs; all_gather_cat puts them back in order
    ref_train, _ = all_pair_logps(model, dist.shard(train_pairs), tok.pad_id, device, dtype, a.eval_batch_size,
                                  banned, stats=pad)
    ref_test, _ = all_pair_logps(model, dist.shard(test_pairs), tok.pad_id, device, dtype, a.eval_batch_size, banned)
    ref_train, ref_test = dist.all_gather_cat(ref_train), dist.all_gather_cat(ref_test)
    if dist.is_main():
        torch_save(cache, {"key": key, "train": ref_train.cpu(), "test": ref_test.cpu()})
    print(f"reference log-probs of {len(train_pairs) + len(test_pairs)} pairs in {time.time() - t0:.1f}s -> {cache} "
          f"(padding {pad.get('padding_share', 0.0):.0%} of the train pass)")
    return ref_train, ref_test


# ----------------------------------------------------------------------------------------------- loss + stats
def dpo_step_loss(logps, lens, ref, a: Args, n_pairs=None, n_tokens=None):
    """The training objective and the usual DPO diagnostics for one batch.

    n_pairs, n_tokens: the divisors of the pair means and of the chosen responses' per-token NLL, by default this
    batch's counts. Under torchrun each rank passes (global count) / world size: DDP averages the gradients over
    ranks, so the ranks together then follow the gradient of the whole global batch's loss, also when their
    shards hold different numbers of tokens; loss and stats are this rank's part (their sum over ranks divided
    by the world size is the global batch's value).

    logps, lens (2B,) = policy log-probs and lengths of [chosen; rejected]; ref (B, 2) reference log-probs.
    Returns (loss, stats), stats as 0-d tensors (stats_to_host turns them into floats): rewards/* = beta * log-ratio (the implicit reward of Rafailov et al., eq. 5, up to
    beta log Z(x)); accuracy = share of pairs whose implicit reward ranks chosen first (ties half)."""
    B = ref.size(0)
    pi_c, pi_r = logps[:B], logps[B:]
    ref_c, ref_r = ref[:, 0], ref[:, 1]
    if a.loss == "ipo" and a.ipo_length_average:  # per-token log-ratios: the margin no longer grows with length
        n_c, n_r = lens[:B].clamp(min=1), lens[B:].clamp(min=1)
        pi_c, pi_r, ref_c, ref_r = pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r
    losses = preference_loss(a.loss, pi_c, pi_r, ref_c, ref_r, a.beta, a.label_smoothing)  # (B,)
    mean = (lambda x: x.mean()) if n_pairs is None else (lambda x: x.sum() / n_pairs)
    loss = mean(losses)
    # per-token NLL of the chosen responses (as SFT's loss)
    nll = -logps[:B].sum() / (lens[:B].sum().clamp(min=1) if n_tokens is None else n_tokens)
    if a.nll_coef:
        loss = loss + a.nll_coef * nll
    with torch.no_grad():  # tensors, not floats: no host sync per step (stats_to_host once per log step)
        r_c, r_r = a.beta * (pi_c - ref_c), a.beta * (pi_r - ref_r)
        stats = {"loss": loss.detach(), "pref_loss": mean(losses), "nll_chosen": nll.detach(),
                 "rewards/chosen": mean(r_c), "rewards/rejected": mean(r_r),
                 "rewards/accuracy": mean((r_c > r_r).float() + 0.5 * (r_c == r_r).float()),
                 "rewards/margin": mean(r_c - r_r),
                 "logps/chosen": mean(logps[:B]), "logps/rejected": mean(logps[B:])}
    return loss, stats


def stats_to_host(stats: dict) -> dict:
    """{name: 0-d tensor} -> {name: float} in one device-to-host transfer."""
    return dict(zip(stats, torch.stack([v.detach().float() for v in stats.values()]).tolist()))


@torch.no_grad()
def test_pair_stats(model, pairs, ref, a: Args, tok, device, dtype):
    """The same diagnostics on the test pairs (pair-weighted means over all of them), prefixed 'test/'."""
    pad = {}
    logps, lens = all_pair_logps(model, pairs, tok.pad_id, device, dtype, a.eval_batch_size,
                                 tok.unsampleable_ids(model.config.vocab_size), stats=pad)
    _, stats = dpo_step_loss(torch.cat([logps[:, 0], logps[:, 1]]), torch.cat([lens[:, 0], lens[:, 1]]), ref, a)
    return {f"test/{k}": v for k, v in {**stats_to_host(stats), **pad}.items()}


# ----------------------------------------------------------------------------------------------- online rounds
def online_pairs(model, ref_model, reward_model, tok, task, a: Args, rnd: int, device, dtype, out: Path = None):
    """The pairs of online round `rnd` (1 = the first after the offline one): --round-k samples per prompt of
    --round-prompts fresh task train prompts from the *current* policy `model`, labelled by the reward model
    (preferences.rank_pairs; the gold reward is never asked), and their reference log-probs (N, 2) from the frozen
    `ref_model`, the same reference as the offline round. Writes the pairs to out/round<rnd+1>_prefs.jsonl.
    Returns (pairs, ref log-probs, stats)."""
    seed = a.seed * 1000 + rnd  # a new sample of prompts and responses each round
    prompts = task.sample_prompts("train", a.round_prompts, seed=seed)
    was_training = model.training
    model.eval()
    samples = sample_many(model, tok, [p for p in prompts for _ in range(a.round_k)], a.max_new_tokens, seed,
                          a.eval_batch_size, device, dtype, desc=f"round {rnd + 1} samples")
    model.train(was_training)
    scores = reward_model_scores(reward_model, tok, samples, a.eval_batch_size, device, dtype)
    records, stats = rank_pairs(prompts, samples, scores, a.round_k, a.round_pairs, tok.fingerprint())
    if not records:
        raise UserError(f"online round {rnd + 1}: none of the {len(samples)} samples formed a pair (no two distinct "
                        f"EOS-ended responses of one prompt): raise --round-k or --max-new-tokens")
    if out is not None:
        with open(out / f"round{rnd + 1}_prefs.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    for r in records:
        r["_where"] = f"round {rnd + 1} pair"
    pairs, _ = encode_pairs(records, tok, model.config.block_size, model.config.vocab_size)
    ref, _ = all_pair_logps(ref_model, pairs, tok.pad_id, device, dtype, a.eval_batch_size,
                            tok.unsampleable_ids(model.config.vocab_size), seed=seed)
    stats["eos_rate"] = sum(s["eos"] for s in samples) / len(samples)
    stats["rm_mean"] = sum(scores) / len(scores)
    return pairs, ref, stats


def validate(a: Args):
    """Every flag's range, before any work (one line naming the flag, exit 2)."""
    check(a.loss in LOSSES, f"--loss {a.loss}: choose one of {', '.join(LOSSES)}")
    check_flags(a, {"beta": POSITIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                    "nll_coef": NON_NEGATIVE, "test_frac": FRACTION, "max_pairs": NON_NEGATIVE,
                    "max_test_pairs": NON_NEGATIVE, "epochs": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE,
                    "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
                    "grad_clip": NON_NEGATIVE, "log_interval": POSITIVE, "eval_interval": POSITIVE,
                    "eval_batch_size": POSITIVE, "n_eval_prompts": (lambda v: v >= 2, ">= 2 (standard errors)"),
                    "max_new_tokens": POSITIVE})
    check(not a.label_smoothing or a.loss == "sigmoid", "--label-smoothing only applies to --loss sigmoid")
    check_flags(a, {"rounds": POSITIVE, "round_prompts": POSITIVE, "round_k": (lambda v: v >= 2, ">= 2 (pairs)")})
    check(a.round_pairs in ("all", "best-worst"), f"--round-pairs {a.round_pairs}: choose all or best-worst")
    check(a.rounds == 1 or a.task.lower() != "none", "--rounds > 1 samples the task's train prompts: it needs "
                                                     "--task (not none)")
    check(a.rounds == 1 or not a.resume, "--resume is not supported with --rounds > 1 (rerun the command)")


def main(argv=None):
    a = parse_args(Args, argv)
    validate(a)
    device = dist.setup(resolve_device(a.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(a.dtype, device)
    check(a.batch_size >= dist.world_size(), f"--batch-size {a.batch_size}: must be >= the number of processes "
                                             f"({dist.world_size()}; it is the global batch, split across them)")
    check(a.rounds == 1 or not dist.enabled(), "--rounds > 1 is not supported under torchrun (run one process)")
    set_seed(a.seed)
    task = None if a.task.lower() == "none" else get_task(a.task)
    # before any work: is the output location writable, free and no input of the run?
    run_ = Run(a.out_dir, a, resume=a.resume, inputs={"--policy": a.policy, "--prefs": a.prefs,
                                                       "--reward": a.reward if a.rounds > 1 else None})
    state = run_.load_resume()

    # ---- policy (= reference) and pairs
    model, tok, pol_cfg = load_policy(a.policy, "--policy", device)
    block_size = model.config.block_size
    records = load_pref_jsonl(a.prefs)
    has_gold = has_gold_columns(records)
    train_recs, test_recs = split_prefs(records, a.test_frac, a.seed)
    if not test_recs:  # the implicit-reward accuracy is measured on them (train_rm.py refuses such a file too)
        raise DataError(f"--prefs {a.prefs}: no test pairs (add more prompts, or set the \"split\" field)")
    n_all = len(train_recs), len(test_recs)
    train_recs, test_recs = subsample(train_recs, a.max_pairs, a.seed), subsample(test_recs, a.max_test_pairs, a.seed)
    n_ids, n_other = token_id_counts(train_recs + test_recs, tok)
    if n_other:
        print(f"warning: {n_other} pairs carry token ids of another tokenizer than --policy {a.policy}'s; their "
              f"text is re-encoded instead")
    vocab_size = model.config.vocab_size
    train_pairs, n_cut = encode_pairs(train_recs, tok, block_size, vocab_size)
    test_pairs, n_cut_test = encode_pairs(test_recs, tok, block_size, vocab_size)
    if n_cut + n_cut_test:
        print(f"warning: {n_cut + n_cut_test} responses were longer than the context and were cut (no EOS)")
    train_recs, train_pairs, n_same = informative_pairs(train_recs, train_pairs, "train pairs")
    test_recs, test_pairs, n_same_test = informative_pairs(test_recs, test_pairs, "test pairs")
    print(f"{len(train_pairs)} train / {len(test_pairs)} test pairs (of {n_all[0]} / {n_all[1]}) from {a.prefs}, "
          f"policy {a.policy} "
          f"({model.num_params() / 1e6:.2f}M parameters), loss {a.loss}, beta {a.beta}, device {device} ({dtype})")

    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir
    t0 = time.time()
    ref_train, ref_test = reference_logps(model, train_pairs, test_pairs, a, tok, device, dtype, out,
                                          also=[run_.out])
    ref_train, ref_test = ref_train.to(device), ref_test.to(device)

    ref_model = reward_model = None
    if a.rounds > 1:  # the frozen reference for later rounds' pairs, and the RM that labels them
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reward_model, _, rm_cfg = load_scalar(a.reward, "--reward", device)
        check_compatible(("--policy", a.policy, pol_cfg), ("--reward", a.reward, rm_cfg))
        reward_model.eval().requires_grad_(False)

    opt = adamw(model, a.lr, a.weight_decay, device)
    train_model = dist.wrap(model, device)  # DDP under torchrun (averages gradients), else the model itself
    train_model = torch.compile(train_model) if a.compile else train_model
    banned = tok.unsampleable_ids(model.config.vocab_size)

    # ---- training: shuffled passes over the pairs
    steps_per_epoch = math.ceil(len(train_pairs) / a.batch_size)
    total = max(1, round(a.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(a.seed)
    order = torch.zeros(0, dtype=torch.long)
    test_stats, start = {}, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], [gen])
        start, order, test_stats = state["step"], state["order"], state["test_stats"]
        t0 -= state["elapsed_s"]
    log = MetricsLog(out / "metrics.jsonl", keep_rows=state["log_rows"] if state else None)
    finite = FiniteCheck("train_dpo.py")
    model.train()  # dropout is already 0 (load_run): DPO needs deterministic log-probs (TRL #744)

    def save_resume(next_step):
        run_.save_resume({"step": next_step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "rng": rng_state([gen]), "order": order, "test_stats": test_stats,
                          "log_rows": log.rows, "elapsed_s": time.time() - t0}, finite, [model])

    if state is None and a.save_interval and a.rounds == 1:  # so that a crash from here on keeps the reference log-probs
        save_resume(0)
    round_stats, step0 = [], 0  # step0: steps of the earlier rounds (metrics.jsonl's step counts across rounds)
    for rnd in range(a.rounds):
        if rnd > 0:  # online round: fresh pairs from the current policy, a new cosine schedule over them
            step0 += total
            train_pairs, ref_train, info = online_pairs(model, ref_model, reward_model, tok, task, a, rnd, device,
                                                        dtype, out)
            steps_per_epoch = math.ceil(len(train_pairs) / a.batch_size)
            total = max(1, round(a.epochs * steps_per_epoch))
            order, start = torch.zeros(0, dtype=torch.long), 0
            round_stats.append({"round": rnd + 1, **info, "steps": total})
            print(f"round {rnd + 1}: {len(train_pairs)} pairs labelled by {a.reward} from {info['n_samples']} "
                  f"samples of the current policy (EOS {info['eos_rate']:.3f}, RM mean {info['rm_mean']:+.3f}); "
                  f"{total} steps")
        bar = Progress(range(start, total), desc="dpo" if a.rounds == 1 else f"dpo round {rnd + 1}", total=total)
        for step in bar:
            lr = cosine_lr(step, total, a.lr, a.min_lr, a.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            if len(order) < a.batch_size:  # next epoch; the tail of the last one joins it (every pair is seen)
                order = torch.cat([order, torch.randperm(len(train_pairs), generator=gen)])
            idx, order = order[:a.batch_size], order[a.batch_size:]
            mine = dist.shard(idx)  # the same global batch on every rank; this rank's contiguous share of it
            batch = pair_batch([train_pairs[i] for i in mine], tok.pad_id, device)
            counts = {}
            if dist.enabled():  # global pair and chosen-token counts (one all-reduce), divided by the world size
                n_tok = dist.all_reduce_sum(batch["loss_mask"][:len(mine)].sum())
                counts = dict(n_pairs=len(idx) / dist.world_size(), n_tokens=n_tok.clamp(min=1) / dist.world_size())
            logps, lens = pair_logps(train_model, batch, device, dtype, banned)
            loss, stats = dpo_step_loss(logps, lens, ref_train[mine.to(device)], a, **counts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else 1e9)
            opt.step()
            finite.watch(step0 + step, loss=loss, grad_norm=grad_norm)
            last = step == total - 1
            if test_pairs and (step % a.eval_interval == 0 or last):
                test_stats = test_pair_stats(model, test_pairs, ref_test, a, tok, device, dtype)
            if step % a.log_interval == 0 or last:
                finite.check()  # a NaN stops the run here, naming its step, before anything is logged or saved
                if dist.enabled():  # each rank holds its part: sum / world = the global batch's numbers
                    stats = {k: dist.all_reduce_sum(v) / dist.world_size() for k, v in stats.items()}
                stats = stats_to_host({**stats, "grad_norm": grad_norm})
                row = {"step": step0 + step, "epoch": (step + 1) / steps_per_epoch, **stats, **test_stats, "lr": lr,
                       "elapsed_s": time.time() - t0}
                if a.rounds > 1:
                    row["round"] = rnd + 1
                log.write(row)
                bar.log(step, loss=stats["loss"], acc=stats["rewards/accuracy"],
                        test_acc=test_stats.get("test/rewards/accuracy", float("nan")), chosen=stats["logps/chosen"])
            if a.save_interval and a.rounds == 1 and (step + 1) % a.save_interval == 0 and not last:
                save_resume(step + 1)
    log.close()
    finite.check(model)
    train_seconds = time.time() - t0
    dist.assert_identical(model)  # under torchrun: every rank ends with the same weights
    save_run(out, model, tok, a, kind="policy", stage="dpo", reference=a.policy)  # rank 0 only
    if not dist.is_main():  # the evaluation and the report are rank 0's
        run_.finish()
        return

    # ---- final numbers: implicit-reward accuracy on test pairs beside the Bayes ceiling, then gold vs reference
    metrics = {"train_loss": stats["loss"], "train_accuracy": stats["rewards/accuracy"],
               "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs), "n_file_pairs": sum(n_all),
               "n_pairs_from_ids": n_ids, "n_uninformative_pairs": n_same + n_same_test,
               "train_seconds": train_seconds}
    if round_stats:
        metrics["rounds"] = round_stats
    if test_pairs:
        metrics["test_accuracy"] = test_stats["test/rewards/accuracy"]
        metrics.update({k.replace("/", "_"): v for k, v in test_stats.items() if k != "test/rewards/accuracy"})
        if has_gold:
            metrics["bayes_accuracy"] = bayes_accuracy(test_recs)
    samples = []
    if task is not None and has_gold:
        model.eval()
        ref, _, _ = load_policy(a.policy, "--policy", device)  # the reference again, only now that training is over
        ref.eval()
        prompts = task.sample_prompts("test", a.n_eval_prompts, seed=a.seed)
        eval_metrics, samples = compare_to_reference(model, ref, tok, task, prompts, a.max_new_tokens, seed=a.seed,
                                                     batch_size=a.eval_batch_size, device=device, dtype=dtype)
        metrics.update(eval_metrics)
    elif task is not None:
        print(f"note: {a.prefs} has no gold columns, so it is not from task {a.task!r}: skipping the gold "
              f"comparison (pass --task none to silence this)")
    metrics["total_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    run_.finish()
    out = run_.out

    if samples:
        print("samples on held-out prompts (prompt | response | gold):")
        for s in samples[:5]:
            print(f"  {s['prompt']!r} | {s['response']!r}{'' if s['eos'] else '  [no EOS]'} | {s['gold']:.2f}")
    show = [("test_accuracy", "bayes_accuracy"), ("win_rate_vs_ref", "kl_mean"), ("gold_mean", "ref_gold_mean")]
    for pair in show:
        present = [f"{k}={metrics[k]:.4f}" for k in pair if k in metrics]
        if present:
            print("  ".join(present))
    print(f"wrote {out}/model.pt, config.json, tokenizer.json, ref_logps.pt, metrics.jsonl, metrics.json "
          f"({metrics['total_seconds']:.0f}s)")


if __name__ == "__main__":
    run(main)
