"""Evaluation: the KL and optimal-frontier estimators against exact enumeration, win rate, the report files.

The enumerable case: a tiny GPT over 5 tokens (pad, bos, eos, "a", "b") and responses of at most 3 tokens, so
pi(y|x) can be summed over every possible response (EOS ends a response; the budget ends it too).
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from minirlhf.harness.checkpoint import save_run
from minirlhf.evaluation.metrics import (bootstrap_frontiers, distinct_n, estimate_frontier, fraction_of_optimal,
                                         fraction_of_optimal_sem, frontier_gold_at, paired_gain, paired_win_rate_sem,
                                         frontier_points, mean_sem, optimal_policy_estimate,
                                         policy_metrics, reward_weights)
from minirlhf.sampling import reward_model_scores, sample_policy
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAD, BOS, EOS, A, B = range(5)
N_NEW = 3  # response budget of the enumerable case


class TinyTok:
    """Characters 'a', 'b' <-> ids 3, 4; specials dropped on decode (as the real tokenizer does)."""
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text):
        return [{"a": A, "b": B}[c] for c in text]

    def decode(self, ids):
        return "".join({A: "a", B: "b"}.get(i, "") for i in ids)


class TinyTask:
    """A gold reward on the tiny vocabulary: a's are good, b's bad, stopping is good."""

    @staticmethod
    def gold_reward(prompt, response, ended=True):
        return response.count("a") - 0.5 * response.count("b") + (0.5 if ended else -1.0)


def tiny_gpt(seed, scale=1.5):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():  # peaked next-token distributions, so that two models are far apart
        m.transformer.wte.weight.mul_(scale / 0.02)
    return m.eval()


@torch.no_grad()
def enumerate_responses(model, tok, prompt):
    """Every response (token list) the sampler can produce for `prompt`, with its exact log-probability."""
    ctx = [tok.bos_id] + tok.encode(prompt)
    out, frontier = [], [([], 0.0)]
    while frontier:
        prefix, lp = frontier.pop()
        logp = F.log_softmax(model(torch.tensor([ctx + prefix]))[0, -1].float(), -1)
        for t in range(5):
            seq, lpt = prefix + [t], lp + logp[t].item()
            (out if t == EOS or len(seq) == N_NEW else frontier).append((seq, lpt))
    return out


def exact_logprob(model, tok, prompt, resp):
    ctx = [tok.bos_id] + tok.encode(prompt)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + resp]))[0].float(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(resp))


def exact_optimum(p, g, beta):
    """Exact gold and KL of pi* = p exp(g/beta)/Z on a finite support (float64)."""
    p, g = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    w = p * torch.exp(g / beta)
    z = w.sum()
    q = w / z
    return (q * g).sum().item(), (q * (q / p).log()).sum().item()


# ----------------------------------------------------------------------------------------------- KL
def test_kl_is_zero_for_reference_against_itself():
    tok, ref = TinyTok(), tiny_gpt(0)
    copy = tiny_gpt(0)  # same weights, a different object: the log-probs go through two forward passes
    prompts = ["a", "b", "ab", ""] * 50
    samples = sample_policy(copy, tok, prompts, N_NEW, seed=1, batch_size=64)
    ref_samples = sample_policy(ref, tok, prompts, N_NEW, seed=2, batch_size=64)
    m = policy_metrics(copy, ref, tok, samples, ref_samples, batch_size=64)
    assert abs(m["kl_mean"]) < 1e-5 and max(abs(s["kl"]) for s in samples) < 1e-4
    m_same = policy_metrics(ref, ref, tok, samples, ref_samples, batch_size=64)
    assert m_same["kl_mean"] == 0.0


def test_kl_estimator_matches_exact_enumeration():
    tok, pi, ref = TinyTok(), tiny_gpt(1), tiny_gpt(2)
    prompts = ["a", "b"]
    exact = []
    for p in prompts:
        resp = enumerate_responses(pi, tok, p)
        assert abs(sum(math.exp(lp) for _, lp in resp) - 1) < 1e-5  # the enumeration is complete
        exact.append(sum(math.exp(lp) * (lp - exact_logprob(ref, tok, p, y)) for y, lp in resp))
    exact_kl = sum(exact) / len(exact)  # the report averages over prompts
    assert exact_kl > 0.2  # the two models differ enough for the test to mean something
    n = 3000
    samples = sample_policy(pi, tok, [p for p in prompts for _ in range(n)], N_NEW, seed=3, batch_size=1000)
    ref_samples = sample_policy(ref, tok, [p for p in prompts for _ in range(n)], N_NEW, seed=4, batch_size=1000)
    m = policy_metrics(pi, ref, tok, samples, ref_samples, batch_size=1000)
    assert abs(m["kl_mean"] - exact_kl) < 4 * m["kl_sem"] + 1e-3, (m["kl_mean"], m["kl_sem"], exact_kl)
    # and the per-sample log-ratio is the exact sequence log-ratio, not merely right on average
    for s in samples[:20]:
        assert s["kl"] == pytest.approx(exact_logprob(pi, tok, s["prompt"], s["tokens"])
                                        - exact_logprob(ref, tok, s["prompt"], s["tokens"]), abs=1e-4)


def test_rm_scores_as_rl_trains_on_them_replace_unfinished_responses_by_the_penalty():
    tok, pi, ref = TinyTok(), tiny_gpt(1), tiny_gpt(2)
    torch.manual_seed(3)
    rm = ScalarModel(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    prompts = ["a", "b", "ab", ""] * 10
    samples = sample_policy(pi, tok, prompts, N_NEW, seed=1)
    ref_samples = sample_policy(ref, tok, prompts, N_NEW, seed=2)
    assert 0 < sum(s["eos"] for s in samples) < len(samples)  # both kinds of rows occur
    m = policy_metrics(pi, ref, tok, samples, ref_samples, TinyTask(), rm, missing_eos_penalty=3.0)
    naive = sum(s["rm"] if s["eos"] else -3.0 for s in samples) / len(samples)
    assert m["score_mean"] == pytest.approx(naive) and m["rm_mean"] == pytest.approx(
        sum(s["rm"] for s in samples) / len(samples))
    ref_rm = reward_model_scores(rm, tok, ref_samples)
    assert m["ref_rm_mean"] == pytest.approx(sum(ref_rm) / len(ref_rm))
    assert m["ref_score_mean"] == pytest.approx(sum(r if s["eos"] else -3.0 for s, r in zip(ref_samples, ref_rm))
                                                / len(ref_rm))
    assert "score_mean" not in policy_metrics(pi, ref, tok, samples, ref_samples, TinyTask(), rm)


def test_reward_weights_recover_how_a_reward_prices_each_part_in_gold_units():
    rng = np.random.default_rng(0)
    gold_w = {"sentiment": 1.0, "repeated_words": -0.5, "too_short": -1.0, "no_eos": -1.5}
    parts = [{"sentiment": float(rng.normal()), "repeated_words": int(rng.integers(0, 3)),
              "too_short": int(rng.random() < 0.2), "no_eos": 0} for _ in range(400)]  # no_eos never varies
    # an RM that ignores most of the repetition penalty, on another scale and shift (which BT cannot identify)
    rm_w = {"sentiment": 1.0, "repeated_words": -0.05, "too_short": -1.0, "no_eos": -1.5}
    scores = [3.0 * sum(rm_w[k] * p[k] for k in rm_w) + 0.7 for p in parts]
    w = reward_weights(parts, scores, gold_w)
    assert w["scale"] == pytest.approx(3.0) and w["r2"] == pytest.approx(1.0)
    assert w["weights"]["repeated_words"] == pytest.approx(-0.05) and w["weights"]["too_short"] == pytest.approx(-1.0)
    assert w["weights"]["no_eos"] is None and w["gold_weights"] == gold_w
    # the gold reward itself gets its own weights back; noise lowers r2 but not the weights (on average)
    gold = [sum(gold_w[k] * p[k] for k in gold_w) for p in parts]
    assert reward_weights(parts, gold, gold_w)["weights"]["repeated_words"] == pytest.approx(-0.5)
    noisy = reward_weights(parts, [g + rng.normal(0, 0.3) for g in gold], gold_w)
    assert 0.7 < noisy["r2"] < 0.98 and noisy["weights"]["repeated_words"] == pytest.approx(-0.5, abs=0.1)


# ----------------------------------------------------------------------------------------------- frontier
def test_optimal_policy_estimate_matches_exact_on_a_categorical():
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    g = torch.tensor([-1.0, 0.0, 0.3, 0.8, 1.2, 2.0], dtype=torch.float64)
    K = 200_000
    idx = torch.multinomial(p.expand(2, -1), K, replacement=True)  # two prompts, same distribution
    for beta in (2.0, 0.7, 0.35):
        est = optimal_policy_estimate(g[idx], beta)
        gold, kl = exact_optimum(p, g, beta)
        assert est["gold"] == pytest.approx(gold, abs=0.01)
        assert est["kl"] == pytest.approx(kl, abs=0.01)
        w = p * torch.exp(g / beta)
        ess_frac = (w.sum() ** 2 / (w * w / p).sum()).item()  # Kish ESS / K in the large-K limit
        assert est["ess"] / K == pytest.approx(ess_frac, rel=0.03)


def test_optimal_policy_estimate_limits():
    g = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    far = optimal_policy_estimate(g, 1e6)  # beta -> inf: the reference itself
    assert far["kl"] == pytest.approx(0.0, abs=1e-9) and far["gold"] == pytest.approx(1.5)
    assert far["ess"] == pytest.approx(4.0)
    near = optimal_policy_estimate(g, 1e-3)  # beta -> 0: best-of-K, KL at its cap log K
    assert near["gold"] == pytest.approx(3.0) and near["kl"] == pytest.approx(math.log(4), abs=1e-6)
    assert near["ess"] == pytest.approx(1.0)
    flat = optimal_policy_estimate(torch.ones(3, 8), 0.01)  # nothing to prefer: no KL at any beta
    assert flat["kl"] == pytest.approx(0.0, abs=1e-9) and flat["ess"] == pytest.approx(8.0)


def test_frontier_points_drop_low_ess_and_sort_by_kl():
    torch.manual_seed(1)
    g = torch.randn(4, 64, dtype=torch.float64)
    kept, dropped = frontier_points(g, [0.01, 10.0, 1.0, 2.0], min_ess=5.0)
    assert [p["beta"] for p in dropped] == [0.01] and dropped[0]["ess_min"] < 5.0
    assert [p["beta"] for p in kept] == [10.0, 2.0, 1.0] and all(p["ess_min"] >= 5.0 for p in kept)
    assert all(a["kl"] < b["kl"] and a["gold"] < b["gold"] for a, b in zip(kept, kept[1:]))
    # the worst prompt decides, not the mean: one prompt whose optimum rests on a single sample drops the point
    g[0, 0] = 12.0
    one = optimal_policy_estimate(g, 1.0)
    assert one["ess"] >= 5.0 > one["ess_min"]
    assert [p["beta"] for p in frontier_points(g, [1.0], min_ess=5.0)[1]] == [1.0]


def test_frontier_bound_past_the_measured_range_is_an_upper_bound_on_gaussian_gold():
    """g ~ N(0, 1) under the reference: pi* tilts it to N(1/beta, 1), so KL = 1/(2 beta^2) and V(c) = sqrt(2c)
    exactly. With 32 prompts x 1,024 samples the old bound (points kept on the mean ESS, log Z uncorrected) gave
    2.71 at c = 3.84 against the true 2.77: a "lower bound" on the share that was not one."""
    for seed in range(5):
        g = torch.randn(32, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        kept, _ = frontier_points(g, min_ess=10.0)
        ref = g.mean().item()
        top = kept[-1]["kl"]
        for c, slack in ((top * 1.1, 0.99), (top * 1.5, 1.0), (2.0, 1.0), (3.0, 1.0), (3.84, 1.0), (5.0, 1.0)):
            if c <= top:
                continue
            est, extrapolated = frontier_gold_at(kept, c, ref)  # just past the range: within 1% of a bound
            assert extrapolated and est >= slack * math.sqrt(2 * c), (seed, c, est)
        for c in (0.1, 0.5, top * 0.9):  # inside: close to the truth, a little under (chord and finite-K bias)
            est, extrapolated = frontier_gold_at(kept, c, ref)
            assert not extrapolated and math.sqrt(2 * c) - 0.1 < est < math.sqrt(2 * c) + 0.02, (seed, c, est)
    # the correction for log Z's Jensen bias is what makes the old points a bound here: without it they are not
    mean_kept = [p for p in frontier_points(g, min_ess=1.0)[0] if p["ess"] >= 10.0]
    uncorrected = min(p["gold"] + p["beta"] * (3.84 - p["kl"]) for p in mean_kept)
    assert uncorrected < math.sqrt(2 * 3.84)


def test_share_error_bar_includes_the_frontier_noise_over_its_prompts():
    g = torch.randn(32, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    kept, _ = frontier_points(g, min_ess=10.0)
    ref = g.mean().item()
    boot = bootstrap_frontiers(g, min_ess=10.0, n_boot=100, seed=1)
    assert len(boot) == 100 and all(b[0] for b in boot) and len({round(b[1], 9) for b in boot}) > 50
    kl = kept[-1]["kl"] / 2
    gold = ref + 0.8 * (frontier_gold_at(kept, kl, ref)[0] - ref)
    frontier_only = fraction_of_optimal_sem(gold, ref, kl, 0.0, boot)
    both = fraction_of_optimal_sem(gold, ref, kl, 0.02, boot)
    assert frontier_only > 0.005 and both > frontier_only
    fracs = [fraction_of_optimal(gold, ref, kl, f, r)[0] for f, r in boot]
    assert frontier_only == pytest.approx(float(np.std(fracs, ddof=1)))
    assert both == pytest.approx(math.hypot(frontier_only, np.mean(fracs) * 0.02 / (gold - ref)))


def test_frontier_of_tiny_gpt_matches_exact_optimum():
    tok, ref, task = TinyTok(), tiny_gpt(5, scale=0.3), TinyTask()  # broad enough to sample
    prompts = ["a", "b"]
    support = [enumerate_responses(ref, tok, p) for p in prompts]
    betas = [2.0, 1.0, 0.6]
    fr = estimate_frontier(ref, tok, task, prompts, k=20_000, max_new_tokens=N_NEW, betas=betas, min_ess=1.0,
                           seed=7, batch_size=5000)
    assert len(fr["frontier"]) == 3 and fr["kl_cap"] == pytest.approx(math.log(20_000))
    exact_ref_gold = sum(sum(math.exp(lp) * task.gold_reward(p, tok.decode(y), y[-1] == EOS) for y, lp in sup)
                         for p, sup in zip(prompts, support)) / 2
    assert fr["ref_gold"] == pytest.approx(exact_ref_gold, abs=0.03)
    for point in fr["frontier"]:
        per_prompt = [exact_optimum([math.exp(lp) for _, lp in sup],
                                    [task.gold_reward(p, tok.decode(y), y[-1] == EOS) for y, _ in sup],
                                    point["beta"]) for p, sup in zip(prompts, support)]
        gold = sum(x[0] for x in per_prompt) / 2
        kl = sum(x[1] for x in per_prompt) / 2
        assert kl > 0.05
        assert point["gold"] == pytest.approx(gold, abs=0.05), point
        assert point["kl"] == pytest.approx(kl, abs=0.05), point


def test_frontier_interpolation_and_duality_bound_bracket_the_exact_frontier():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    g = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    ref_gold = (p * g).sum().item()
    pts = sorted(({"beta": b, "gold": exact_optimum(p, g, b)[0], "kl": exact_optimum(p, g, b)[1],
                   "value": exact_optimum(p, g, b)[0] - b * exact_optimum(p, g, b)[1]}  # = beta log Z, exactly
                  for b in (4.0, 2.0, 1.0, 0.5)), key=lambda q: q["kl"])

    def exact_v(c):  # the optimum at KL c: bisect beta (KL falls as beta grows)
        lo, hi = 1e-3, 1e3
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if exact_optimum(p, g, mid)[1] > c else (lo, mid)
        return exact_optimum(p, g, hi)[0]

    for c in (0.01, 0.1, pts[-1]["kl"] * 0.9):  # inside: the chord lies under the concave frontier
        est, extrapolated = frontier_gold_at(pts, c, ref_gold)
        assert not extrapolated and est <= exact_v(c) + 1e-9 and est > exact_v(c) - 0.05
    for c in (pts[-1]["kl"] * 1.2, pts[-1]["kl"] * 2):  # beyond: an upper bound
        est, extrapolated = frontier_gold_at(pts, c, ref_gold)
        assert extrapolated and est >= exact_v(c) - 1e-9
    assert frontier_gold_at(pts, 0.0, ref_gold) == (ref_gold, False)
    gold = ref_gold + 0.5 * (exact_v(0.1) - ref_gold)  # half the optimal gain at KL 0.1
    frac, opt, extrapolated = fraction_of_optimal(gold, ref_gold, 0.1, pts, ref_gold)
    assert frac == pytest.approx((gold - ref_gold) / (opt - ref_gold)) and not extrapolated
    assert 0.5 <= frac < 0.6  # >= because the chord under-estimates the optimum
    assert fraction_of_optimal(ref_gold + 0.01, ref_gold, 1e-4, pts, ref_gold, noise=0.05)[0] is None


# ----------------------------------------------------------------------------------------------- small statistics
def test_paired_win_rate_counts_ties_half():
    assert paired_win_rate_sem([1, 2, 3, 3], [0, 2, 4, 1])[0] == pytest.approx(2.5 / 4)
    assert paired_win_rate_sem([1.0] * 5, [1.0] * 5)[0] == 0.5
    assert paired_win_rate_sem([0, 0], [1, 1])[0] == 0.0
    with pytest.raises(AssertionError):
        paired_win_rate_sem([1, 2], [1])


def test_win_rate_sem_is_the_sem_of_per_prompt_outcomes():
    a, b = [3, 1, 2, 2, 5, 0, 1], [1, 1, 4, 0, 2, 3, 1]  # wins: 1, 0.5, 0, 1, 1, 0, 0.5
    outcomes = [1, 0.5, 0, 1, 1, 0, 0.5]
    n, p = len(outcomes), sum(outcomes) / len(outcomes)
    var = sum((o - p) ** 2 for o in outcomes) / (n - 1)
    rate, sem = paired_win_rate_sem(a, b)
    assert rate == pytest.approx(p)
    assert sem == pytest.approx(math.sqrt(var / n))
    # without ties it is the binomial s.e. sqrt(p (1 - p) / n), with the n - 1 variance
    a, b = [1, 0, 1, 1, 0, 1, 1, 1], [0.5] * 8
    rate, sem = paired_win_rate_sem(a, b)
    assert sem == pytest.approx(math.sqrt(rate * (1 - rate) / 8 * 8 / 7))


def test_gain_uses_the_paired_sem():
    # the policy is the reference plus 0.1 on every prompt, with big prompt-to-prompt variation: paired s.e. ~ 0
    ref = [-2.0, 1.5, 0.3, 3.0, -1.0, 0.7]
    pol = [r + 0.1 + (0.01 if i % 2 else -0.01) for i, r in enumerate(ref)]
    gain, sem = paired_gain(pol, ref)
    d = [x - y for x, y in zip(pol, ref)]
    mean_d = sum(d) / len(d)
    assert gain == pytest.approx(mean_d) and gain == pytest.approx(0.1)
    assert sem == pytest.approx(math.sqrt(sum((x - mean_d) ** 2 for x in d) / (len(d) - 1) / len(d)))
    unpaired = math.hypot(mean_sem(pol)[1], mean_sem(ref)[1])
    assert sem < 0.01 < 0.5 < unpaired  # the unpaired s.e. would call a sure +0.1 gain noise


def test_mean_sem_and_distinct_n():
    mean, sem = mean_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sem == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_sem([7.0]) == (7.0, 0.0)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_n(["x y", "x y", "x y"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""], 2) == 0.0


# ----------------------------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A reference, a perturbed policy and a reward model, tiny and untrained, saved as real run directories."""
    root = tmp_path_factory.mktemp("runs")
    task = get_task("reviews")
    tok = Tokenizer.train(task.corpus(300, seed=0), 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=32, n_layer=1, n_head=2, n_embd=16)
    sft = GPT(cfg)
    with torch.no_grad():  # make EOS likely, so that responses are short and some end
        sft.transformer.wte.weight[tok.eos_id] += 0.3 * sft.transformer.wte.weight.std() / 0.02
    save_run(root / "sft", sft, tok, {"stage": "test"}, kind="policy")
    ppo = GPT(cfg)
    ppo.load_state_dict(sft.state_dict())
    with torch.no_grad():
        for p_ in ppo.parameters():
            p_.add_(0.5 * torch.randn_like(p_) * p_.std())
    save_run(root / "ppo", ppo, tok, {"stage": "test"}, kind="policy")
    rm = ScalarModel(cfg)
    save_run(root / "rm", rm, tok, {"stage": "test"}, kind="reward")
    (root / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({"iter": i, "kl": 0.1 * i, "gold_mean": -1 + 0.1 * i})
                                                        + "\n" for i in range(5)))
    return root


def run_evaluate(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"] + [str(x) for x in argv])
    evaluate.main()


def test_report_files_have_the_documented_keys(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    run_evaluate(monkeypatch, ["--policies", runs / "sft", runs / "ppo", "--ref", runs / "sft", "--reward",
                               runs / "rm", "--out-dir", out, "--n-prompts", 12, "--max-new-tokens", 10, "--frontier",
                               "--frontier-prompts", 2, "--frontier-samples", 32, "--min-ess", 2, "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo"}
    for name, m in report["policies"].items():
        for key in ("gold_mean", "gold_sem", "kl_mean", "kl_sem", "win_rate", "win_rate_sem", "gold_gain",
                    "gold_gain_sem", "eos_rate", "mean_len", "distinct_2", "rm_mean", "rm_sem", "rm_win_rate",
                    "rm_win_rate_sem", "frac_optimal", "frac_optimal_sem", "frontier_gold", "samples"):
            assert key in m, (name, key)
        gold = [s["gold"] for s in m["samples"]]  # only n_show of them: check the definitions on the full report
        assert m["gold_gain"] == pytest.approx(m["gold_mean"] - m["ref_gold_mean"])
        assert 0 < m["win_rate_sem"] <= 0.5 / math.sqrt(m["n_prompts"] - 1) + 1e-12 and gold
        assert len(m["samples"]) == 3 and {"prompt", "response", "gold", "kl", "rm"} <= set(m["samples"][0])
    assert report["policies"]["sft"]["kl_mean"] == 0.0  # the reference against itself, exactly
    # the perturbed policy's true KL is ~0.035 (200-prompt estimate; PAD, BOS and unused ids are not sampled)
    assert report["policies"]["ppo"]["kl_mean"] > 0.02
    assert report["frontier"] and all(set(p) >= {"beta", "kl", "gold", "ess"} for p in report["frontier"])
    # kept on the worst prompt's ESS (so the mean's too)
    assert all(p["ess_min"] >= 2 and p["ess"] >= 2 for p in report["frontier"])
    assert all(p["ess_min"] < 2 for p in report["frontier_dropped"])
    assert set(report["frontier_info"]) >= {"ref_gold", "kl_cap", "n_prompts", "samples_per_prompt", "min_ess",
                                            "n_bootstrap"}
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (out / "report.png").exists() == has_mpl and (report["plot"] is not None) == has_mpl
    md = (out / "report.md").read_text()
    assert "| policy" in md and "gold ± se" in md and "Optimal reward-KL frontier" in md
    assert ("matplotlib is not installed" in md) != has_mpl
    printed = capsys.readouterr().out
    assert "| sft" in printed and "| ppo" in printed and "win vs ref" in printed


def test_user_prompts_have_no_gold_columns(runs, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the food", "the room was", "the view"]))
    out = tmp_path / "eval"
    run_evaluate(monkeypatch, ["--policies", runs / "sft", runs / "ppo", "--ref", runs / "sft", "--prompts", prompts,
                               "--out-dir", out, "--max-new-tokens", 8, "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert report["gold"] is False
    for m in report["policies"].values():
        assert {"kl_mean", "kl_sem", "eos_rate", "mean_len"} <= set(m)
        assert not {"gold_mean", "gold_sem", "win_rate", "frac_optimal"} & set(m)
    assert "gold ± se" not in (out / "report.md").read_text()


def test_user_errors_are_one_line(runs, tmp_path, monkeypatch):
    from minirlhf.utils import UserError
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the food"}\n{"prompt": "the bed"}\n')
    with pytest.raises(UserError, match="--frontier needs the gold reward"):
        run_evaluate(monkeypatch, ["--policies", runs / "sft", "--ref", runs / "sft", "--prompts", prompts,
                                   "--frontier", "--out-dir", tmp_path / "e"])
    # and as users meet it: `python evaluate.py`, exit 2, one line naming the flag
    proc = subprocess.run([sys.executable, "evaluate.py", "--policies", runs / "sft", tmp_path / "missing", "--ref",
                           runs / "sft", "--out-dir", tmp_path / "e"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --policies") and "no model.pt" in proc.stderr


# ----------------------------------------------------------------------------------------------- the pipeline
def test_pipeline_skips_only_up_to_date_stages(tmp_path):
    import dataclasses
    import os
    import pipeline
    import train_sft
    from minirlhf.harness.cli import parse_args
    root = tmp_path / "out"
    (name, script, argv, out_dir, marker, _), (_, _, _, rm_dir, rm_marker, _) = pipeline.stages(root)[:2]
    argv = [str(x) for x in argv] + ["--seed", "3"]
    assert pipeline.why_rerun(script, argv, out_dir, marker, []) == "no finished output yet"
    out_dir.mkdir(parents=True)
    cfg = {"kind": "policy", "args": dataclasses.asdict(parse_args(train_sft.Args, argv))}
    (out_dir / "config.json").write_text(json.dumps(cfg))
    (out_dir / marker).write_text("{}")
    assert pipeline.why_rerun(script, argv, out_dir, marker, []) == ""
    assert "seed 3 -> 4" in pipeline.why_rerun(script, argv[:-1] + ["4"], out_dir, marker, [])
    rm_dir.mkdir()
    (rm_dir / rm_marker).write_text("{}")
    os.utime(rm_dir / rm_marker, (1, 1))  # an input older than this stage's output: still up to date
    assert pipeline.why_rerun(script, argv, out_dir, marker, [rm_dir / rm_marker]) == ""
    os.utime(out_dir / marker, (1, 1))  # an input that finished after this stage: rerun
    os.utime(rm_dir / rm_marker, (100, 100))
    assert "changed since it ran" in pipeline.why_rerun(script, argv, out_dir, marker, [rm_dir / rm_marker])
