"""Reward-model stage: Bradley-Terry loss, reward read at EOS, normalisation, preference labels, train_rm.py runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.harness.checkpoint import load_scalar, save_run
from minirlhf.data import left_pad, right_pad
from minirlhf.losses import bradley_terry_loss
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.data import DataError
from minirlhf.sampling import reward_model_scores
from minirlhf.preferences import (encode_pairs, fit_normalisation, informative_pairs, label_pairs, pair_rewards,
                                  sequence_rewards, set_normalisation, spearman, token_id_counts)
from minirlhf.scoring import reward_at_eos
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from tests.inprocess import run_main

ROOT = Path(__file__).resolve().parents[1]
PAD, EOS = 0, 2


def tiny_rm(seed=0, vocab=40):
    torch.manual_seed(seed)
    rm = ScalarModel(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return rm.eval()


# ----------------------------------------------------------------------------------------------- the loss
def naive_bt(rc, rr, margin, coef):
    total, center = 0.0, 0.0
    for i in range(len(rc)):
        m = margin[i] if isinstance(margin, list) else margin
        total += -math.log(1.0 / (1.0 + math.exp(-(rc[i] - rr[i] - m))))
        center += (rc[i] + rr[i]) ** 2
    return total / len(rc) + coef * center / len(rc)


@pytest.mark.parametrize("margin,coef", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), ("per-pair", 0.1)])
def test_bradley_terry_matches_naive_loop(margin, coef):
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(9, generator=g, dtype=torch.float64) * 3, torch.randn(9, generator=g, dtype=torch.float64) * 3
    rc[0], rr[0] = -20.0, 15.0  # a badly wrong pair: -log sigmoid(-35) = 35, must not overflow
    m = [0.1 * i for i in range(9)] if margin == "per-pair" else margin
    got = bradley_terry_loss(rc, rr, torch.tensor(m, dtype=torch.float64) if margin == "per-pair" else m, coef)
    assert got.item() == pytest.approx(naive_bt(rc.tolist(), rr.tolist(), m, coef), rel=1e-10)


def test_bradley_terry_gradient_prefers_chosen():
    rc, rr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descent raises r_chosen and lowers r_rejected


# ----------------------------------------------------------------------------------------------- reward at EOS
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 14, 15]]
RESPONSES = [[20, 21, EOS], [22, EOS], [23, 24, 25, 26, EOS], [27, 28, 29]]  # the last one was cut off (no EOS)


def test_reward_is_read_at_eos_for_ragged_batches():
    rm = tiny_rm()
    with torch.no_grad():
        p_ids, p_mask = left_pad(PROMPTS, PAD)
        r_ids, r_mask = right_pad(RESPONSES, PAD)
        batched = reward_at_eos(rm, p_ids, p_mask, r_ids, r_mask)  # (4,)
        # reference: each sequence alone, no padding at all, head read at its last token (EOS, or the cut-off end)
        alone = torch.stack([rm(torch.tensor([p + r]))[0, -1] for p, r in zip(PROMPTS, RESPONSES)])
        # the right-padded path train_rm.py trains with gives the same numbers
        right_padded = sequence_rewards(rm, [p + r for p, r in zip(PROMPTS, RESPONSES)], PAD)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(right_padded, alone, atol=1e-5)
    # and it is not the reward one token early or the first response token
    early = torch.stack([rm(torch.tensor([p + r]))[0, -2] for p, r in zip(PROMPTS, RESPONSES)])
    assert not torch.allclose(batched, early, atol=1e-3)


def test_reward_unchanged_by_extra_left_or_right_padding():
    rm = tiny_rm(seed=3)
    with torch.no_grad():
        p_ids, p_mask = left_pad(PROMPTS, PAD)
        r_ids, r_mask = right_pad(RESPONSES, PAD)
        base = reward_at_eos(rm, p_ids, p_mask, r_ids, r_mask)
        lp = torch.full((4, 5), PAD), torch.zeros(4, 5, dtype=torch.long)
        rp = torch.full((4, 7), PAD), torch.zeros(4, 7, dtype=torch.long)
        more_left = reward_at_eos(rm, torch.cat([lp[0], p_ids], 1), torch.cat([lp[1], p_mask], 1), r_ids, r_mask)
        more_right = reward_at_eos(rm, p_ids, p_mask, torch.cat([r_ids, rp[0]], 1), torch.cat([r_mask, rp[1]], 1))
        # a row scored inside a batch with longer neighbours equals the same row in a batch of one
        single = reward_at_eos(rm, *left_pad(PROMPTS[1:2], PAD), *right_pad(RESPONSES[1:2], PAD))
        extra_seq = sequence_rewards(rm, [p + r for p, r in zip(PROMPTS, RESPONSES)] + [list(range(1, 30))], PAD)
    assert torch.allclose(more_left, base, atol=1e-5)
    assert torch.allclose(more_right, base, atol=1e-5)
    assert torch.allclose(single, base[1:2], atol=1e-5)
    assert torch.allclose(extra_seq[:4], base, atol=1e-5)


def test_pair_rewards_scores_each_distinct_sequence_once_and_indexes_back():
    rm = tiny_rm(seed=4)
    seqs = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    pairs = [(seqs[0], seqs[1]), (seqs[2], seqs[0]), (seqs[1], seqs[3]), (seqs[0], seqs[1])]
    with torch.no_grad():
        rc, rr = pair_rewards(rm, pairs, PAD)
        ref = sequence_rewards(rm, seqs, PAD)
    assert torch.allclose(rc, ref[[0, 2, 1, 0]], atol=1e-5)
    assert torch.allclose(rr, ref[[1, 0, 3, 1]], atol=1e-5)


# ----------------------------------------------------------------------------------------------- normalisation
def test_normalisation_gives_mean0_std1_on_its_samples():
    rm = tiny_rm(seed=5)
    rm.gain.fill_(3.0)
    rm.bias.fill_(-2.0)  # set_normalisation must compose with whatever gain/bias are already there
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (50,), generator=g)]
    with torch.no_grad():
        set_normalisation(rm, sequence_rewards(rm, seqs, PAD))
        r = sequence_rewards(rm, seqs, PAD).double()
    assert abs(r.mean().item()) < 1e-5
    assert r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_normalisation_uses_only_eos_ended_samples():
    rm = tiny_rm(seed=6)
    tok = type("Tok", (), {"pad_id": PAD, "bos_id": 1, "eos_id": EOS, "encode": lambda self, t: [5, 6]})()
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(40):
        ended = i % 3 != 0  # every third sample was cut off by the budget: no EOS, a long run of one token
        toks = torch.randint(3, 40, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        samples.append({"prompt": "p", "tokens": toks + [EOS] if ended else [39] * 20, "eos": ended})
    with torch.no_grad():
        rm.bias.fill_(0.0)
        mean, std, n_used = fit_normalisation(rm, tok, samples, batch_size=16)
        ended = [s for s in samples if s["eos"]]
        r = torch.tensor(reward_model_scores(rm, tok, ended), dtype=torch.float64)
        r_all = torch.tensor(reward_model_scores(rm, tok, samples), dtype=torch.float64)
    assert n_used == len(ended) == 26
    assert abs(r.mean().item()) < 1e-5 and r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert abs(r_all.mean().item()) > 0.05  # the cut-off samples score differently: including them would shift it
    with pytest.raises(DataError, match="none of the 2 normalisation samples ended with EOS"):
        fit_normalisation(rm, tok, [dict(s, eos=False) for s in samples[:2]])


def test_spearman_handles_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: ranks x = (0.5, 0.5, 2, 3), y = (0, 1, 2, 3)
    x, y = [0.5, 0.5, 2, 3], [0, 1, 2, 3]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    expect = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(expect)


# ----------------------------------------------------------------------------------------------- preference labels
def annotator_prob(g_a, g_b, tau):
    """The simulated human's formula, written out: P(a preferred) = 1 / (1 + exp(-(g_a - g_b) / tau))."""
    return 1.0 / (1.0 + math.exp(-(g_a - g_b) / tau))


def check_records(records, task):
    for r in records:
        assert r["chosen"] != r["rejected"]
        assert r["chosen_gold"] == pytest.approx(task.gold_reward(r["prompt"], r["chosen"], r["chosen_eos"]))
        assert r["rejected_gold"] == pytest.approx(task.gold_reward(r["prompt"], r["rejected"], r["rejected_eos"]))
        assert r["label_prob"] == pytest.approx(annotator_prob(r["chosen_gold"], r["rejected_gold"], task.TAU))


def test_label_prob_matches_the_annotator_formula():
    task = get_task("reviews")
    prompts = ["the food was", "the room"]
    texts = [[" very good .", " bad .", " okay . the staff was lovely .", " bad .", " great"],
             [" was nice .", " was terrible .", " was fine", " was noisy ."]]
    k = 5
    samples = []
    for t in texts:
        t = t + [" was nice ."] * (k - len(t))
        samples += [{"response": x, "eos": not x.endswith("great") and not x.endswith("fine")} for x in t]
    records, stats = label_pairs(task, prompts, samples, k, "train", seed=0)
    check_records(records, task)
    # distinct, EOS-ended responses only: 3 for the first prompt (" bad ." twice), 3 for the second
    assert stats == {"n_samples": 10, "n_dropped_no_eos": 2, "n_duplicates": 2, "n_same_text_pairs": 0}
    assert len(records) == 3 + 3
    assert all(" great" != r["chosen"] and " great" != r["rejected"] for r in records)


def test_labels_are_drawn_with_the_annotator_probability():
    task = get_task("reviews")
    a, b = " very good .", " slightly okay ."  # gold 0.9 vs 0.0: P(a) is well inside (0, 1)
    n = 3000
    samples = [{"response": x, "eos": True} for _ in range(n) for x in (a, b)]
    records, _ = label_pairs(task, ["the food was"] * n, samples, 2, "train", seed=0)
    p = annotator_prob(task.gold_reward("the food was", a), task.gold_reward("the food was", b), task.TAU)
    freq = sum(r["chosen"] == a for r in records) / n
    assert 0.05 < p < 0.95
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------------------------- token ids
def unmerged_ids(tok, text=" good"):
    """Character-level ids of `text` (byte-level alphabet): what a sampler can emit, but BPE re-encodes
    differently (merges), so encode(decode(ids)) != ids."""
    ids = [tok.hf.token_to_id(c) for c in text.replace(" ", "Ġ")]
    assert tok.decode(ids) == text and tok.encode(text) != ids
    return ids


@pytest.fixture(scope="module")
def small_tok():
    return Tokenizer.train(get_task("reviews").corpus(300), 300)


def test_pairs_train_on_the_sampled_ids_not_the_re_encoded_text(small_tok, capsys):
    tok = small_tok
    sampled = unmerged_ids(tok) + [tok.eos_id]
    rec = {"prompt": "the food was", "chosen": " good", "rejected": " bad .", "chosen_ids": sampled,
           "rejected_ids": tok.encode(" bad .") + [tok.eos_id], "tokenizer_fingerprint": tok.fingerprint(),
           "_where": "f:1"}
    prompt = [tok.bos_id] + tok.encode("the food was")
    (p, chosen, rejected), = encode_pairs([rec], tok, 64)[0]
    assert p == prompt and chosen == sampled and rejected == tok.encode(" bad .") + [tok.eos_id]
    assert chosen != tok.encode(" good") + [tok.eos_id]
    # the same record from another tokenizer: its ids mean nothing here, the text is encoded (and counted)
    other = dict(rec, tokenizer_fingerprint="0123456789abcdef")
    (_, chosen, _), = encode_pairs([other], tok, 64)[0]
    assert chosen == tok.encode(" good") + [tok.eos_id]
    assert token_id_counts([rec, other, {"prompt": "x", "chosen": "a", "rejected": "b"}], tok) == (1, 1)
    # malformed ids are a FILE:LINE error
    with pytest.raises(DataError, match="f:1: field 'chosen_ids' must be a non-empty list"):
        encode_pairs([dict(rec, chosen_ids=[1.5])], tok, 64)
    with pytest.raises(DataError, match=r"f:1: field 'chosen_ids' must be a non-empty list of token ids in \[0, 320\)"):
        encode_pairs([dict(rec, chosen_ids=[5, 320, tok.eos_id])], tok, 64, vocab_size=320)
    assert encode_pairs([dict(rec, chosen_ids=[5, 319, tok.eos_id])], tok, 64, vocab_size=320)[0][0][1][-3:] == \
        [5, 319, tok.eos_id]  # an id past the tokenizer's but inside the model's vocabulary is a valid token
    with pytest.raises(DataError, match="f:1: field 'chosen_ids' has EOS before its last token"):
        encode_pairs([dict(rec, chosen_ids=[tok.eos_id, 5, tok.eos_id])], tok, 64)


def test_label_pairs_keeps_the_sampled_ids_and_dedups_on_them(small_tok):
    tok, task = small_tok, get_task("reviews")
    good_a = unmerged_ids(tok) + [tok.eos_id]
    good_b = tok.encode(" good") + [tok.eos_id]  # same text, other tokens: a distinct sample
    bad = tok.encode(" bad .") + [tok.eos_id]
    samples = [{"response": tok.decode(t), "eos": True, "tokens": t} for t in (good_a, good_b, bad, list(bad))]
    records, stats = label_pairs(task, ["the food was"], samples, 4, "train", tokenizer_fingerprint=tok.fingerprint())
    # bad twice (same ids): one duplicate; good_a and good_b are distinct samples, each paired with bad, but not
    # with each other (same text, same gold: a coin-flip label)
    assert stats["n_duplicates"] == 1 and stats["n_same_text_pairs"] == 1 and len(records) == 2
    for r in records:
        assert r["tokenizer_fingerprint"] == tok.fingerprint()
        assert tok.decode(r["chosen_ids"]) == r["chosen"] and tok.decode(r["rejected_ids"]) == r["rejected"]
    assert sorted(map(tuple, [r["chosen_ids"] for r in records] + [r["rejected_ids"] for r in records])) == \
        sorted(map(tuple, [good_a, good_b, bad, bad]))


def test_uninformative_pairs_are_dropped_with_a_warning(capsys):
    recs = [{"prompt": "p", "chosen": "a", "rejected": "a", "_where": "f:1"},  # same text
            {"prompt": "p", "chosen": "a", "rejected": "b", "_where": "f:2"},
            {"prompt": "p", "chosen": "a ", "rejected": "a", "_where": "f:3"}]  # text differs, tokens the same
    pairs = [([1, 5, 2], [1, 5, 2]), ([1, 5, 2], [1, 6, 2]), ([1, 5, 2], [1, 5, 2])]
    kept, kept_pairs, n = informative_pairs(recs, pairs, "train pairs")
    assert n == 2 and [r["_where"] for r in kept] == ["f:2"] and kept_pairs == [pairs[1]]
    assert "warning: 2 of 3 train pairs have chosen == rejected" in capsys.readouterr().out
    with pytest.raises(DataError, match="f: none of the 2 train pairs is informative"):
        informative_pairs([recs[0], recs[2]], [pairs[0], pairs[2]], "train pairs")


# ----------------------------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A stand-in SFT run: a random 1-layer GPT rigged to sample task words at random and EOS with probability
    about 1/4 per step, so samples end with EOS and pairs exist without training a policy first."""
    task = get_task("reviews")
    tok = Tokenizer.train(task.corpus(300), 300)
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    gpt = GPT(cfg)
    words = task.NOUNS + task.VERBS + list(task.ADVERBS) + list(task.ADJECTIVES) + task.CONNECTIVES + ["the", "."]
    word_ids = sorted({i for w in words for i in tok.encode(" " + w)})
    target = torch.full((cfg.vocab_size,), -30.0)  # the logits we want, whatever the context
    target[word_ids] = 0.0
    target[tok.eos_id] = math.log(len(word_ids) / 3)
    with torch.no_grad():  # hidden state ~ 10 * e_0 + small, tied lm_head: logit_j ~ 10 * wte[j, 0]
        gpt.transformer.ln_f.bias.zero_()
        gpt.transformer.ln_f.bias[0] = 10.0
        gpt.transformer.wte.weight[:, 0] = target / 10.0
    out = tmp_path_factory.mktemp("sft")
    save_run(out, gpt, tok, {"stage": "test"}, kind="policy")
    return out


def run_rm(*flags):
    return subprocess.run([sys.executable, str(ROOT / "train_rm.py"), "--device", "cpu", *map(str, flags)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


METRIC_KEYS = {"test_accuracy", "bayes_accuracy", "gold_accuracy", "gold_pearson", "gold_spearman", "train_loss",
               "train_accuracy"}


def test_tiny_run_writes_every_output(tiny_sft, tmp_path):
    out = tmp_path / "rm"
    res = run_rm("--policy", tiny_sft, "--out-dir", out, "--n-prompts", 24, "--n-test-prompts", 8, "--k", 3,
                 "--max-new-tokens", 8, "--epochs", 1, "--batch-size", 8, "--n-norm", 32, "--n-eval", 32)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("model.pt", "config.json", "tokenizer.json", "prefs.jsonl", "metrics.jsonl", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert all(isinstance(metrics[k], float) and math.isfinite(metrics[k]) for k in METRIC_KEYS)
    assert "test_accuracy" in res.stdout and "gold_spearman" in res.stdout  # the printed table
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1

    records = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "test"}
    assert len(records) == metrics["n_train_pairs"] + metrics["n_test_pairs"]
    _, tok, _ = load_scalar(out)
    for r in records:
        assert {"prompt", "chosen", "rejected", "split", "chosen_gold", "rejected_gold", "label_prob",
                "chosen_eos", "rejected_eos", "chosen_ids", "rejected_ids", "tokenizer_fingerprint"} <= set(r)
        # the sampled ids, EOS included, of this tokenizer; they decode to the stored text
        assert r["tokenizer_fingerprint"] == tok.fingerprint()
        for key in ("chosen", "rejected"):
            assert r[f"{key}_ids"][-1] == tok.eos_id and tok.decode(r[f"{key}_ids"]) == r[key]
    assert metrics["n_pairs_from_ids"] == len(records) and metrics["n_uninformative_pairs"] == 0
    assert 0 < metrics["n_norm_used"] <= 32
    task = get_task("reviews")
    check_records(records, task)
    test_prompts = set(task.sample_prompts("test", 8, seed=0))
    assert {r["prompt"] for r in records if r["split"] == "test"} <= test_prompts

    # PPO's view: load_scalar gives the trained model with the normalisation in its buffers
    rm, tok, config = load_scalar(out)
    assert config["kind"] == "reward"
    assert rm.gain.item() == pytest.approx(metrics["gain"]) and rm.gain.item() != 1.0
    assert rm.bias.item() == pytest.approx(metrics["bias"])


def test_user_prefs_file_trains_and_reports_accuracy(tiny_sft, tmp_path):
    out = tmp_path / "rm_user"
    res = run_main("train_rm.py", "--device", "cpu", "--policy", tiny_sft, "--out-dir", out, "--prefs",
                   ROOT / "tests/data/prefs_small.jsonl", "--epochs", 2, "--batch-size", 4, "--n-norm", 16)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test_pairs"] == 5 and metrics["n_train_pairs"] == 15
    # it learned: the labels are consistent (fluent/positive chosen), so the fit must beat chance clearly
    assert metrics["train_loss"] < math.log(2) - 0.1 and metrics["train_accuracy"] >= 0.75
    assert metrics["test_accuracy"] > 0.5
    assert metrics["bayes_accuracy"] is None and metrics["gold_spearman"] is None  # no gold columns in the file
    assert "test_accuracy" in res.stdout
    assert len((out / "prefs.jsonl").read_text().splitlines()) == 20


def test_user_prefs_without_split_hold_out_whole_groups():
    from minirlhf.preferences import split_prefs
    recs = [{"prompt": f"p{i // 3}", "chosen": "a", "rejected": "b", "_where": f"f:{i}"} for i in range(30)]
    train, test = split_prefs(recs, 0.2, seed=0)
    assert len(test) == 6 and len(train) == 24
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_missing_sft_is_one_clear_error(tmp_path):
    res = run_rm("--policy", tmp_path / "nope", "--out-dir", tmp_path / "rm")
    assert res.returncode == 2
    assert "--policy" in res.stderr and "Traceback" not in res.stderr


def test_subsample_groups_keeps_whole_prompts_and_exact_size():
    """--max-pairs: a seeded subset of exactly n pairs made of whole comparison groups (only the last one cut)."""
    from minirlhf.preferences import groups_of, subsample_groups
    recs = [{"prompt": f"p{g}", "group": f"train-{g}"} for g in range(20) for _ in range(6)]  # 20 groups of 6
    keep = subsample_groups(recs, 40, seed=3)
    assert len(keep) == 40 and keep == sorted(set(keep))
    sizes = sorted(sum(recs[i]["group"] == g for i in keep) for g in {recs[i]["group"] for i in keep})
    assert sizes == [4, 6, 6, 6, 6, 6, 6]  # six whole groups and four pairs of a seventh
    assert subsample_groups(recs, 40, seed=3) == keep and subsample_groups(recs, 40, seed=4) != keep
    assert subsample_groups(recs, 0) == list(range(120)) == subsample_groups(recs, 500)
    assert len(groups_of([recs[i] for i in keep])) == 7
