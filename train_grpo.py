"""Stage 3 without a critic: GRPO, RLOO and Dr. GRPO against the learned reward model.

    python train_grpo.py                  # RLOO, the default: --policy out/sft --reward out/rm -> out/grpo
    # GRPO as published, then Dr. GRPO (GRPO without the std division and without the 1/|o_i|):
    python train_grpo.py --baseline grpo --scale-by-std --loss-agg sequence --kl-in loss --kl-coef 0.04
    python train_grpo.py --baseline grpo --no-scale-by-std --loss-agg constant --kl-in loss --kl-coef 0.04

PPO learns a value model to tell a good token from a bad one. The group methods drop it: each prompt gets k
samples ("a group"), and a sample's advantage is its sequence reward compared with the rest of its group; every
token of the sample gets that one number. Which flags are which paper's:
    GRPO      (Shao et al. 2024, 2402.03300)  --baseline grpo (scale by the group std) --loss-agg sequence
              --kl-in loss --kl-estimator k3 (beta 0.04 in the paper)
    Dr. GRPO  (Liu et al. 2025, 2503.20783)   GRPO with --no-scale-by-std and --loss-agg constant: no std division
              (it over-weights groups whose scores barely differ) and no 1/|o_i| (it favours long bad answers)
    RLOO      (Ahmadian et al. 2024, 2402.14740)  --baseline rloo --kl-in reward (the KL penalty summed into the
              sequence reward, as PPO does); the default here, with 2 epochs x 2 minibatches (see docs/grpo.md for
              the measurements behind the defaults)
Each iteration:
  rollout (no grad)  P prompts x k samples at temperature T (minirlhf/rollout.py, the same code as PPO's): old and
                     reference log-probs, the RM score at EOS (-penalty without EOS), gold logged only
  advantages         r_i = score_i [- beta * sum_t (log pi_old - log pi_ref)]  (--kl-in reward)
                     A_i = r_i - mean(group) [/ (std(group) + eps)]  or  r_i - mean(others)   (losses.py)
  update             --epochs x --minibatches passes of the clipped ratio objective (1 x 1 = on-policy REINFORCE
                     with a baseline: the ratio is 1), + beta * k(log pi, log pi_ref) per token with --kl-in loss
"""
import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.evaluation.metrics import compare_to_reference
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import check_compatible, load_policy, load_scalar, save_run
from minirlhf.harness.cli import (NON_NEGATIVE, POSITIVE, MetricsLog, Progress, arg, check_flags, parse_args,
                                  resolve_device, resolve_dtype, run, set_seed)
from minirlhf.harness.files import write_json
from minirlhf.harness.runs import FiniteCheck, NonFiniteError, Run, rng_state, set_rng_state
from minirlhf.losses import group_advantages, grpo_policy_loss, masked_mean, zero_advantage_share
from minirlhf.rollout import check_first_ratio, collect_rollout, training_prompts
from minirlhf.scoring import RATIO_TOLERANCE, response_logprobs
from minirlhf.tasks import get_task
from minirlhf.utils import autocast, check


@dataclass
class Args:
    """Critic-free RL (GRPO / RLOO / Dr. GRPO) with group baselines (stage 3 of RLHF)."""
    policy: str = arg("out/sft", "SFT run directory: the initial policy and the frozen reference")
    reward: str = arg("out/rm", "reward-model run directory")
    out_dir: str = arg("out/grpo", "run directory to write")
    task: str = arg("reviews", "built-in task for prompts and the (logging/evaluation only) gold reward")
    prompts: Optional[str] = arg(None, "JSONL of {prompt} records to train on instead of the built-in task")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    seed: int = arg(0, "random seed")
    compile: bool = arg(False, "torch.compile the policy for the update passes and the decode step of the rollouts")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(10, "iterations between resume checkpoints in <out-dir>.partial (0 = none)")
    # rollouts
    iterations: int = arg(80, "iterations (one rollout batch + its update passes each)")
    prompts_per_iter: int = arg(8, "prompts per rollout; each is sampled --group-size times")
    group_size: int = arg(8, "samples per prompt (k >= 2: the baseline comes from the other samples)")
    max_new_tokens: int = arg(48, "response budget in tokens")
    temperature: float = arg(1.0, "rollout sampling temperature; log-probs use the same one")
    missing_eos_penalty: float = arg(2.0, "a response without EOS gets score -penalty (normalised RM units) "
                                          "instead of its RM score")
    # advantages
    baseline: str = arg("rloo", "grpo: A = r - group mean; rloo: A = r - mean of the other k-1 samples "
                                "(leave-one-out, unbiased)")
    scale_by_std: bool = arg(False, "divide A by the group's sample std (n-1) + 1e-4, as GRPO does "
                                    "(--no-scale-by-std: Dr. GRPO, RLOO)")
    loss_agg: str = arg("token", "token: mean over all valid tokens; sequence: mean over each response's tokens, "
                                 "then over responses (GRPO's 1/|o_i|); constant: token sum / (max-new-tokens x "
                                 "responses) (Dr. GRPO)")
    # KL to the reference
    kl_in: str = arg("reward", "reward: -beta * sum_t k1 added to the sequence reward before the baseline (PPO, "
                               "RLOO); loss: beta * k per token added to the loss (GRPO)")
    kl_estimator: str = arg("k3", "with --kl-in loss: k1 = log pi/pi_ref (expected gradient 0: useless as a loss); "
                                  "k2 = 1/2 (log pi/pi_ref)^2 (gradient of the reverse KL(pi||pi_ref)); k3 = "
                                  "pi_ref/pi - log(pi_ref/pi) - 1 (unbiased value, but the gradient of the forward "
                                  "KL(pi_ref||pi); GRPO's)")
    kl_coef: float = arg(0.07, "beta, the KL weight (in reward or loss)")
    # optimisation
    epochs: int = arg(2, "passes over each rollout batch")
    minibatches: int = arg(2, "minibatches per pass")
    lr: float = arg(5e-4, "learning rate (linearly annealed to 0)")
    clip: float = arg(0.2, "ratio clip epsilon")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)")
    log_interval: int = arg(10, "iterations between console lines (metrics.jsonl gets every iteration)")
    # final evaluation
    n_eval: int = arg(512, "held-out test prompts for the final paired comparison with the SFT policy")


def validate(a: Args):
    """Every flag's range, before any work (one line naming the flag, exit 2)."""
    check_flags(a, {"iterations": POSITIVE, "prompts_per_iter": POSITIVE,
                    "group_size": (lambda v: v >= 2, ">= 2 (a sample's baseline comes from the other samples of its "
                                                     "group)"),
                    "max_new_tokens": POSITIVE, "temperature": (lambda v: v > 0, "> 0 (the ratio needs the log-probs "
                                                                                "of a sampling distribution)"),
                    "missing_eos_penalty": NON_NEGATIVE, "kl_coef": NON_NEGATIVE, "epochs": POSITIVE,
                    "minibatches": POSITIVE, "lr": POSITIVE, "clip": POSITIVE, "grad_clip": NON_NEGATIVE,
                    "save_interval": NON_NEGATIVE, "log_interval": POSITIVE,
                    "n_eval": (lambda v: v >= 2, ">= 2 (standard errors need two samples)")})
    B = a.prompts_per_iter * a.group_size
    check(B % a.minibatches == 0, f"--prompts-per-iter x --group-size = {B} samples must be divisible by "
                                  f"--minibatches {a.minibatches}")
    for flag, value, choices in (("--baseline", a.baseline, ("grpo", "rloo")),
                                 ("--loss-agg", a.loss_agg, ("token", "sequence", "constant")),
                                 ("--kl-in", a.kl_in, ("reward", "loss")),
                                 ("--kl-estimator", a.kl_estimator, ("k1", "k2", "k3"))):
        check(value in choices, f"{flag} {value}: choose one of {', '.join(choices)}")


def main(argv=None):
    a = parse_args(Args, argv)
    validate(a)
    device = dist.setup(resolve_device(a.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(a.dtype, device)
    set_seed(a.seed)
    W = dist.world_size()  # under torchrun each rank samples whole groups: prompts_per_iter / W prompts
    check(a.prompts_per_iter % W == 0 and (a.prompts_per_iter // W * a.group_size) % a.minibatches == 0,
          f"--prompts-per-iter {a.prompts_per_iter}: must be divisible by the number of processes {W}, and each "
          f"process's samples (prompts / {W} x --group-size) by --minibatches {a.minibatches}")
    B = a.prompts_per_iter * a.group_size // W  # samples per rollout (of this rank)
    # before any work: is the output location writable, free and no input of the run?
    run_ = Run(a.out_dir, a, resume=a.resume, inputs={"--policy": a.policy, "--reward": a.reward,
                                                       "--prompts": a.prompts})
    state = run_.load_resume()

    # ---- three models: the policy (trained), the frozen reference (SFT copy) and the frozen reward model. No value
    # model: that is the point. load_run turns dropout off (the first ratio must be 1; TRL #3500).
    policy, tok, pol_cfg = load_policy(a.policy, "--policy", device)
    reward_model, _, rm_cfg = load_scalar(a.reward, "--reward", device)
    check_compatible(("--policy", a.policy, pol_cfg), ("--reward", a.reward, rm_cfg))
    ref = copy.deepcopy(policy)
    for m in (ref, reward_model):
        m.requires_grad_(False)
    for m in (policy, ref, reward_model):
        m.eval()
    print(f"policy {a.policy} ({policy.num_params() / 1e6:.2f}M), reward {a.reward}, device {device} ({dtype}); "
          f"{a.prompts_per_iter} prompts x {a.group_size} samples per iteration, baseline {a.baseline}"
          f"{' / std' if a.scale_by_std else ''}, loss-agg {a.loss_agg}, KL in {a.kl_in}"
          f"{' (' + a.kl_estimator + ')' if a.kl_in == 'loss' else ''}")

    # ---- prompts: each train prompt repeated group_size times in a row (group g = samples g*k .. g*k + k - 1)
    task = None if a.prompts else get_task(a.task)
    n_needed = a.iterations * a.prompts_per_iter
    texts, prompt_ids = training_prompts(a.prompts, task, n_needed, a.seed, tok, policy.config.block_size)
    group_ids = torch.arange(a.prompts_per_iter // W, device=device).repeat_interleave(a.group_size)  # (B,)
    all_group_ids = torch.arange(a.prompts_per_iter, device=device).repeat_interleave(a.group_size)  # all ranks

    # no weight decay (it would pull the policy off the SFT weights the KL anchors it to); eps 1e-5 as for PPO
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.0, eps=1e-5, fused=device.startswith("cuda"))
    train_policy = dist.wrap(policy, device)  # DDP under torchrun (averages gradients), else the model itself
    train_policy = torch.compile(train_policy) if a.compile else train_policy
    # Dr. GRPO's constant normaliser: the token budget of the responses in a minibatch (not their actual lengths)
    mb_size = B // a.minibatches
    constant = float(a.max_new_tokens * mb_size)

    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir
    banned = tok.unsampleable_ids(policy.config.vocab_size)  # never sampled, so never scored (rollout.py)
    gen = torch.Generator(device=device).manual_seed(a.seed + 1_000_003 * dist.rank())  # own stream per rank
    t0, start = time.time(), 0
    first_ratio_dev, first_ratio_max = None, 0.0  # of the first iteration; the largest over all
    if state is not None:
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng_ranks"][dist.rank()] if dist.enabled() else state["rng"], [gen])
        start, first_ratio_dev, first_ratio_max = state["step"], state["first_ratio_dev"], state["first_ratio_max"]
        t0 -= state["elapsed_s"]
    log = MetricsLog(out / "metrics.jsonl", keep_rows=state["log_rows"] if state else None)
    finite = FiniteCheck("train_grpo.py", unit="iteration")
    bar = Progress(range(start, a.iterations), desc=a.baseline, total=a.iterations)
    for it in bar:
        for g in opt.param_groups:  # linear lr annealing
            g["lr"] = a.lr * (1.0 - it / a.iterations)

        # ================================================================ rollout (no gradients)
        t_roll = time.time()
        sl = dist.shard(range(it * a.prompts_per_iter, (it + 1) * a.prompts_per_iter))  # this rank's groups
        sl = slice(sl.start, sl.stop)
        ids = [p for p in prompt_ids[sl] for _ in range(a.group_size)]
        strs = [p for p in texts[sl] for _ in range(a.group_size)]
        ro = collect_rollout(policy, ref, reward_model, tok, ids, strs, a.max_new_tokens, a.temperature,
                             a.missing_eos_penalty, gen, device, dtype, task=task, compile=a.compile)
        mask = ro.mask  # (B, R)

        # ================================================================ group advantages
        seq_kl = ((ro.old_logp - ro.ref_logp) * mask).sum(1)  # (B,) k1 estimate of KL(pi_old || pi_ref)
        reward = ro.score - a.kl_coef * seq_kl if a.kl_in == "reward" else ro.score  # (B,) sequence reward
        adv = group_advantages(reward, group_ids, a.baseline, a.scale_by_std)  # (B,), one value per sample
        g = dist.all_gather_cat  # the whole batch's per-sample numbers (the identity in one process)
        rm_score, all_reward = g(ro.rm_score), g(reward)
        roll = {"rm_score_mean": rm_score.mean(), "rm_score_std": rm_score.std(), "score_mean": g(ro.score).mean(),
                "kl": g(seq_kl).mean(), "reward_mean": all_reward.mean(), "resp_len": g(ro.lengths).float().mean(),
                "eos_rate": g(ro.has_eos).float().mean(),
                "zero_adv_groups": zero_advantage_share(all_reward, all_group_ids),
                "adv_abs_mean": g(adv).abs().mean(),
                "sample_logp_diff": dist.all_reduce_max(((ro.sample_logp - ro.old_logp) * mask).abs().max())}
        row = {"iter": it, "episodes": (it + 1) * a.prompts_per_iter * a.group_size, "beta": a.kl_coef,
               **dict(zip(roll, torch.stack([v.float() for v in roll.values()]).tolist()))}  # one host transfer
        if ro.gold is not None:  # gold reward: logged to expose reward hacking, never trained on
            gold = dist.all_gather_objects(ro.gold)
            row["gold_mean"] = sum(gold) / len(gold)
        row["rollout_s"] = time.time() - t_roll

        # ================================================================ update
        # statistics stay on the device until one .tolist() per iteration (as in train_ppo.py)
        stat_names = ("loss", "kl_loss", "approx_kl", "clipfrac", "entropy", "ratio_mean", "ratio_max", "grad_norm")
        mb_stats, first_dev = [], None
        lengths = ro.lengths.tolist()
        kl_ref = ro.ref_logp if a.kl_in == "loss" else None
        for epoch in range(a.epochs):
            perm = torch.randperm(B, generator=gen, device=device) if device == "cpu" else \
                torch.randperm(B, device=device)
            perm_host = perm.tolist()
            for k in range(a.minibatches):
                idx = perm[k * mb_size:(k + 1) * mb_size]
                R = max(lengths[i] for i in perm_host[k * mb_size:(k + 1) * mb_size])  # trim trailing padding
                mb_mask = mask[idx, :R]
                with autocast(device, dtype):
                    logp, entropy = response_logprobs(train_policy, ro.prompt_ids[idx], ro.prompt_mask[idx],
                                                      ro.resp[idx, :R], ro.resp_mask[idx, :R], a.temperature,
                                                      with_entropy=True, banned=banned)  # (mb, R) each
                loss, st = grpo_policy_loss(logp, ro.old_logp[idx, :R], adv[idx], mb_mask, a.clip, a.loss_agg,
                                            None if kl_ref is None else kl_ref[idx, :R], a.kl_coef, a.kl_estimator,
                                            constant)
                if dist.enabled() and a.loss_agg == "token":  # a per-token mean: normalise by the global count
                    n_tok = mb_mask.sum()  # ("sequence" and "constant" divide by equal per-rank numbers already)
                    loss = loss * (n_tok * W / dist.all_reduce_sum(n_tok).clamp(min=1))
                opt.zero_grad(set_to_none=True)
                finite.watch(it, loss=loss)  # checked once per iteration, before logging
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                      a.grad_clip if a.grad_clip > 0 else float("inf"))
                finite.watch(it, grad_norm=norm)
                opt.step()
                ratio, valid = st["ratio"], mb_mask.bool()  # masked reductions: boolean indexing would sync
                ratio_max = ratio.masked_fill(~valid, float("-inf")).max()
                if epoch == 0 and k == 0:  # nothing updated yet: the ratio must be 1 up to rounding
                    first_dev = ((ratio - 1).abs() * valid).max()
                mb_stats.append(torch.stack([loss.detach(), st["kl_loss"], st["approx_kl"], st["clipfrac"],
                                             masked_mean(entropy.detach(), mb_mask), masked_mean(ratio, mb_mask),
                                             ratio_max, norm]).float())
        mb_stats = torch.stack(mb_stats)  # (minibatches, n_stats)
        if dist.enabled():  # means over ranks (ratio_max and the first-ratio deviation: maxima)
            mb_max = dist.all_reduce_max(mb_stats)
            mb_stats = dist.all_reduce_sum(mb_stats) / W
            mb_stats[:, stat_names.index("ratio_max")] = mb_max[:, stat_names.index("ratio_max")]
            first_dev = dist.all_reduce_max(first_dev.float())
        host = torch.cat([mb_stats.flatten(), first_dev.float()[None]]).tolist()
        dev, n = host.pop(), len(stat_names)
        cols = dict(zip(stat_names, zip(*(host[i:i + n] for i in range(0, len(host), n)))))
        row.update({k: (max(v) if k == "ratio_max" else sum(v) / len(v)) for k, v in cols.items()})
        row["first_ratio_dev"], row["first_ratio_tol"] = dev, check_first_ratio(dev, dtype, it)
        first_ratio_dev = dev if first_ratio_dev is None else first_ratio_dev
        first_ratio_max = max(first_ratio_max, dev)
        row["elapsed_s"] = time.time() - t0
        bad = [k for k, v in row.items() if isinstance(v, float) and not torch.isfinite(torch.tensor(v))]
        if bad:
            raise NonFiniteError(f"train_grpo.py: {', '.join(bad)} became non-finite (NaN/inf) at iteration {it}; "
                                 f"stopped without saving (lower --lr)")
        finite.check(policy)  # before the next rollout samples from NaN weights
        log.write(row)
        if it % a.log_interval == 0 or it == a.iterations - 1:
            bar.write(f"it {it:4d} | rm {row['rm_score_mean']:+.3f} | gold {row.get('gold_mean', float('nan')):+.3f}"
                       f" | kl {row['kl']:.2f} | loss {row['loss']:+.4f} | akl {row['approx_kl']:.4f}"
                       f" | clip {row['clipfrac']:.3f} | ent {row['entropy']:.2f} | len {row['resp_len']:.1f}"
                       f" | eos {row['eos_rate']:.2f} | zero-adv groups {row['zero_adv_groups']:.2f}")
        if a.save_interval and (it + 1) % a.save_interval == 0 and it != a.iterations - 1:
            run_.save_resume({"step": it + 1, "unit": "iteration", "policy": policy.state_dict(),
                              "optimizer": opt.state_dict(), "rng": rng_state([gen]),
                              **({"rng_ranks": dist.all_gather_objects([rng_state([gen])])} if dist.enabled() else {}),
                              "first_ratio_dev": first_ratio_dev, "first_ratio_max": first_ratio_max,
                              "log_rows": log.rows, "elapsed_s": time.time() - t0}, finite, [policy])
    log.close()
    train_seconds = time.time() - t0
    dist.assert_identical(policy)  # under torchrun: every rank ends with the same weights
    save_run(out, policy, tok, a, kind="policy", stage="grpo")  # rank 0 only
    if not dist.is_main():  # the held-out comparison and the report are rank 0's
        run_.finish()
        return

    # ---- held-out comparison with the SFT policy (paired by prompt, gold reward, temperature 1), as train_ppo.py
    metrics = {"train_seconds": train_seconds, "first_ratio_dev": first_ratio_dev,
               "first_ratio_dev_max": first_ratio_max, "first_ratio_tol": RATIO_TOLERANCE[dtype],
               "final_rm_score_mean": row["rm_score_mean"], "final_train_kl": row["kl"]}
    if task is not None:
        test_prompts = task.sample_prompts("test", a.n_eval, seed=a.seed)
        cmp, samples = compare_to_reference(policy, ref, tok, task, test_prompts, a.max_new_tokens, seed=a.seed,
                                            device=device, dtype=dtype, reward_model=reward_model)
        metrics.update(cmp)
        print("samples (prompt | response):")
        for s in samples[:5]:
            print(f"  {s['prompt']!r} | {s['response']!r}{'' if s['eos'] else '  [no EOS]'}  gold {s['gold']:+.2f}")
    metrics["total_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    run_.finish()
    out = run_.out
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"wrote {out}/model.pt, config.json, tokenizer.json, metrics.jsonl, metrics.json")


if __name__ == "__main__":
    run(main)
