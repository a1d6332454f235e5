"""Sampling a policy on a list of prompts, the comparisons every stage reports, and the optimal reward-KL frontier.

A policy is judged by its own samples on held-out prompts at temperature 1 (the distribution the KL is defined on;
sampling with top-k/top-p or another temperature than the one scored biases the KL, even below 0: TRL #925,
#1857): gold reward; KL(pi || pi_ref), the mean of the summed per-token log-ratios (k1, unbiased); win rate vs the
reference (same prompt, one sample each, ties half); EOS rate, length, distinct-2 (collapse shows there). The
optimal frontier (Ziegler et al. 2019, 1909.08593): pi* = pi_ref exp(g/beta) / Z maximises E[g] - beta KL; its gold
and KL follow from reference samples by self-normalised importance weighting (optimal_policy_estimate). The
estimators take lists/tensors and are tested against exact enumeration in tests/test_evaluate.py.
"""
import math

import numpy as np
import torch

from minirlhf.harness import dist
from minirlhf.losses import score_with_eos_penalty
from minirlhf.preferences import pearson, spearman
from minirlhf.sampling import response_logprob_sums, reward_model_scores, sample_policy


# ----------------------------------------------------------------------------------------------- estimators
def mean_sem(xs):
    """(mean, standard error of the mean) with the n-1 sample variance; sem is 0 for a single value."""
    xs = np.asarray(xs, dtype=np.float64)
    n = len(xs)
    assert n > 0
    sem = float(xs.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(xs.mean()), sem


def win_outcomes(scores_a, scores_b) -> list:
    """Per-prompt outcome of a against b: 1 (a wins), 0.5 (tie), 0 (a loses)."""
    assert len(scores_a) == len(scores_b) and len(scores_a) > 0
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]


def paired_win_rate_sem(scores_a, scores_b):
    """(win rate, its standard error). The win rate is the mean of the per-prompt outcomes 1 / 0.5 / 0, so its s.e.
    is the s.e. of that mean (n-1 variance); without ties this is the binomial sqrt(p(1-p)/n) up to n/(n-1)."""
    return mean_sem(win_outcomes(scores_a, scores_b))


def paired_gain(scores, ref_scores):
    """(mean of scores - ref_scores, paired standard error: the s.e. of the mean per-prompt difference). Samples of one
    prompt share its difficulty, so this is smaller than the unpaired sqrt(se_a^2 + se_b^2) when the two scores are
    positively correlated across prompts, and it never needs them to be independent."""
    assert len(scores) == len(ref_scores) and len(scores) > 0
    return mean_sem([a - b for a, b in zip(scores, ref_scores)])


def distinct_n(texts, n: int = 2) -> float:
    """Distinct-n (Li et al. 2016, 1510.03055): distinct word n-grams / all word n-grams over all responses.
    Near 1 for varied text; it falls when a policy repeats one answer to every prompt. 0 with no n-grams."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def optimal_policy_estimate(gold, beta: float) -> dict:
    """Gold reward and KL of pi* = pi_ref exp(g/beta) / Z, from K reference samples per prompt. gold: (P, K) gold
    rewards of K samples of pi_ref for each of P prompts (a 1-D input is one prompt). Per prompt, with s = g / beta
    and self-normalised weights w = softmax(s):
        E*[g] ~= sum_k w_k g_k,   log Z ~= log mean_k exp(s_k),   KL(pi* || pi_ref) = E*[g]/beta - log Z,
        ESS = 1 / sum_k w_k^2   (Kish's effective sample size: how many samples carry the weight)
    then averaged over prompts (the frontier is the optimum's average over the prompt set). The KL estimate equals
    log K - H(w), so it never exceeds log K (as beta -> 0 it saturates into best-of-K, ESS -> 1), and for finite K
    both estimates are biased low; frontier_points keeps only points whose worst prompt has enough effective
    samples, where that bias is small (docs/results.md: how good the estimate is).
    "value" = an upper estimate of the optimum of E[g] - beta * KL, beta log Z, for frontier_gold_at's bound past
    the measured range: log Z of the sample mean is biased low by Jensen's inequality, by about half its
    delta-method variance v = Var(Z_hat) / Z^2 ~= 1/ESS - 1/K per prompt, which is added back, and two standard
    errors of the prompts' mean on top: value = beta (mean(log Z + v/2) + 2 sqrt(sum v) / P).
    Returns {"beta", "kl", "gold", "value", "ess", "ess_min"} (ess = mean over prompts, ess_min = the worst)."""
    g = torch.as_tensor(gold, dtype=torch.float64)
    if g.dim() == 1:
        g = g[None]
    K = g.size(1)
    s = g / beta
    w = torch.softmax(s, dim=1)  # stable for any beta: softmax subtracts the max
    log_z = torch.logsumexp(s, dim=1) - math.log(K)
    e_gold = (w * g).sum(1)
    kl = (e_gold / beta - log_z).clamp(min=0.0)  # >= 0 up to rounding (log K - H(w))
    ess = 1.0 / (w * w).sum(1)
    var = (1.0 / ess - 1.0 / K).clamp(min=0.0)  # delta-method Var(Z_hat) / Z^2 per prompt
    value = beta * ((log_z + 0.5 * var).mean() + 2.0 * var.sum().sqrt() / len(var)).item()
    return {"beta": float(beta), "kl": kl.mean().item(), "gold": e_gold.mean().item(), "value": value,
            "ess": ess.mean().item(), "ess_min": ess.min().item()}


def default_betas(n: int = 24, lo: float = 0.02, hi: float = 5.0) -> list:
    """A geometric sweep of beta: large beta = near the reference, small beta = near best-of-K."""
    return [float(b) for b in np.geomspace(hi, lo, n)]


def frontier_points(gold, betas=None, min_ess: float = 10.0):
    """optimal_policy_estimate for each beta. Returns (kept, dropped): points whose smallest per-prompt ESS is at
    least min_ess, sorted by KL, and those that are not (too few effective samples on some prompt to trust; reported,
    not drawn). The worst prompt, not the mean: a mean of 20 can hide prompts whose optimum rests on one sample."""
    points = [optimal_policy_estimate(gold, b) for b in (betas or default_betas())]
    kept = sorted((p for p in points if p["ess_min"] >= min_ess), key=lambda p: p["kl"])
    dropped = [p for p in points if p["ess_min"] < min_ess]
    return kept, dropped


def bootstrap_frontiers(gold, betas=None, min_ess: float = 10.0, n_boot: int = 200, seed: int = 0) -> list:
    """The frontier of each of n_boot resamples (with replacement) of the prompts of gold (P, K): its noise from
    the choice of its P prompts, which a policy's share of the optimum inherits. Returns [(kept points, reference
    gold of the resample)]."""
    g = torch.as_tensor(gold, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_boot):
        rows = g[torch.randint(g.size(0), (g.size(0),), generator=gen)]
        out.append((frontier_points(rows, betas, min_ess)[0], rows.mean().item()))
    return out


def frontier_gold_at(frontier, kl: float, ref_gold: float):
    """The optimal gold reward at `kl` from frontier points (sorted by KL) plus the reference at (0, ref_gold). Within
    the estimated range: linear interpolation (V(KL) is concave, so the chord is a lower bound). Beyond it, the duality
    bound: for every beta, max_pi E[g] - beta * KL = beta log Z, so no policy with KL c beats "value" + beta c; the
    smallest of these over the points bounds V(c) from above up to estimation noise (bootstrap_frontiers measures
    it), and a fraction of the optimum computed from it is a lower bound. Returns (gold, extrapolated: bool)."""
    if kl <= 0 or not frontier:
        return ref_gold, False
    kls = [0.0] + [p["kl"] for p in frontier]
    golds = [ref_gold] + [p["gold"] for p in frontier]
    if kl <= kls[-1]:
        return float(np.interp(kl, kls, golds)), False
    return min(p["value"] + p["beta"] * kl for p in frontier), True


def fraction_of_optimal_sem(gold: float, ref_gold: float, kl: float, gain_sem: float, frontiers) -> float:
    """Standard error of fraction_of_optimal: the policy's gain noise (gain_sem, paired by prompt) and the frontier's
    (the spread of the fraction over bootstrap_frontiers' resamples), added in quadrature. None when undefined."""
    fracs = [fraction_of_optimal(gold, ref_gold, kl, f, r)[0] for f, r in frontiers]
    fracs = [f for f in fracs if f is not None]
    if len(fracs) < 2 or gold == ref_gold:
        return None
    mean = sum(fracs) / len(fracs)
    # d(gain / optimal gain) = d(gain) / optimal gain = fraction * d(gain) / gain
    return math.hypot(float(np.std(fracs, ddof=1)), abs(mean) * gain_sem / abs(gold - ref_gold))


def fraction_of_optimal(gold: float, ref_gold: float, kl: float, frontier, frontier_ref_gold: float,
                        noise: float = 0.0):
    """(gold - ref_gold) / (V(kl) - V(0)): the share of the best possible gold gain at this KL that the policy got, each
    gain from its own curve's reference mean. noise: the s.e. of the policy's gain; an optimal gain below twice it
    gives None (noise over a small number). Returns (fraction or None, optimal gold at kl, extrapolated)."""
    opt, extrapolated = frontier_gold_at(frontier, kl, frontier_ref_gold)
    gain = opt - frontier_ref_gold
    return ((gold - ref_gold) / gain if gain > max(2.0 * noise, 1e-9) else None), opt, extrapolated


def gold_scores(task, samples):
    return [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in samples]


def gold_parts(task, samples):
    """Each sample's parts of the gold reward (task.gold_components: the sentiment and each penalty's count), or
    None when the task does not break its reward down."""
    fn = getattr(task, "gold_components", None)
    return None if fn is None else [fn(s["prompt"], s["response"], s["eos"]) for s in samples]


def mean_parts(parts) -> dict:
    """{part: mean over samples} of gold_parts' output."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def reward_weights(parts, scores, gold_weights: dict) -> dict:
    """How a learned reward prices each part of the gold reward, in gold units. The gold reward is exactly
    sum_k gold_weights[k] * part_k, so a perfect RM (up to the scale and shift Bradley-Terry cannot identify) scores
    a * gold + b. Least squares of the RM's scores (N,) on the parts (N, K) plus an intercept, divided by scale =
    (coefficient of the first part) / (its gold weight), gives weights comparable with gold_weights; a part near 0
    here but not there is one the RM does not see (and a policy can exploit). Returns {"r2" (of that fit), "scale",
    "weights": {part: weight, or None when the part never varies}, "gold_weights"}."""
    names = list(gold_weights)
    X = np.array([[float(p[k]) for k in names] for p in parts], dtype=np.float64)  # (N, K)
    y = np.asarray(scores, dtype=np.float64)
    varies = X.std(0) > 0
    A = np.concatenate([X[:, varies], np.ones((len(y), 1))], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    full = np.full(len(names), np.nan)
    full[varies] = coef[:-1]
    scale = full[0] / gold_weights[names[0]] if varies[0] else float("nan")
    return {"r2": float(1.0 - resid.var() / y.var()) if y.var() > 0 else None, "scale": float(scale),
            "weights": {k: (None if np.isnan(w) else float(w / scale)) for k, w in zip(names, full)},
            "gold_weights": dict(gold_weights)}


def reward_model_vs_gold(rm, tok, task, samples, batch_size: int, device, dtype) -> dict:
    """How a reward model ranks fresh samples against the task's hidden gold reward: Pearson and Spearman
    correlations, its mean score, and how it prices each part of the gold reward (reward_weights). Under torchrun
    each rank scores its share of the samples."""
    r = dist.sharded(lambda mine: reward_model_scores(rm, tok, mine, batch_size, device, dtype), samples)
    gold = gold_scores(task, samples)
    out = {"gold_pearson": pearson(r, gold), "gold_spearman": spearman(r, gold), "eval_reward_mean": sum(r) / len(r)}
    parts = gold_parts(task, samples)
    if parts:
        out["gold_part_weights"] = reward_weights(parts, r, task.GOLD_WEIGHTS)
    return out


@torch.no_grad()
def policy_metrics(policy, ref, tok, samples, ref_samples, task=None, reward_model=None, batch_size: int = 64,
                   device="cpu", dtype="float32", ref_logp=None, missing_eos_penalty: float = None):
    """Metrics of one policy from its samples and, paired by prompt, the reference's samples; adds "kl" (and "gold",
    "rm" when available) to each sample dict. Without a task (user data) there are no gold keys; with a reward model,
    rm_mean/rm_sem and rm_win_rate. Win rates get the s.e. of the mean per-prompt outcome, the gain over the
    reference (gold_gain) the paired s.e. of the per-prompt differences. ref_logp: precomputed reference log-probs of
    `samples`. missing_eos_penalty (with an RM): also score_mean / ref_score_mean, the RM score as RL trains on it."""
    kw = dict(batch_size=batch_size, device=device, dtype=dtype)
    assert [s["prompt"] for s in samples] == [s["prompt"] for s in ref_samples], "win rate needs paired prompts"
    pad = {}
    pol_logp = response_logprob_sums(policy, tok, samples, **kw, stats=pad)
    if ref_logp is None:
        ref_logp = pol_logp if policy is ref else response_logprob_sums(ref, tok, samples, **kw)
    kl = [a - b for a, b in zip(pol_logp, ref_logp)]
    for s, k in zip(samples, kl):
        s["kl"] = k
    m = {"n_prompts": len(samples)}
    m["kl_mean"], m["kl_sem"] = mean_sem(kl)
    rm = ref_rm = None
    if reward_model is not None:
        rm, ref_rm = [reward_model_scores(reward_model, tok, ss, **kw) for ss in (samples, ref_samples)]
    paired_metrics(m, samples, task, gold_scores(task, ref_samples) if task is not None else None, rm,
                   ref_rm)
    if reward_model is not None and missing_eos_penalty is not None:
        for key, ss, rr in (("score_mean", samples, rm), ("ref_score_mean", ref_samples, ref_rm)):
            eos = torch.tensor([s["eos"] for s in ss])
            m[key] = score_with_eos_penalty(torch.tensor(rr), eos, missing_eos_penalty).mean().item()
    m["scoring_padding_share"] = pad.get("scoring_padding_share", 0.0)
    return m


def paired_metrics(m: dict, samples, task, ref_gold, rm, ref_rm):
    """Into m: the gold keys (with a task; ref_gold = the paired reference samples' gold), the RM keys (with rm and
    ref_rm, the two sides' RM scores), then eos_rate, mean_len, distinct_2. Each sample gets its "gold" / "rm"."""
    n = len(samples)
    if task is not None:
        gold = gold_scores(task, samples)
        for s, g in zip(samples, gold):
            s["gold"] = g
        m["gold_mean"], m["gold_sem"] = mean_sem(gold)
        m["ref_gold_mean"], m["ref_gold_sem"] = mean_sem(ref_gold)
        m["win_rate_vs_ref"], m["win_rate_vs_ref_sem"] = paired_win_rate_sem(gold, ref_gold)
        m["gold_gain"], m["gold_gain_sem"] = paired_gain(gold, ref_gold)  # paired by prompt
        parts = gold_parts(task, samples)
        if parts:  # which parts of the gold reward the policy moved (sentiment up, repeats up, ...)
            m["gold_parts"] = mean_parts(parts)
    if rm is not None:
        for s, r in zip(samples, rm):
            s["rm"] = r
        m["rm_mean"], m["rm_sem"] = mean_sem(rm)
        m["ref_rm_mean"] = sum(ref_rm) / n
        m["rm_win_rate"], m["rm_win_rate_sem"] = paired_win_rate_sem(rm, ref_rm)
    m["eos_rate"] = sum(s["eos"] for s in samples) / n
    m["mean_len"] = sum(s["length"] for s in samples) / n
    m["distinct_2"] = distinct_n([s["response"] for s in samples], 2)


@torch.no_grad()
def compare_on_test_prompts(policy, ref, tok, task, n: int, max_new_tokens: int, seed: int, device, dtype,
                            reward_model=None, batch_size: int = 64) -> dict:
    """The numbers every policy-training stage reports: the trained policy against the reference (SFT) on n
    held-out test prompts of the task, one sample per prompt from each at temperature 1 (different seeds), scored
    by policy_metrics (+ sampling_padding_share); prints a few samples. {} without a task (no gold reward)."""
    if task is None:
        return {}
    kw = dict(batch_size=batch_size, device=device, dtype=dtype)
    prompts, pad = task.sample_prompts("test", n, seed=seed), {}
    samples = sample_policy(policy, tok, prompts, max_new_tokens, 1.0, seed=seed, **kw, stats=pad)
    ref_samples = sample_policy(ref, tok, prompts, max_new_tokens, 1.0, seed=seed + 1, **kw)
    metrics = policy_metrics(policy, ref, tok, samples, ref_samples, task, reward_model, **kw)
    metrics["sampling_padding_share"] = pad.get("sampling_padding_share", 0.0)
    print_samples(samples)
    return metrics


def print_samples(samples, n: int = 5):
    """The first n samples as `prompt | response [no EOS] | gold` lines (gold when the samples carry it)."""
    print("samples on held-out prompts (prompt | response" + (" | gold):" if "gold" in samples[0] else "):"))
    for s in samples[:n]:
        gold = f" | {s['gold']:+.2f}" if "gold" in s else ""
        print(f"  {s['prompt']!r} | {s['response']!r}{'' if s['eos'] else '  [no EOS]'}{gold}")


@torch.no_grad()
def estimate_frontier(ref, tok, task, prompts, k: int, max_new_tokens: int, betas=None, min_ess: float = 10.0,
                      seed: int = 0, batch_size: int = 512, device="cpu", dtype="float32", distributed: bool = False):
    """k reference samples per prompt at temperature 1, scored by the gold reward, beta swept (frontier_points). Returns
    {frontier, dropped, ref_gold (the frontier at KL 0), kl_cap (= log k, the largest KL k samples can show),
    n_prompts, samples_per_prompt, min_ess, bootstrap}; distributed: sample_policy's sharded sampling under torchrun."""
    samples = sample_policy(ref, tok, [p for p in prompts for _ in range(k)], max_new_tokens, 1.0,
                            batch_size=batch_size, seed=seed, device=device, dtype=dtype, distributed=distributed)
    gold = torch.tensor(gold_scores(task, samples), dtype=torch.float64).view(len(prompts), k)
    kept, dropped = frontier_points(gold, betas, min_ess)
    return {"frontier": kept, "dropped": dropped, "ref_gold": gold.mean().item(), "kl_cap": math.log(k),
            "n_prompts": len(prompts), "samples_per_prompt": k, "min_ess": min_ess,
            "bootstrap": bootstrap_frontiers(gold, betas, min_ess, seed=seed)}


# ----------------------------------------------------------------------------------------------- best-of-n
def best_of_n_kl(n: int) -> float:
    """KL(pi_bon || pi_ref) <= log n - (n - 1) / n for best-of-n sampling (Stiennon et al. 2020, appendix; Beirami
    et al. 2024, 2401.01879, prove it is an upper bound, tight when no single response carries much probability)."""
    return math.log(n) - (n - 1) / n


def best_of_n_select(scores, n: int):
    """scores (P, N): a score per sample, N samples per prompt. Index (P,) of the best among the first n (first on
    ties). Taking the first n of one set of N samples gives every n from the same draws (nested, cheap)."""
    return scores[:, :n].argmax(1)


@torch.no_grad()
def best_of_n_metrics(ref, reward_model, tok, prompts, ns, ref_samples, max_new_tokens: int, task=None,
                      missing_eos_penalty: float = 2.0, seed: int = 0, batch_size: int = 512, device="cpu",
                      dtype="float32", distributed: bool = False) -> dict:
    """Best-of-n of the reference policy under the reward model, for each n in ns: max(ns) reference samples per
    prompt drawn once (temperature 1), scored by the RM (-missing_eos_penalty without EOS, as PPO and GRPO train),
    the best of the first n kept. ref_samples: the reference's paired samples every win rate is measured against.
    Returns {n: metrics} with policy_metrics' keys, kl_mean = the bound best_of_n_kl(n) (kl_sem 0, kl_is_bound True),
    and "samples" (the chosen ones). distributed: sample_policy's sharded sampling under torchrun."""
    N, P = max(ns), len(prompts)
    kw = dict(batch_size=batch_size, device=device, dtype=dtype)
    samples = sample_policy(ref, tok, [p for p in prompts for _ in range(N)], max_new_tokens, 1.0, seed=seed, **kw,
                            distributed=distributed)
    rm = torch.tensor(reward_model_scores(reward_model, tok, samples, **kw), dtype=torch.float64)
    eos = torch.tensor([s["eos"] for s in samples])
    score = score_with_eos_penalty(rm, eos, missing_eos_penalty).view(P, N)
    ref_rm = reward_model_scores(reward_model, tok, ref_samples, **kw)
    ref_gold = gold_scores(task, ref_samples) if task is not None else None
    out = {}
    for n in ns:
        pick = best_of_n_select(score, n).tolist()
        chosen = [dict(samples[i * N + j], rm=float(rm[i * N + j]), kl=best_of_n_kl(n)) for i, j in enumerate(pick)]
        m = {"n_prompts": P, "best_of": n, "kl_mean": best_of_n_kl(n), "kl_sem": 0.0, "kl_is_bound": True}
        paired_metrics(m, chosen, task, ref_gold, [s["rm"] for s in chosen], ref_rm)
        m["samples"] = chosen
        out[n] = m
    return out
