"""Direct Preference Optimization: train the policy straight on preference pairs (no reward model, no sampling).

    python train_dpo.py                                   # out/rm/prefs.jsonl on top of out/sft, CPU-sized defaults
    python train_dpo.py --prefs my_prefs.jsonl --task none   # your {"prompt", "chosen", "rejected"} records
    python train_dpo.py --loss ipo --beta 0.5             # IPO; also --loss hinge, --label-smoothing 0.1, --nll-coef
    python train_dpo.py --rounds 3 --reward out/rm        # online DPO: rounds 2-3 on fresh pairs ranked by the RM
    python train_dpo.py --loss simpo --beta 2 --simpo-gamma 1   # SimPO: no reference, length-normalised rewards
    python train_dpo.py --loss kto                        # KTO: chosen = desirable, rejected = undesirable examples

The policy's implicit reward beta * log(pi / ref) is fitted to the labels by a classification loss on the margin
delta = log-ratio(chosen) - log-ratio(rejected) (Rafailov et al. 2023; minirlhf/dpo.py, losses.py): reference
log-probs computed once before training (cached in ref_logps.pt); then each step a shuffled batch of pairs, chosen
and rejected in one forward, and DPO / IPO / hinge on delta (+ --nll-coef x the chosen responses' per-token NLL),
SimPO on length-normalised log-probs, or KTO on each half against its reference point z0. --rounds N: later rounds
train on fresh samples of the current policy ranked into pairs by --reward (never the gold reward).
"""
import copy
import math
from dataclasses import dataclass

import torch

from minirlhf import dpo
from minirlhf.data import DataError, load_pref_jsonl
from minirlhf.evaluation.metrics import compare_on_test_prompts
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import check_compatible, load_policy, load_scalar
from minirlhf.harness.cli import RunArgs, arg, parse_args, run
from minirlhf.harness.stage import Stage, Stats
from minirlhf.model import compile_model
from minirlhf.preferences import (bayes_accuracy, encode_splits, has_gold_columns, split_prefs, subsample,
                                  token_id_counts)
from minirlhf.tasks import get_task
from minirlhf.utils import adamw, check, cosine_lr


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Direct Preference Optimization (DPO, IPO, hinge, SimPO, KTO) on preference pairs."""
    out_dir: str = arg("out/dpo", "run directory to write")
    prefs: str = arg("out/rm/prefs.jsonl", "JSONL of {prompt, chosen, rejected} records, as train_rm.py writes them")
    policy: str = arg("out/sft", "run directory of the starting policy, which is also the frozen reference")
    task: str = arg("reviews", "built-in task whose gold reward scores the final policy; 'none' to skip (own data)")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(25, "steps between resume checkpoints (0 = none)", ">= 0")
    compile: bool = arg(False, "torch.compile the model")
    # loss
    loss: str = arg("sigmoid", "sigmoid (DPO), ipo, hinge, simpo (no reference; the paper's beta is 2-2.5) or kto "
                    "(each pair split into a desirable and an undesirable example)",
                    choices=("sigmoid", "ipo", "hinge", "simpo", "kto"))
    beta: float = arg(0.1, "beta: strength of the implicit KL penalty (rewards are beta * log-ratios)", "> 0")
    label_smoothing: float = arg(0.0, "sigmoid loss: assumed label-flip rate eps (conservative DPO)", "in [0, 0.5)")
    ipo_length_average: bool = arg(True, "ipo: average log-ratios over response tokens (as TRL) instead of summing")
    simpo_gamma: float = arg(1.0, "simpo: target margin gamma of the length-normalised rewards", ">= 0")
    kto_desirable_weight: float = arg(1.0, "kto: lambda_D, the weight of the desirable (chosen) examples", "> 0")
    kto_undesirable_weight: float = arg(1.0, "kto: lambda_U, the weight of the undesirable (rejected) examples", "> 0")
    nll_coef: float = arg(0.2, "add this times the chosen responses' NLL pooled per token (RPO; not Pang et al.'s "
                               "per-pair mean); 0 = plain DPO", ">= 0")
    # data
    test_frac: float = arg(0.1, "share of prompts held out as test pairs when the file has no 'split' field",
                           "in [0, 1)")
    max_pairs: int = arg(8000, "train on a seeded random subset of at most this many training pairs (0 = all)", ">= 0")
    max_test_pairs: int = arg(1000, "evaluate on a seeded random subset of at most this many test pairs (0 = all)",
                              ">= 0")
    # optimisation
    epochs: float = arg(1.5, "passes over the training pairs", "> 0")
    batch_size: int = arg(64, "preference pairs per step (2x sequences per forward)", "> 0")
    lr: float = arg(1e-3, "peak learning rate", "> 0")
    min_lr: float = arg(3e-5, "final learning rate of the cosine schedule", ">= 0")
    warmup_steps: int = arg(10, "linear warmup steps", ">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay (0: decay pulls weights to 0, not towards the reference)",
                              ">= 0")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)", ">= 0")
    log_interval: int = arg(10, "steps between metrics.jsonl lines", "> 0")
    eval_interval: int = arg(50, "steps between evaluations on the test pairs", "> 0")
    eval_batch_size: int = arg(256, "pairs per forward when computing reference log-probs and test metrics", "> 0")
    # end-of-run evaluation against the reference (built-in task only)
    n_eval: int = arg(512, "held-out task prompts of the final paired comparison with the reference",
                      ">= 2 (standard errors)")
    max_new_tokens: int = arg(48, "response budget when sampling for the evaluation (and for --rounds > 1)", "> 0")
    # online / iterative DPO (rounds after the first sample fresh pairs from the current policy)
    rounds: int = arg(1, "training rounds: 1 = offline DPO on --prefs; later ones on pairs of the current policy",
                      "> 0")
    reward: str = arg("out/rm", "reward model run directory that labels the online pairs (--rounds > 1 only)")
    round_prompts: int = arg(1000, "task train prompts sampled per online round", "> 0")
    round_k: int = arg(4, "responses sampled per prompt in an online round", ">= 2 (pairs)")
    round_pairs: str = arg("all", "pairs of an online round: every pair of distinct responses, or best-worst",
                           choices=("all", "best-worst"))


def main(argv=None):
    args = parse_args(Args, argv)
    check(not args.label_smoothing or args.loss == "sigmoid", "--label-smoothing only applies to --loss sigmoid")
    check(args.rounds == 1 or args.task.lower() != "none", "--rounds > 1 samples the task's train prompts: it needs "
          "--task (not none)")
    check(args.rounds == 1 or not args.resume, "--resume is not supported with --rounds > 1 (rerun the command)")
    W = dist.env_world_size()
    check(args.batch_size >= W, f"--batch-size {args.batch_size}: must be >= the number of processes ({W}; it is the "
          f"global batch, split across them)")
    check(args.rounds == 1 or W == 1, "--rounds > 1 is not supported under torchrun (run one process)")
    task = None if args.task.lower() == "none" else get_task(args.task)
    st = Stage("train_dpo.py", args, inputs={"--policy": args.policy, "--prefs": args.prefs,
                                             "--reward": args.reward if args.rounds > 1 else None})
    device, dtype = st.device, st.dtype

    # ---- policy (= reference) and pairs: (prompt, chosen, rejected) token ids
    model, tok, pol_cfg = load_policy(args.policy, "--policy", device)
    records = load_pref_jsonl(args.prefs)
    has_gold = has_gold_columns(records)
    train_recs, test_recs = split_prefs(records, args.test_frac, args.seed)
    if not test_recs:  # the implicit-reward accuracy is measured on them (train_rm.py refuses such a file too)
        raise DataError(f"--prefs {args.prefs}: no test pairs (add more prompts, or set the \"split\" field)")
    n_all = len(train_recs), len(test_recs)
    train_recs = subsample(train_recs, args.max_pairs, args.seed)
    test_recs = subsample(test_recs, args.max_test_pairs, args.seed)
    n_ids, n_other = token_id_counts(train_recs + test_recs, tok)
    if n_other:
        print(f"warning: {n_other} pairs carry token ids of another tokenizer than --policy {args.policy}'s; their "
              f"text is re-encoded instead")
    splits, n_same = encode_splits({"train pairs": train_recs, "test pairs": test_recs}, tok, model.config.block_size,
                                   model.config.vocab_size, targets=True)
    (train_recs, train_pairs), (test_recs, test_pairs) = splits.values()
    print(f"{len(train_pairs)} train / {len(test_pairs)} test pairs (of {n_all[0]} / {n_all[1]}) from {args.prefs}, "
          f"policy {args.policy} ({model.num_params() / 1e6:.2f}M parameters), loss {args.loss}, beta {args.beta}")
    ref_train, ref_test = dpo.reference_logps(model, train_pairs, test_pairs, args, tok, device, dtype, st.dir,
                                              also=[st.run.out])
    # the frozen reference for KTO's z0 and later rounds' pairs, and the RM that labels those pairs
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.rounds > 1 or args.loss == "kto" else None
    reward_model = None
    if args.rounds > 1:
        reward_model, _, rm_cfg = load_scalar(args.reward, "--reward", device)
        check_compatible(("--policy", args.policy, pol_cfg), ("--reward", args.reward, rm_cfg))
        reward_model.eval().requires_grad_(False)

    opt = adamw(model, args.lr, args.weight_decay, device)
    train_model = compile_model(dist.wrap(model, device), args.compile)  # DDP under torchrun, else the model itself
    banned = tok.unsampleable_ids(model.config.vocab_size)  # log-probs of the distribution the policy samples

    # ---- training: shuffled passes over the pairs
    gen = torch.Generator().manual_seed(args.seed)
    extra = {"order": torch.zeros(0, dtype=torch.long), "test_stats": {},
             **st.resume(model=model, optimizer=opt, generators=[gen])}
    model.train()  # dropout is already 0 (load_run): DPO needs deterministic log-probs (TRL #744)
    if st.saved is None and args.save_interval and args.rounds == 1:  # a crash from here on keeps the ref log-probs
        st.checkpoint(0, **extra)
    round_stats, step0, total = [], 0, 0  # step0: steps of the earlier rounds (metrics.jsonl counts across rounds)
    for rnd in range(args.rounds):
        if rnd > 0:  # online round: fresh pairs from the current policy, a new cosine schedule over them
            train_pairs, ref_train, info = dpo.online_pairs(model, ref_model, reward_model, tok, task, args, rnd,
                                                            device, dtype, st.dir)
            step0, extra["order"] = step0 + total, torch.zeros(0, dtype=torch.long)
        steps_per_epoch = math.ceil(len(train_pairs) / args.batch_size)
        total = max(1, round(args.epochs * steps_per_epoch))
        if rnd > 0:
            round_stats.append({"round": rnd + 1, **info, "steps": total})
        bar = st.steps(total, "dpo" if args.rounds == 1 else f"dpo round {rnd + 1}", start=0 if rnd else None)
        for step in bar:
            lr = cosine_lr(step, total, args.lr, args.min_lr, args.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            if len(extra["order"]) < args.batch_size:  # next epoch; the last one's tail joins it (every pair is seen)
                extra["order"] = torch.cat([extra["order"], torch.randperm(len(train_pairs), generator=gen)])
            idx, extra["order"] = extra["order"][:args.batch_size], extra["order"][args.batch_size:]
            mine = dist.shard(idx)  # the same global batch on every rank; this rank's contiguous share of it
            chunk = [train_pairs[i] for i in mine]
            batch = dpo.pair_batch(chunk, tok.pad_id, device)
            logps, lens = dpo.pair_logps(train_model, batch, device, dtype, banned)  # (2B,) chosen, then rejected
            divisors = dpo.global_divisors(batch["loss_mask"][:len(mine)], len(idx))
            z0 = dpo.kto_z0(model, ref_model, chunk, tok.pad_id, device, dtype, banned) if args.loss == "kto" else 0.0
            loss, stats = dpo.dpo_step_loss(logps, lens, ref_train[mine.to(device)], args, **divisors, z0=z0)
            grad_norm, = st.optimize(opt, loss, model, step=step0 + step)
            last = step == total - 1
            if test_pairs and (step % args.eval_interval == 0 or last):
                extra["test_stats"] = dpo.test_pair_stats(model, test_pairs, ref_test, args, tok, device, dtype)
            if step % args.log_interval == 0 or last:
                st.check({}, step0 + step)  # a NaN stops the run here, before anything is logged or saved
                host = Stats()  # each rank's part -> the global batch's, in one transfer
                host.add(**stats, grad_norm=grad_norm)
                stats = host.host()
                row = {"step": step0 + step, "epoch": (step + 1) / steps_per_epoch, **stats, **extra["test_stats"],
                       "lr": lr, "elapsed_s": st.elapsed(), **({"round": rnd + 1} if args.rounds > 1 else {})}
                st.log(row, step0 + step)
                bar.log(step, loss=stats["loss"], acc=stats["rewards/accuracy"], chosen=stats["logps/chosen"],
                        test_acc=extra["test_stats"].get("test/rewards/accuracy", float("nan")))
            if args.rounds == 1:
                st.save(step, last, **extra)
    train_seconds = st.elapsed()
    st.save_model(model, tok, kind="policy", stage="dpo", reference=args.policy)

    # ---- final numbers: implicit-reward accuracy on test pairs beside the Bayes ceiling, then gold vs reference
    test_stats = extra["test_stats"]
    metrics = {"train_loss": stats["loss"], "train_accuracy": stats["rewards/accuracy"],
               "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs), "n_file_pairs": sum(n_all),
               "n_pairs_from_ids": n_ids, "n_uninformative_pairs": n_same, "train_seconds": train_seconds,
               **({"rounds": round_stats} if round_stats else {}), "test_accuracy": test_stats["test/rewards/accuracy"],
               **{k.replace("/", "_"): v for k, v in test_stats.items() if k != "test/rewards/accuracy"},
               **({"bayes_accuracy": bayes_accuracy(test_recs)} if has_gold else {})}
    if task is not None and has_gold:
        model.eval()
        ref = load_policy(args.policy, "--policy", device)[0].eval()  # the reference again, now that training is over
        metrics.update(compare_on_test_prompts(model, ref, tok, task, args.n_eval, args.max_new_tokens, args.seed,
                                               device, dtype, batch_size=args.eval_batch_size))
    elif task is not None:
        print(f"note: {args.prefs} has no gold columns, so it is not from task {args.task!r}: skipping the gold "
              f"comparison (pass --task none to silence this)")
    metrics["total_seconds"] = st.elapsed()
    st.finish(metrics)
    for pair in [("test_accuracy", "bayes_accuracy"), ("win_rate_vs_ref", "kl_mean"), ("gold_mean", "ref_gold_mean")]:
        if pair[0] in metrics:
            print("  ".join(f"{k}={metrics[k]:.4f}" for k in pair if k in metrics))


if __name__ == "__main__":
    run(main)
