"""DPO family: the pure losses against naive scalar references, the response log-prob masking, the state at
initialisation, the direction of the gradient, and tiny end-to-end runs of train_dpo.py."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train_dpo.py is a script at the repository root

import train_dpo  # noqa: E402
from minirlhf.harness.checkpoint import load_policy  # noqa: E402
from minirlhf.data import DataError, left_pad, right_pad  # noqa: E402
from minirlhf.losses import dpo_sigmoid_loss, hinge_loss, ipo_loss, preference_loss  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf import dpo  # noqa: E402
from minirlhf.preferences import encode_pairs, split_prefs, subsample  # noqa: E402
from minirlhf.scoring import response_logprobs, token_logprobs  # noqa: E402
from minirlhf.tasks import get_task  # noqa: E402
from tests.inprocess import run_fails, run_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the subprocess runs share a small CPU
PAD, BOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------ pure losses
def naive_log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_loss(kind, pc, pr, rc, rr, beta, eps):
    """One pair, plain Python floats, straight from the papers' equations."""
    delta = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -(1 - eps) * naive_log_sigmoid(beta * delta) - eps * naive_log_sigmoid(-beta * delta)
    if kind == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - beta * delta)
    raise AssertionError(kind)


def random_logps(n=64, seed=0):
    """Sequence log-probs of a policy and a reference, (n,) each for chosen/rejected, with margins of all sizes."""
    g = torch.Generator().manual_seed(seed)
    ref_c, ref_r = -30 * torch.rand(n, generator=g, dtype=torch.float64), -30 * torch.rand(n, generator=g, dtype=torch.float64)
    pi_c = ref_c + 20 * torch.randn(n, generator=g, dtype=torch.float64)
    pi_r = ref_r + 20 * torch.randn(n, generator=g, dtype=torch.float64)
    return pi_c, pi_r, ref_c, ref_r


@pytest.mark.parametrize("kind,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2),
                                           ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0), ("hinge", 0.1, 0.0),
                                           ("hinge", 0.3, 0.0)])
def test_losses_match_naive_scalar_implementation(kind, beta, eps):
    pc, pr, rc, rr = random_logps()
    got = preference_loss(kind, pc, pr, rc, rr, beta, eps)
    want = torch.tensor([naive_loss(kind, *map(float, x), beta, eps) for x in zip(pc, pr, rc, rr)], dtype=got.dtype)
    assert got.shape == pc.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    if kind == "hinge":  # both sides of the hinge are exercised
        assert (got == 0).any() and (got > 0).any()
    direct = {"sigmoid": lambda: dpo_sigmoid_loss(pc, pr, rc, rr, beta, eps), "ipo": lambda: ipo_loss(pc, pr, rc, rr, beta),
              "hinge": lambda: hinge_loss(pc, pr, rc, rr, beta)}[kind]()
    assert torch.equal(direct, got)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", *random_logps(4))


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_loss_gradient_raises_chosen_and_lowers_rejected(kind):
    """d loss / d log pi(chosen) < 0 and d loss / d log pi(rejected) > 0 wherever the loss is active; the
    reference log-probs are constants."""
    pc, pr, rc, rr = random_logps(32, seed=1)
    pc, pr = (pc * 0.01).requires_grad_(), (pr * 0.01).requires_grad_()  # small margins: every loss is active
    rc, rr = rc * 0.01, rr * 0.01
    preference_loss(kind, pc, pr, rc, rr, 0.1).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert torch.allclose(pc.grad, -pr.grad)  # the losses depend on the margin only


# ------------------------------------------------------------------------------------------------ log-probs
def test_token_logprobs_match_a_naive_log_softmax_position_by_position():
    """scoring.token_logprobs, which DPO's pair log-probs sum over response tokens: a float32 log-softmax of the
    lm_head's logits, position by position, also across the chunks it computes them in."""
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 3, 9, 5, 11
    h, weight = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g)
    targets = torch.randint(V, (B, T), generator=g)
    lp = token_logprobs(h, weight, targets, chunk_rows=4)  # chunks of 4 of the 27 positions: across rows
    naive = torch.tensor([[(h[b, t] @ weight.T).log_softmax(-1)[targets[b, t]].item() for t in range(T)]
                          for b in range(B)])
    assert torch.allclose(lp, naive, atol=1e-5)
    changed = h.clone()
    changed[0, 3] += 1.0  # one position's hidden state moves that position's log-prob only
    moved = token_logprobs(changed, weight, targets, chunk_rows=4) != lp
    assert moved[0, 3] and moved.sum() == 1
    assert token_logprobs(h.bfloat16(), weight.bfloat16(), targets).dtype == torch.float32


def tiny_gpt(seed=0, vocab=32):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # larger weights than GPT-2's init, so positions and attention matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def random_pairs(n, seed=0, vocab=32):
    """(prompt_ids, chosen_ids, rejected_ids) with BOS first and EOS last, ragged lengths."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    return [([BOS] + tok(rng.randint(1, 6)), tok(rng.randint(1, 8)) + [EOS], tok(rng.randint(1, 8)) + [EOS])
            for _ in range(n)]


def test_pair_logps_match_scoring_layout_and_ignore_padding():
    """The right-padded training layout gives the same sequence log-probs as the foundation's scoring layout
    [prompt left-padded | response right-padded], and a row's value does not depend on the rest of the batch."""
    model = tiny_gpt().eval()
    pairs = random_pairs(6)
    logps, lens = dpo.pair_logps(model, dpo.pair_batch(pairs, PAD, "cpu"), "cpu", "float32")
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    p_ids, p_mask = left_pad([p for p, _ in seqs], PAD)
    r_ids, r_mask = right_pad([r for _, r in seqs], PAD)
    scored = response_logprobs(model, p_ids, p_mask, r_ids, r_mask).sum(1)
    assert torch.allclose(logps, scored, atol=1e-5)
    assert lens.tolist() == [len(r) for _, r in seqs]
    alone, _ = dpo.pair_logps(model, dpo.pair_batch(pairs[:1], PAD, "cpu"), "cpu", "float32")
    assert torch.allclose(alone, logps[[0, 6]], atol=1e-5)  # less padding, same log-probs


# ------------------------------------------------------------------------------------------------ training step
def dpo_args(**kw):
    return train_dpo.Args(**kw)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_at_init_policy_equals_reference(kind):
    model = tiny_gpt()
    pairs = random_pairs(8, seed=1)
    ref, _ = dpo.all_pair_logps(model, pairs, PAD, "cpu", "float32", batch_size=3)  # other batch shapes
    a = dpo_args(loss=kind, beta=0.1, nll_coef=0.0)
    logps, lens = dpo.pair_logps(model, dpo.pair_batch(pairs, PAD, "cpu"), "cpu", "float32")
    loss, stats = dpo.dpo_step_loss(logps, lens, ref, a)
    want = {"sigmoid": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0}[kind]
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert abs(stats["rewards/margin"]) < 1e-6 and abs(stats["rewards/chosen"]) < 1e-6
    assert abs(stats["rewards/rejected"]) < 1e-6


def log_ratios(model, pairs, ref):
    logps, _ = dpo.all_pair_logps(model, pairs, PAD, "cpu", "float32", batch_size=64)
    return logps - ref  # (N, 2)


@pytest.mark.parametrize("kind,nll", [("sigmoid", 0.0), ("sigmoid", 1.0), ("ipo", 0.0), ("hinge", 0.0)])
def test_a_training_step_raises_chosen_and_lowers_rejected_log_ratio(kind, nll):
    model = tiny_gpt(seed=2)
    pairs = random_pairs(16, seed=3)
    ref, _ = dpo.all_pair_logps(model, pairs, PAD, "cpu", "float32", batch_size=64)
    a = dpo_args(loss=kind, beta=0.1, nll_coef=nll)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3 if kind != "ipo" else 1e-5)
    logps, lens = dpo.pair_logps(model, dpo.pair_batch(pairs, PAD, "cpu"), "cpu", "float32")
    loss, _ = dpo.dpo_step_loss(logps, lens, ref, a)
    loss.backward()
    opt.step()
    h = log_ratios(model, pairs, ref)
    assert h[:, 0].mean() > 1e-4 and h[:, 1].mean() < -1e-4
    assert (h[:, 0] - h[:, 1] > 0).float().mean() > 0.9  # the margin grows on (almost) every pair


# ------------------------------------------------------------------------------------------------ data handling
def test_split_holds_out_whole_prompts_and_validates():
    recs = [{"prompt": f"p{i % 10}", "chosen": "a", "rejected": "b", "_where": f"f:{i + 1}"} for i in range(50)]
    train, test = split_prefs(recs, 0.2, seed=0)
    assert len(test) == 10 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    with_split = [dict(r, split="test" if i < 5 else "train") for i, r in enumerate(recs)]
    train, test = split_prefs(with_split, 0.2, seed=0)
    assert len(test) == 5 and len(train) == 45
    with pytest.raises(DataError, match="f:3: split must be"):
        split_prefs([dict(r, split="dev" if i == 2 else "train") for i, r in enumerate(recs)], 0.2, 0)
    sub = subsample(recs, 7, seed=0)
    assert len(sub) == 7 and sub == subsample(recs, 7, seed=0) and subsample(recs, 0, 0) == recs
    assert [int(r["_where"][2:]) for r in sub] == sorted(int(r["_where"][2:]) for r in sub)  # file order kept
    with pytest.raises(DataError, match="f:1: missing field 'split'"):
        split_prefs([recs[0]] + with_split[1:], 0.2, 0)


def test_dpo_pairs_use_the_sampled_ids_when_the_tokenizer_matches():
    from minirlhf.tokenizer import Tokenizer
    tok = Tokenizer.train(get_task("reviews").corpus(300), 300)
    sampled = [tok.hf.token_to_id(c) for c in "Ġgood"] + [tok.eos_id]  # "Ġ g o o d": BPE would merge "oo"
    assert tok.encode(tok.decode(sampled)) != sampled[:-1]
    rec = {"prompt": "the food was", "chosen": " good", "rejected": " bad .", "chosen_ids": sampled,
           "rejected_ids": tok.encode(" bad .") + [tok.eos_id], "tokenizer_fingerprint": tok.fingerprint(),
           "_where": "f:1"}
    (p, c, r), = encode_pairs([rec], tok, 64, targets=True)[0]
    assert p == [tok.bos_id] + tok.encode("the food was") and c == sampled
    (_, c, _), = encode_pairs([dict(rec, tokenizer_fingerprint="other")], tok, 64, targets=True)[0]
    assert c == tok.encode(" good") + [tok.eos_id]  # another tokenizer's ids: the text is encoded


# ------------------------------------------------------------------------------------------------ end to end
def run_script(*args, check=True, timeout=300):
    if check:  # a run that must succeed: in this process (tests/inprocess.py)
        return run_main(*args)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_prefs(path, n_prompts=24, with_extras=True, seed=0):
    """Preference pairs in train_rm.py's format from the task's demonstrations: two demonstrations of one split,
    the second given the first one's prompt, labelled by the simulated annotator."""
    task, rng = get_task("reviews"), random.Random(seed)
    lines = []
    for split in ("train", "test"):
        demos = task.sft_examples(split, 2 * n_prompts, seed=seed)
        for a, b in zip(demos[::2], demos[1::2]):
            prompt, ga = a["prompt"], task.gold_reward(a["prompt"], a["completion"])
            gb = task.gold_reward(prompt, b["completion"])
            (c, gc), (r, gr) = ((a["completion"], ga), (b["completion"], gb))
            if not task.annotate(ga, gb, rng):
                (c, gc), (r, gr) = (r, gr), (c, gc)
            rec = {"prompt": prompt, "chosen": c, "rejected": r}
            if with_extras:
                rec.update(split=split, chosen_gold=gc, rejected_gold=gr, label_prob=task.preference_prob(gc, gr))
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


TINY_SFT = ["--steps", "3", "--n-train", "64", "--n-val", "8", "--n-samples", "4", "--batch-size", "8",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300", "--device", "cpu",
            "--max-new-tokens", "8"]
TINY_DPO = ["--epochs", "2", "--batch-size", "8", "--log-interval", "1", "--eval-interval", "2",
            "--n-eval", "8", "--max-new-tokens", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_script("train_sft.py", "--out-dir", str(out), *TINY_SFT)
    return out


@pytest.mark.parametrize("loss,flags", [("simpo", ["--beta", "2.0", "--simpo-gamma", "1.0"]),
                                        ("kto", ["--kto-undesirable-weight", "1.2"])])
def test_tiny_simpo_and_kto_runs(sft_run, tmp_path, loss, flags):
    prefs, out = write_prefs(tmp_path / "prefs.jsonl"), tmp_path / loss
    run_script("train_dpo.py", "--policy", str(sft_run), "--prefs", str(prefs), "--out-dir", str(out), *TINY_DPO,
               "--loss", loss, "--nll-coef", "0", *flags)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if loss == "kto":  # first step: policy = reference, so z0 = 0 and every example's loss is 1 - sigmoid(0)
        assert rows[0]["kto_z0"] == 0.0 and rows[0]["loss"] == pytest.approx(0.5 * (1 + 1.2) / 2, abs=1e-6)
        assert any(r["kto_z0"] > 0 for r in rows[1:])  # the policy moved: mismatched pairs' log-ratio above 0
    else:  # SimPO's loss at the start is the policy's own (no reference): not log 2
        assert rows[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] >= 0


def test_tiny_dpo_run_writes_outputs(sft_run, tmp_path):
    prefs, out = write_prefs(tmp_path / "prefs.jsonl"), tmp_path / "dpo"
    proc = run_script("train_dpo.py", "--policy", str(sft_run), "--prefs", str(prefs), "--out-dir", str(out),
                      *TINY_DPO)
    for name in ("model.pt", "config.json", "tokenizer.json", "metrics.jsonl", "metrics.json", "ref_logps.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))  # 24 pairs / 8 = 3 steps per epoch, 2 epochs
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected"}
    assert all(keys <= set(r) and {f"test/{k}" for k in keys} <= set(r) for r in rows)
    assert rows[0]["pref_loss"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy = reference
    assert rows[0]["loss"] == pytest.approx(math.log(2) + 0.2 * rows[0]["nll_chosen"], abs=1e-4)  # + default NLL
    assert all(math.isfinite(v) for r in rows for v in r.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("win_rate_vs_ref", "kl_mean", "gold_mean", "ref_gold_mean", "test_accuracy", "bayes_accuracy"):
        assert math.isfinite(metrics[k]), k
    assert 0.5 <= metrics["bayes_accuracy"] <= 1 and metrics["n_test_pairs"] == 24
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "policy" and config["stage"] == "dpo" and config["args"]["loss"] == "sigmoid"
    model, _, _ = load_policy(out)  # the SFT checkpoint format: later stages load it the same way
    ref, _, _ = load_policy(sft_run)
    assert any(not torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values()))
    assert "reusing" not in proc.stdout
    # a second run into the same directory reuses the cached reference log-probs (same file, same reference)
    proc = run_script("train_dpo.py", "--policy", str(sft_run), "--prefs", str(prefs), "--out-dir", str(out),
                      *TINY_DPO, "--epochs", "0.4", "--loss", "ipo", "--n-eval", "4")
    assert "reference log-probs: reusing" in proc.stdout


def test_user_file_without_split_or_gold_and_clear_errors(sft_run, tmp_path):
    prefs, out = write_prefs(tmp_path / "mine.jsonl", n_prompts=12, with_extras=False), tmp_path / "mine"
    proc = run_script("train_dpo.py", "--policy", str(sft_run), "--prefs", str(prefs), "--out-dir", str(out),
                      *TINY_DPO, "--epochs", "1", "--loss", "hinge", "--test-frac", "0.25")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test_accuracy" in metrics and "bayes_accuracy" not in metrics and "win_rate_vs_ref" not in metrics
    assert "no gold columns" in proc.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the food", "chosen": " was good .", "rejected": " was bad ."}) + "\n"
                   + json.dumps({"prompt": "the food", "chosen": " was good ."}) + "\n")
    proc = run_script("train_dpo.py", "--policy", str(sft_run), "--prefs", str(bad), "--out-dir",
                      str(tmp_path / "x"), *TINY_DPO, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: missing field 'rejected'" in proc.stderr
    proc = run_fails("train_dpo.py", "--policy", str(tmp_path / "nope"), "--prefs", str(prefs), "--out-dir",
                     str(tmp_path / "y"), *TINY_DPO)
    assert proc.returncode == 2 and "--policy" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_fails("train_dpo.py", "--policy", str(sft_run), "--prefs", str(prefs), "--out-dir",
                     str(tmp_path / "z"), "--loss", "orpo")
    assert proc.returncode == 2 and "--loss orpo" in proc.stderr
    # a file whose pairs all have chosen == rejected carries no preference: refused, not trained at loss ln 2
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"the food {i}", "chosen": " was good .", "rejected": " was good .",
                                        "split": "test" if i % 4 == 0 else "train"}) + "\n" for i in range(8)))
    proc = run_fails("train_dpo.py", "--policy", str(sft_run), "--prefs", str(same), "--out-dir",
                     str(tmp_path / "s"), *TINY_DPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "warning: 6 of 6 train pairs have chosen == rejected" in proc.stdout
    assert f"{same}: none of the 6 train pairs is informative" in proc.stderr
    # label_prob NaN is not a number a metrics file can carry: FILE:LINE error
    nan = tmp_path / "nan.jsonl"
    nan.write_text(same.read_text().replace('"split"', '"label_prob": NaN, "split"', 1))
    proc = run_fails("train_dpo.py", "--policy", str(sft_run), "--prefs", str(nan), "--out-dir",
                     str(tmp_path / "n"), *TINY_DPO)
    assert proc.returncode == 2 and f"{nan}:1: NaN is not a finite number" in proc.stderr


# ------------------------------------------------------------------------------------------------ online DPO
def test_rank_pairs_label_by_reward_model_score():
    """Online pairs: the higher RM score is chosen; no-EOS samples, repeated responses and equal scores form no
    pair; best-worst keeps one pair per prompt (highest vs lowest)."""
    from minirlhf.preferences import rank_pairs

    def s(text, toks, eos=True):
        return {"response": text, "tokens": toks, "eos": eos, "logprobs": [-1.0] * len(toks)}
    samples = [s("a", [5, 2]), s("b", [6, 2]), s("c", [7, 2]), s("d", [8], eos=False),  # prompt 0
               s("e", [5, 2]), s("e", [5, 2]), s("f", [6, 2]), s("g", [7, 2])]  # prompt 1: a repeat, a tie
    scores = [0.1, 0.9, 0.1, 9.0, 0.3, 0.3, 0.2, -1.0]  # a and c tie
    recs, stats = rank_pairs(["p0", "p1"], samples, scores, 4, "all", "fp")
    got = {(r["prompt"], r["chosen"], r["rejected"]) for r in recs}
    assert got == {("p0", "b", "a"), ("p0", "b", "c"), ("p1", "e", "f"), ("p1", "e", "g"), ("p1", "f", "g")}
    assert all(r["chosen_rm"] > r["rejected_rm"] and "chosen_gold" not in r for r in recs)
    assert stats["n_dropped_no_eos"] == 1 and stats["n_duplicates"] == 1
    recs, _ = rank_pairs(["p0", "p1"], samples, scores, 4, "best-worst")
    assert [(r["chosen"], r["rejected"]) for r in recs] == [("b", "a"), ("e", "g")]


@pytest.fixture(scope="module")
def online_runs(tmp_path_factory):
    """A tiny random policy that stops early (EOS logit pushed up, so samples end within a few tokens) and a
    random reward model, saved as run directories."""
    from minirlhf.harness.checkpoint import save_run
    from minirlhf.model import ScalarModel
    from minirlhf.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("online")
    task = get_task("reviews")
    tok = Tokenizer.train(task.corpus(300, 0), 300)
    cfg = GPTConfig(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    policy = GPT(cfg)
    with torch.no_grad():
        v = torch.randn(cfg.n_embd)
        policy.transformer.ln_f.bias.copy_(v)
        policy.transformer.wte.weight[tok.eos_id] = 5.0 * v / v.norm() ** 2  # EOS logit ~ +5
    save_run(d / "sft", policy, tok, {"note": "test"}, kind="policy", stage="sft")
    save_run(d / "rm", ScalarModel(cfg), tok, {"note": "test"}, kind="reward", stage="rm")
    return d


class NoGoldTask:
    """The built-in task with its human taken away: asking for a gold reward or a label fails the test."""
    def __init__(self):
        self._task = get_task("reviews")

    def sample_prompts(self, *args, **kw):
        return self._task.sample_prompts(*args, **kw)

    def __getattr__(self, name):
        raise AssertionError(f"online pairs used task.{name}")


def test_online_pairs_come_from_the_reward_model_not_the_gold_reward(online_runs):
    from minirlhf.harness.checkpoint import load_scalar
    from minirlhf.sampling import reward_model_scores
    policy, tok, _ = load_policy(online_runs / "sft")
    rm, _, _ = load_scalar(online_runs / "rm")
    a = train_dpo.Args(round_prompts=6, round_k=4, max_new_tokens=10, eval_batch_size=16)
    pairs, ref, stats = dpo.online_pairs(policy, policy, rm, tok, NoGoldTask(), a, 1, "cpu", "float32")
    assert len(pairs) == stats["n_pairs"] > 0 and ref.shape == (len(pairs), 2)
    # the labels are the RM's ranking: rescoring chosen / rejected gives chosen > rejected on every pair
    prompts = get_task("reviews").sample_prompts("train", 6, seed=1)
    chosen = [{"prompt": tok.decode(p[1:]), "tokens": c} for p, c, _ in pairs]
    rejected = [{"prompt": tok.decode(p[1:]), "tokens": r} for p, _, r in pairs]
    rc, rr = reward_model_scores(rm, tok, chosen), reward_model_scores(rm, tok, rejected)
    assert all(x > y for x, y in zip(rc, rr))
    assert {tok.decode(p[1:]) for p, _, _ in pairs} <= set(prompts)  # the round's own train prompts


def test_two_round_online_dpo_samples_round_two_from_the_updated_policy(online_runs, tmp_path):
    prefs, out = write_prefs(tmp_path / "prefs.jsonl"), tmp_path / "online"
    proc = run_script("train_dpo.py", "--policy", str(online_runs / "sft"), "--prefs", str(prefs), "--out-dir",
                      str(out), *TINY_DPO, "--rounds", "2", "--reward", str(online_runs / "rm"), "--round-prompts",
                      "8", "--round-k", "4", "--lr", "1e-2", "--max-new-tokens", "10")
    assert "round 2:" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    (info,) = metrics["rounds"]
    recs = [json.loads(line) for line in (out / "round2_prefs.jsonl").read_text().splitlines()]
    assert info["round"] == 2 and info["n_pairs"] == len(recs) > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6 + info["steps"]))  # round 1: 6 steps, then round 2's
    assert {r.get("round") for r in rows} == {1, 2}
    # round 2's responses were sampled by the policy after round 1: their sampling log-probs are not the SFT's
    from minirlhf.sampling import response_logprob_sums
    sft, tok, _ = load_policy(online_runs / "sft")
    sampled = [{"prompt": r["prompt"], "tokens": r["chosen_ids"]} for r in recs]
    sft_logp = response_logprob_sums(sft, tok, sampled)
    diffs = [abs(r["chosen_logp"] - lp) for r, lp in zip(recs, sft_logp)]
    assert max(diffs) > 0.05, diffs
    # and the reference log-probs of round 2 are the SFT model's (the same fixed reference)
    final, _, _ = load_policy(out)
    assert any(not torch.equal(p, q) for p, q in zip(final.state_dict().values(), sft.state_dict().values()))


def test_online_flags_are_checked(online_runs, tmp_path):
    proc = run_fails("train_dpo.py", "--rounds", "2", "--task", "none", "--out-dir", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--rounds > 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_fails("train_dpo.py", "--round-pairs", "best", "--out-dir", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--round-pairs" in proc.stderr


def test_host_syncs_per_step_and_per_log_step_stay_within_budget(sft_run, tmp_path, monkeypatch):
    """A DPO step reads nothing back from the device and copies one batch over (idx, targets, loss_mask of the
    chosen and rejected together); a log step adds the statistics' one transfer and the NaN watch's one."""
    import train_dpo
    from tests.test_runs import host_syncs_added
    prefs = write_prefs(tmp_path / "prefs.jsonl")

    def argv(log_every):
        return lambda n: ["--policy", str(sft_run), "--prefs", str(prefs), "--out-dir", str(tmp_path / f"{log_every}-{n}"),
                          "--epochs", str(n), "--batch-size", "8", "--log-interval", str(log_every),
                          "--eval-interval", "1000", "--save-interval", "0", "--n-eval", "8", "--max-new-tokens", "8",
                          "--device", "cpu"]
    assert host_syncs_added(monkeypatch, train_dpo.main, argv(1000)) == {"to_device": 3 * 3}  # 3 more steps
    added = host_syncs_added(monkeypatch, train_dpo.main, argv(3))  # 3 more steps, 1 more log step
    assert added.pop("to_device") == 3 * 3 and sum(added.values()) <= 2, added
