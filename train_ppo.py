"""Stage 3 of RLHF: PPO against the learned reward model, with a per-token KL penalty to the frozen SFT policy.

    python train_ppo.py                                  # --policy out/sft --reward out/rm -> out/ppo
    python train_ppo.py --target-kl 6                    # adaptive beta (Ziegler et al. 2019) instead of fixed
    python train_ppo.py --prompts my_prompts.jsonl       # your {"prompt"} records (no gold reward to report)

Four models: the policy (trained), the reference (frozen SFT copy, for the KL penalty), the reward model (frozen)
and the value model (a separate ScalarModel initialised from the reward model, trained). Each iteration:
  rollout (no grad)  sample responses at temperature T -> old log-probs, reference log-probs, values, RM score
                     -> per-token rewards r_t = -beta * (logpi_old - logpi_ref) + score on the EOS token
                     -> GAE advantages and returns -> advantages whitened over the batch's valid tokens
  update             --epochs passes over shuffled minibatches: clipped policy loss + clipped value loss
The gold reward is only logged (reward hacking shows as RM score up, gold down) and scores the final comparison.
"""
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf import rl
from minirlhf.evaluation.metrics import compare_on_test_prompts, policy_metrics
from minirlhf.harness import dist
from minirlhf.harness.cli import RunArgs, arg, parse_args, run
from minirlhf.harness.stage import Stage, Stats
from minirlhf.losses import (AdaptiveKLController, FixedKLController, default_kl_horizon, explained_variance,
                             gae_advantages, kl_shaped_rewards, masked_mean, masked_var, masked_whiten, ppo_policy_loss,
                             ppo_value_loss)
from minirlhf.model import compile_model
from minirlhf.rollout import collect_rollout, training_prompts
from minirlhf.sampling import sample_policy
from minirlhf.scoring import response_logprobs, response_values
from minirlhf.tasks import get_task
from minirlhf.utils import autocast, check, linear_lr


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """PPO with GAE, clipping and a per-token KL penalty (stage 3 of RLHF)."""
    policy: str = arg("out/sft", "SFT run directory: the initial policy and the frozen reference")
    reward: str = arg("out/rm", "reward-model run directory (also initialises the value model)")
    out_dir: str = arg("out/ppo", "run directory to write")
    task: str = arg("reviews", "built-in task for prompts and the (logging/evaluation only) gold reward")
    prompts: Optional[str] = arg(None, "JSONL of {prompt} records to train on instead of the built-in task")
    compile: bool = arg(False, "torch.compile every model: the update, the rollouts' decode step and scoring")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(10, "iterations between resume checkpoints (0 = none)", ">= 0")
    # rollouts
    iterations: int = arg(50, "PPO iterations (one rollout batch + its update epochs each)", "> 0")
    batch_size: int = arg(64, "prompts (one response each) per rollout", "> 0")
    max_new_tokens: int = arg(48, "response budget in tokens", "> 0")
    temperature: float = arg(1.0, "rollout sampling temperature; log-probs use the same one", "> 0")
    missing_eos_penalty: float = arg(2.0, "score of a response without EOS: -penalty (normalised RM units)", ">= 0")
    # reward shaping
    kl_coef: float = arg(0.07, "beta of the per-token KL penalty (the start with --target-kl)", ">= 0")
    target_kl: float = arg(0.0, "adaptive beta: target sequence KL in nats (0 = fixed beta)", ">= 0")
    kl_horizon: int = arg(0, "adaptive beta: horizon in episodes; 0 = one rollout batch", ">= 0")
    whiten_rewards: bool = arg(False, "rescale per-token rewards to unit std over the batch (no mean shift)")
    gamma: float = arg(1.0, "discount", "in (0, 1]")
    lam: float = arg(0.95, "GAE lambda", "in [0, 1]")
    # optimisation
    epochs: int = arg(4, "passes over each rollout batch", "> 0")
    minibatches: int = arg(4, "minibatches per pass", "> 0")
    lr: float = arg(1e-4, "policy learning rate (linearly annealed to 0)", "> 0")
    value_lr: float = arg(1e-4, "value-model learning rate (linearly annealed to 0)", "> 0")
    clip: float = arg(0.2, "policy ratio clip epsilon", "> 0")
    value_clip: float = arg(0.2, "value clip epsilon (normalised RM units)", "> 0")
    grad_clip: float = arg(1.0, "gradient norm clip, per model (0 = off)", ">= 0")
    approx_kl_stop: float = arg(0.0, "stop an iteration's epochs once one's mean approx_kl exceeds this (0 = off)",
                                ">= 0")
    log_interval: int = arg(10, "iterations between console lines (metrics.jsonl gets every iteration)", "> 0")
    # evaluation
    n_eval: int = arg(512, "held-out test prompts of the final comparison with the SFT policy", ">= 2")
    eval_interval: int = arg(0, "every N iterations also evaluate on held-out prompts (eval_* keys); 0 = never", ">= 0")
    eval_prompts: int = arg(256, "held-out prompts of each --eval-interval evaluation", ">= 2")


@torch.no_grad()
def held_out_eval(policy, ref, reward_model, tok, task, ref_samples, args: Args, device, dtype, seed: int) -> dict:
    """The current policy on the held-out prompts of ref_samples (one sample each, temperature 1): gold, gain over
    the reference's samples (paired s.e.), KL(pi || ref) +- s.e., the RM score raw and as trained on (EOS penalty),
    win rate, and each part of the gold reward (eval_part_*). Keys eval_*; what experiments/overopt.py plots."""
    samples = sample_policy(policy, tok, [s["prompt"] for s in ref_samples], args.max_new_tokens, 1.0,
                            seed=args.seed + 2 + seed, device=device, dtype=dtype)
    m = policy_metrics(policy, ref, tok, samples, ref_samples, task, reward_model, device=device, dtype=dtype,
                       missing_eos_penalty=args.missing_eos_penalty)
    keys = ("gold_mean", "gold_sem", "ref_gold_mean", "gold_gain", "gold_gain_sem", "kl_mean", "kl_sem", "rm_mean",
            "ref_rm_mean", "score_mean", "ref_score_mean", "win_rate_vs_ref", "eos_rate")
    parts = {f"eval_part_{k}": v for k, v in m.get("gold_parts", {}).items()}  # which parts of the gold moved
    return {**{f"eval_{k}": m[k] for k in keys}, **parts}


def main(argv=None):
    args = parse_args(Args, argv)
    W = dist.env_world_size()  # under torchrun each rank rolls out batch_size / W prompts
    check(args.batch_size % (W * args.minibatches) == 0, f"--batch-size {args.batch_size} must be divisible by "
          f"--minibatches {args.minibatches}" + (f" times the {W} processes" if W > 1 else ""))
    check(not (args.eval_interval and args.prompts), "--eval-interval needs the built-in task's held-out prompts and "
                                                     "gold reward (not available with --prompts)")
    check(args.target_kl == 0 or args.kl_coef > 0, "--kl-coef 0 with --target-kl: the adaptive beta must start > 0")
    st = Stage("train_ppo.py", args, unit="iteration",
               inputs={"--policy": args.policy, "--reward": args.reward, "--prompts": args.prompts})
    device, dtype = st.device, st.dtype
    tok, policy, ref, reward_model, value_model = rl.load_models(args, device, value_model=True)
    task = None if args.prompts else get_task(args.task)
    texts, prompt_ids = training_prompts(args.prompts, task, args.iterations * args.batch_size, args.seed, tok,
                                         policy.config.block_size)

    # one optimizer, two parameter groups; no weight decay (it would pull the policy away from the SFT weights
    # the KL penalty anchors it to); eps 1e-5 as in the PPO reference implementations
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": args.lr},
                             {"params": value_model.parameters(), "lr": args.value_lr}],
                            weight_decay=0.0, betas=(0.9, 0.999), eps=1e-5, fused=device.startswith("cuda"))
    base_lrs = [group["lr"] for group in opt.param_groups]
    # DDP under torchrun (one wrapper per trained model), else the models themselves; --compile compiles them and
    # the models of the rollout's scoring passes (generate compiles its own decode step)
    train_policy, train_value = (compile_model(dist.wrap(m, device), args.compile) for m in (policy, value_model))
    scorers = [compile_model(m, args.compile) for m in (policy, ref, reward_model, value_model)]
    kl_horizon = args.kl_horizon or default_kl_horizon(args.batch_size)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, kl_horizon) if args.target_kl > 0 \
        else FixedKLController(args.kl_coef)
    banned = tok.unsampleable_ids(policy.config.vocab_size)  # never sampled, so never scored (rollout.py)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * dist.rank())  # a stream per rank
    first = rl.FirstRatio()
    vars(first).update(st.resume(policy=policy, value_model=value_model, optimizer=opt, kl_ctl=kl_ctl,
                                 generators=[gen]))
    eval_ref = None  # --eval-interval: the SFT's samples on the held-out prompts, drawn once (paired evaluations)
    if args.eval_interval:
        eval_ref = sample_policy(ref, tok, task.sample_prompts("test", args.eval_prompts, seed=args.seed),
                                 args.max_new_tokens, 1.0, seed=args.seed + 1, device=device, dtype=dtype)
    all_reduce = dist.all_reduce_sum  # batch statistics of the whole batch under torchrun (identity in one process)

    bar = st.steps(args.iterations, "ppo")
    for it in bar:
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = linear_lr(it, args.iterations, lr)
        beta = kl_ctl.value

        # ================================================================ rollout (no gradients)
        t_roll = time.time()
        mine = dist.shard_range(args.batch_size)  # this rank's prompts of the batch
        sl = slice(it * args.batch_size + mine.start, it * args.batch_size + mine.stop)
        ro = collect_rollout(*scorers[:3], tok, prompt_ids[sl], texts[sl], args.max_new_tokens, args.temperature,
                             args.missing_eos_penalty, gen, device, dtype, value_model=scorers[3], task=task,
                             compile=args.compile)
        mask, old_logp, old_values = ro.mask, ro.old_logp, ro.values  # (B, R) each

        # ================================================================ advantages
        rewards, kl, non_score = kl_shaped_rewards(ro.score, old_logp, ro.ref_logp, mask, beta)  # (B, R) each
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
        advantages, returns = gae_advantages(rewards, old_values, mask, args.gamma, args.lam)  # (B, R) each
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
        non_score_sum, score = dist.all_gather_cat(non_score.sum(1)), dist.all_gather_cat(ro.score)
        row = {"iter": it, "episodes": (it + 1) * args.batch_size, "beta": beta, **rl.rollout_stats(
            ro, kl.sum(1), non_score_reward=non_score_sum.mean(), total_reward=(score + non_score_sum).mean(),
            explained_var=explained_variance(old_values, returns, mask, all_reduce=all_reduce),
            value_mean=masked_mean(old_values, mask, all_reduce=all_reduce),
            reward_mean=masked_mean(rewards, mask, all_reduce=all_reduce),  # per-token rewards as trained on
            reward_std=masked_var(rewards, mask, all_reduce=all_reduce).sqrt()), "rollout_s": time.time() - t_roll}

        # ================================================================ PPO update
        stats, lengths = Stats(maxima=rl.MAXIMA), ro.lengths.tolist()
        for epoch in range(args.epochs):
            epoch_kl = []
            for k, (idx, R) in enumerate(rl.minibatches(len(lengths), args.minibatches, lengths, gen, device)):
                mb_mask, resp, resp_mask = mask[idx, :R], ro.resp[idx, :R], ro.resp_mask[idx, :R]
                with autocast(device, dtype):
                    logp, entropy = response_logprobs(train_policy, ro.prompt_ids[idx], ro.prompt_mask[idx], resp,
                                                      resp_mask, args.temperature, with_entropy=True, banned=banned)
                    values = response_values(train_value, ro.prompt_ids[idx], ro.prompt_mask[idx], resp, resp_mask)
                pg_loss, pg = ppo_policy_loss(logp, old_logp[idx, :R], advantages[idx, :R], mb_mask, args.clip)
                vf_loss, vf_clipfrac = ppo_value_loss(values, old_values[idx, :R], returns[idx, :R], mb_mask,
                                                      args.value_clip)
                # The models share no parameters: each loss trains its own model. A weight on vf_loss would only
                # rescale gradients that Adam normalises away (and the per-model clip): --value-lr is the knob.
                loss = dist.global_mean(pg_loss + vf_loss, mb_mask.sum())  # per-token means of the global batch
                pg_norm, vf_norm = st.optimize(opt, loss, policy, value_model, step=it)
                stats.add(pg_loss=pg_loss, vf_loss=vf_loss, approx_kl=pg["approx_kl"], clipfrac=pg["clipfrac"],
                          vf_clipfrac=vf_clipfrac, entropy=masked_mean(entropy.detach(), mb_mask),
                          pg_grad_norm=pg_norm, vf_grad_norm=vf_norm,
                          **rl.ratio_stats(pg["ratio"], mb_mask, first=epoch == 0 and k == 0))
                epoch_kl.append(pg["approx_kl"])
            epoch_kl = torch.stack(epoch_kl).mean()
            if args.approx_kl_stop > 0 and dist.mean_over_ranks(epoch_kl).item() > args.approx_kl_stop:
                break  # the policy moved too far from the one that collected the data
        row.update(stats.host(), epochs_done=epoch + 1)
        row.update(first.check(row["first_ratio_dev"], dtype, it))
        kl_ctl.update(row["kl"], args.batch_size)  # the global batch's KL: beta is the same on every rank
        st.check(row, it, policy, value_model)  # NaN stops here, before the next rollout samples from NaN weights
        if eval_ref is not None and ((it + 1) % args.eval_interval == 0 or it == args.iterations - 1):
            t_eval = time.time()
            row.update(held_out_eval(policy, ref, reward_model, tok, task, eval_ref, args, device, dtype, seed=it))
            row["eval_s"] = time.time() - t_eval
        row["elapsed_s"] = st.elapsed()
        st.log(row, it)
        if it % args.log_interval == 0 or it == args.iterations - 1:
            bar.write(rl.console_line(it, row, ("beta", "beta", ".3f"), ("pg", "pg_loss", "+.4f"),
                                      ("vf", "vf_loss", ".4f"), ("akl", "approx_kl", ".4f"),
                                      ("clip", "clipfrac", ".3f"), ("ent", "entropy", ".2f"),
                                      ("ev", "explained_var", "+.2f"), ("len", "resp_len", ".1f"),
                                      ("eos", "eos_rate", ".2f")))
        st.save(it, last=it == args.iterations - 1, **vars(first))
    train_seconds = st.elapsed()
    st.save_model(policy, tok, others=[value_model], kind="policy", stage="ppo")

    metrics = {"train_seconds": train_seconds, **first.metrics(dtype), "final_beta": kl_ctl.value,
               "kl_horizon": kl_horizon, "final_rm_score_mean": row["rm_score_mean"], "final_train_kl": row["kl"],
               **compare_on_test_prompts(policy, ref, tok, task, args.n_eval, args.max_new_tokens, args.seed, device,
                                         dtype, reward_model)}
    metrics["total_seconds"] = st.elapsed()
    st.finish(metrics, summary=True)


if __name__ == "__main__":
    run(main)
