"""PPO: the pure loss/advantage functions against naive references, the rollout -> training log-prob agreement,
and a tiny end-to-end run of train_ppo.py."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.harness.checkpoint import load_policy, save_run
from minirlhf.generation import generate
from minirlhf.losses import (AdaptiveKLController, FixedKLController, approx_kl, default_kl_horizon,
                             explained_variance, gae_advantages, kl_shaped_rewards, masked_whiten, ppo_policy_loss,
                             ppo_value_loss, score_with_eos_penalty)
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.scoring import response_logprobs
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from tests.inprocess import run_ok

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the subprocess runs share a small CPU


def ragged_mask(lengths, R):
    """Right-padded response mask (B, R) float for the given lengths."""
    return (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).float()


# ------------------------------------------------------------------------------------------------ GAE
def naive_gae(rewards, values, lengths, gamma, lam):
    """Plain double loop: A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V = 0
    after the last valid token; everything past a row's length is 0."""
    B, R = rewards.shape
    adv, ret = torch.zeros(B, R, dtype=torch.float64), torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        r, v = rewards[b].tolist(), values[b].tolist()
        for t in range(L):
            total = 0.0
            for l in range(L - t):
                s = t + l
                v_next = v[s + 1] if s + 1 < L else 0.0
                total += (gamma * lam) ** l * (r[s] + gamma * v_next - v[s])
            adv[b, t] = total
            ret[b, t] = total + v[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_double_loop_on_ragged_batch(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths, R = [5, 1, 7, 0, 3, 7], 7
    mask = ragged_mask(lengths, R)
    rewards = torch.randn(len(lengths), R, generator=g, dtype=torch.float64) * mask
    values = torch.randn(len(lengths), R, generator=g, dtype=torch.float64)  # garbage on padding on purpose
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


# ------------------------------------------------------------------------------------------------ reward shaping
def test_score_on_eos_token_and_kl_only_on_valid_tokens():
    g = torch.Generator().manual_seed(1)
    lengths, R = [4, 1, 6, 2], 6
    mask = ragged_mask(lengths, R)
    logp = torch.randn(4, R, generator=g, dtype=torch.float64)  # nonzero on padding: must be ignored
    ref = torch.randn(4, R, generator=g, dtype=torch.float64)
    score = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    beta = 0.1
    rewards, kl, non_score = kl_shaped_rewards(score, logp, ref, mask, beta)
    for b, L in enumerate(lengths):
        for t in range(R):
            k = (logp[b, t] - ref[b, t]).item() if t < L else 0.0
            expect = -beta * k + (score[b].item() if t == L - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expect, abs=1e-12), (b, t)
            assert kl[b, t].item() == pytest.approx(k, abs=1e-12)
            assert non_score[b, t].item() == pytest.approx(-beta * k, abs=1e-12)
    # the total reward of a row is its score minus beta * its sequence KL
    torch.testing.assert_close(rewards.sum(1), score - beta * kl.sum(1))


# ------------------------------------------------------------------------------------------------ policy loss
def test_policy_loss_gradient_zero_where_clipped_on_binding_side():
    eps = 0.2
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -1.0, -3.0, -0.7]], dtype=torch.float64)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.7]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -2.0, 2.0, 0.7, -0.3, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)  # last token is padding
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    n = mask.sum().item()
    # binding: ratio > 1+eps with A > 0 (token 0), ratio < 1-eps with A < 0 (token 2): zero gradient.
    # non-binding clipped region (tokens 1, 3) and inside the clip range (4, 5): the unclipped gradient
    # d/dlogp [-A * exp(logp - old)] / n = -A * ratio / n. Padding (6): zero.
    expect = [0.0, 1.5 / n, 0.0, -2.0 * 0.5 / n, -0.7 * 1.1 / n, 0.3 * 0.9 / n, 0.0]
    torch.testing.assert_close(logp.grad[0], torch.tensor(expect, dtype=torch.float64))
    naive = []
    for r, a, m in zip(ratios[0].tolist(), adv[0].tolist(), mask[0].tolist()):
        if m:
            naive.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    assert loss.item() == pytest.approx(sum(naive) / len(naive))
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)


# ------------------------------------------------------------------------------------------------ value loss
def test_clipped_value_loss_matches_naive():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    old = values.detach() + 0.4 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = ragged_mask([5, 2, 3], 5).double()
    eps = 0.2
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, eps)
    terms, n_clip, grads = [], 0, torch.zeros(3, 5, dtype=torch.float64)
    n = int(mask.sum())
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                continue
            v, vo, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            vc = vo + min(max(v - vo, -eps), eps)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            terms.append(0.5 * max(e1, e2))
            n_clip += e2 > e1
            # gradient flows through whichever error is larger; the clipped one is flat when v - vo is clipped
            if e1 >= e2:
                grads[b, t] = (v - r) / n
            else:
                grads[b, t] = (vc - r) / n if abs(v - vo) < eps else 0.0
    assert loss.item() == pytest.approx(sum(terms) / n)
    assert clipfrac.item() == pytest.approx(n_clip / n)
    loss.backward()
    torch.testing.assert_close(values.grad, grads)


# ------------------------------------------------------------------------------------------------ whitening etc.
def test_masked_whiten_ignores_padding():
    g = torch.Generator().manual_seed(3)
    lengths = [4, 2, 5]
    mask = ragged_mask(lengths, 5).double()
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3 + 2
    x_garbage = torch.where(mask.bool(), x, torch.full_like(x, 1e6))  # huge values on padding
    out = masked_whiten(x_garbage, mask)
    valid = x[mask.bool()]
    expect = (valid - valid.mean()) / valid.std()  # naive: whiten the valid values alone (unbiased std)
    torch.testing.assert_close(out[mask.bool()], expect, atol=1e-6, rtol=1e-6)
    assert (out[~mask.bool()] == 0).all()
    # shift_mean=False: same spread, the mean is kept
    out2 = masked_whiten(x_garbage, mask, shift_mean=False)
    torch.testing.assert_close(out2[mask.bool()], expect + valid.mean(), atol=1e-6, rtol=1e-6)


def test_approx_kl_and_explained_variance():
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    new = torch.tensor([[-1.2, -1.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    naive = sum(math.exp(d) - 1 - d for d in (-0.2, 0.5)) / 2
    assert approx_kl(new, old, mask).item() == pytest.approx(naive)
    assert approx_kl(old, old, mask).item() == 0.0
    ret = torch.tensor([[1.0, 3.0, 100.0]], dtype=torch.float64)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask).item() == pytest.approx(0.0)  # predicts nothing


def test_adaptive_kl_controller_matches_the_formula_and_reaches_its_target_within_a_run():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=500)
    for kl, n in ((5.0, 64), (1.0, 32), (4.4, 64)):  # e = +0.2 (clipped from 0.25), -0.2 (clipped), +0.1
        before = ctl.value
        e = min(max(kl / 4.0 - 1, -0.2), 0.2)
        assert ctl.update(kl, n) == pytest.approx(before * (1 + e * n / 500))
    # the default horizon is one rollout batch (so one update changes beta by <= 20%)
    assert default_kl_horizon(64) == 64 and default_kl_horizon(16) == 16
    # closed loop on a toy policy whose KL is c / beta, a run of the default length (50 updates of 64 episodes):
    # from any start in [0.01, 0.2] and for targets 2 and 6 the default horizon ends within 10% of the target;
    # 10% of the run (5 batches, the earlier default) does not from 0.01 (beta can move only ~x7 in a run), and
    # the fixed 10,000 of lm-human-preferences ends far off from every start.
    def final_kl(horizon, start, target, c=3.0):
        ctl = AdaptiveKLController(start, target=target, horizon=horizon)
        for _ in range(50):
            ctl.update(c / ctl.value, 64)
        return c / ctl.value
    for start in (0.01, 0.03, 0.07, 0.2):
        for target, c in ((2.0, 0.4), (6.0, 3.0)):
            assert final_kl(default_kl_horizon(64), start, target, c) == pytest.approx(target, rel=0.1)
    assert final_kl(320, 0.01, 2.0, c=0.4) > 1.25 * 2.0
    assert final_kl(10_000, 0.15, 6.0) > 2.5 * 6.0
    # beta never reaches 0 at the smallest horizon the default allows
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=default_kl_horizon(64))
    for _ in range(100):
        assert ctl.update(0.0, 64) > 0


def test_adaptive_beta_in_a_real_run_moves_at_the_full_rate_of_its_default_horizon(tiny_runs):
    # a run long enough that 10% of its episodes (the earlier default) exceeds one batch: 12 x 8 episodes. The KL
    # stays far below the target, so beta must fall by the full 20% per update (one batch = the horizon).
    rows = run_ppo(tiny_runs, tiny_runs / "ppo_far", "--iterations", "12", "--target-kl", "50", "--kl-coef", "0.2")
    assert all(r["kl"] < 40 for r in rows)
    assert [r["beta"] for r in rows] == pytest.approx([0.2 * 0.8 ** i for i in range(12)], abs=1e-6)  # 6 digits
    assert json.loads((tiny_runs / "ppo_far" / "metrics.json").read_text())["kl_horizon"] == 8


def test_missing_eos_score_is_replaced_by_the_penalty():
    rm = torch.tensor([1.5, -0.3, 2.0, 0.7])
    has_eos = torch.tensor([True, False, True, False])
    torch.testing.assert_close(score_with_eos_penalty(rm, has_eos, 2.0), torch.tensor([1.5, -2.0, 2.0, -2.0]))


def test_adaptive_kl_controller_moves_beta_the_right_way():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 64) > 0.1  # KL above target -> stronger penalty
    b = ctl.value
    assert ctl.update(1.0, 64) < b  # KL below target -> weaker penalty
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(1e9, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.0, 100) == pytest.approx(0.1)  # on target: unchanged
    assert FixedKLController(0.05).update(100.0, 64) == 0.05


# ------------------------------------------------------------------------------------------------ model paths
def tiny_gpt(seed=0, vocab=64):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # sharper than the 0.02-std init, so log-probs differ clearly between tokens
        model.transformer.wte.weight.mul_(20)
    return model.eval()


def left_padded_prompts():
    ids = torch.tensor([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11], [0, 12, 13, 14, 15], [0, 0, 0, 0, 16]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_minibatch_ratio_is_one_through_rollout_path(temperature):
    """The rollout's sampling log-probs (KV cache, one token at a time), the full-batch scoring forward that gives
    the old log-probs, and the training forward on a shuffled minibatch with trimmed padding columns must agree:
    the first PPO ratio is 1 only if temperature, padding and positions are handled identically."""
    policy = tiny_gpt()
    p_ids, p_mask = left_padded_prompts()
    # choose as EOS a token row 0 samples at step 3 (same seed, so the rerun stops there): a ragged batch
    probe, _, _ = generate(policy, p_ids, p_mask, 12, eos_id=-1, pad_id=0, temperature=temperature,
                           generator=torch.Generator().manual_seed(0))
    resp, resp_mask, sample_logp = generate(policy, p_ids, p_mask, 12, eos_id=int(probe[0, 3]), pad_id=0,
                                            temperature=temperature, generator=torch.Generator().manual_seed(0))
    lengths = resp_mask.sum(1)
    assert lengths.min() < lengths.max()  # ragged: right padding is involved
    with torch.no_grad():
        old_logp = response_logprobs(policy, p_ids, p_mask, resp, resp_mask, temperature)
    torch.testing.assert_close(old_logp, sample_logp, atol=1e-5, rtol=0)
    # naive reference: each row alone, unpadded (positions 0..n-1), softmax(logits / T) written out
    for b in range(len(p_ids)):
        prompt = p_ids[b][p_mask[b].bool()]
        response = resp[b][resp_mask[b].bool()]
        with torch.no_grad():
            logits = policy(torch.cat([prompt, response])[None])[0, len(prompt) - 1:-1].double() / temperature
        naive = logits.log_softmax(-1).gather(1, response[:, None]).squeeze(1)
        torch.testing.assert_close(old_logp[b, :len(response)].double(), naive, atol=1e-4, rtol=0)
    idx = torch.tensor([2, 0])  # a minibatch, as the update loop takes it (rows permuted, padding trimmed)
    R = int(resp_mask[idx].sum(1).max())
    new_logp = response_logprobs(policy, p_ids[idx], p_mask[idx], resp[idx, :R], resp_mask[idx, :R], temperature)
    _, stats = ppo_policy_loss(new_logp, old_logp[idx, :R], torch.randn(2, R), resp_mask[idx, :R].float())
    ratio = stats["ratio"][resp_mask[idx, :R].bool()]
    assert (ratio - 1).abs().max().item() < 1e-5


def test_kl_to_reference_is_zero_when_policy_equals_reference():
    policy = tiny_gpt(1)
    ref = copy.deepcopy(policy)
    p_ids, p_mask = left_padded_prompts()
    resp, resp_mask, _ = generate(policy, p_ids, p_mask, 10, eos_id=3, pad_id=0, temperature=1.0,
                                  generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = response_logprobs(policy, p_ids, p_mask, resp, resp_mask)
        ref_logp = response_logprobs(ref, p_ids, p_mask, resp, resp_mask)
    score = torch.tensor([1.0, -1.0, 0.5, 2.0])
    rewards, kl, non_score = kl_shaped_rewards(score, logp, ref_logp, resp_mask.float(), 0.1)
    assert (kl == 0).all() and (non_score == 0).all()
    torch.testing.assert_close(rewards.sum(1), score)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny random policy and reward model saved as run directories (no trained checkpoints needed)."""
    d = tmp_path_factory.mktemp("runs")
    task = get_task("reviews")
    tok = Tokenizer.train(task.corpus(300, 0), 300)
    cfg = GPTConfig(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    save_run(d / "sft", GPT(cfg), tok, {"note": "test"}, kind="policy", stage="sft")
    save_run(d / "rm", ScalarModel(cfg), tok, {"note": "test"}, kind="reward", stage="rm")
    return d


def run_ppo(tiny_runs, out, *flags, in_process: bool = True):
    """train_ppo.py on the tiny fixture, in this process (tests/inprocess.py) or a subprocess; metrics.jsonl rows."""
    run_ok("train_ppo.py", "--policy", tiny_runs / "sft", "--reward", tiny_runs / "rm", "--out-dir", out,
           "--iterations", 3, "--batch-size", 8, "--minibatches", 2, "--epochs", 2, "--max-new-tokens", 8,
           "--n-eval", 16, "--device", "cpu", *flags, in_process=in_process, env=ENV)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_subprocess_run_writes_outputs(tiny_runs):
    out = tiny_runs / "ppo"
    run_ppo(tiny_runs, out, "--target-kl", "1", in_process=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    need = ["rm_score_mean", "rm_score_std", "kl", "non_score_reward", "beta", "pg_loss", "vf_loss", "approx_kl",
            "clipfrac", "entropy", "explained_var", "ratio_mean", "ratio_max", "resp_len", "eos_rate", "gold_mean",
            "first_ratio_dev"]
    for row in rows:
        for k in need:
            assert k in row and math.isfinite(row[k]), k
        assert row["first_ratio_dev"] < 1e-5
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference before the first update
    # adaptive beta starts at --kl-coef and moves towards the target within the run: KL stays far below 1 here, so
    # beta falls by 20% per update with the default horizon (one batch); a 10,000-episode horizon moved it 0.05%
    assert rows[0]["beta"] == pytest.approx(0.07)
    for prev, nxt in zip(rows, rows[1:]):
        assert prev["kl"] < 0.8 and nxt["beta"] == pytest.approx(prev["beta"] * 0.8, rel=1e-4)
    m = json.loads((out / "metrics.json").read_text())
    assert m["kl_horizon"] == 8 and m["final_beta"] == pytest.approx(0.07 * 0.8 ** 3, rel=1e-4)
    for k in ("win_rate_vs_ref", "kl_mean", "gold_mean", "ref_gold_mean", "first_ratio_dev"):
        assert k in m and math.isfinite(m[k]), k
    model, _, cfg = load_policy(out)
    assert cfg["stage"] == "ppo" and cfg["kind"] == "policy"


def test_missing_eos_penalty_whitening_and_approx_kl_stop_in_a_run(tiny_runs, tmp_path):
    # an untrained policy rarely says EOS within 8 tokens: those rows must score -100, not their RM score
    rows = run_ppo(tiny_runs, tmp_path / "a", "--missing-eos-penalty", "100", "--whiten-rewards",
                   "--approx-kl-stop", "1e-12")
    for r in rows:
        assert r["eos_rate"] < 1 and abs(r["rm_score_mean"]) < 10
        assert abs(r["score_mean"] - (-100) * (1 - r["eos_rate"])) < 10 * r["eos_rate"] + 1e-3
        # whitened per-token rewards: unit std, but the mean is kept (no shift: it carries the incentive to stop)
        assert r["reward_std"] == pytest.approx(1.0, abs=1e-3)
        assert r["reward_mean"] == pytest.approx(r["total_reward"] / r["resp_len"], rel=1e-3, abs=1e-4)
        assert r["reward_mean"] < -1  # the -100 scores dominate: a mean shift to 0 would fail here
        # the epoch loop stopped after the first epoch: its mean approx-KL is above the tiny threshold
        assert r["epochs_done"] == 1
    rows = run_ppo(tiny_runs, tmp_path / "b")
    assert all(r["epochs_done"] == 2 and r["reward_std"] != pytest.approx(1.0, abs=1e-3) for r in rows)


def test_held_out_evaluations_along_the_way_leave_training_unchanged(tiny_runs, tmp_path):
    # --eval-interval 2 over 3 iterations: after iteration 1 and the last one; the held-out samples have their own
    # random stream, so the training rows are the same as without the evaluations
    rows = run_ppo(tiny_runs, tmp_path / "e", "--eval-interval", "2", "--eval-prompts", "8")
    plain = run_ppo(tiny_runs, tmp_path / "p")
    assert [("eval_kl_mean" in r) for r in rows] == [False, True, True]
    for r, q in zip(rows, plain):
        for k in ("rm_score_mean", "kl", "pg_loss", "vf_loss", "approx_kl", "gold_mean"):
            assert r[k] == q[k], k
    e1, e2 = rows[1], rows[2]
    for e in (e1, e2):
        assert e["eval_gold_gain"] == pytest.approx(e["eval_gold_mean"] - e["eval_ref_gold_mean"], abs=1e-5)
        for k in ("eval_kl_mean", "eval_kl_sem", "eval_gold_gain_sem", "eval_rm_mean", "eval_score_mean",
                  "eval_ref_score_mean", "eval_win_rate_vs_ref", "eval_s", "eval_part_sentiment",
                  "eval_part_repeated_words", "eval_part_no_eos"):
            assert math.isfinite(e[k]), k
    # the reference's samples are drawn once: the same SFT baseline at every evaluation
    for k in ("eval_ref_gold_mean", "eval_ref_rm_mean", "eval_ref_score_mean"):
        assert e1[k] == e2[k], k


def test_missing_reward_dir_is_a_clear_error(tiny_runs, tmp_path):
    cmd = [sys.executable, "train_ppo.py", "--policy", str(tiny_runs / "sft"), "--reward", str(tmp_path / "nope"),
           "--out-dir", str(tmp_path / "o"), "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=ENV)
    assert res.returncode == 2 and "--reward" in res.stderr and "Traceback" not in res.stderr


def test_host_syncs_per_iteration_stay_within_budget(tiny_runs, tmp_path, monkeypatch):
    """One more PPO iteration reads the device 7 + epochs + max_new_tokens / CHECK_EVERY times: generate's prompt
    budgets, "all rows done?" every CHECK_EVERY tokens and the final width (3 here), the rollout's texts and its
    statistics (2), the response lengths of the update (1), each epoch's minibatch order (2), the update's
    statistics (1) and the NaN watch (1): none per minibatch or per token. It copies the prompts over (2)."""
    import train_ppo
    from minirlhf.generation import CHECK_EVERY
    from tests.test_runs import host_syncs_added
    added = host_syncs_added(monkeypatch, train_ppo.main, lambda n: [
        "--policy", str(tiny_runs / "sft"), "--reward", str(tiny_runs / "rm"), "--out-dir", str(tmp_path / str(n)),
        "--iterations", str(n), "--batch-size", "8", "--minibatches", "2", "--epochs", "2", "--max-new-tokens", "8",
        "--n-eval", "16", "--device", "cpu"])
    assert added.pop("to_device") == 2 and sum(added.values()) <= 7 + 2 + 8 // CHECK_EVERY, added
