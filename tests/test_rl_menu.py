"""Today's RL menu as pure functions, each against a naive reference written here: DAPO's clip-higher and overlong
penalty, GSPO's sequence ratio, CISPO's clipped stop-gradient weight, truncated importance sampling, REINFORCE++
advantages (and its baseline variant on ragged groups), the k3+ and unbiased KL terms (values and expected
gradients by exact enumeration), and SimPO / KTO on hand-computed cases."""
import math

import pytest
import torch

from minirlhf.losses import (clipped_surrogate, cispo_surrogate, grpo_policy_loss, gspo_surrogate, kl_estimator,
                             kto_loss, kto_reference_point, overlong_penalty, reinforce_pp_advantages, simpo_loss,
                             truncated_is_weights)

D = torch.float64
SIZES = [3, 1, 4, 2]  # ragged groups; the third one's scores are all equal


def batch(seed=0, B=4, R=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, R, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, R, generator=g, dtype=D)  # ratios well inside and well outside the clip
    mask = torch.ones(B, R, dtype=D)
    for i, n in enumerate([5, 3, 1, 4][:B]):
        mask[i, n:] = 0  # ragged responses
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5][:B], dtype=D)
    return logp, old, mask, adv


def test_clip_higher_against_a_loop():
    logp, old, mask, adv = batch()
    got, stats = clipped_surrogate(logp, old, adv, mask, clip=0.2, clip_high=0.28)
    for i in range(4):
        for t in range(5):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t].item() - old[i, t].item())
            want = max(-adv[i].item() * r, -adv[i].item() * min(max(r, 0.8), 1.28))
            assert got[i, t].item() == pytest.approx(want, rel=1e-12)
    # the upper bound moved, the lower did not: a ratio of 1.25 with A > 0 is clipped at 0.2, not at 0.28
    one = torch.tensor([[math.log(1.25)]], requires_grad=True)
    for high, grad in ((None, 0.0), (0.28, -1.25)):
        (g,) = torch.autograd.grad(clipped_surrogate(one, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.2,
                                                     high)[0].sum(), one)
        assert g.item() == pytest.approx(grad)


def test_gspo_ratio_is_per_sequence_against_a_loop():
    logp, old, mask, adv = batch(1)
    got, stats = gspo_surrogate(logp, old, adv, mask, clip=0.05, clip_high=0.08)
    clipped = 0
    for i in range(4):
        n = int(mask[i].sum())
        s = math.exp(sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n)
        want = max(-adv[i].item() * s, -adv[i].item() * min(max(s, 0.95), 1.08))
        clipped += -adv[i].item() * min(max(s, 0.95), 1.08) > -adv[i].item() * s
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert 0 < clipped < 4 and stats["clipfrac"].item() == clipped / 4  # both kinds of responses occur
    # through grpo_policy_loss: the sequence aggregation of the per-response loss is its mean over responses
    loss, _ = grpo_policy_loss(logp, old, adv, mask, 0.05, "sequence", clip_high=0.08, pg_loss="gspo")
    assert loss.item() == pytest.approx(got.mean().item(), rel=1e-12)


def test_cispo_keeps_a_gradient_where_ppo_clips():
    logp, old, mask, adv = batch(2)
    got, stats = cispo_surrogate(logp, old, adv, mask, clip=1.0, clip_high=0.1)
    (g,) = torch.autograd.grad((got * mask).sum(), logp)
    ppo, _ = clipped_surrogate(logp, old, adv, mask, 0.1, 0.1)
    (g_ppo,) = torch.autograd.grad((ppo * mask).sum(), logp)
    n_clipped = 0
    for i in range(4):
        for t in range(int(mask[i].sum())):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            w = min(r, 1.1)
            assert got[i, t].item() == pytest.approx(-w * adv[i].item() * logp[i, t].item(), rel=1e-12)
            assert g[i, t].item() == pytest.approx(-w * adv[i].item(), rel=1e-12)  # d/dlogp of -sg(w) A logp
            if r > 1.1 and adv[i] > 0:  # PPO's binding side: no gradient there, CISPO's is the capped weight
                n_clipped += 1
                assert g_ppo[i, t].item() == 0.0 and g[i, t].item() == pytest.approx(-1.1 * adv[i].item())
    assert n_clipped > 0


def test_truncated_importance_weights_against_a_loop():
    _, old, mask, _ = batch(3)
    sampler = old + 0.9 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    w, stats = truncated_is_weights(old, sampler, mask, cap=2.0)
    ws, n_cut = [], 0
    for i in range(4):
        for t in range(5):
            r = math.exp(old[i, t].item() - sampler[i, t].item()) if mask[i, t] else 1.0
            assert w[i, t].item() == pytest.approx(min(r, 2.0), rel=1e-12)
            if mask[i, t]:
                ws.append(min(r, 2.0))
                n_cut += r > 2.0
    assert 0 < n_cut < len(ws)
    assert stats["is_weight_mean"].item() == pytest.approx(sum(ws) / len(ws))
    assert stats["is_weight_max"].item() == pytest.approx(max(ws))
    assert stats["is_truncated"].item() == pytest.approx(n_cut / len(ws))


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_advantages_against_a_loop(baseline):
    B, R, beta = sum(SIZES), 4, 0.1
    g = torch.Generator().manual_seed(4)
    logp, ref = -torch.rand(B, R, generator=g, dtype=D), -torch.rand(B, R, generator=g, dtype=D)
    lens = [4, 2, 3, 1, 4, 4, 2, 3, 1, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lens], dtype=D)
    score = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.0, 1.0, 1.0, 1.0, -0.2, 0.7], dtype=D)
    got = reinforce_pp_advantages(score, logp, ref, mask, beta, SIZES if baseline else None)
    if baseline:  # each score minus its group's mean (the group of one: 0)
        start, shifted = 0, []
        for n in SIZES:
            grp = score[start:start + n].tolist()
            shifted += [x - sum(grp) / n for x in grp]
            start += n
    else:
        shifted = score.tolist()
    returns = {}
    for i in range(B):
        for t in range(lens[i]):  # reward -beta k1 per token, the score on the last; return-to-go, gamma 1
            returns[i, t] = shifted[i] - beta * sum(logp[i, s].item() - ref[i, s].item() for s in range(t, lens[i]))
    vals = list(returns.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    for (i, t), v in returns.items():
        assert got[i, t].item() == pytest.approx((v - mean) / std, rel=1e-6)
    assert (got * (1 - mask)).abs().max() == 0


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 40, 41, 44, 48, 60])
    got = overlong_penalty(lengths, max_len=48, buffer=8).tolist()
    assert got == pytest.approx([0.0, 0.0, -1 / 8, -0.5, -1.0, -1.0])


# ------------------------------------------------------------------------------------------------ the new KL terms
def one_token_policy(seed=3):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, generator=g, dtype=D, requires_grad=True)  # logits of pi
    ref_logp = torch.randn(5, generator=g, dtype=D).log_softmax(0)
    old_logp = torch.randn(5, generator=g, dtype=D).log_softmax(0)  # pi_old: where the samples came from
    return theta, ref_logp, old_logp


def grad(f, theta):
    return torch.autograd.grad(f(theta), theta)[0]


def test_k3_plus_has_k3s_value_and_the_reverse_kl_gradient():
    theta, ref_logp, _ = one_token_policy()
    logp = theta.detach().log_softmax(0)
    torch.testing.assert_close(kl_estimator(logp, ref_logp, "k3+"), kl_estimator(logp, ref_logp, "k3"))
    p = logp.exp()
    expected = sum(p[y] * grad(lambda t: kl_estimator(t.log_softmax(0)[y], ref_logp[y], "k3+"), theta)
                   for y in range(5))
    reverse = grad(lambda t: (t.softmax(0) * (t.log_softmax(0) - ref_logp)).sum(), theta)
    torch.testing.assert_close(expected, reverse, atol=1e-12, rtol=1e-10)


def test_unbiased_kl_is_unbiased_off_policy_in_value_and_gradient():
    """Samples from pi_old != pi: E_old[k3] is not KL(pi || pi_ref), E_old[(pi / pi_old) k3] is; and the expected
    gradient of the corrected term (autograd through log pi with the sample fixed) is grad KL(pi || pi_ref)."""
    theta, ref_logp, old_logp = one_token_policy()
    logp = theta.detach().log_softmax(0)
    kl = (logp.exp() * (logp - ref_logp)).sum()
    q = old_logp.exp()
    plain = (q * kl_estimator(logp, ref_logp, "k3")).sum()
    fixed = (q * kl_estimator(logp, ref_logp, "unbiased", old_logp)).sum()
    assert plain.item() != pytest.approx(kl.item(), rel=1e-2)
    assert fixed.item() == pytest.approx(kl.item(), rel=1e-10)
    expected = sum(q[y] * grad(lambda t: kl_estimator(t.log_softmax(0)[y], ref_logp[y], "unbiased", old_logp[y]),
                               theta) for y in range(5))
    reverse = grad(lambda t: (t.softmax(0) * (t.log_softmax(0) - ref_logp)).sum(), theta)
    torch.testing.assert_close(expected, reverse, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ SimPO and KTO
def test_simpo_by_hand():
    # log pi(y_c) = -6 over 3 tokens, log pi(y_r) = -4 over 1 token; beta 2, gamma 1:
    # z = 2 * (-6/3 - (-4/1)) - 1 = 3 -> loss = log(1 + e^-3)
    got = simpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([3.0]), torch.tensor([1.0]), 2.0, 1.0)
    assert got.item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)
    # no reference model: only the policy's length-normalised log-probs enter (a longer chosen response is not
    # penalised for its length)
    long = simpo_loss(torch.tensor([-12.0]), torch.tensor([-4.0]), torch.tensor([6.0]), torch.tensor([1.0]), 2.0, 1.0)
    assert long.item() == pytest.approx(got.item(), rel=1e-6)


def test_kto_by_hand_and_its_reference_point():
    pi_c, pi_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -2.5])
    z0 = kto_reference_point(torch.tensor([-7.0, -6.0]), torch.tensor([-7.4, -6.2]))  # mean log-ratio 0.3
    assert z0.item() == pytest.approx(0.3, rel=1e-6)
    assert kto_reference_point(torch.tensor([-7.0]), torch.tensor([-6.0])).item() == 0.0  # clamped at 0
    des, und = kto_loss(pi_c, pi_r, ref_c, ref_r, z0, beta=0.5, w_desirable=1.0, w_undesirable=1.5)

    def sig(x):
        return 1 / (1 + math.exp(-x))
    # r_c = [0.5, 0], r_r = [-1, 0.5]
    assert des.tolist() == pytest.approx([1 - sig(0.5 * (0.5 - 0.3)), 1 - sig(0.5 * (0.0 - 0.3))], rel=1e-6)
    assert und.tolist() == pytest.approx([1.5 * (1 - sig(0.5 * (0.3 + 1.0))), 1.5 * (1 - sig(0.5 * (0.3 - 0.5)))],
                                         rel=1e-6)
    # z0 is a constant of the loss: no gradient flows into the mismatched log-probs
    pm = torch.tensor([-7.0, -6.0], requires_grad=True)
    z = kto_reference_point(pm, torch.tensor([-7.4, -6.2]))
    assert not z.requires_grad


def test_dpo_step_loss_routes_simpo_and_kto():
    from types import SimpleNamespace
    from minirlhf.dpo import dpo_step_loss
    logps, lens = torch.tensor([-6.0, -5.0, -4.0, -2.0]), torch.tensor([3.0, 5.0, 1.0, 2.0])
    ref = torch.tensor([[-6.5, -3.0], [-5.0, -2.5]])
    args = SimpleNamespace(loss="simpo", beta=2.0, simpo_gamma=1.0, nll_coef=0.0, ipo_length_average=True,
                           label_smoothing=0.0, kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    loss, stats = dpo_step_loss(logps, lens, ref, args)
    want = simpo_loss(logps[:2], logps[2:], lens[:2], lens[2:], 2.0, 1.0).mean()
    assert loss.item() == pytest.approx(want.item())
    assert stats["rewards/chosen"].item() == pytest.approx((2.0 * logps[:2] / lens[:2]).mean().item())
    args.loss = "kto"
    loss, stats = dpo_step_loss(logps, lens, ref, args, z0=torch.tensor(0.2))
    des, und = kto_loss(logps[:2], logps[2:], ref[:, 0], ref[:, 1], 0.2, 2.0)
    assert loss.item() == pytest.approx(((des + und) / 2).mean().item())
    assert stats["kto_z0"].item() == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ dynamic sampling
def fake_rollout(scores, P, R, tag):
    """A Rollout of len(scores) rows with prompt width P and response width R; every tensor holds `tag` so that
    where a row came from is visible after the merge."""
    from minirlhf.rollout import Rollout
    B = len(scores)

    def full(w, v=float(tag)):
        return torch.full((B, w), v)
    return Rollout(full(P, tag).long(), torch.ones(B, P, dtype=torch.long), full(R, tag).long(),
                   torch.ones(B, R, dtype=torch.long), full(R), full(R), full(R), full(R), None,
                   torch.tensor(scores, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32),
                   torch.ones(B, dtype=torch.bool), [f"p{tag}"] * B, [f"r{tag}"] * B, None)


def test_dynamic_sampling_keeps_groups_with_signal_and_pads_the_merge():
    from minirlhf.rollout import dynamic_rollout
    # 3 groups of 2 per rollout; rollout 0: group 1 all equal; rollout 1: groups 0 and 2 all equal
    draws = [fake_rollout([1, 2, 5, 5, 0, 3], P=3, R=4, tag=1), fake_rollout([7, 7, 1, 4, 2, 2], P=5, R=2, tag=2),
             fake_rollout([0, 9, 0, 8, 0, 7], P=2, R=6, tag=3)]
    ro, drawn, varied = dynamic_rollout(lambda r: draws[r], group_size=2, max_draws=3, pad_id=-1)
    assert (drawn, varied) == (2, 3)  # enough varied groups after two rollouts: the third is never drawn
    assert ro.score.tolist() == [1, 2, 0, 3, 1, 4] and ro.prompts == ["p1"] * 4 + ["p2"] * 2
    assert ro.prompt_ids.shape == (6, 5) and ro.resp.shape == (6, 4)
    assert ro.prompt_ids[0].tolist() == [-1, -1, 1, 1, 1] and ro.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]  # left
    assert ro.resp[4].tolist() == [2, 2, -1, -1] and ro.mask[4].tolist() == [2, 2, 0, 0]  # right-padded
    # not enough groups with signal within max_draws: equal-score groups fill the batch, in order
    ro, drawn, varied = dynamic_rollout(lambda r: draws[1], group_size=2, max_draws=2, pad_id=-1)
    assert (drawn, varied) == (2, 2) and ro.score.tolist() == [1, 4, 1, 4, 7, 7]
