"""Stage 2 of RLHF: collect preferences on the SFT model's own samples and fit a Bradley-Terry reward model.

    python train_rm.py                                 # built-in simulated human, after python train_sft.py
    python train_rm.py --prefs my_prefs.jsonl          # your {"prompt", "chosen", "rejected"} records
    python train_rm.py --device cuda --n-prompts 20000 --batch-size 256   # same script, bigger
    torchrun --standalone --nproc_per_node 2 train_rm.py ...   # sampling and training sharded across 2 processes

Writes out/rm: model.pt + config.json + tokenizer.json (load with checkpoint.load_scalar; the gain/bias buffers
normalise rewards of fresh SFT samples to mean 0, std 1), prefs.jsonl (train and test pairs), metrics.jsonl and
metrics.json. The reward of a sequence is the scalar head read at its EOS token (scoring.reward_at_eos).
"""
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.data import DataError, load_pref_jsonl
from minirlhf.evaluation.metrics import gold_parts, reward_weights
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import load_policy, save_run
from minirlhf.harness.cli import (FRACTION, NON_NEGATIVE, POSITIVE, MetricsLog, Progress, arg, check_flags, parse_args,
                                  resolve_device, resolve_dtype, run, set_seed)
from minirlhf.harness.files import read_json, write_json
from minirlhf.harness.runs import FiniteCheck, Run, rng_state, set_rng_state
from minirlhf.losses import bradley_terry_loss
from minirlhf.model import ScalarModel
from minirlhf.preferences import (all_pair_rewards, bayes_accuracy, collect_preferences, encode_pairs,
                                  fit_normalisation, groups_of, has_gold_columns, informative_pairs, pair_rewards,
                                  pairwise_accuracy, pearson, spearman, split_prefs, subsample_groups, token_id_counts)
from minirlhf.sampling import reward_model_scores, sample_many
from minirlhf.tasks import get_task
from minirlhf.utils import UserError, adamw, autocast, check, cosine_lr


@dataclass
class Args:
    """Preference collection and Bradley-Terry reward model (stage 2 of RLHF)."""
    out_dir: str = arg("out/rm", "run directory to write")
    sft: str = arg("out/sft", "SFT run directory: the policy that is sampled, and the trunk the RM starts from")
    task: str = arg("reviews", "built-in task (minirlhf/tasks/<task>.py): prompts, annotator and gold reward")
    prefs: Optional[str] = arg(None, "JSONL of {prompt, chosen, rejected} records instead of collecting them "
                                     "(optional: split = train|test; chosen_gold, rejected_gold, label_prob)")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    seed: int = arg(0, "random seed")
    compile: bool = arg(False, "torch.compile the reward model")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial (its collected preferences and last "
                              "resume checkpoint)")
    save_interval: int = arg(50, "steps between resume checkpoints in <out-dir>.partial (0 = none; the collected "
                                 "preferences are kept there either way)")
    # preference collection (built-in task)
    n_prompts: int = arg(1024, "train prompts; k samples each, all pairs labelled")
    n_test_prompts: int = arg(256, "test prompts (the task's held-out split) for the test pairs")
    k: int = arg(8, "samples per prompt; all k-choose-2 pairs are labelled (InstructGPT: k = 4..9)")
    max_new_tokens: int = arg(48, "response budget when sampling (samples without EOS are not paired)")
    gen_batch_size: int = arg(512, "sequences per sampling batch")
    test_frac: float = arg(0.1, "--prefs without a split field: share of prompts held out as test pairs")
    max_pairs: int = arg(0, "train on a seeded random subset of this many train pairs, whole prompts' groups at a "
                            "time (0 = all; the test pairs are kept; for reward models of several data sizes)")
    # optimisation
    epochs: float = arg(2.0, "passes over the train pairs")
    min_steps: int = arg(0, "train at least this many steps (more passes over a small --max-pairs subset, which 2 "
                            "epochs would give too few steps to leave the warmup; overopt.py uses 100)")
    batch_size: int = arg(8, "comparison groups (prompts, with all their pairs) per step")
    lr: float = arg(2e-3, "peak learning rate")
    min_lr: float = arg(1e-4, "final learning rate of the cosine schedule")
    warmup_steps: int = arg(10, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)")
    margin: float = arg(0.0, "Bradley-Terry margin: chosen must win by this much")
    center_coef: float = arg(0.01, "reward centering coefficient, c * mean((r_c + r_r)^2) (Eisenstein et al. 2023)")
    log_interval: int = arg(10, "steps between metrics.jsonl lines")
    eval_interval: int = arg(50, "steps between test-accuracy evaluations")
    eval_batch_size: int = arg(512, "pairs per batch when evaluating")
    # normalisation and evaluation on fresh samples
    n_norm: int = arg(1024, "fresh SFT samples on train prompts that the reward is normalised on (mean 0, std 1)")
    n_eval: int = arg(1024, "fresh SFT samples on test prompts for the RM-vs-gold correlations (built-in task)")


def validate(a: Args):
    """Every flag's range, before any work (one line naming the flag, exit 2)."""
    check(a.k >= 2, f"--k {a.k}: must be >= 2 (need at least 2 samples per prompt to form a pair)")
    check_flags(a, {"n_prompts": POSITIVE, "n_test_prompts": POSITIVE, "max_new_tokens": POSITIVE,
                    "max_pairs": NON_NEGATIVE, "gen_batch_size": POSITIVE, "test_frac": FRACTION, "epochs": POSITIVE, "min_steps": NON_NEGATIVE, "batch_size": POSITIVE,
                    "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE,
                    "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "margin": NON_NEGATIVE,
                    "center_coef": NON_NEGATIVE, "log_interval": POSITIVE, "eval_interval": POSITIVE,
                    "eval_batch_size": POSITIVE, "n_norm": (lambda v: v >= 2, ">= 2 (a standard deviation)"),
                    "n_eval": (lambda v: v >= 2, ">= 2 (a correlation)")})


def read_collected(path):
    """The preferences collected before a crash (collected.json in the staging folder), checked before reuse."""
    saved = read_json(path, "--resume")
    ok = isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("train", "test")) \
        and isinstance(saved.get("stats"), dict) and all(isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                                         for r in saved["train"] + saved["test"])
    if not ok:
        raise UserError(f"--resume: {path} is damaged; run without --resume to collect the preferences again")
    return saved


def main(argv=None):
    a = parse_args(Args, argv)
    validate(a)
    device = dist.setup(resolve_device(a.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(a.dtype, device)
    set_seed(a.seed)
    task = get_task(a.task)
    t_start = time.time()
    # before any work: is the output location writable, free and no input of the run?
    run_ = Run(a.out_dir, a, resume=a.resume, inputs={"--sft": a.sft, "--prefs": a.prefs})
    state = run_.load_resume()
    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir

    # ---- the policy whose samples are compared (and whose trunk the reward model starts from)
    policy, tok, _ = load_policy(a.sft, "--sft", device)  # CheckpointError if missing or its tokenizer mismatches
    policy.eval()
    cfg = policy.config  # dropout already forced to 0 by load_run
    kw = dict(batch_size=a.gen_batch_size, device=device, dtype=dtype, distributed=dist.enabled())

    # ---- preference pairs: collected from the simulated human, or the user's file
    stats, task_file = {}, False
    collected = out / "collected.json"  # the simulated human's labels, kept across --resume (~20 s of sampling)
    # under torchrun rank 0 reads its staging folder and every rank gets the same pairs
    saved = dist.broadcast_object(read_collected(collected) if a.resume and not a.prefs and dist.is_main()
                                  and collected.is_file() else None)
    if saved is not None:
        train_recs, test_recs, stats = saved["train"], saved["test"], saved["stats"]
        norm_prompts = task.sample_prompts("train", a.n_norm, seed=a.seed + 1)
        print(f"reusing the {len(train_recs) + len(test_recs)} preference pairs collected in {collected}")
    elif a.prefs:
        records = load_pref_jsonl(a.prefs)
        # checks the optional numeric columns now (FILE:LINE), not after training; with gold columns the file
        # comes from the built-in task, whose gold reward then also scores the RM on fresh samples (below)
        task_file = has_gold_columns(records)
        train_recs, test_recs = split_prefs(records, a.test_frac, a.seed)
        if not test_recs:
            raise DataError(f"--prefs {a.prefs}: no test pairs (add more prompts, or set the \"split\" field)")
        norm_prompts = sorted({r["prompt"] for r in train_recs})  # fresh samples for normalisation on these
        norm_prompts = [norm_prompts[i % len(norm_prompts)] for i in range(a.n_norm)]
    else:
        train_prompts = task.sample_prompts("train", a.n_prompts, seed=a.seed)
        test_prompts = task.sample_prompts("test", a.n_test_prompts, seed=a.seed)
        train_recs, s_train = collect_preferences(policy, tok, task, train_prompts, a.k, a.max_new_tokens, "train",
                                                  seed=a.seed, **kw)
        test_recs, s_test = collect_preferences(policy, tok, task, test_prompts, a.k, a.max_new_tokens, "test",
                                                seed=a.seed + 1, **kw)
        stats = {k: s_train[k] + s_test[k] for k in s_train}
        if stats["n_dropped_no_eos"] > 0.5 * stats["n_samples"]:
            print(f"warning: {stats['n_dropped_no_eos']} of {stats['n_samples']} samples did not end with EOS "
                  f"within --max-new-tokens {a.max_new_tokens} and were not paired")
        if not train_recs or not test_recs:
            raise DataError(f"no preference pairs: of {stats['n_samples']} samples, {stats['n_dropped_no_eos']} "
                            f"lacked EOS and {stats['n_duplicates']} were duplicates (train the SFT model longer or "
                            f"raise --max-new-tokens / --k)")
        norm_prompts = task.sample_prompts("train", a.n_norm, seed=a.seed + 1)
        write_json(collected, {"train": train_recs, "test": test_recs, "stats": stats})
    # one file, both splits; "_where" (file:line of a user's record) is not data. Under torchrun every rank
    # holds the same records (sample_many gathers the sharded samples in order): rank 0's file is the
    # one-process run's file.
    with open(out / "prefs.jsonl", "w") as f:
        for r in train_recs + test_recs:
            f.write(json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n")

    # the sampled token ids when the file has them for this tokenizer, else the text re-encoded
    n_ids, n_other = token_id_counts(train_recs + test_recs, tok)
    if n_other:
        print(f"warning: {n_other} pairs carry token ids of another tokenizer than --sft {a.sft}'s; their text is "
              f"re-encoded instead")
    train_pairs, n_cut = encode_pairs(train_recs, tok, cfg.block_size, cfg.vocab_size)
    test_pairs, n_cut_test = encode_pairs(test_recs, tok, cfg.block_size, cfg.vocab_size)
    if n_cut + n_cut_test:
        print(f"warning: {n_cut + n_cut_test} responses were longer than the context and were cut (no EOS; "
              f"scored at their last token)")
    train_recs, train_pairs, n_same = informative_pairs(train_recs, train_pairs, "train pairs")
    test_recs, test_pairs, n_same_test = informative_pairs(test_recs, test_pairs, "test pairs")
    stats.update(n_pairs_from_ids=n_ids, n_uninformative_pairs=n_same + n_same_test)
    if a.max_pairs and len(train_pairs) > a.max_pairs:
        keep = subsample_groups(train_recs, a.max_pairs, a.seed)
        print(f"--max-pairs {a.max_pairs}: training on {len(keep)} of the {len(train_pairs)} train pairs")
        stats["n_train_pairs_available"] = len(train_pairs)
        train_recs, train_pairs = [train_recs[i] for i in keep], [train_pairs[i] for i in keep]
    groups = groups_of(train_recs)
    print(f"{len(train_pairs)} train pairs ({len(groups)} prompts) / {len(test_pairs)} test pairs, "
          f"collected in {time.time() - t_start:.1f}s" + (f"; {stats}" if stats else ""))

    # ---- reward model: SFT trunk + scalar head (N(0, 1/sqrt(d+1)) init in ScalarModel), dropout off
    rm = ScalarModel(cfg)
    rm.gpt.load_state_dict(policy.state_dict())
    rm.to(device)
    opt = adamw(rm, a.lr, a.weight_decay, device)
    train_rm = dist.wrap(rm, device)  # DDP under torchrun (averages gradients), else the model itself
    train_rm = torch.compile(train_rm) if a.compile else train_rm

    eval_pad = {}  # padding share of the length-batched evaluation passes (all_pair_rewards)

    def evaluate(pairs):
        """Raw (unnormalised) BT loss and accuracy over all pairs."""
        rc, rr = all_pair_rewards(rm, pairs, tok.pad_id, a.eval_batch_size, device, dtype, stats=eval_pad)
        return bradley_terry_loss(rc, rr, a.margin).item(), pairwise_accuracy(rc, rr)

    # Each step takes `batch_size` whole comparison groups (all pairs of a prompt together); an epoch is one
    # shuffled pass over the groups.
    steps_per_epoch = math.ceil(len(groups) / a.batch_size)
    total_steps = max(1, a.min_steps, round(a.epochs * steps_per_epoch))
    order_rng = random.Random(a.seed)

    def batches():
        while True:
            perm = list(range(len(groups)))
            order_rng.shuffle(perm)
            for i in range(0, len(perm), a.batch_size):
                yield [j for g in perm[i:i + a.batch_size] for j in groups[g]]

    t0, test_acc, pairs_seen, start = time.time(), float("nan"), 0, 0
    if state is not None:
        rm.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start, test_acc, pairs_seen = state["step"], state["test_accuracy"], state["pairs_seen"]
        t0 -= state["elapsed_s"]
    log = MetricsLog(out / "metrics.jsonl", keep_rows=state["log_rows"] if state else None)
    finite = FiniteCheck("train_rm.py")
    rm.train()

    def save_resume(next_step):
        run_.save_resume({"step": next_step, "model": rm.state_dict(), "optimizer": opt.state_dict(),
                          "rng": rng_state(), "test_accuracy": test_acc, "pairs_seen": pairs_seen,
                          "log_rows": log.rows, "elapsed_s": time.time() - t0}, finite, [rm])

    if state is None and a.save_interval:  # so that a crash from here on keeps the collected preferences
        save_resume(0)
    bar = Progress(range(start, total_steps), desc="rm", total=total_steps)
    batch_iter = batches()
    for _ in range(start):  # the data order is a function of the seed: replay it up to the resumed step
        next(batch_iter)
    for step in bar:
        lr = cosine_lr(step, total_steps, a.lr, a.min_lr, a.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(batch_iter)  # the global batch: the same on every rank
        mine = dist.shard(idx)  # this rank's pairs (contiguous: the pairs of a prompt mostly stay together)
        # A step with fewer pairs than processes leaves a rank none: it scores one pair at weight 0 instead, so
        # that its backward still joins DDP's gradient all-reduce.
        with autocast(device, dtype):
            rc, rr = pair_rewards(train_rm, [train_pairs[i] for i in mine or idx[:1]], tok.pad_id, device)  # (b,)
            loss = bradley_terry_loss(rc, rr, a.margin, a.center_coef)
        if dist.enabled():  # a mean over this rank's b pairs -> its share of the mean over all B (DDP averages)
            loss = loss * (len(mine) * dist.world_size() / len(idx))
            rc, rr = rc[:len(mine)], rr[:len(mine)]  # the logged statistics: this rank's real pairs only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), a.grad_clip if a.grad_clip > 0 else 1e9)
        opt.step()
        finite.watch(step, loss=loss, grad_norm=grad_norm)
        pairs_seen += len(idx)
        last = step == total_steps - 1
        if step % a.eval_interval == 0 or last:
            _, test_acc = evaluate(test_pairs)
        if step % a.log_interval == 0 or last:
            finite.check()  # a NaN stops the run here, naming its step, before anything is logged or saved
            elapsed = time.time() - t0
            if dist.enabled():  # the logged numbers are those of the global batch
                rc, rr = dist.all_gather_cat(rc.detach()), dist.all_gather_cat(rr.detach())
                loss = dist.all_reduce_sum(loss.detach()) / dist.world_size()
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(),
                   "accuracy": pairwise_accuracy(rc.detach(), rr.detach()), "test_accuracy": test_acc,
                   "margin_mean": (rc - rr).mean().item(), "reward_mean": torch.cat([rc, rr]).mean().item(),
                   "reward_std": torch.cat([rc, rr]).std().item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "pairs_per_s": pairs_seen / elapsed, "elapsed_s": elapsed}
            log.write(row)
            bar.log(step, loss=row["loss"], acc=row["accuracy"], test=test_acc)
        if a.save_interval and (step + 1) % a.save_interval == 0 and not last:
            save_resume(step + 1)
    log.close()
    finite.check(rm)
    train_seconds = time.time() - t0

    # ---- final accuracy, before normalisation (the loss is in the units the model was trained in)
    train_loss, train_acc = evaluate(train_pairs)
    test_loss, test_acc = evaluate(test_pairs)
    metrics = {"test_accuracy": test_acc, "eval_padding_share": eval_pad.get("padding_share"),
               "bayes_accuracy": None, "gold_accuracy": None, "gold_pearson": None,
               "gold_spearman": None, "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss}
    if has_gold_columns(test_recs):
        # Bayes ceiling: the best any model can do on these noisy labels is to predict the likelier label.
        metrics["bayes_accuracy"] = bayes_accuracy(test_recs)
        metrics["gold_accuracy"] = pairwise_accuracy([r["chosen_gold"] for r in test_recs],
                                                     [r["rejected_gold"] for r in test_recs])
        metrics["accuracy_vs_bayes"] = test_acc / metrics["bayes_accuracy"]

    # ---- normalisation on fresh SFT samples of train prompts: mean 0, std 1 (lm-human-preferences), on the samples
    # that ended with EOS only (the RM never saw cut-off responses; PPO replaces their score)
    norm_samples = sample_many(policy, tok, norm_prompts, a.max_new_tokens, seed=a.seed + 2, desc="normalise", **kw)
    raw_mean, raw_std, n_norm_used = fit_normalisation(rm, tok, norm_samples, a.eval_batch_size, device, dtype,
                                                       distributed=dist.enabled())
    print(f"reward normalised on {n_norm_used} of {len(norm_samples)} fresh SFT samples (those that ended with EOS)")
    metrics.update(raw_reward_mean=raw_mean, raw_reward_std=raw_std, gain=rm.gain.item(), bias=rm.bias.item(),
                   n_norm_used=n_norm_used)

    # ---- does the RM rank fresh samples of held-out prompts like the hidden gold reward does? And how does it price
    # each part of the gold reward (evaluation.reward_weights: a part it does not see is one a policy can exploit)?
    if not a.prefs or task_file:
        eval_prompts = task.sample_prompts("test", a.n_eval, seed=a.seed + 1)
        samples = sample_many(policy, tok, eval_prompts, a.max_new_tokens, seed=a.seed + 3, desc="evaluate", **kw)
        r = dist.all_gather_objects(reward_model_scores(rm, tok, dist.shard(samples), a.eval_batch_size, device,
                                                        dtype))  # each rank scores its share
        gold = [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in samples]
        metrics.update(gold_pearson=pearson(r, gold), gold_spearman=spearman(r, gold),
                       eval_reward_mean=sum(r) / len(r))
        parts = gold_parts(task, samples)
        if parts:
            metrics["gold_part_weights"] = reward_weights(parts, r, task.GOLD_WEIGHTS)
    metrics.update(n_train_pairs=len(train_pairs), n_test_pairs=len(test_pairs), **stats, steps=total_steps,
                   train_seconds=train_seconds, total_seconds=time.time() - t_start)
    dist.assert_identical(rm)  # under torchrun: every rank ends with the same weights
    save_run(out, rm, tok, a, kind="reward", stage="rm", sft=a.sft, normalisation={
        "fit_on": f"{n_norm_used} EOS-ended of {len(norm_samples)} fresh SFT samples of train prompts",
        "n_samples": n_norm_used, "raw_mean": raw_mean,
        "raw_std": raw_std})
    write_json(out / "metrics.json", metrics)
    collected.unlink(missing_ok=True)  # prefs.jsonl holds the same pairs
    run_.finish()
    if not dist.is_main():
        return
    out = run_.out

    print("reward model")
    for k in ("test_accuracy", "bayes_accuracy", "accuracy_vs_bayes", "gold_accuracy", "gold_pearson",
              "gold_spearman", "train_loss", "train_accuracy", "test_loss"):
        v = metrics.get(k)
        print(f"  {k:<18} {'n/a' if v is None else f'{v:.4f}'}")
    if "gold_part_weights" in metrics:  # in gold units; the gold reward's own weight in brackets
        w = metrics["gold_part_weights"]
        print(f"  {'weights (gold)':<18} " + ", ".join(f"{k} {'n/a' if v is None else f'{v:+.2f}'} "
                                                     f"({w['gold_weights'][k]:+.2f})" for k, v in w["weights"].items()))
    print(f"  {'pairs':<18} {len(train_pairs)} train / {len(test_pairs)} test, {time.time() - t_start:.0f}s in all")
    print(f"wrote {out}/model.pt, config.json, tokenizer.json, prefs.jsonl, metrics.jsonl, metrics.json")


if __name__ == "__main__":
    run(main)
