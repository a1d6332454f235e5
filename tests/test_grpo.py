"""Critic-free RL: group advantages (GRPO, RLOO) on ragged groups, the leave-one-out mean, the three loss
aggregations, the KL loss estimators (values and expected gradients by exact enumeration), the best-of-n KL, and a
tiny end-to-end run of train_grpo.py."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.harness.checkpoint import load_policy, load_scalar, save_run
from minirlhf.evaluation.metrics import best_of_n_kl, best_of_n_select
from minirlhf.losses import (aggregate_loss, group_advantages, group_ids_from_sizes, grpo_policy_loss, kl_estimator,
                             leave_one_out_mean, score_with_eos_penalty, zero_advantage_share)
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.rl import check_first_ratio
from minirlhf.rollout import collect_rollout
from minirlhf.scoring import RATIO_TOLERANCE as FIRST_RATIO_TOL
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError
from tests.inprocess import run_ok

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# ragged groups: sizes 3, 1, 4, 2; the third group's scores are all equal
SIZES = [3, 1, 4, 2]
SCORES = [0.5, -1.0, 2.0, 0.7, 1.5, 1.5, 1.5, 1.5, -0.25, 3.0]


def naive_groups(sizes, scores):
    out, i = [], 0
    for n in sizes:
        out.append(scores[i:i + n])
        i += n
    return out


def naive_advantages(sizes, scores, baseline, scale_by_std, eps=1e-4):
    adv = []
    for g in naive_groups(sizes, scores):
        n = len(g)
        mean = sum(g) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (n - 1)) if n > 1 else 0.0  # sample std
        for i, x in enumerate(g):
            if baseline == "grpo":
                a = x - mean
            else:  # leave-one-out; a group of one: baseline = the sample itself
                a = x - (sum(g[:i] + g[i + 1:]) / (n - 1) if n > 1 else x)
            adv.append(a / (std + eps) if scale_by_std else a)
    return adv


def test_group_ids_from_sizes():
    assert group_ids_from_sizes([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]


def test_leave_one_out_mean_matches_naive_and_group_of_one_is_itself():
    s = torch.tensor(SCORES, dtype=torch.float64)
    expect = []
    for g in naive_groups(SIZES, SCORES):
        for i, x in enumerate(g):
            expect.append(sum(g[:i] + g[i + 1:]) / (len(g) - 1) if len(g) > 1 else x)
    torch.testing.assert_close(leave_one_out_mean(s, SIZES), torch.tensor(expect, dtype=torch.float64))
    # same result from a (shuffled) group-id tensor
    gid = group_ids_from_sizes(SIZES)
    perm = torch.randperm(len(SCORES), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(leave_one_out_mean(s[perm], gid[perm]), torch.tensor(expect, dtype=torch.float64)[perm])


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_on_ragged_groups(baseline, scale_by_std):
    s = torch.tensor(SCORES, dtype=torch.float64)
    adv = group_advantages(s, SIZES, baseline, scale_by_std)
    torch.testing.assert_close(adv, torch.tensor(naive_advantages(SIZES, SCORES, baseline, scale_by_std),
                                                 dtype=torch.float64))
    assert (adv[3:8] == 0).all()  # the group of one (index 3) and the all-equal group (4..7): no signal
    # within a group of size k > 1 the GRPO and RLOO advantages are proportional: rloo = k/(k-1) * grpo
    if not scale_by_std:
        other = group_advantages(s, SIZES, "grpo" if baseline == "rloo" else "rloo", False)
        grpo, rloo = (adv, other) if baseline == "grpo" else (other, adv)
        torch.testing.assert_close(rloo[:3], 3 / 2 * grpo[:3])


def test_grpo_advantages_are_standardised_per_group():
    s = torch.tensor(SCORES, dtype=torch.float64)
    adv = group_advantages(s, SIZES, "grpo", True, eps=0.0)
    for lo, hi in ((0, 3), (8, 10)):
        assert adv[lo:hi].mean().item() == pytest.approx(0.0, abs=1e-12)
        assert adv[lo:hi].std().item() == pytest.approx(1.0)  # sample std 1


def test_zero_advantage_share_counts_all_equal_groups():
    s = torch.tensor(SCORES)
    assert zero_advantage_share(s, SIZES).item() == pytest.approx(2 / 4)  # the group of one and the equal group
    assert zero_advantage_share(torch.tensor([1.0, 2.0, 3.0, 4.0]), [2, 2]).item() == 0.0


def test_score_with_eos_penalty_replaces_not_adds():
    out = score_with_eos_penalty(torch.tensor([0.3, -5.0, 1.0]), torch.tensor([True, False, False]), 2.0)
    assert out.tolist() == [pytest.approx(0.3), -2.0, -2.0]


# ------------------------------------------------------------------------------------------------ aggregation
def test_three_loss_aggregations_match_naive():
    lengths, R = [3, 1, 5], 5
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).double()
    x = torch.randn(3, R, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 1
    rows = [x[b, :L].tolist() for b, L in enumerate(lengths)]
    token = sum(sum(r) for r in rows) / sum(lengths)
    sequence = sum(sum(r) / len(r) for r in rows) / len(rows)
    constant = sum(sum(r) for r in rows) / (48 * 3)
    assert aggregate_loss(x, mask, "token").item() == pytest.approx(token)
    assert aggregate_loss(x, mask, "sequence").item() == pytest.approx(sequence)
    assert aggregate_loss(x, mask, "constant", constant=48 * 3).item() == pytest.approx(constant)
    assert token != pytest.approx(sequence)  # the ragged lengths make them differ


def test_grpo_policy_loss_is_reinforce_with_baseline_at_ratio_one():
    """1 epoch x 1 minibatch: the ratio is 1, so the gradient w.r.t. log pi_t is -A_i / (normaliser), the
    REINFORCE-with-baseline gradient, for each aggregation."""
    lengths, R = [2, 4], 4
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).double()
    old = torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-0.5, -1.5, -3.0, -0.1]], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    for agg, norm in (("token", [[6, 6], [6, 6]]), ("sequence", [[4, 4], [8, 8]]), ("constant", [[10, 10], [10, 10]])):
        logp = old.clone().requires_grad_(True)
        loss, st = grpo_policy_loss(logp, old, adv, mask, 0.2, agg, constant=10.0)
        loss.backward()
        for b, L in enumerate(lengths):
            n = norm[b][0]
            torch.testing.assert_close(logp.grad[b, :L], torch.full((L,), -adv[b].item() / n, dtype=torch.float64))
            assert (logp.grad[b, L:] == 0).all()
        assert st["clipfrac"].item() == 0 and st["approx_kl"].item() == 0


# ------------------------------------------------------------------------------------------------ KL estimators
def test_kl_estimator_values():
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.3], dtype=torch.float64)
    for kind, f in (("k1", lambda lp, lr: lp - lr), ("k2", lambda lp, lr: 0.5 * (lp - lr) ** 2),
                    ("k3", lambda lp, lr: math.exp(lr - lp) - (lr - lp) - 1)):
        expect = [f(a, b) for a, b in zip(logp.tolist(), ref.tolist())]
        torch.testing.assert_close(kl_estimator(logp, ref, kind), torch.tensor(expect, dtype=torch.float64))


def one_token_policy():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)  # logits of pi
    ref_logp = torch.randn(5, generator=g, dtype=torch.float64).log_softmax(0)  # pi_ref
    return theta, ref_logp


def exact_grad(f, theta):
    (g,) = torch.autograd.grad(f(theta), theta)
    return g


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimator_values_are_what_they_estimate(kind):
    """Expected value under y ~ pi, by enumeration: k1 and k3 are unbiased for KL(pi || pi_ref); k2 is not."""
    theta, ref_logp = one_token_policy()
    logp = theta.detach().log_softmax(0)
    p = logp.exp()
    reverse_kl = (p * (logp - ref_logp)).sum()
    value = (p * kl_estimator(logp, ref_logp, kind)).sum()
    if kind == "k2":
        assert value.item() != pytest.approx(reverse_kl.item(), rel=1e-3)
    else:
        assert value.item() == pytest.approx(reverse_kl.item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimator_expected_gradients_by_enumeration(kind):
    """The gradient a loss term k(log pi(y), log pi_ref(y)) gives, averaged over y ~ pi: autograd through log pi
    with the sample y held fixed (exactly what the training loss does), then weighted by pi(y) and summed over all
    5 tokens. k1 -> 0; k2 -> grad of reverse KL(pi || pi_ref); k3 -> grad of forward KL(pi_ref || pi)."""
    theta, ref_logp = one_token_policy()
    p = theta.detach().softmax(0)
    expected = torch.zeros_like(theta)
    for y in range(5):  # the estimator's pathwise gradient at each possible sample
        expected += p[y] * exact_grad(lambda t: kl_estimator(t.log_softmax(0)[y], ref_logp[y], kind), theta)
    reverse = exact_grad(lambda t: (t.softmax(0) * (t.log_softmax(0) - ref_logp)).sum(), theta)
    forward = exact_grad(lambda t: (ref_logp.exp() * (ref_logp - t.log_softmax(0))).sum(), theta)
    assert reverse.abs().max() > 1e-2 and (reverse - forward).abs().max() > 1e-2  # the three targets differ
    target = {"k1": torch.zeros_like(theta), "k2": reverse, "k3": forward}[kind]
    torch.testing.assert_close(expected, target, atol=1e-12, rtol=1e-10)
    # With the score-function term that the loss leaves out, grad E_pi[k] = sum_y grad(pi(y) k(y)): for the
    # value-unbiased k1 and k3 that is the true reverse-KL gradient again (the missing term is what differs).
    full = exact_grad(lambda t: sum(t.softmax(0)[y] * kl_estimator(t.log_softmax(0)[y], ref_logp[y], kind)
                                    for y in range(5)), theta)
    if kind != "k2":
        torch.testing.assert_close(full, reverse, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ best-of-n
def test_best_of_n_kl_closed_form_upper_bounds_the_exact_kl():
    """Best-of-n of a discrete pi_ref with distinct rewards: P(rank-i outcome) = F_i^n - F_{i-1}^n, F the CDF in
    reward order. Its exact KL to pi_ref never exceeds log n - (n-1)/n (Beirami et al. 2024), and approaches it
    when no single outcome carries much mass."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    g = torch.Generator().manual_seed(0)
    for support in (3, 10, 2000):
        p = torch.rand(support, generator=g, dtype=torch.float64) + 0.05
        p = p / p.sum()  # already in reward order (rank = index)
        F = p.cumsum(0)
        F_prev = torch.cat([torch.zeros(1, dtype=torch.float64), F[:-1]])
        for n in (2, 4, 16, 64):
            q = F ** n - F_prev ** n
            kl = (q * (q / p).log()).sum().item()
            assert kl <= best_of_n_kl(n) + 1e-12, (support, n)
            if support == 2000:
                assert kl == pytest.approx(best_of_n_kl(n), rel=0.02)


def test_best_of_n_select_takes_the_highest_score_among_the_first_n():
    rm = torch.tensor([[0.1, 0.9, 0.3, 2.0], [1.0, -1.0, 0.5, 0.2]])  # (prompts, samples)
    assert best_of_n_select(rm, 1).tolist() == [0, 0]
    assert best_of_n_select(rm, 2).tolist() == [1, 0]
    assert best_of_n_select(rm, 4).tolist() == [3, 0]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny random policy that stops early (its hidden state is pushed towards the EOS embedding, so groups
    have samples with and without EOS: non-zero advantages) and a random reward model."""
    d = tmp_path_factory.mktemp("runs")
    task = get_task("reviews")
    tok = Tokenizer.train(task.corpus(300, 0), 300)
    cfg = GPTConfig(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    policy = GPT(cfg)
    with torch.no_grad():
        v = torch.randn(cfg.n_embd)
        policy.transformer.ln_f.bias.copy_(v)
        policy.transformer.wte.weight[tok.eos_id] = 3.0 * v / v.norm() ** 2  # EOS logit ~ +3
    save_run(d / "sft", policy, tok, {"note": "test"}, kind="policy", stage="sft")
    save_run(d / "rm", ScalarModel(cfg), tok, {"note": "test"}, kind="reward", stage="rm")
    return d


def test_collect_rollout_texts_gold_and_eos_rule(tiny_runs):
    """The shared rollout: texts and gold from one host transfer equal the per-row decode; the score is the RM
    score where the response ended with EOS and -penalty elsewhere; old log-probs match the sampling ones."""
    policy, tok, _ = load_policy(tiny_runs / "sft")
    rm, _, _ = load_scalar(tiny_runs / "rm")
    task = get_task("reviews")
    prompts = task.sample_prompts("train", 6, seed=0)
    ids = [tok.encode(p) for p in prompts]
    ro = collect_rollout(policy, policy, rm, tok, ids, prompts, 8, 1.0, 2.5, torch.Generator().manual_seed(0),
                         value_model=rm, task=task)
    assert 0 < ro.has_eos.float().mean() < 1  # both kinds of rows are present
    for j in range(len(prompts)):
        n = int(ro.resp_mask[j].sum())
        toks = ro.resp[j, :n].tolist()
        assert ro.responses[j] == tok.decode(toks)
        assert bool(ro.has_eos[j]) == (toks[-1] == tok.eos_id)
        assert ro.gold[j] == task.gold_reward(prompts[j], tok.decode(toks), toks[-1] == tok.eos_id)
        assert ro.score[j].item() == (ro.rm_score[j].item() if ro.has_eos[j] else -2.5)
    torch.testing.assert_close(ro.old_logp, ro.sample_logp, atol=1e-5, rtol=0)
    assert (ro.ref_logp == ro.old_logp).all()  # reference = policy here
    assert ro.values is not None and ro.values.shape == ro.resp.shape


def test_compiled_rollout_scores_like_the_eager_one_in_whole_graphs(tiny_runs):
    """--compile: the decode step and the four scoring passes (old, reference, value, reward) run compiled, with
    the eager rollout's tokens and, to rounding, its log-probs, values and scores; no graph break anywhere."""
    from minirlhf.model import compile_model
    policy, tok, _ = load_policy(tiny_runs / "sft")
    rm, _, _ = load_scalar(tiny_runs / "rm")
    prompts = get_task("reviews").sample_prompts("train", 6, seed=1)
    ids = [tok.encode(p) for p in prompts]
    models = (policy, copy.deepcopy(policy), rm, copy.deepcopy(rm))
    runs = []
    for compiled in (False, True):
        torch._dynamo.utils.counters.clear()
        ms = [compile_model(m) if compiled else m for m in models]
        runs.append(collect_rollout(*ms[:3], tok, ids, prompts, 8, 1.0, 2.5, torch.Generator().manual_seed(0),
                                    value_model=ms[3], compile=compiled))
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert sum(breaks.values()) == 0, breaks
    eager, comp = runs
    assert torch.equal(comp.resp, eager.resp) and comp.responses == eager.responses
    for name in ("sample_logp", "old_logp", "ref_logp", "values", "rm_score", "score"):
        torch.testing.assert_close(getattr(comp, name), getattr(eager, name), atol=1e-5, rtol=0)


def test_first_ratio_check_tolerances():
    assert check_first_ratio(1e-6, "float32", 0) == FIRST_RATIO_TOL["float32"] == 1e-5
    assert check_first_ratio(0.05, "bfloat16", 0) == FIRST_RATIO_TOL["bfloat16"]
    for dev, dtype in ((2e-5, "float32"), (0.2, "bfloat16"), (float("nan"), "float32")):
        with pytest.raises(UserError, match="ratio at the first minibatch"):
            check_first_ratio(dev, dtype, 3)


def tiny_grpo_run(tiny_runs, out, flags, in_process: bool = False) -> list:
    """Three iterations of train_grpo.py on the tiny fixture, in a subprocess or in this process
    (tests/inprocess.py); its metrics.jsonl rows."""
    run_ok("train_grpo.py", "--policy", tiny_runs / "sft", "--reward", tiny_runs / "rm", "--out-dir", out,
           "--iterations", 3, "--prompts-per-iter", 4, "--group-size", 3, "--minibatches", 2, "--max-new-tokens", 8,
           "--n-eval", 16, "--device", "cpu", "--lr", "1e-2", *flags, in_process=in_process, env=ENV)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags,in_process", [(["--baseline", "rloo", "--kl-in", "reward", "--epochs", "2"], False),
                                              (["--baseline", "grpo", "--scale-by-std", "--loss-agg", "sequence",
                                                "--kl-in", "loss", "--kl-estimator", "k3"], True),
                                              (["--dtype", "bfloat16"], True)])
def test_tiny_run_writes_outputs(tiny_runs, tmp_path, flags, in_process):
    out = tmp_path / "grpo"
    rows = tiny_grpo_run(tiny_runs, out, flags, in_process)  # the first as users run it: a subprocess
    assert len(rows) == 3
    need = ["rm_score_mean", "kl", "loss", "kl_loss", "approx_kl", "clipfrac", "entropy", "ratio_mean", "ratio_max",
            "resp_len", "eos_rate", "gold_mean", "zero_adv_groups", "first_ratio_dev", "first_ratio_tol"]
    for row in rows:
        for k in need:
            assert k in row and math.isfinite(row[k]), k
        assert row["first_ratio_dev"] <= row["first_ratio_tol"] == FIRST_RATIO_TOL[
            "bfloat16" if "bfloat16" in flags else "float32"]
    assert 0 < rows[0]["eos_rate"] < 1  # the fixture's policy stops sometimes: groups carry signal
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference before the first update
    assert rows[-1]["kl"] != pytest.approx(0.0, abs=1e-4)  # and it moved
    if "loss" in flags:  # the KL is a loss term (k3 > 0 once the policy moved), not part of the sequence reward
        assert rows[-1]["kl_loss"] > 0 and rows[-1]["reward_mean"] == rows[-1]["score_mean"]
    else:  # the KL is in the reward: reward = score - beta * KL, and no loss term
        assert all(r["kl_loss"] == 0 for r in rows)
        assert rows[-1]["reward_mean"] == pytest.approx(rows[-1]["score_mean"] - 0.07 * rows[-1]["kl"], abs=1e-4)
    m = json.loads((out / "metrics.json").read_text())
    for k in ("win_rate_vs_ref", "kl_mean", "gold_mean", "first_ratio_dev", "first_ratio_dev_max"):
        assert k in m and math.isfinite(m[k]), k
    _, _, cfg = load_policy(out)
    assert cfg["stage"] == "grpo" and cfg["args"]["group_size"] == 3


@pytest.mark.parametrize("flags", [
    ["--clip-high", "0.28", "--dynamic-sampling", "--overlong-buffer", "4"],  # DAPO
    ["--pg-loss", "gspo", "--loss-agg", "sequence", "--clip", "3e-4", "--clip-high", "4e-4"],
    ["--pg-loss", "cispo", "--clip", "1", "--clip-high", "0.28"],
    ["--baseline", "reinforce++"],
    ["--baseline", "reinforce++-baseline", "--tis-cap", "2", "--dtype", "bfloat16"],
    ["--kl-in", "loss", "--kl-estimator", "k3+"],
    ["--kl-in", "loss", "--kl-estimator", "unbiased"]])
def test_rl_menu_flags_run(tiny_runs, tmp_path, flags):
    out = tmp_path / "grpo"
    rows = tiny_grpo_run(tiny_runs, out, flags, in_process=True)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["first_ratio_dev"] <= r["first_ratio_tol"]
                                  for r in rows)
    assert rows[-1]["kl"] != pytest.approx(0.0, abs=1e-4)  # the policy moved
    if "--dynamic-sampling" in flags:  # groups without signal were redrawn: more than one rollout some iteration
        assert all(1 <= r["draws"] <= 3 for r in rows) and max(r["draws"] for r in rows) > 1
        assert all(r["zero_adv_groups"] <= 0.5 for r in rows if r["draws"] < 3)
    if "--tis-cap" in flags:  # on the CPU the KV-cache sampler and the full forward agree to ~1e-3 under bf16
        assert all(r["is_weight_max"] <= 2 and abs(r["is_weight_mean"] - 1) < 1e-2 and r["is_truncated"] == 0
                   for r in rows)
    if "unbiased" in flags or "k3+" in flags:
        assert rows[-1]["kl_loss"] > 0


def test_group_size_one_is_a_clear_error(tiny_runs, tmp_path):
    cmd = [sys.executable, "train_grpo.py", "--policy", str(tiny_runs / "sft"), "--reward", str(tiny_runs / "rm"),
           "--out-dir", str(tmp_path / "o"), "--group-size", "1", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 2 and "--group-size" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_best_of_n_rows(tiny_runs, tmp_path, monkeypatch, capsys):
    import evaluate
    out = tmp_path / "eval"
    argv = ["evaluate.py", "--policies", tiny_runs / "sft", "--ref", tiny_runs / "sft", "--out-dir", out,
            "--n-prompts", 6, "--max-new-tokens", 8, "--device", "cpu", "--best-of", 1, 4, "--frontier",
            "--frontier-prompts", 2, "--frontier-samples", 16, "--min-ess", 1]
    monkeypatch.setattr(sys, "argv", [str(x) for x in argv])
    with pytest.raises(UserError, match="--best-of needs --reward"):
        evaluate.main()
    monkeypatch.setattr(sys, "argv", [str(x) for x in argv + ["--reward", tiny_runs / "rm"]])
    evaluate.main()
    report = json.loads((out / "report.json").read_text())
    assert list(report["policies"]) == ["sft", "bon-1", "bon-4"]
    for n in (1, 4):
        m = report["policies"][f"bon-{n}"]
        assert m["kl_mean"] == pytest.approx(math.log(n) - (n - 1) / n) and m["kl_is_bound"]
        for key in ("gold_mean", "gold_sem", "win_rate", "rm_mean", "rm_win_rate", "eos_rate", "frac_optimal",
                    "samples"):
            assert key in m, key
    printed = capsys.readouterr().out
    assert "| bon-4" in printed and "≤ 0.64" in printed


def test_group_statistics_never_read_the_device(monkeypatch):
    """group_advantages and zero_advantage_share on group ids: no host sync (the number of groups is bounded by the
    samples, not read off the device); empty group ids in between do not count as groups."""
    from tests.test_runs import count_host_syncs
    scores = torch.tensor([1.0, 2.0, 3.0, 3.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 2, 2, 3, 3])  # group 1 has no samples
    calls = count_host_syncs(monkeypatch)
    adv = group_advantages(scores, groups, "rloo", scale_by_std=False)
    share = zero_advantage_share(scores, groups)
    assert calls == []
    monkeypatch.undo()
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0])) and abs(share.item() - 2 / 3) < 1e-6


def test_host_syncs_per_iteration_stay_within_budget(tiny_runs, tmp_path, monkeypatch):
    """One more GRPO iteration reads the device as often as a PPO one (test_ppo.py): 7 + epochs + max_new_tokens /
    CHECK_EVERY, none per minibatch, group or token; it copies the prompts over (2)."""
    import train_grpo
    from minirlhf.generation import CHECK_EVERY
    from tests.test_runs import host_syncs_added
    added = host_syncs_added(monkeypatch, train_grpo.main, lambda n: [
        "--policy", str(tiny_runs / "sft"), "--reward", str(tiny_runs / "rm"), "--out-dir", str(tmp_path / str(n)),
        "--iterations", str(n), "--prompts-per-iter", "4", "--group-size", "2", "--minibatches", "2", "--epochs", "2",
        "--max-new-tokens", "8", "--n-eval", "16", "--device", "cpu"])
    assert added.pop("to_device") == 2 and sum(added.values()) <= 7 + 2 + 8 // CHECK_EVERY, added
