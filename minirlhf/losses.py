"""Every loss and advantage computation of the pipeline, as pure functions (tensors in, tensors out).

Each is unit-tested against a naive reference implementation written in tests/. Conventions: `mask` tensors
are 1 on valid response tokens and 0 on padding; masked means divide by the number of valid tokens.
"""
import torch
import torch.nn.functional as F


def masked_mean(x, mask, dim=None, all_reduce=None):
    """Mean of x over positions where mask is 1 (all of them when dim is None). all_reduce (dist.all_reduce_sum):
    the sum and the count are summed over ranks, for the statistic of the global batch under torchrun."""
    mask = mask.to(x.dtype)
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    if all_reduce is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    total, n = all_reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    return total / n.clamp(min=1)


# ============================================================================ reward model (Bradley-Terry)
# Shapes: (B,) = one reward per sequence of each preference pair, read at the response's EOS.


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef: float = 0.0):
    """Reward-model loss, averaged over the B pairs:

        L = mean_i[ -log sigmoid(r_c,i - r_r,i - m_i) ]  +  c * mean_i[ (r_c,i + r_r,i)^2 ]

    The first term is the labels' negative log-likelihood under Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r)
    (Bradley & Terry 1952; Christiano et al. 2017; Ouyang et al. 2022); margin m (a float or (B,)) asks the chosen
    reward to win by at least m (Llama 2, 2307.09288). The second is reward centering (Eisenstein et al. 2023,
    2312.09244, c ~ 0.01): BT only sees differences, so without it the offset drifts. r_chosen, r_rejected (B,)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ============================================================================ PPO (GAE, clipped objectives, KL)
# Shapes: (B, R) = (sequences, response tokens); response rows are right-padded, `mask` 1 on real tokens (EOS
# included). References: Schulman et al. 2017 (PPO, 1707.06347), Schulman et al. 2015 (GAE, 1506.02438),
# Ziegler et al. 2019 (KL-shaped reward, adaptive beta, 1909.08593), Huang et al. 2024 (N+ details, 2403.17031).


def masked_var(x, mask, unbiased: bool = True, all_reduce=None):
    """Variance of x over valid positions (Bessel-corrected like torch.var when unbiased); all_reduce: as
    masked_mean (two passes: the global mean first, then the squares)."""
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    n = mask.sum() if all_reduce is None else all_reduce(mask.to(x.dtype).sum())
    var = masked_mean((x - mean) ** 2, mask, all_reduce=all_reduce)
    if unbiased:  # torch.where, not `if n > 1`: that would read n on the host
        var = torch.where(n > 1, var * n / (n - 1), var)
    return var


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8, all_reduce=None):
    """(x - mean) / std over valid positions, padding left at 0. shift_mean=False adds the mean back, so only the spread
    is normalised (lm-human-preferences' reward whitening: moving the mean would change the incentive to stop early).
    all_reduce: as masked_mean; under torchrun every rank must whiten with the global batch's (Huang et al. 2024)."""
    mean, var = masked_mean(x, mask, all_reduce=all_reduce), masked_var(x, mask, all_reduce=all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def score_with_eos_penalty(rm_score, has_eos, penalty: float):
    """The sequence score RL trains on (the "EOS trick": lm-human-preferences; N+ details, 2403.17031): the RM score for
    a response that ended with EOS, a fixed -penalty for one cut off by the budget, whose RM score (on text it never
    saw) is unreliable. rm_score (B,) float, has_eos (B,) bool. Returns (B,)."""
    return torch.where(has_eos, rm_score, torch.full_like(rm_score, -penalty))


def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards of Ziegler et al. 2019: r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) on every valid token,
    plus the score on the row's last valid token (its EOS). score (B,), the rest (B, R). Returns rewards, kl (k1 per
    token, 0 on padding; unbiased for the sequence KL(pi_old || pi_ref) when summed) and non_score = -beta * kl."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    non_score = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of each row's EOS (or last token if cut off)
    rewards = non_score.clone()
    rewards[torch.arange(len(score), device=score.device), last] += score * (mask.sum(1) > 0)
    return rewards, kl, non_score


def gae_advantages(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16), written as the backward recursion
        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},
    with V_{t+1} = 0 and A_{t+1} = 0 after a row's last valid token (the episode ends at EOS or the budget).
    rewards, values, mask (B, R). Returns advantages (B, R) and returns = A + V (B, R), both 0 on padding."""
    mask = mask.to(values.dtype)
    values = values * mask
    B, R = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    advs = [None] * R
    for t in reversed(range(R)):  # R <= a few dozen tokens: a Python loop over time is cheap and readable
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advs[t] = adv
        # padding (mask 0) resets the carry, so the token before it bootstraps from V = 0 and A = 0
        next_value, next_adv = values[:, t] * mask[:, t], adv
    advantages = torch.stack(advs, 1)
    return advantages, (advantages + values) * mask


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, clip_high: float = None):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as a loss to minimise:
        l_t = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)),   ratio = exp(log pi - log pi_old).
    The max picks the clipped term only on the pessimistic ('binding') side: ratio > 1 + eps_high with A > 0, ratio <
    1 - eps with A < 0; there the gradient is 0. eps_high > eps is DAPO's "clip-higher" (Yu et al. 2025, 2503.14476:
    0.2 / 0.28): a rare token with A > 0 may grow further per update, against a symmetric clip's entropy collapse.
    advantages (B, R), or (B,) for one per sample. Returns (l (B, R), stats: ratio (B, R), clipfrac, approx_kl)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    with torch.no_grad():
        stats = {"ratio": ratio.detach(), "clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": approx_kl(logprobs.detach(), old_logprobs, mask)}
    return torch.max(unclipped, clipped), stats


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """The clipped surrogate averaged over valid tokens. Returns (loss, stats of clipped_surrogate)."""
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip)
    return masked_mean(per_token, mask), stats


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss (the OpenAI baselines / lm-human-preferences form):
        0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2),  averaged over valid tokens.
    Returns (loss, clipfrac) where clipfrac is the share of tokens where the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), mask)
    return loss, masked_mean((err_clipped > err_unclipped).float(), mask).detach()


def approx_kl(logprobs, old_logprobs, mask):
    """KL(pi_old || pi) estimated on pi_old's samples with k3 = (ratio - 1) - log ratio (Schulman's 'Approximating
    KL divergence' note): unbiased and never negative, unlike the plain mean of -log ratio."""
    log_ratio = (logprobs - old_logprobs) * mask
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def explained_variance(values, returns, mask, all_reduce=None):
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 = perfect value predictions, <= 0 = useless."""
    var_ret = masked_var(returns, mask, all_reduce=all_reduce)
    return 1.0 - masked_var(returns - values, mask, all_reduce=all_reduce) / var_ret.clamp(min=1e-8)


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: nudge beta so the observed KL tracks a target,
        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon),
    where n is the number of episodes since the last update (lm-human-preferences' K = n / horizon).
    Over a run of N episodes beta can move by at most a factor of about exp(0.2 * N / horizon), so the horizon
    must be a fraction of the run for the controller to reach its target (default_kl_horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def default_kl_horizon(batch_size: int) -> int:
    """The adaptive controller's default horizon: one rollout batch, so each update may move beta by up to 20% (it stays
    > 0); lm-human-preferences' 10,000 episodes suit runs of millions. The price: beta follows each batch's KL noise
    (docs/results.md: "The adaptive KL horizon" has the measurements)."""
    return batch_size


class FixedKLController:
    """beta held at --kl-coef (N+ details and TRL use 0.05)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ============================================================================ DPO family
# One value per preference pair, shapes (B,). Sequence log-probs log pi(y|x) are sums over the response tokens (EOS
# included; prompt and padding excluded) unless said otherwise. With log-ratios h_c = log pi(y_c|x) - log ref(y_c|x)
# and h_r likewise, every loss below is a function of the margin  delta = h_c - h_r  (Rafailov et al. 2023, 2305.18290).


def dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected):
    """delta = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), (B,)."""
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)


def dpo_sigmoid_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                     label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7), per pair:  -log sigmoid(beta * delta). With label_smoothing eps > 0 it is
    conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
        -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta),
    the DPO loss when each label is flipped with probability eps; its minimum sits at a finite margin
    (sigmoid(beta * delta) = 1 - eps) instead of pushing delta to infinity."""
    z = beta * dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """IPO (Azar et al. 2023, 2310.12036, eq. 17), per pair:  (delta - 1 / (2 * beta))^2: a regression of the margin
    onto a fixed target, so it cannot run off to infinity on deterministic labels. train_dpo.py passes per-token
    averaged log-probs by default (as TRL; --no-ipo-length-average passes sums, as the DPO authors' code does)."""
    return (dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected) - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Hinge loss on the DPO margin (SLiC-HF, Zhao et al. 2023, 2305.10425), per pair:  relu(1 - beta * delta).
    Pairs already separated by a margin of 1 / beta give no gradient."""
    return F.relu(1.0 - beta * dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


def simpo_loss(pi_chosen, pi_rejected, len_chosen, len_rejected, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al. 2024, 2405.14734, eq. 6), per pair, with no reference model (the implicit reward is the
    policy's own length-normalised log-prob; gamma a target margin; the paper: beta 2-2.5, gamma / beta about 0.5):
        -log sigmoid(beta / |y_c| * log pi(y_c|x) - beta / |y_r| * log pi(y_r|x) - gamma)"""
    return -F.logsigmoid(beta * (pi_chosen / len_chosen - pi_rejected / len_rejected) - gamma)


def kto_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, z0, beta: float = 0.1, w_desirable: float = 1.0,
             w_undesirable: float = 1.0):
    """KTO (Ethayarajh et al. 2024, 2402.01306, eq. 8) on pairs split into their halves, as TRL does: chosen = a
    desirable example, rejected = an undesirable one. With r = log pi(y|x) - log ref(y|x) and the reference point z0
    (kto_reference_point, detached):

        desirable:    w_D * (1 - sigmoid(beta * (r - z0)))       undesirable:  w_U * (1 - sigmoid(beta * (z0 - r)))

    (the paper's lambda_y - v(x, y)). Each example is judged against z0 alone, not its partner, so the loss also works
    on unpaired data. Returns (desirable losses (B,), undesirable losses (B,))."""
    r_c, r_r = pi_chosen - ref_chosen, pi_rejected - ref_rejected
    return (w_desirable * (1 - torch.sigmoid(beta * (r_c - z0))),
            w_undesirable * (1 - torch.sigmoid(beta * (z0 - r_r))))


def kto_reference_point(pi_mismatched, ref_mismatched, all_reduce=None):
    """KTO's z0 = max(0, mean of log pi(y'|x) - log ref(y'|x)) over mismatched pairs (each prompt with another
    example's response), an estimate of KL(pi || ref) on the batch's prompts; detached, as in the paper (it shifts
    the sigmoid's reference, it is not optimised). all_reduce: the global batch's mean under torchrun."""
    diff = (pi_mismatched - ref_mismatched).detach()
    mean = masked_mean(diff, torch.ones_like(diff), all_reduce=all_reduce)
    return mean.clamp(min=0.0)


def preference_loss(kind: str, pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                    label_smoothing: float = 0.0):
    """Per-pair loss (B,) of the DPO-family member `kind`: sigmoid (with optional label smoothing), ipo or hinge."""
    if kind == "sigmoid":
        return dpo_sigmoid_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if kind == "ipo":
        return ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    if kind == "hinge":
        return hinge_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    raise ValueError(f"unknown preference loss {kind!r} (sigmoid, ipo, hinge)")


# ============================================================================ critic-free RL (GRPO, RLOO, Dr. GRPO)
# k samples ("a group") per prompt; every token of sample i gets the same advantage A_i, computed from the group's
# sequence scores instead of a learned critic. Groups may be ragged: they are given as a group-id tensor (B,) long
# (ids 0..G-1, each used) or as a list of group sizes (consecutive samples). References: Shao et al. 2024 (GRPO,
# DeepSeekMath, 2402.03300), Ahmadian et al. 2024 (RLOO, "Back to Basics", 2402.14740), Kool et al. 2019 (the
# leave-one-out baseline), Liu et al. 2025 (Dr. GRPO, 2503.20783), Schulman 2020 ("Approximating KL divergence").


def group_ids_from_sizes(sizes, device=None):
    """[2, 3] -> tensor([0, 0, 1, 1, 1]): group ids of consecutive groups of the given sizes."""
    sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)


def _as_group_ids(groups, n: int, device):
    """A tensor is taken as group ids (B,); a list or tuple as group sizes."""
    gid = groups.long() if torch.is_tensor(groups) else group_ids_from_sizes(groups)
    assert gid.numel() == n, f"groups cover {gid.numel()} samples, scores have {n}"
    return gid.to(device)


def group_stats(scores, groups):
    """Per-sample statistics of its own group: (mean, sample std (n-1, as torch.std and TRL's GRPO; 0 for a group of
    one), group size as float), each (B,). scores (B,) float; groups: group ids (B,) long or a list of sizes."""
    gid = _as_group_ids(groups, scores.numel(), scores.device)
    G = gid.numel()  # at most one group per sample: no host sync to find the number of groups
    count = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, torch.ones_like(scores))
    total = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, scores)
    mean = (total / count.clamp(min=1))[gid]
    sq = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, (scores - mean) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()[gid]
    return mean, std, count[gid]


def leave_one_out_mean(scores, groups):
    """Mean of the *other* samples of each sample's group, (B,): (sum_group - r_i) / (n - 1) (Kool et al. 2019).
    Independent of r_i, so r_i minus it is an unbiased advantage estimate. A group of one has no other sample:
    its baseline is defined as r_i itself (advantage 0 -- nothing to compare with, no update from it)."""
    mean, _, n = group_stats(scores, groups)
    loo = (mean * n - scores) / (n - 1).clamp(min=1)
    return torch.where(n > 1, loo, scores)


def group_advantages(scores, groups, baseline: str = "grpo", scale_by_std: bool = True, eps: float = 1e-4):
    """Per-sample advantage (B,) from the group's scores (apply it to every token of the sample):
        grpo:  A_i = r_i - mean_group           (Shao et al. 2024; the mean includes r_i itself)
        rloo:  A_i = r_i - mean of the others    (Ahmadian et al. 2024; = k/(k-1) * (r_i - mean_group))
    scale_by_std divides by (sample std of the group + eps), as GRPO does; Dr. GRPO (Liu et al. 2025) drops it, as it
    gives groups whose scores barely differ (too easy or too hard prompts) the largest weight. A group whose scores
    are all equal (or a group of one) gets advantage 0: no learning signal ("wasted" samples, zero_advantage_share)."""
    mean, std, _ = group_stats(scores, groups)
    if baseline == "grpo":
        adv = scores - mean
    elif baseline == "rloo":
        adv = scores - leave_one_out_mean(scores, groups)
    else:
        raise ValueError(f"unknown baseline {baseline!r} (grpo, rloo)")
    if scale_by_std:
        adv = adv / (std + eps)
    return adv


def zero_advantage_share(scores, groups, tol: float = 1e-6):
    """Share of groups whose scores are all equal (max - min <= tol): their advantages are 0, the samples wasted."""
    gid = _as_group_ids(groups, scores.numel(), scores.device)
    G = gid.numel()  # at most one group per sample (no host sync); the ids that occur are the groups
    present = torch.zeros(G, dtype=torch.bool, device=scores.device).index_fill_(0, gid, True)
    hi = torch.full((G,), float("-inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, gid, scores, "amax")
    lo = torch.full((G,), float("inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, gid, scores, "amin")
    return (((hi - lo) <= tol) & present).sum() / present.sum().clamp(min=1)


def kl_estimator(logprobs, ref_logprobs, kind: str = "k3", old_logprobs=None):
    """Per-token estimate of KL(pi || pi_ref) from a sample y ~ pi, as a loss term (B, R) (Schulman 2020), with
    log_r = log pi_ref(y) - log pi(y). The gradient meant is autograd's through log pi with the sample held fixed (no
    score-function term), i.e. how a loss term behaves; tests/test_grpo.py checks each estimator by exact enumeration.

        k1 = -log_r                      value unbiased; expected gradient ZERO (E_pi[grad log pi] = 0): as a loss
                                         term it does nothing on average -- put k1 in the reward instead
        k2 = 1/2 log_r^2                 value biased (low variance); expected gradient = grad of the REVERSE
                                         KL(pi || pi_ref) on-policy (exactly so for one token)
        k3 = exp(log_r) - log_r - 1      value unbiased and >= 0 (GRPO's, beta 0.04); but its expected gradient is
                                         that of the FORWARD KL(pi_ref || pi), a different (mass-covering) penalty
        k3+ = k2 - sg(k2) + sg(k3)       k3's value (what gets logged) with k2's gradient, straight-through (verl)
        unbiased = (pi / pi_old) * k3    DeepSeek-V3.2's correction when the samples come from pi_old != pi (later
                                         epochs): unbiased in value, and the ratio's own gradient adds the score-
                                         function term, so the expected gradient is that of KL(pi || pi_ref).
                                         Needs old_logprobs."""
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    if kind == "k3+":
        k2, k3 = 0.5 * log_r ** 2, torch.expm1(log_r) - log_r
        return k2 - k2.detach() + k3.detach()
    if kind == "unbiased":
        return torch.exp(logprobs - old_logprobs) * (torch.expm1(log_r) - log_r)
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3, k3+, unbiased)")


def aggregate_loss(per_token, mask, agg: str = "token", constant: float = None):
    """Reduce a per-token loss (B, R) to a scalar; the three choices weight tokens differently:
        token     sum over all valid tokens / their number: every token counts the same (DAPO; PPO here)
        sequence  mean over each response's tokens, then over responses: GRPO's 1/|o_i| (Shao et al. 2024, eq. 3),
                  so a token of a short response weighs more than one of a long response
        constant  sum over all valid tokens / constant (Dr. GRPO, Liu et al. 2025: e.g. max_new_tokens x
                  responses); no length bias either way. Default constant: R x B."""
    mask = mask.to(per_token.dtype)
    if agg == "token":
        return masked_mean(per_token, mask)
    if agg == "sequence":
        return (masked_mean(per_token, mask, dim=1)).mean()
    if agg == "constant":
        c = constant if constant is not None else per_token.numel()
        return (per_token * mask).sum() / c
    raise ValueError(f"unknown loss aggregation {agg!r} (token, sequence, constant)")


def gspo_surrogate(logprobs, old_logprobs, advantages, mask, clip: float = 3e-4, clip_high: float = 4e-4):
    """GSPO (Zheng et al. 2025, 2507.18071): one ratio per response, the geometric mean of its tokens' ratios,
        s_i = exp(mean_t (log pi_t - log pi_old_t)),   l_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps, 1 + eps_high)),
    so a response is clipped (or not) as a whole, and a long response's noise does not pile up in one token's
    ratio. Length-normalised, s_i stays near 1: the paper clips at 3e-4 / 4e-4. advantages (B,). Returns (l (B,),
    stats): ratio = the token ratios (B, R) (for the logs), clipfrac = share of responses clipped, approx_kl."""
    log_s = masked_mean(logprobs - old_logprobs, mask, dim=1)  # (B,)
    s = torch.exp(log_s)
    unclipped, clipped = -advantages * s, -advantages * torch.clamp(s, 1.0 - clip, 1.0 + clip_high)
    with torch.no_grad():
        stats = {"ratio": torch.exp((logprobs - old_logprobs) * mask).detach(),
                 "clipfrac": (clipped > unclipped).float().mean(),
                 "approx_kl": approx_kl(logprobs.detach(), old_logprobs, mask)}
    return torch.max(unclipped, clipped), stats


def cispo_surrogate(logprobs, old_logprobs, advantages, mask, clip: float = 1.0, clip_high: float = 0.28):
    """CISPO (MiniMax 2025, 2506.13585): the importance weight is clipped and detached, not the update dropped,
        l_t = -sg(clip(ratio_t, 1 - eps, 1 + eps_high)) * A * log pi_t,
    so its gradient is -w_t A grad log pi_t for every token: one past the bound still learns, with its weight held
    at the bound (PPO's clip gives it no gradient at all). The paper sets no effective lower bound (eps = 1 here:
    w >= 0) and tunes eps_high. advantages (B,) or (B, R). Returns (l (B, R), stats as clipped_surrogate's;
    clipfrac = share of tokens whose weight was clipped)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    w = torch.clamp(ratio, 1.0 - clip, 1.0 + clip_high).detach()
    with torch.no_grad():
        stats = {"ratio": ratio.detach(), "clipfrac": masked_mean((w != ratio).float(), mask),
                 "approx_kl": approx_kl(logprobs.detach(), old_logprobs, mask)}
    return -w * advantages * logprobs, stats


def truncated_is_weights(old_logprobs, sampler_logprobs, mask, cap: float = 2.0):
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"): w_t = min(pi_old(y_t) / pi_sampler(y_t), C), detached, a weight on each token's policy loss. The
    sampler (generate's KV-cache decode, bf16, maybe compiled) and the trainer's full forward compute different
    log-probs for the same tokens; the weight corrects for that, truncated at C against rare large ratios. Returns
    (w (B, R), 1 on padding; stats: is_weight_mean, is_weight_max, is_truncated = share of valid tokens capped)."""
    ratio = torch.exp((old_logprobs - sampler_logprobs) * mask).detach()
    w = ratio.clamp(max=cap)
    stats = {"is_weight_mean": masked_mean(w, mask), "is_weight_max": (w * mask).max(),
             "is_truncated": masked_mean((ratio > cap).float(), mask)}
    return w, stats


def reinforce_pp_advantages(score, logprobs, ref_logprobs, mask, kl_coef: float, groups=None, all_reduce=None):
    """REINFORCE++ (Hu 2025, 2501.03262): per-token rewards r_t = -beta * k1_t plus the sequence score on the last
    token, their return-to-go G_t = sum_{s >= t} r_s as the advantage (gamma 1, no critic), z-scored over every valid
    token of the global batch (all_reduce under torchrun), not per group: less biased than GRPO's per-prompt std, the
    paper argues. groups (ids or sizes): the "baseline" variant, each score minus its group's mean first. Returns A
    (B, R)."""
    if groups is not None:
        score = score - group_stats(score, groups)[0]
    k1 = (logprobs - ref_logprobs) * mask
    returns = score[:, None] - kl_coef * k1.flip(1).cumsum(1).flip(1)  # (B, R) score - beta * sum_{s >= t} k1_s
    return masked_whiten(returns * mask, mask, all_reduce=all_reduce)


def overlong_penalty(lengths, max_len: int, buffer: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) to add to the score: 0 up to max_len - buffer
    tokens, then ((max_len - buffer) - |y|) / buffer, falling linearly to -1 at max_len (and -1 beyond)."""
    return ((max_len - buffer - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)


def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, agg: str = "sequence",
                     ref_logprobs=None, kl_coef: float = 0.0, kl_kind: str = "k3", constant: float = None,
                     clip_high: float = None, pg_loss: str = "clip", is_weight=None):
    """The clipped surrogate of PPO with a per-sample advantage, plus (optionally) a KL loss term, aggregated by agg:

        l_t = max(-A_i * ratio_t, -A_i * clip(ratio_t, 1 - eps, 1 + eps_high)) + kl_coef * k(log pi_t, log pi_ref_t)

    (GRPO, Shao et al. 2024, eq. 3). advantages (B,) or (B, R); the rest (B, R). With one epoch of one minibatch the
    ratio is 1 and the gradient is REINFORCE with a baseline, A_i * grad log pi. pg_loss: clip (above), gspo
    (gspo_surrogate's per-response loss on each of its tokens; aggregate by sequence) or cispo. is_weight (B, R):
    truncated_is_weights, on the policy term. clip_high: the upper eps (default clip). Returns (loss, stats): ratio
    (B, R), clipfrac, approx_kl (KL(pi_old || pi), k3) and kl_loss (the aggregated KL term), detached."""
    clip_high = clip if clip_high is None else clip_high
    if pg_loss == "clip":
        per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip, clip_high)
    elif pg_loss == "gspo":
        per_seq, stats = gspo_surrogate(logprobs, old_logprobs, advantages, mask, clip, clip_high)
        per_token = per_seq[:, None].expand_as(logprobs)
    elif pg_loss == "cispo":
        per_token, stats = cispo_surrogate(logprobs, old_logprobs, advantages, mask, clip, clip_high)
    else:
        raise ValueError(f"unknown policy loss {pg_loss!r} (clip, gspo, cispo)")
    if is_weight is not None:
        per_token = per_token * is_weight
    kl_loss = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None and kl_coef:
        kl_tok = kl_estimator(logprobs, ref_logprobs, kl_kind, old_logprobs) * mask
        kl_loss = aggregate_loss(kl_tok, mask, agg, constant)
        per_token = per_token + kl_coef * kl_tok
    return aggregate_loss(per_token, mask, agg, constant), {**stats, "kl_loss": kl_loss.detach()}
