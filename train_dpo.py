"""Direct Preference Optimization: train the policy straight on preference pairs (no reward model, no sampling).

    python train_dpo.py                                   # out/rm/prefs.jsonl on top of out/sft, CPU-sized defaults
    python train_dpo.py --prefs my_prefs.jsonl --task none   # your {"prompt", "chosen", "rejected"} records
    python train_dpo.py --loss ipo --beta 0.5             # IPO; also --loss hinge, --label-smoothing 0.1, --nll-coef

Rafailov et al. 2023 (2305.18290) show that the KL-regularised RLHF objective max E[r] - beta KL(pi || ref) has the
optimum pi*(y|x) = ref(y|x) exp(r(x, y) / beta) / Z(x), so r = beta log(pi / ref) + beta log Z(x). Put this
"implicit reward" into the Bradley-Terry likelihood of the labels and Z cancels: the policy is fitted to the
preferences directly, by a classification loss on delta = log-ratio(chosen) - log-ratio(rejected).

The reference is the starting policy. Its log-probs of every chosen/rejected response are computed once before
training and cached in the run directory (ref_logps.pt), so no second model sits in memory while training.

Why --nll-coef defaults to 0.2 (DPO + NLL on the chosen response, as in Pang et al. 2024, 2404.19733): plain DPO
only constrains the *difference* of two log-ratios, and pushing a rejected response down raises the logsumexp,
i.e. every other token's probability (the "squeezing" of Ren & Sutherland 2024, 2407.10490). Here 372 of the 438
tokens never occur in the data; Adam scales their tiny, sign-noisy output gradients up to full-size steps, and
plain DPO (3,600 pairs, 3 epochs at lr 3e-4) ended up sampling byte garbage: 11% of next-token mass on unused
tokens, gold -1.3 vs -0.2 for SFT, KL 26 nats. The chosen-NLL term pushes those tokens down consistently; with it
lr 1e-3 for 170-190 steps beat SFT in 75-79% of paired gold comparisons at 1.4-1.6 nats of KL on three
preference files. Chosen log-probs still fall a little (expected, DPO reference repo #8); watch logps/chosen and
test/logps/chosen in metrics.jsonl.
"""
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.checkpoint import load_policy, save_run
from minirlhf.data import collate_sft, encode_prompt, encode_response, load_pref_jsonl
from minirlhf.evaluation import compare_to_reference
from minirlhf.losses import preference_loss, token_logps
from minirlhf.preferences import bayes_accuracy, has_gold_columns, split_prefs
from minirlhf.runs import FiniteCheck, Run, rng_state, set_rng_state
from minirlhf.tasks import get_task
from minirlhf.utils import (MetricsLog, Progress, adamw, cosine_lr, UserError, arg, autocast, parse_args, resolve_device,
                            resolve_dtype, run, set_seed, torch_save, write_json)

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
    nll_coef: float = arg(0.2, "add this times the chosen responses' per-token NLL (keeps chosen log-probs up; "
                               "0 = plain DPO, see the module docstring)")
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
    max_new_tokens: int = arg(48, "response budget when sampling for the evaluation")


# ----------------------------------------------------------------------------------------------- data
def subsample(records, n: int, seed: int):
    """A seeded random subset of at most n records (all of them when n is 0), in file order."""
    if not n or len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def encode_pairs(records, tok, block_size: int):
    """[(prompt_ids, chosen_ids, rejected_ids)] with BOS + prompt and response + EOS, each sequence cut to fit the
    context (a cut response has no EOS). Returns (pairs, number of responses cut)."""
    pairs, n_cut = [], 0
    for r in records:
        p = encode_prompt(tok, r["prompt"], block_size, r["_where"], reserve=2)
        c, cut_c = encode_response(tok, r["chosen"], block_size + 1 - len(p))
        rj, cut_r = encode_response(tok, r["rejected"], block_size + 1 - len(p))
        pairs.append((p, c, rj))
        n_cut += cut_c + cut_r
    return pairs, n_cut


# ----------------------------------------------------------------------------------------------- log-probs
def pair_batch(pairs, pad_id: int, device):
    """One batch of 2B sequences: the B chosen, then the B rejected, in the SFT layout (BOS + prompt + response,
    right-padded, loss_mask on response tokens and EOS). Right padding with plain causal attention gives the
    same positions and logits as the left-padded scoring layout, and every sequence fits the context."""
    return collate_sft([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id, device)


def pair_logps(model, batch, device, dtype):
    """One forward over chosen and rejected together. Returns summed log-probs (2B,) and response lengths (2B,)."""
    with autocast(device, dtype):
        logits = model(batch["idx"])  # (2B, T, V)
    mask = batch["loss_mask"]
    return token_logps(logits, batch["targets"], mask).sum(1), mask.sum(1)


@torch.no_grad()
def all_pair_logps(model, pairs, pad_id, device, dtype, batch_size):
    """Log-probs and lengths of every pair: two tensors (N, 2), column 0 = chosen, 1 = rejected."""
    was_training = model.training
    model.eval()
    logps, lens = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        lp, n = pair_logps(model, pair_batch(chunk, pad_id, device), device, dtype)
        logps.append(torch.stack(lp.split(len(chunk)), 1))
        lens.append(torch.stack(n.split(len(chunk)), 1))
    model.train(was_training)
    empty = torch.zeros(0, 2, device=device)
    return (torch.cat(logps) if logps else empty), (torch.cat(lens) if lens else empty)


def reference_logps(model, train_pairs, test_pairs, a: Args, tok, device, dtype, out: Path, also=()):
    """Reference log-probs (N, 2) of the train and test pairs, computed once with the starting policy (before any
    update) and cached in the run directory `out`; the cache is reused only when the prefs file, the reference
    checkpoint and the split are the same. A cache in one of the folders `also` (the finished run a rerun will
    replace) is reused too, and copied into `out`."""
    h = hashlib.sha256()
    for path in (Path(a.prefs), Path(a.policy) / "model.pt"):
        h.update(path.read_bytes())
    h.update(json.dumps([a.test_frac, a.max_pairs, a.max_test_pairs, a.seed, model.config.block_size, dtype]).encode())
    key, cache = h.hexdigest(), out / "ref_logps.pt"
    for found in [cache] + [Path(d) / "ref_logps.pt" for d in also]:
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
            return saved["train"].to(device), saved["test"].to(device)
    t0 = time.time()
    ref_train, _ = all_pair_logps(model, train_pairs, tok.pad_id, device, dtype, a.eval_batch_size)
    ref_test, _ = all_pair_logps(model, test_pairs, tok.pad_id, device, dtype, a.eval_batch_size)
    torch_save(cache, {"key": key, "train": ref_train.cpu(), "test": ref_test.cpu()})
    print(f"reference log-probs of {len(train_pairs) + len(test_pairs)} pairs in {time.time() - t0:.1f}s -> {cache}")
    return ref_train, ref_test


# ----------------------------------------------------------------------------------------------- loss + stats
def dpo_step_loss(logps, lens, ref, a: Args):
    """The training objective and the usual DPO diagnostics for one batch.

    logps, lens (2B,) = policy log-probs and lengths of [chosen; rejected]; ref (B, 2) reference log-probs.
    Returns (loss, stats): rewards/* = beta * log-ratio (the implicit reward of Rafailov et al., eq. 5, up to
    beta log Z(x)); accuracy = share of pairs whose implicit reward ranks chosen first (ties half)."""
    B = ref.size(0)
    pi_c, pi_r = logps[:B], logps[B:]
    ref_c, ref_r = ref[:, 0], ref[:, 1]
    if a.loss == "ipo" and a.ipo_length_average:  # per-token log-ratios: the margin no longer grows with length
        n_c, n_r = lens[:B].clamp(min=1), lens[B:].clamp(min=1)
        pi_c, pi_r, ref_c, ref_r = pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r
    losses = preference_loss(a.loss, pi_c, pi_r, ref_c, ref_r, a.beta, a.label_smoothing)  # (B,)
    loss = losses.mean()
    nll = -logps[:B].sum() / lens[:B].sum().clamp(min=1)  # per-token NLL of the chosen responses (as SFT's loss)
    if a.nll_coef:
        loss = loss + a.nll_coef * nll
    with torch.no_grad():
        r_c, r_r = a.beta * (pi_c - ref_c), a.beta * (pi_r - ref_r)
        stats = {"loss": loss.item(), "pref_loss": losses.mean().item(), "nll_chosen": nll.item(),
                 "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                 "rewards/accuracy": ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean().item(),
                 "rewards/margin": (r_c - r_r).mean().item(),
                 "logps/chosen": logps[:B].mean().item(), "logps/rejected": logps[B:].mean().item()}
    return loss, stats


@torch.no_grad()
def test_pair_stats(model, pairs, ref, a: Args, tok, device, dtype):
    """The same diagnostics on the test pairs (pair-weighted means over all of them), prefixed 'test/'."""
    logps, lens = all_pair_logps(model, pairs, tok.pad_id, device, dtype, a.eval_batch_size)
    _, stats = dpo_step_loss(torch.cat([logps[:, 0], logps[:, 1]]), torch.cat([lens[:, 0], lens[:, 1]]), ref, a)
    return {f"test/{k}": v for k, v in stats.items()}


def main():
    a = parse_args(Args)
    if a.loss not in LOSSES:
        raise UserError(f"--loss {a.loss}: choose one of {', '.join(LOSSES)}")
    if not 0.0 <= a.label_smoothing < 0.5:
        raise UserError(f"--label-smoothing {a.label_smoothing}: must be in [0, 0.5)")
    if a.label_smoothing and a.loss != "sigmoid":
        raise UserError("--label-smoothing only applies to --loss sigmoid")
    if a.beta <= 0:
        raise UserError(f"--beta {a.beta}: must be > 0")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    set_seed(a.seed)
    task = None if a.task.lower() == "none" else get_task(a.task)
    run_ = Run(a.out_dir, a, resume=a.resume)  # before any work: is the output location writable?
    state = run_.load_resume()

    # ---- policy (= reference) and pairs
    model, tok, _ = load_policy(a.policy, "--policy", device)
    block_size = model.config.block_size
    records = load_pref_jsonl(a.prefs)
    has_gold = has_gold_columns(records)
    train_recs, test_recs = split_prefs(records, a.test_frac, a.seed)
    n_all = len(train_recs), len(test_recs)
    train_recs, test_recs = subsample(train_recs, a.max_pairs, a.seed), subsample(test_recs, a.max_test_pairs, a.seed)
    train_pairs, n_cut = encode_pairs(train_recs, tok, block_size)
    test_pairs, n_cut_test = encode_pairs(test_recs, tok, block_size)
    if n_cut + n_cut_test:
        print(f"warning: {n_cut + n_cut_test} responses were longer than the context and were cut (no EOS)")
    print(f"{len(train_pairs)} train / {len(test_pairs)} test pairs (of {n_all[0]} / {n_all[1]}) from {a.prefs}, "
          f"policy {a.policy} "
          f"({model.num_params() / 1e6:.2f}M parameters), loss {a.loss}, beta {a.beta}, device {device} ({dtype})")

    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir
    t0 = time.time()
    ref_train, ref_test = reference_logps(model, train_pairs, test_pairs, a, tok, device, dtype, out,
                                          also=[run_.out])
    ref_train, ref_test = ref_train.to(device), ref_test.to(device)

    opt = adamw(model, a.lr, a.weight_decay, device)
    train_model = torch.compile(model) if a.compile else model

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

    if state is None and a.save_interval:  # so that a crash from here on keeps the reference log-probs
        save_resume(0)
    bar = Progress(range(start, total), desc="dpo", total=total)
    for step in bar:
        lr = cosine_lr(step, total, a.lr, a.min_lr, a.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < a.batch_size:  # next epoch; the tail of the last one joins it (every pair is seen)
            order = torch.cat([order, torch.randperm(len(train_pairs), generator=gen)])
        idx, order = order[:a.batch_size], order[a.batch_size:]
        logps, lens = pair_logps(train_model, pair_batch([train_pairs[i] for i in idx], tok.pad_id, device),
                                 device, dtype)
        loss, stats = dpo_step_loss(logps, lens, ref_train[idx.to(device)], a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else 1e9)
        opt.step()
        finite.watch(step, loss=loss, grad_norm=grad_norm)
        last = step == total - 1
        if test_pairs and (step % a.eval_interval == 0 or last):
            test_stats = test_pair_stats(model, test_pairs, ref_test, a, tok, device, dtype)
        if step % a.log_interval == 0 or last:
            finite.check()  # a NaN stops the run here, naming its step, before anything is logged or saved
            row = {"step": step, "epoch": (step + 1) / steps_per_epoch, **stats, **test_stats, "lr": lr,
                   "grad_norm": grad_norm.item(), "elapsed_s": time.time() - t0}
            log.write(row)
            bar.log(step, loss=stats["loss"], acc=stats["rewards/accuracy"],
                    test_acc=test_stats.get("test/rewards/accuracy", float("nan")), chosen=stats["logps/chosen"])
        if a.save_interval and (step + 1) % a.save_interval == 0 and not last:
            save_resume(step + 1)
    log.close()
    finite.check(model)
    train_seconds = time.time() - t0
    save_run(out, model, tok, a, kind="policy", stage="dpo", reference=a.policy)

    # ---- final numbers: implicit-reward accuracy on test pairs beside the Bayes ceiling, then gold vs reference
    metrics = {"train_loss": stats["loss"], "train_accuracy": stats["rewards/accuracy"],
               "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs), "n_file_pairs": sum(n_all),
               "train_seconds": train_seconds}
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
