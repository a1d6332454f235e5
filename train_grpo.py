"""Stage 3 without a critic: GRPO, RLOO, Dr. GRPO and today's menu against the learned reward model.

    python train_grpo.py                  # RLOO, the default: --policy out/sft --reward out/rm -> out/grpo
    python train_grpo.py --baseline grpo --scale-by-std --loss-agg sequence --kl-in loss --kl-coef 0.04  # GRPO
    python train_grpo.py --baseline grpo --no-scale-by-std --loss-agg constant --kl-in loss --kl-coef 0.04  # Dr. GRPO
    python train_grpo.py --clip-high 0.28 --loss-agg token --dynamic-sampling --overlong-buffer 8   # DAPO

No value model: each prompt gets k samples ("a group"), and a sample's advantage, given to every one of its
tokens, is its sequence reward compared with the rest of its group. Each paper's flags (also GSPO, CISPO,
REINFORCE++, k3+ / unbiased KL, truncated IS) and the measurements behind the defaults: docs/grpo.md. Each iteration:
  rollout (no grad)  P prompts x k samples at temperature T (minirlhf/rollout.py, as PPO's): old and reference
                     log-probs, the RM score at EOS (-penalty without EOS), gold logged only
  advantages         r_i = score_i [- beta * sum_t (log pi_old - log pi_ref)]  (--kl-in reward)
                     A_i = r_i - mean(group) [/ (std(group) + eps)]  or  r_i - mean(others)   (losses.py)
  update             --epochs x --minibatches passes of the clipped ratio objective (1 x 1 = on-policy REINFORCE
                     with a baseline: the ratio is 1), + beta * k(log pi, log pi_ref) per token with --kl-in loss
"""
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf import rl
from minirlhf.evaluation.metrics import compare_on_test_prompts
from minirlhf.harness import dist
from minirlhf.harness.cli import RunArgs, arg, parse_args, run
from minirlhf.harness.stage import Stage, Stats
from minirlhf.losses import (group_advantages, grpo_policy_loss, masked_mean, overlong_penalty,
                             reinforce_pp_advantages, truncated_is_weights, zero_advantage_share)
from minirlhf.model import compile_model
from minirlhf.rollout import collect_rollout, dynamic_rollout, training_prompts
from minirlhf.scoring import response_logprobs
from minirlhf.tasks import get_task
from minirlhf.utils import autocast, check, linear_lr


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Critic-free RL (GRPO / RLOO / Dr. GRPO) with group baselines (stage 3 of RLHF)."""
    policy: str = arg("out/sft", "SFT run directory: the initial policy and the frozen reference")
    reward: str = arg("out/rm", "reward-model run directory")
    out_dir: str = arg("out/grpo", "run directory to write")
    task: str = arg("reviews", "built-in task for prompts and the (logging/evaluation only) gold reward")
    prompts: Optional[str] = arg(None, "JSONL of {prompt} records to train on instead of the built-in task")
    compile: bool = arg(False, "torch.compile every model: the update, the rollouts' decode step and scoring")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(10, "iterations between resume checkpoints (0 = none)", ">= 0")
    # rollouts
    iterations: int = arg(80, "iterations (one rollout batch + its update passes each)", "> 0")
    prompts_per_iter: int = arg(8, "prompts per rollout; each is sampled --group-size times", "> 0")
    group_size: int = arg(8, "samples per prompt (the baseline comes from the other samples)", ">= 2")
    max_new_tokens: int = arg(48, "response budget in tokens", "> 0")
    temperature: float = arg(1.0, "rollout sampling temperature; log-probs use the same one", "> 0")
    missing_eos_penalty: float = arg(2.0, "score of a response without EOS: -penalty (normalised RM units)", ">= 0")
    # advantages
    baseline: str = arg("rloo", "grpo: A = r - group mean; rloo: A = r - mean of the other k-1 samples; reinforce++"
                        "(-baseline): per-token returns z-scored over the batch (the group mean subtracted first)",
                        choices=("grpo", "rloo", "reinforce++", "reinforce++-baseline"))
    scale_by_std: bool = arg(False, "divide A by the group's sample std + 1e-4, as GRPO does")
    loss_agg: str = arg("token", "token mean, sequence (GRPO's 1/|o_i|) or constant (Dr. GRPO) aggregation",
                        choices=("token", "sequence", "constant"))
    # KL to the reference
    kl_in: str = arg("reward", "reward: -beta * sum_t k1 in the sequence reward (PPO, RLOO); loss: beta * k per "
                     "token in the loss (GRPO)", choices=("reward", "loss"))
    kl_estimator: str = arg("k3", "KL estimator of --kl-in loss (losses.kl_estimator; unbiased: DeepSeek-V3.2's)",
                            choices=("k1", "k2", "k3", "k3+", "unbiased"))
    kl_coef: float = arg(0.07, "beta, the KL weight (in reward or loss)", ">= 0")
    # optimisation
    epochs: int = arg(2, "passes over each rollout batch", "> 0")
    minibatches: int = arg(2, "minibatches per pass", "> 0")
    lr: float = arg(5e-4, "learning rate (linearly annealed to 0)", "> 0")
    clip: float = arg(0.2, "ratio clip epsilon (the lower one with --clip-high)", "> 0")
    clip_high: float = arg(0.0, "upper ratio clip epsilon (0 = --clip); DAPO's clip-higher is 0.28", ">= 0")
    pg_loss: str = arg("clip", "policy term: clip (PPO's), gspo (one clipped ratio per response) or cispo (clipped, "
                       "detached importance weights)", choices=("clip", "gspo", "cispo"))
    tis_cap: float = arg(0.0, "truncated importance sampling: weight token losses by min(pi_old / pi_sampler, C); "
                         "0 = off", ">= 0")
    overlong_buffer: int = arg(0, "DAPO's overlong penalty: from max_new_tokens - N tokens on, linearly down to -1 at "
                               "the budget (0 = off)", ">= 0")
    dynamic_sampling: bool = arg(False, "DAPO: replace groups whose scores are all equal by fresh prompts' groups")
    max_draws: int = arg(3, "--dynamic-sampling: rollouts drawn at most per iteration", "> 0")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)", ">= 0")
    log_interval: int = arg(10, "iterations between console lines (metrics.jsonl gets every iteration)", "> 0")
    # final evaluation
    n_eval: int = arg(512, "held-out test prompts of the final comparison with the SFT policy", ">= 2")


def main(argv=None):
    args = parse_args(Args, argv)
    W = dist.env_world_size()  # under torchrun each rank samples whole groups: prompts_per_iter / W prompts
    check(args.prompts_per_iter % W == 0 and (args.prompts_per_iter // W * args.group_size) % args.minibatches == 0,
          f"--prompts-per-iter x --group-size = {args.prompts_per_iter * args.group_size} samples must be divisible by "
          f"--minibatches {args.minibatches}" + (f" (and the prompts by the {W} processes)" if W > 1 else ""))
    reinforce = args.baseline.startswith("reinforce++")  # per-token advantages (B, R), not one per sample
    check(args.pg_loss != "gspo" or (args.loss_agg == "sequence" and not reinforce),
          "--pg-loss gspo: one ratio and advantage per response; use --loss-agg sequence and a group baseline")
    check(not reinforce or args.kl_in == "reward", "--baseline reinforce++: the KL is in its reward (--kl-in reward)")
    check(args.overlong_buffer < args.max_new_tokens, "--overlong-buffer must be below --max-new-tokens")
    check(not args.dynamic_sampling or W == 1, "--dynamic-sampling is not supported under torchrun (run one process)")
    draws = args.max_draws if args.dynamic_sampling else 1  # rollouts (of fresh prompts) an iteration may draw
    st = Stage("train_grpo.py", args, unit="iteration",
               inputs={"--policy": args.policy, "--reward": args.reward, "--prompts": args.prompts})
    device, dtype = st.device, st.dtype
    # three models: the policy (trained), the frozen reference and reward model. No value model: that is the point.
    tok, policy, ref, reward_model = rl.load_models(args, device)
    print(f"{args.prompts_per_iter} prompts x {args.group_size} samples per iteration, baseline {args.baseline}"
          f"{' / std' if args.scale_by_std else ''}, loss-agg {args.loss_agg}, KL in {args.kl_in}"
          f"{' (' + args.kl_estimator + ')' if args.kl_in == 'loss' else ''}")
    # each train prompt is repeated group_size times in a row: group g = samples g*k .. g*k + k - 1
    task = None if args.prompts else get_task(args.task)
    texts, prompt_ids = training_prompts(args.prompts, task, args.iterations * draws * args.prompts_per_iter, args.seed,
                                         tok, policy.config.block_size)
    group_ids = torch.arange(args.prompts_per_iter // W, device=device).repeat_interleave(args.group_size)  # (B,)
    all_group_ids = torch.arange(args.prompts_per_iter, device=device).repeat_interleave(args.group_size)  # all ranks

    # no weight decay (it would pull the policy off the SFT weights the KL anchors it to); eps 1e-5 as for PPO
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, eps=1e-5,
                            fused=device.startswith("cuda"))
    train_policy = compile_model(dist.wrap(policy, device), args.compile)  # DDP under torchrun, else the model
    # --compile: the rollout's scoring passes run compiled too (generate compiles its own decode step)
    scorers = [compile_model(m, args.compile) for m in (policy, ref, reward_model)]
    B = args.prompts_per_iter * args.group_size // W  # samples per rollout (of this rank)
    constant = float(args.max_new_tokens * B // args.minibatches)  # Dr. GRPO's normaliser: a minibatch's token budget
    banned = tok.unsampleable_ids(policy.config.vocab_size)  # never sampled, so never scored (rollout.py)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * dist.rank())  # a stream per rank
    first = rl.FirstRatio()
    vars(first).update(st.resume(policy=policy, optimizer=opt, generators=[gen]))

    bar = st.steps(args.iterations, args.baseline)
    for it in bar:
        for group in opt.param_groups:
            group["lr"] = linear_lr(it, args.iterations, args.lr)

        # ================================================================ rollout (no gradients)
        t_roll = time.time()
        mine = dist.shard_range(args.prompts_per_iter)  # this rank's groups

        def draw(r):  # rollout r of this iteration: the next prompts_per_iter prompts, each group_size times
            sl = slice((it * draws + r) * args.prompts_per_iter + mine.start,
                       (it * draws + r) * args.prompts_per_iter + mine.stop)
            return collect_rollout(*scorers, tok, [p for p in prompt_ids[sl] for _ in range(args.group_size)],
                                   [p for p in texts[sl] for _ in range(args.group_size)], args.max_new_tokens,
                                   args.temperature, args.missing_eos_penalty, gen, device, dtype, task=task,
                                   compile=args.compile)
        ro, drawn, varied = dynamic_rollout(draw, args.group_size, draws, tok.pad_id) if draws > 1 else (draw(0), 1, 0)
        mask = ro.mask  # (B, R)

        # ================================================================ group advantages
        score = ro.score + overlong_penalty(ro.lengths, args.max_new_tokens, args.overlong_buffer) \
            if args.overlong_buffer else ro.score  # (B,)
        seq_kl = ((ro.old_logp - ro.ref_logp) * mask).sum(1)  # (B,) k1 estimate of KL(pi_old || pi_ref)
        reward = score - args.kl_coef * seq_kl if args.kl_in == "reward" else score  # (B,) sequence reward
        if reinforce:  # (B, R): per-token returns of the KL-shaped reward, z-scored over the whole batch
            adv = reinforce_pp_advantages(score, ro.old_logp, ro.ref_logp, mask, args.kl_coef, group_ids
                                          if args.baseline.endswith("baseline") else None, dist.all_reduce_sum)
        else:
            adv = group_advantages(reward, group_ids, args.baseline, args.scale_by_std)  # (B,), one value per sample
        is_w, is_stats = truncated_is_weights(ro.old_logp, ro.sample_logp, mask, args.tis_cap) if args.tis_cap \
            else (None, {})  # (B, R): the sampler's log-probs against the trainer's
        all_reward = dist.all_gather_cat(reward)  # the whole batch's (the identity in one process)
        row = {"iter": it, "episodes": (it + 1) * args.prompts_per_iter * args.group_size, "beta": args.kl_coef,
               **rl.rollout_stats(ro, seq_kl, reward_mean=all_reward.mean(), **is_stats,
                                  zero_adv_groups=zero_advantage_share(all_reward, all_group_ids),
                                  adv_abs_mean=dist.all_gather_cat(adv.abs() if adv.dim() == 1 else
                                                                   masked_mean(adv.abs(), mask, dim=1)).mean()),
               **({"draws": drawn, "varied_groups": varied} if draws > 1 else {}), "rollout_s": time.time() - t_roll}

        # ================================================================ update
        stats, lengths = Stats(maxima=rl.MAXIMA), ro.lengths.tolist()
        kl_ref = ro.ref_logp if args.kl_in == "loss" else None
        for epoch in range(args.epochs):
            for k, (idx, R) in enumerate(rl.minibatches(B, args.minibatches, lengths, gen, device)):
                mb_mask = mask[idx, :R]
                with autocast(device, dtype):
                    logp, entropy = response_logprobs(train_policy, ro.prompt_ids[idx], ro.prompt_mask[idx],
                                                      ro.resp[idx, :R], ro.resp_mask[idx, :R], args.temperature,
                                                      with_entropy=True, banned=banned)  # (mb, R) each
                mb_adv = adv[idx] if adv.dim() == 1 else adv[idx, :R]  # (mb,) or (mb, R)
                loss, pg = grpo_policy_loss(logp, ro.old_logp[idx, :R], mb_adv, mb_mask, args.clip, args.loss_agg,
                                            None if kl_ref is None else kl_ref[idx, :R], args.kl_coef,
                                            args.kl_estimator, constant, args.clip_high or None, args.pg_loss,
                                            None if is_w is None else is_w[idx, :R])
                if args.loss_agg == "token":  # a per-token mean: of the global batch's tokens under torchrun
                    loss = dist.global_mean(loss, mb_mask.sum())  # (the other two divide by equal numbers already)
                norm, = st.optimize(opt, loss, policy, step=it)
                stats.add(loss=loss, kl_loss=pg["kl_loss"], approx_kl=pg["approx_kl"], clipfrac=pg["clipfrac"],
                          entropy=masked_mean(entropy.detach(), mb_mask), grad_norm=norm,
                          **rl.ratio_stats(pg["ratio"], mb_mask, first=epoch == 0 and k == 0))
        row.update(stats.host())
        row.update(first.check(row["first_ratio_dev"], dtype, it), elapsed_s=st.elapsed())
        st.log(row, it, policy)  # NaN stops here, before the next rollout samples from NaN weights
        if it % args.log_interval == 0 or it == args.iterations - 1:
            bar.write(rl.console_line(it, row, ("loss", "loss", "+.4f"), ("akl", "approx_kl", ".4f"),
                                      ("clip", "clipfrac", ".3f"), ("ent", "entropy", ".2f"),
                                      ("len", "resp_len", ".1f"), ("eos", "eos_rate", ".2f"),
                                      ("zero-adv groups", "zero_adv_groups", ".2f")))
        st.save(it, last=it == args.iterations - 1, **vars(first))
    train_seconds = st.elapsed()
    st.save_model(policy, tok, kind="policy", stage="grpo")

    metrics = {"train_seconds": train_seconds, **first.metrics(dtype), "final_rm_score_mean": row["rm_score_mean"],
               "final_train_kl": row["kl"], **compare_on_test_prompts(
                   policy, ref, tok, task, args.n_eval, args.max_new_tokens, args.seed, device, dtype, reward_model)}
    metrics["total_seconds"] = st.elapsed()
    st.finish(metrics, summary=True)


if __name__ == "__main__":
    run(main)
