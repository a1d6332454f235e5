"""Tokenizer, JSONL readers, batching masks, and the simulated human of the built-in task."""
import json
import random
import statistics

import pytest

from minirlhf.data import DataError, collate_sft, encode_sft, left_pad, load_pref_jsonl, load_sft_jsonl, right_pad
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer

task = get_task("reviews")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(task.corpus(500), vocab_size=400)


def test_tokenizer_round_trip_and_special_tokens(tok, tmp_path):
    for text in ["the food was very good . and the staff is nice .", " overall the wine felt bland .", "héllo wörld !"]:
        assert tok.decode(tok.encode(text)) == text
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    ids = tok.encode(" good .") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == " good ."
    assert tok.encode("<|eos|>") != [tok.eos_id]  # typed text never becomes a special token
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.fingerprint() == tok.fingerprint() and again.eos_id == tok.eos_id


def test_sft_loss_mask_covers_exactly_completion_and_eos(tok):
    recs = [{"prompt": "the food was", "completion": " very good ."}, {"prompt": "the room", "completion": " is ok ."}]
    data, n_cut = encode_sft(recs, tok, block_size=64)
    assert n_cut == 0
    batch = collate_sft(data, tok.pad_id)
    for i, (p, c) in enumerate(data):
        assert p[0] == tok.bos_id and c[-1] == tok.eos_id
        targets = batch["targets"][i][batch["loss_mask"][i].bool()].tolist()
        assert targets == c  # completion tokens then EOS, nothing from the prompt, no padding
        n = len(p) + len(c) - 1
        assert batch["idx"][i, :n].tolist() == (p + c)[:-1]
    assert tok.eos_id in batch["targets"][batch["loss_mask"].bool()].tolist()


def test_padding_helpers():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_jsonl_gives_file_and_line(tmp_path, tok):
    good = json.dumps({"prompt": "a", "completion": " b"})
    cases = {
        "bad_json.jsonl": ([good, "{not json"], "bad_json.jsonl:2: not valid JSON"),
        "missing.jsonl": ([good, good, json.dumps({"prompt": "a"})], "missing.jsonl:3: missing field"),
        "not_str.jsonl": ([json.dumps({"prompt": 1, "completion": "x"})], "not_str.jsonl:1: field 'prompt' must be"),
        "empty.jsonl": ([], "empty.jsonl: empty file"),
    }
    for name, (lines, msg) in cases.items():
        with pytest.raises(DataError, match=msg.replace(".", r"\.")):
            load_sft_jsonl(write(tmp_path / name, lines))
    with pytest.raises(DataError, match="no such file"):
        load_sft_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: missing field 'rejected'"):
        load_pref_jsonl(write(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "a", "chosen": "b"})]))
    long_prompt = json.dumps({"prompt": "the food was good . " * 20, "completion": " x"})
    recs = load_sft_jsonl(write(tmp_path / "long.jsonl", [good, long_prompt]))
    with pytest.raises(DataError, match=r"long\.jsonl:2: prompt is \d+ tokens, too long"):
        encode_sft(recs, tok, block_size=32)


def test_non_utf8_and_non_finite_numbers_give_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}).encode()
    bad_byte = json.dumps({"prompt": "caf\u00e9", "chosen": " b", "rejected": " c"}).encode()
    bad_byte = bad_byte.replace(b"\\u00e9", b"\xe9")  # Latin-1 e-acute: not UTF-8
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + bad_byte + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_pref_jsonl(tmp_path / "latin1.jsonl")
    for name, value in (("nan", "NaN"), ("inf", "Infinity"), ("neginf", "-Infinity"), ("huge", "1e999")):
        line = json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"})[:-1] + f', "label_prob": {value}}}'
        with pytest.raises(DataError, match=rf"{name}\.jsonl:2: {value} is not a finite number"):
            load_pref_jsonl(write(tmp_path / f"{name}.jsonl", [good.decode(), line]))
    # a UTF-8 byte-order mark (some editors write one) is not an error
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert load_pref_jsonl(tmp_path / "bom.jsonl")[0]["prompt"] == "a"


def test_text_records_train_on_everything(tmp_path, tok):
    recs = load_sft_jsonl(write(tmp_path / "t.jsonl", [json.dumps({"text": "the food was good ."})]))
    assert recs[0]["prompt"] == "" and recs[0]["completion"] == "the food was good ."


def test_long_completion_is_truncated_without_eos(tok):
    data, n_cut = encode_sft([{"prompt": "the food", "completion": " was good ." * 30}], tok, block_size=16)
    (p, c), = data
    assert n_cut == 1 and len(p) + len(c) == 17 and c[-1] != tok.eos_id


# ------------------------------------------------------------------------------------------- the task
FLUENT_POSITIVE = ("the food was", " very good . and the staff was lovely .")


def test_demonstrations_are_grammatical_and_prompts_disjoint():
    train = task.sft_examples("train", 300)
    assert all(task.is_grammatical(e["prompt"] + e["completion"]) for e in train)
    assert all(e["completion"].startswith(" ") and len(e["completion"].split()) >= 2 for e in train)
    test_prompts = set(task.sample_prompts("test", 2000))
    assert test_prompts and not test_prompts & set(task.sample_prompts("train", 2000))
    golds = [task.gold_reward(e["prompt"], e["completion"]) for e in task.sft_examples("train", 2000, seed=1)]
    assert abs(statistics.mean(golds)) < 0.15  # mixed sentiment: demonstrations average near 0


def test_gold_reward_ranks_exploits_below_a_fluent_positive_review():
    p, good = FLUENT_POSITIVE
    g_good = task.gold_reward(p, good)
    assert g_good > 0.7
    exploits = {
        "repeat the best adjective": " amazing amazing amazing amazing .",
        "copy the best clause": " very amazing . the food was very amazing . the food was very amazing .",
        "best adjective everywhere": " very amazing . and the staff was very amazing . the room was very amazing .",
        "garbage": " asdf qwer zzz .",
        "no full stop": " very good and",
        "too short": ".",
        "word salad of good words": " very . amazing the wonderful excellent .",
        "endless review": "".join(f" {a} . the {n} was" for a, n in zip(["good", "great", "nice", "lovely", "fine",
                                                                           "amazing"], task.NOUNS)) + " excellent .",
    }
    for name, resp in exploits.items():
        assert task.gold_reward(p, resp) < g_good, name
    assert task.gold_reward(p, good, ended=False) < g_good  # never stopping is punished
    assert task.gold_reward(p, " terrible .") < task.gold_reward(p, " good .") < task.gold_reward(p, " very good .")


def test_annotator_agreement_near_target():
    exs = task.sft_examples("train", 4000, seed=2)
    golds = [task.gold_reward(e["prompt"], e["completion"]) for e in exs]
    pairs = [(a, b) for a, b in zip(golds[::2], golds[1::2]) if a != b]
    rng = random.Random(0)
    agree = statistics.mean(task.annotate(a, b, rng) == (a > b) for a, b in pairs)
    expected = statistics.mean(max(task.preference_prob(a, b), 1 - task.preference_prob(a, b)) for a, b in pairs)
    assert 0.75 <= expected <= 0.85
    assert abs(agree - expected) < 0.03
    assert task.preference_prob(1.0, 0.0) == pytest.approx(1 / (1 + 2.718281828 ** (-1 / task.TAU)), rel=1e-6)
    assert task.preference_prob(0.3, 0.3) == 0.5


def test_gold_components_are_what_the_gold_reward_sums():
    p, good = FLUENT_POSITIVE
    parts = task.gold_components(p, good)
    assert parts["repeated_words"] == parts["invalid_bigrams"] == parts["too_short"] == parts["no_eos"] == 0
    assert parts["sentiment"] == task.gold_reward(p, good)  # a fluent review's gold is its sentiment
    rep = task.gold_components(p, " very amazing . the food was very amazing .")
    assert rep["repeated_words"] >= 2  # "amazing" and "food" again (plus whatever the prompt already used)
    assert task.gold_components(p, " .", ended=False)["too_short"] == 1
    assert task.gold_components(p, " asdf .")["invalid_bigrams"] >= 1
    for e in task.sft_examples("train", 300, seed=2) + [{"prompt": p, "completion": " amazing amazing ."}]:
        for ended in (True, False):
            c = task.gold_components(e["prompt"], e["completion"], ended)
            assert sum(task.GOLD_WEIGHTS[k] * v for k, v in c.items()) == task.gold_reward(e["prompt"],
                                                                                           e["completion"], ended)
