"""Stage 3 of RLHF: PPO against the learned reward model, with a per-token KL penalty to the frozen SFT policy.

    python train_ppo.py                                  # --policy out/sft --reward out/rm -> out/ppo
    python train_ppo.py --target-kl 6                    # adaptive beta (Ziegler et al. 2019) instead of fixed
    python train_ppo.py --prompts my_prompts.jsonl       # your {"prompt"} records (no gold reward to report)

Four models: the policy (trained), the reference (frozen SFT copy, for the KL penalty), the reward model (frozen)
and the value model (a separate ScalarModel initialised from the reward model, trained). Each iteration:
  rollout (no grad)  sample responses at temperature T -> old log-probs, reference log-probs, values, RM score
                     -> per-token rewards r_t = -beta * (logpi_old - logpi_ref) + score on the EOS token
                     -> GAE advantages and returns -> advantages whitened over the batch's valid tokens
  update             --ppo-epochs passes over shuffled minibatches: clipped policy loss + clipped value loss
The gold reward of the built-in task is only logged (to see reward hacking: RM score up, gold down) and used for
the final comparison with the SFT policy; it never enters the training signal.
"""
import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.evaluation.metrics import compare_to_reference, policy_metrics
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import check_compatible, load_policy, load_scalar, save_run
from minirlhf.harness.cli import (NON_NEGATIVE, POSITIVE, MetricsLog, Progress, arg, check_flags, parse_args,
                                  resolve_device, resolve_dtype, run, set_seed)
from minirlhf.harness.files import write_json
from minirlhf.harness.runs import FiniteCheck, NonFiniteError, Run, rng_state, set_rng_state
from minirlhf.losses import (AdaptiveKLController, FixedKLController, default_kl_horizon, explained_variance,
                             gae_advantages, kl_shaped_rewards, masked_mean, ppo_policy_loss, ppo_value_loss)
from minirlhf.rollout import check_first_ratio, collect_rollout, training_prompts
from minirlhf.sampling import sample_policy
from minirlhf.scoring import RATIO_TOLERANCE, response_logprobs, response_values
from minirlhf.tasks import get_task
from minirlhf.utils import autocast, check


@dataclass
class Args:
    """PPO with GAE, clipping and a per-token KL penalty (stage 3 of RLHF)."""
    policy: str = arg("out/sft", "SFT run directory: the initial policy and the frozen reference")
    reward: str = arg("out/rm", "reward-model run directory (also initialises the value model)")
    out_dir: str = arg("out/ppo", "run directory to write")
    task: str = arg("reviews", "built-in task for prompts and the (logging/evaluation only) gold reward")
    prompts: Optional[str] = arg(None, "JSONL of {prompt} records to train on instead of the built-in task")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    seed: int = arg(0, "random seed")
    compile: bool = arg(False, "torch.compile the policy and value model for the update passes, and the rollouts' decode step")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(10, "iterations between resume checkpoints in <out-dir>.partial (0 = none)")
    # rollouts
    iterations: int = arg(50, "PPO iterations (one rollout batch + its update epochs each)")
    batch_size: int = arg(64, "prompts (one response each) per rollout")
    max_new_tokens: int = arg(48, "response budget in tokens")
    temperature: float = arg(1.0, "rollout sampling temperature; log-probs use the same one (N+ details)")
    missing_eos_penalty: float = arg(2.0, "a response without EOS gets score -penalty (normalised RM units) "
                                          "instead of its RM score")
    # reward shaping
    kl_coef: float = arg(0.07, "beta of the per-token KL penalty (the initial value when --target-kl is set)")
    target_kl: float = arg(0.0, "adaptive beta: target sequence KL in nats (0 = fixed beta)")
    kl_horizon: int = arg(0, "adaptive beta: horizon in episodes (Ziegler et al. 2019); 0 = one rollout batch, "
                             "beta moves up to 20%% per iteration (losses.default_kl_horizon)")
    whiten_rewards: bool = arg(False, "rescale per-token rewards to unit std over the batch (no mean shift)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    # optimisation
    ppo_epochs: int = arg(4, "passes over each rollout batch")
    minibatches: int = arg(4, "minibatches per pass")
    lr: float = arg(1e-4, "policy learning rate (linearly annealed to 0)")
    value_lr: float = arg(1e-4, "value-model learning rate (linearly annealed to 0): the knob for how fast the "
                                "value model learns (there is no value-loss weight: with separate networks and Adam "
                                "it would only rescale gradients that Adam normalises away)")
    clip: float = arg(0.2, "policy ratio clip epsilon")
    value_clip: float = arg(0.2, "value clip epsilon (normalised RM units)")
    grad_clip: float = arg(1.0, "gradient norm clip, per model (0 = off)")
    approx_kl_stop: float = arg(0.0, "stop the epoch loop when an epoch's mean approx_kl exceeds this (0 = off)")
    log_interval: int = arg(10, "iterations between console lines (metrics.jsonl gets every iteration)")
    # evaluation
    n_eval: int = arg(512, "held-out test prompts for the final paired comparison with the SFT policy")
    eval_interval: int = arg(0, "every N iterations also score the current policy on held-out prompts (gold, KL, "
                                "RM score: eval_* keys of that iteration's metrics.jsonl line); 0 = only at the end")
    eval_prompts: int = arg(256, "held-out test prompts of each --eval-interval evaluation (the SFT's samples on "
                                 "them are drawn once)")


def validate(a: Args):
    """Every flag's range, before any work (one line naming the flag, exit 2)."""
    check(a.temperature > 0, f"--temperature {a.temperature}: must be > 0 (PPO needs the log-probs of a sampling "
                             "distribution)")
    check_flags(a, {"iterations": POSITIVE, "batch_size": POSITIVE, "max_new_tokens": POSITIVE,
                    "missing_eos_penalty": NON_NEGATIVE, "kl_coef": NON_NEGATIVE, "target_kl": NON_NEGATIVE,
                    "kl_horizon": NON_NEGATIVE, "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
                    "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"), "ppo_epochs": POSITIVE, "minibatches": POSITIVE,
                    "lr": POSITIVE, "value_lr": POSITIVE, "clip": POSITIVE, "value_clip": POSITIVE,
                    "grad_clip": NON_NEGATIVE, "approx_kl_stop": NON_NEGATIVE, "log_interval": POSITIVE,
                    "eval_interval": NON_NEGATIVE, "eval_prompts": (lambda v: v >= 2, ">= 2"),
                    "n_eval": (lambda v: v >= 2, ">= 2 (standard errors need two samples)")})
    check(a.batch_size % a.minibatches == 0, f"--batch-size {a.batch_size} must be divisible by --minibatches "
                                             f"{a.minibatches}")
    check(not (a.eval_interval and a.prompts), "--eval-interval needs the built-in task's held-out prompts and gold "
                                               "reward (not available with --prompts)")
    check(a.target_kl == 0 or a.kl_coef > 0, "--kl-coef 0 with --target-kl: the adaptive controller scales beta, "
                                             "so it must start > 0")


@torch.no_grad()
def held_out_eval(policy, ref, reward_model, tok, task, ref_samples, a: Args, device, dtype, seed: int) -> dict:
    """The current policy on the held-out prompts of ref_samples (one sample each, temperature 1): gold, gain over
    the reference's samples (paired s.e.), KL(pi || ref) +- s.e., the RM score raw and as trained on (EOS penalty),
    win rate, and each part of the gold reward (eval_part_*: mean sentiment, repeated words, ... when the task breaks
    its reward down). Keys eval_*; what overopt.py plots against KL."""
    samples = sample_policy(policy, tok, [s["prompt"] for s in ref_samples], a.max_new_tokens, 1.0,
                            seed=a.seed + 2 + seed, device=device, dtype=dtype)
    m = policy_metrics(policy, ref, tok, samples, ref_samples, task, reward_model, device=device, dtype=dtype,
                       missing_eos_penalty=a.missing_eos_penalty)
    keys = ("gold_mean", "gold_sem", "ref_gold_mean", "gold_gain", "gold_gain_sem", "kl_mean", "kl_sem", "rm_mean",
            "ref_rm_mean", "score_mean", "ref_score_mean", "win_rate_vs_ref", "eos_rate")
    parts = {f"eval_part_{k}": v for k, v in m.get("gold_parts", {}).items()}  # which parts of the gold moved
    return {**{f"eval_{k}": m[k] for k in keys}, **parts}


def main(argv=None):
    a = parse_args(Args, argv)
    validate(a)
    device = dist.setup(resolve_device(a.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(a.dtype, device)
    W = dist.world_size()  # each rank rolls out batch_size / W prompts and trains on minibatches of that share
    check(a.batch_size % (W * a.minibatches) == 0, f"--batch-size {a.batch_size} must be divisible by --minibatches "
                                                   f"{a.minibatches} times the number of processes {W}")
    set_seed(a.seed)
    # before any work: is the output location writable, free and no input of the run?
    run_ = Run(a.out_dir, a, resume=a.resume, inputs={"--policy": a.policy, "--reward": a.reward,
                                                       "--prompts": a.prompts})
    state = run_.load_resume()

    # ---- the four models. load_run turns dropout off in all of them: with dropout the rollout and training
    # forwards disagree, the first ratio is not 1 and the KL is noise (TRL #3500). eval() everywhere for the same
    # reason; eval() does not stop gradients.
    policy, tok, pol_cfg = load_policy(a.policy, "--policy", device)
    reward_model, rm_tok, rm_cfg = load_scalar(a.reward, "--reward", device)
    check_compatible(("--policy", a.policy, pol_cfg), ("--reward", a.reward, rm_cfg))
    ref = copy.deepcopy(policy)
    value_model = copy.deepcopy(reward_model)  # value model starts as the RM (N+ details, TRL)
    for m in (ref, reward_model):
        m.requires_grad_(False)
    for m in (policy, ref, reward_model, value_model):
        m.eval()
    print(f"policy {a.policy} ({policy.num_params() / 1e6:.2f}M), reward/value init {a.reward}, device {device} "
          f"({dtype})")

    # ---- prompts: train prompts for rollouts, held-out test prompts for the final comparison
    task = None if a.prompts else get_task(a.task)
    n_needed = a.iterations * a.batch_size
    texts, prompt_ids = training_prompts(a.prompts, task, n_needed, a.seed, tok, policy.config.block_size)

    # one optimizer, two parameter groups; no weight decay (it would pull the policy away from the SFT weights
    # the KL penalty anchors it to); eps 1e-5 as in the PPO reference implementations
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": a.lr},
                             {"params": value_model.parameters(), "lr": a.value_lr}],
                            weight_decay=0.0, betas=(0.9, 0.999), eps=1e-5, fused=device.startswith("cuda"))
    base_lrs = [g["lr"] for g in opt.param_groups]
    # DDP under torchrun, one wrapper per trained model (they share no parameters); the models themselves otherwise
    train_policy, train_value = dist.wrap(policy, device), dist.wrap(value_model, device)
    train_policy = torch.compile(train_policy) if a.compile else train_policy
    train_value = torch.compile(train_value) if a.compile else train_value
    kl_horizon = a.kl_horizon or default_kl_horizon(a.batch_size)
    kl_ctl = AdaptiveKLController(a.kl_coef, a.target_kl, kl_horizon) if a.target_kl > 0 \
        else FixedKLController(a.kl_coef)

    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir
    banned = tok.unsampleable_ids(policy.config.vocab_size)  # never sampled, so never scored (rollout.py)
    # under torchrun every rank samples its own prompts with its own stream (rank 0 keeps the one-process seed)
    gen = torch.Generator(device=device).manual_seed(a.seed + 1_000_003 * dist.rank())
    t0, start = time.time(), 0
    first_ratio_dev, first_ratio_max = None, 0.0  # of the first iteration; the largest over all
    if state is not None:
        policy.load_state_dict(state["policy"])
        value_model.load_state_dict(state["value_model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng_ranks"][dist.rank()] if dist.enabled() else state["rng"], [gen])
        vars(kl_ctl).update(state["kl_ctl"])
        start, first_ratio_dev = state["step"], state["first_ratio_dev"]
        first_ratio_max = state["first_ratio_max"]
        t0 -= state["elapsed_s"]
    log = MetricsLog(out / "metrics.jsonl", keep_rows=state["log_rows"] if state else None)
    # Held-out evaluations along the way (--eval-interval; rank 0): the reference's samples on the held-out prompts
    # are drawn once, so every evaluation is paired by prompt with the same SFT responses.
    eval_prompts = eval_ref = None
    if a.eval_interval and dist.is_main():
        eval_prompts = task.sample_prompts("test", a.eval_prompts, seed=a.seed)
        eval_ref = sample_policy(ref, tok, eval_prompts, a.max_new_tokens, 1.0, seed=a.seed + 1, device=device,
                                 dtype=dtype)
    finite = FiniteCheck("train_ppo.py", unit="iteration")
    bar = Progress(range(start, a.iterations), desc="ppo", total=a.iterations)
    for it in bar:
        frac = 1.0 - it / a.iterations  # linear lr annealing (CleanRL's anneal_lr)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * frac
        beta = kl_ctl.value

        # ================================================================ rollout (no gradients)
        t_roll = time.time()
        sl = dist.shard(range(it * a.batch_size, (it + 1) * a.batch_size))  # this rank's prompts of the batch
        sl = slice(sl.start, sl.stop)
        ro = collect_rollout(policy, ref, reward_model, tok, prompt_ids[sl], texts[sl], a.max_new_tokens,
                             a.temperature, a.missing_eos_penalty, gen, device, dtype, value_model=value_model,
                             task=task, compile=a.compile)
        p_ids, p_mask, resp, resp_mask, mask = ro.prompt_ids, ro.prompt_mask, ro.resp, ro.resp_mask, ro.mask
        old_logp, old_values = ro.old_logp, ro.values  # (B, R) each
        B = resp.size(0)  # this rank's rollouts; a.batch_size in all
        g = dist.all_gather_cat  # per-sequence numbers of the whole batch (the identity in one process)

        # ================================================================ advantages
        rewards, kl, non_score = kl_shaped_rewards(ro.score, old_logp, ro.ref_logp, mask, beta)  # (B, R) each
        if a.whiten_rewards:
            rewards = dist.masked_whiten(rewards, mask, shift_mean=False)  # statistics of the global batch
        advantages, returns = gae_advantages(rewards, old_values, mask, a.gamma, a.lam)  # (B, R) each
        advantages = dist.masked_whiten(advantages, mask)  # = losses.masked_whiten of the global batch
        seq_kl = kl.sum(1)  # (B,) k1 estimate of KL(pi_old || pi_ref) per sequence
        # rollout statistics as tensors, moved to the host in one transfer
        # Under torchrun every number is the global batch's (per-sequence vectors gathered, token sums all-reduced),
        # so the KL fed to the controller, and with it beta, is the same on every rank.
        rm_score, score, non_score_sum = g(ro.rm_score), g(ro.score), g(non_score.sum(1))
        if dist.enabled():
            ev = 1.0 - dist.masked_var(returns - old_values, mask) / dist.masked_var(returns, mask).clamp(min=1e-8)
        else:
            ev = explained_variance(old_values, returns, mask)
        roll = {"rm_score_mean": rm_score.mean(), "rm_score_std": rm_score.std(),
                "score_mean": score.mean(), "kl": g(seq_kl).mean(), "non_score_reward": non_score_sum.mean(),
                "total_reward": (score + non_score_sum).mean(), "resp_len": g(ro.lengths).float().mean(),
                "eos_rate": g(ro.has_eos).float().mean(),
                "explained_var": ev,
                "value_mean": dist.masked_mean(old_values, mask),
                # per-token rewards as trained on (after --whiten-rewards): mean and std over valid tokens
                "reward_mean": dist.masked_mean(rewards, mask), "reward_std": dist.masked_var(rewards, mask).sqrt(),
                "sample_logp_diff": dist.all_reduce_max(((ro.sample_logp - old_logp) * mask).abs().max())}
        row = {"iter": it, "episodes": (it + 1) * a.batch_size, "beta": beta,
               **dict(zip(roll, torch.stack([v.float() for v in roll.values()]).tolist()))}
        if ro.gold is not None:  # gold reward: logged to expose reward hacking, never trained on
            gold = dist.all_gather_objects(ro.gold)
            row["gold_mean"] = sum(gold) / len(gold)
        row["rollout_s"] = time.time() - t_roll

        # ================================================================ PPO update
        # Per-minibatch statistics stay on the device as one (n_stats,) tensor each; a single .tolist() per
        # iteration moves them to the host (an .item() per statistic stalls a GPU ~10 times per minibatch).
        # A non-finite loss is caught by the non-finite-diagnostics check below (pg_loss / vf_loss turn NaN).
        stat_names = ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy", "ratio_mean",
                      "ratio_max", "pg_grad_norm", "vf_grad_norm")
        mb_stats, first_dev = [], None
        lengths = ro.lengths.tolist()  # host copy: trimming a minibatch's padding columns then needs no sync
        mb_size = B // a.minibatches
        for epoch in range(a.ppo_epochs):
            perm = torch.randperm(B, generator=gen, device=device) if device == "cpu" else \
                torch.randperm(B, device=device)
            perm_host = perm.tolist()  # one sync per epoch
            epoch_kl = []
            for k in range(a.minibatches):
                idx = perm[k * mb_size:(k + 1) * mb_size]
                R = max(lengths[i] for i in perm_host[k * mb_size:(k + 1) * mb_size])  # trim trailing padding
                mb_resp, mb_rmask, mb_mask = resp[idx, :R], resp_mask[idx, :R], mask[idx, :R]
                with autocast(device, dtype):
                    logp, entropy = response_logprobs(train_policy, p_ids[idx], p_mask[idx], mb_resp, mb_rmask,
                                                      a.temperature, with_entropy=True, banned=banned)  # (mb, R) each
                    values = response_values(train_value, p_ids[idx], p_mask[idx], mb_resp, mb_rmask)  # (mb, R)
                pg_loss, pg = ppo_policy_loss(logp, old_logp[idx, :R], advantages[idx, :R], mb_mask, a.clip)
                vf_loss, vf_clipfrac = ppo_value_loss(values, old_values[idx, :R], returns[idx, :R], mb_mask,
                                                      a.value_clip)
                # Policy and value model share no parameters, so the sum backpropagates each loss into its own
                # model only; a weight on vf_loss would only rescale the value gradients, which Adam's per-parameter
                # normalisation (and the per-model clip) undo: --value-lr is the value model's knob.
                loss = pg_loss + vf_loss
                if dist.enabled():  # per-token means of this rank's minibatch -> its share of the global one's
                    n_tok = mb_mask.sum()
                    loss = loss * (n_tok * dist.world_size() / dist.all_reduce_sum(n_tok).clamp(min=1))
                finite.watch(it, pg_loss=pg_loss, vf_loss=vf_loss)  # checked once per iteration, before logging
                opt.zero_grad(set_to_none=True)
                loss.backward()
                big = a.grad_clip if a.grad_clip > 0 else float("inf")
                pg_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), big)
                vf_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), big)
                finite.watch(it, pg_grad_norm=pg_norm, vf_grad_norm=vf_norm)
                opt.step()
                ratio, valid = pg["ratio"], mb_mask.bool()  # masked reductions: boolean indexing would sync
                ratio_max = ratio.masked_fill(~valid, float("-inf")).max()
                if epoch == 0 and k == 0:
                    # Nothing has been updated yet: the ratio must be 1 (same weights, temperature, padding and
                    # positions as the rollout), up to the dtype's rounding. Checked after the loop (no sync here).
                    first_dev = ((ratio - 1).abs() * valid).max()
                mb_stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg["approx_kl"], pg["clipfrac"],
                                             vf_clipfrac, masked_mean(entropy.detach(), mb_mask),
                                             masked_mean(ratio, mb_mask), ratio_max, pg_norm, vf_norm]).float())
                epoch_kl.append(pg["approx_kl"])
            epoch_kl = torch.stack(epoch_kl).mean()
            if a.approx_kl_stop > 0 and dist.enabled():  # every rank must take the same decision
                epoch_kl = dist.all_reduce_sum(epoch_kl) / dist.world_size()
            if a.approx_kl_stop > 0 and epoch_kl.item() > a.approx_kl_stop:
                break  # the policy moved too far from the one that collected the data
        mb_stats = torch.stack(mb_stats)  # (minibatches done, n_stats)
        if dist.enabled():  # means over ranks (ratio_max and the first-ratio deviation: maxima)
            mb_max = dist.all_reduce_max(mb_stats)
            mb_stats = dist.all_reduce_sum(mb_stats) / dist.world_size()
            mb_stats[:, stat_names.index("ratio_max")] = mb_max[:, stat_names.index("ratio_max")]
            first_dev = dist.all_reduce_max(first_dev.float())
        host = torch.cat([mb_stats.flatten(), first_dev.float()[None]]).tolist()  # the one transfer
        dev, n = host.pop(), len(stat_names)
        cols = dict(zip(stat_names, zip(*(host[i:i + n] for i in range(0, len(host), n)))))  # name -> per-minibatch
        row.update({k: (max(v) if k == "ratio_max" else sum(v) / len(v)) for k, v in cols.items()})
        row["first_ratio_dev"], row["first_ratio_tol"] = dev, check_first_ratio(dev, dtype, it)
        first_ratio_dev = dev if first_ratio_dev is None else first_ratio_dev
        first_ratio_max = max(first_ratio_max, dev)
        row["epochs_done"] = epoch + 1
        kl_ctl.update(row["kl"], a.batch_size)  # the global KL and batch: beta is the same on every rank
        row["elapsed_s"] = time.time() - t0
        bad = [k for k, v in row.items() if isinstance(v, float) and not torch.isfinite(torch.tensor(v))]
        if bad:
            raise NonFiniteError(f"train_ppo.py: {', '.join(bad)} became non-finite (NaN/inf) at iteration {it}; "
                                 f"stopped without saving (lower --lr, or raise --kl-coef)")
        finite.check(policy, value_model)  # before the next rollout samples from NaN weights
        if eval_ref is not None and ((it + 1) % a.eval_interval == 0 or it == a.iterations - 1):
            t_eval = time.time()
            row.update(held_out_eval(policy, ref, reward_model, tok, task, eval_ref, a, device, dtype, seed=it))
            row["eval_s"] = time.time() - t_eval
        log.write(row)
        if it % a.log_interval == 0 or it == a.iterations - 1:
            bar.write(f"it {it:4d} | rm {row['rm_score_mean']:+.3f} | gold {row.get('gold_mean', float('nan')):+.3f}"
                       f" | kl {row['kl']:.2f} | beta {beta:.3f} | pg {row['pg_loss']:+.4f} | vf {row['vf_loss']:.4f}"
                       f" | akl {row['approx_kl']:.4f} | clip {row['clipfrac']:.3f} | ent {row['entropy']:.2f}"
                       f" | ev {row['explained_var']:+.2f} | len {row['resp_len']:.1f} | eos {row['eos_rate']:.2f}")
        if a.save_interval and (it + 1) % a.save_interval == 0 and it != a.iterations - 1:
            run_.save_resume({"step": it + 1, "unit": "iteration", "policy": policy.state_dict(),
                              "value_model": value_model.state_dict(), "optimizer": opt.state_dict(),
                              "rng": rng_state([gen]), "kl_ctl": vars(kl_ctl),
                              **({"rng_ranks": dist.all_gather_objects([rng_state([gen])])} if dist.enabled() else {}), "first_ratio_dev": first_ratio_dev,
                              "first_ratio_max": first_ratio_max, "log_rows": log.rows,
                              "elapsed_s": time.time() - t0}, finite, [policy, value_model])
    log.close()
    train_seconds = time.time() - t0
    dist.assert_identical(policy, value_model)  # under torchrun: every rank ends with the same weights
    save_run(out, policy, tok, a, kind="policy", stage="ppo")  # rank 0 only
    if not dist.is_main():  # the held-out comparison and the report are rank 0's
        run_.finish()
        return

    # ---- held-out comparison with the SFT policy (paired by prompt, gold reward, temperature 1)
    metrics = {"train_seconds": train_seconds, "first_ratio_dev": first_ratio_dev,
               "first_ratio_dev_max": first_ratio_max, "first_ratio_tol": RATIO_TOLERANCE[dtype],
               "final_beta": kl_ctl.value, "kl_horizon": kl_horizon, "final_rm_score_mean": row["rm_score_mean"],
               "final_train_kl": row["kl"]}
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
