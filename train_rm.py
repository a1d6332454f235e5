"""Stage 2 of RLHF: collect preferences on the SFT model's own samples and fit a Bradley-Terry reward model.

    python train_rm.py                                 # built-in simulated human, after python train_sft.py
    python train_rm.py --prefs my_prefs.jsonl          # your {"prompt", "chosen", "rejected"} records
    python train_rm.py --device cuda --n-prompts 20000 --batch-size 256   # same script, bigger
    torchrun --standalone --nproc_per_node 2 train_rm.py ...   # sampling and training sharded across 2 processes

Writes out/rm: model.pt (a ScalarModel read at the EOS token, its gain/bias normalising fresh SFT samples' rewards
to mean 0, std 1), config.json, tokenizer.json, prefs.jsonl, metrics.jsonl, metrics.json.
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.evaluation.metrics import reward_model_vs_gold
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import load_policy
from minirlhf.harness.cli import RunArgs, arg, parse_args, run
from minirlhf.harness.stage import Stage
from minirlhf.losses import bradley_terry_loss
from minirlhf.model import ScalarModel, compile_model
from minirlhf.preferences import (all_pair_rewards, bayes_accuracy, fit_normalisation, group_batches, groups_of,
                                  has_gold_columns, pair_rewards, pairwise_accuracy, preference_records)
from minirlhf.sampling import sample_many
from minirlhf.tasks import get_task
from minirlhf.utils import adamw, autocast, cosine_lr


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Preference collection and Bradley-Terry reward model (stage 2 of RLHF)."""
    out_dir: str = arg("out/rm", "run directory to write")
    policy: str = arg("out/sft", "SFT run directory: the policy that is sampled, and the trunk the RM starts from")
    task: str = arg("reviews", "built-in task (minirlhf/tasks/<task>.py): prompts, annotator and gold reward")
    prefs: Optional[str] = arg(None, "JSONL of {prompt, chosen, rejected} records instead of collecting them")
    compile: bool = arg(False, "torch.compile the reward model")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial (its collected preferences too)")
    save_interval: int = arg(50, "steps between resume checkpoints (0 = none)", ">= 0")
    # preference collection (built-in task)
    n_prompts: int = arg(1024, "train prompts; k samples each, all pairs labelled", "> 0")
    n_test_prompts: int = arg(256, "test prompts (the task's held-out split) for the test pairs", "> 0")
    k: int = arg(8, "samples per prompt; all k-choose-2 pairs are labelled (InstructGPT: k = 4..9)",
                 ">= 2 (need at least 2 samples per prompt to form a pair)")
    max_new_tokens: int = arg(48, "response budget when sampling (samples without EOS are not paired)", "> 0")
    gen_batch_size: int = arg(512, "sequences per sampling batch", "> 0")
    test_frac: float = arg(0.1, "--prefs without a split field: share of prompts held out as test pairs", "in [0, 1)")
    max_pairs: int = arg(0, "train on a seeded subset of this many train pairs, whole prompts at a time (0 = all)",
                         ">= 0")
    # optimisation
    epochs: float = arg(2.0, "passes over the train pairs", "> 0")
    min_steps: int = arg(0, "train at least this many steps (more passes over a small --max-pairs subset)", ">= 0")
    batch_size: int = arg(8, "comparison groups (prompts, with all their pairs) per step", "> 0")
    lr: float = arg(2e-3, "peak learning rate", "> 0")
    min_lr: float = arg(1e-4, "final learning rate of the cosine schedule", ">= 0")
    warmup_steps: int = arg(10, "linear warmup steps", ">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)", ">= 0")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)", ">= 0")
    margin: float = arg(0.0, "Bradley-Terry margin: chosen must win by this much", ">= 0")
    center_coef: float = arg(0.01, "reward centering coefficient, c * mean((r_c + r_r)^2) (Eisenstein et al. 2023)",
                             ">= 0")
    log_interval: int = arg(10, "steps between metrics.jsonl lines", "> 0")
    eval_interval: int = arg(50, "steps between test-accuracy evaluations", "> 0")
    eval_batch_size: int = arg(512, "pairs per batch when evaluating", "> 0")
    # normalisation and evaluation on fresh samples
    n_norm: int = arg(1024, "fresh SFT samples of train prompts the reward is normalised on (mean 0, std 1)",
                      ">= 2 (a standard deviation)")
    n_eval: int = arg(1024, "fresh SFT samples of test prompts for the RM-vs-gold correlations", ">= 2 (a correlation)")


def main(argv=None):
    args = parse_args(Args, argv)
    task = get_task(args.task)  # (imports a module: no random draws before the seed is set)
    st = Stage("train_rm.py", args, inputs={"--policy": args.policy, "--prefs": args.prefs})
    device, dtype = st.device, st.dtype
    policy, tok, _ = load_policy(args.policy, "--policy", device)  # the policy whose samples are compared
    policy.eval()
    cfg = policy.config  # dropout already forced to 0 by load_run
    kw = dict(batch_size=args.gen_batch_size, device=device, dtype=dtype)

    # ---- preference pairs: collected from the simulated human, or the user's file; as (chosen, rejected) sequences
    train_recs, train_pairs, test_recs, test_pairs, stats, norm_prompts, task_file = preference_records(
        args, st.dir, policy, tok, task, kw)
    groups = groups_of(train_recs)
    print(f"{len(train_pairs)} train pairs ({len(groups)} prompts) / {len(test_pairs)} test pairs, "
          f"collected in {st.elapsed():.1f}s" + (f"; {stats}" if stats else ""))

    # ---- reward model: SFT trunk + scalar head (N(0, 1/sqrt(d+1)) init in ScalarModel), dropout off
    rm = ScalarModel(cfg)
    rm.gpt.load_state_dict(policy.state_dict())
    rm.to(device)
    opt = adamw(rm, args.lr, args.weight_decay, device)
    train_rm = compile_model(dist.wrap(rm, device), args.compile)  # DDP under torchrun, else the model itself
    eval_pad = {}  # padding share of the length-batched evaluation passes (all_pair_rewards)

    def evaluate(pairs):
        """Raw (unnormalised) BT loss and accuracy over all pairs."""
        rc, rr = all_pair_rewards(rm, pairs, tok.pad_id, args.eval_batch_size, device, dtype, stats=eval_pad)
        return bradley_terry_loss(rc, rr, args.margin).item(), pairwise_accuracy(rc, rr)

    steps_per_epoch = math.ceil(len(groups) / args.batch_size)  # a step: --batch-size prompts with all their pairs
    total_steps = max(1, args.min_steps, round(args.epochs * steps_per_epoch))
    t_train = time.time()
    extra = {"test_accuracy": float("nan"), "pairs_seen": 0, **st.resume(model=rm, optimizer=opt)}
    if st.saved is None and args.save_interval:  # so that a crash from here on keeps the collected preferences
        st.checkpoint(0, **extra)
    rm.train()
    batch_iter = group_batches(groups, args.batch_size, args.seed, skip=st.start)  # a resumed run replays the order
    bar = st.steps(total_steps, "rm")
    for step in bar:
        lr = cosine_lr(step, total_steps, args.lr, args.min_lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = next(batch_iter)  # the global batch: the same on every rank
        mine = dist.shard(idx)  # this rank's pairs (contiguous: the pairs of a prompt mostly stay together)
        # A rank left without pairs (fewer pairs than processes) scores one at weight 0, to join DDP's all-reduce.
        with autocast(device, dtype):
            rc, rr = pair_rewards(train_rm, [train_pairs[i] for i in mine or idx[:1]], tok.pad_id, device)  # (b,)
            loss = dist.global_mean(bradley_terry_loss(rc, rr, args.margin, args.center_coef), len(mine))
        grad_norm, = st.optimize(opt, loss, rm, step=step)
        extra["pairs_seen"] += len(idx)
        last = step == total_steps - 1
        if step % args.eval_interval == 0 or last:
            _, extra["test_accuracy"] = evaluate(test_pairs)
        if step % args.log_interval == 0 or last:
            st.check({}, step)  # a NaN stops the run here, naming its step, before anything is logged or saved
            # the logged numbers are those of the global batch (a rank's real pairs only)
            rc, rr = dist.all_gather_cat(rc[:len(mine)].detach()), dist.all_gather_cat(rr[:len(mine)].detach())
            both = torch.cat([rc, rr])
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": dist.mean_over_ranks(loss.detach()).item(),
                   "accuracy": pairwise_accuracy(rc, rr), "test_accuracy": extra["test_accuracy"],
                   "margin_mean": (rc - rr).mean().item(), "reward_mean": both.mean().item(),
                   "reward_std": both.std().item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "pairs_per_s": extra["pairs_seen"] / st.elapsed(), "elapsed_s": st.elapsed()}
            st.log(row, step)
            bar.log(step, loss=row["loss"], acc=row["accuracy"], test=extra["test_accuracy"])
        st.save(step, last, **extra)
    st.finite.check(rm)
    train_seconds = time.time() - t_train

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
    norm_samples = sample_many(policy, tok, norm_prompts, args.max_new_tokens, seed=args.seed + 2, desc="normalise",
                               **kw)
    raw_mean, raw_std, n_norm_used = fit_normalisation(rm, tok, norm_samples, args.eval_batch_size, device, dtype)
    print(f"reward normalised on {n_norm_used} of {len(norm_samples)} fresh SFT samples (those that ended with EOS)")
    metrics.update(raw_reward_mean=raw_mean, raw_reward_std=raw_std, gain=rm.gain.item(), bias=rm.bias.item(),
                   n_norm_used=n_norm_used)

    # ---- does the RM rank fresh samples of held-out prompts like the hidden gold reward does, and how does it price
    # each part of the gold reward (a part it does not see is one a policy can exploit)?
    if not args.prefs or task_file:
        samples = sample_many(policy, tok, task.sample_prompts("test", args.n_eval, seed=args.seed + 1),
                              args.max_new_tokens, seed=args.seed + 3, desc="evaluate", **kw)
        metrics.update(reward_model_vs_gold(rm, tok, task, samples, args.eval_batch_size, device, dtype))
    metrics.update(n_train_pairs=len(train_pairs), n_test_pairs=len(test_pairs), **stats, steps=total_steps,
                   train_seconds=train_seconds, total_seconds=st.elapsed())
    st.save_model(rm, tok, kind="reward", stage="rm", sft=args.policy, normalisation={
        "fit_on": f"{n_norm_used} EOS-ended of {len(norm_samples)} fresh SFT samples of train prompts",
        "n_samples": n_norm_used, "raw_mean": raw_mean, "raw_std": raw_std})
    (st.dir / "collected.json").unlink(missing_ok=True)  # prefs.jsonl holds the same pairs
    st.finish(metrics)

    print("reward model: " + ", ".join(f"{k} {'n/a' if metrics.get(k) is None else format(metrics[k], '.4f')}" for k in
                                       ("test_accuracy", "bayes_accuracy", "accuracy_vs_bayes", "gold_accuracy",
                                        "gold_pearson", "gold_spearman", "train_loss", "train_accuracy", "test_loss")))
    if "gold_part_weights" in metrics:  # in gold units; the gold reward's own weight in brackets
        w = metrics["gold_part_weights"]
        print("  weights (gold): " + ", ".join(f"{k} {'n/a' if v is None else f'{v:+.2f}'} "
                                               f"({w['gold_weights'][k]:+.2f})" for k, v in w["weights"].items()))
    print(f"  {'pairs':<18} {len(train_pairs)} train / {len(test_pairs)} test, {st.elapsed():.0f}s in all")


if __name__ == "__main__":
    run(main)
