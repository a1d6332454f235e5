"""train_sft.py end to end (tiny), checkpoint round trip, and the user-facing error paths."""
import json

import pytest
import torch

from minirlhf.harness.checkpoint import CheckpointError, check_compatible, load_policy, load_run
from minirlhf.data import collate_sft, encode_sft
from minirlhf.tasks import get_task
from tests.inprocess import run_fails, run_main

TINY = ["--steps", "4", "--n-train", "64", "--n-val", "8", "--n-samples", "4", "--batch-size", "8",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300", "--device", "cpu",
        "--log-interval", "1", "--eval-interval", "2", "--max-new-tokens", "8"]
# the fixture run: long and fast enough to learn something measurable (~5 s)
LEARN = TINY + ["--steps", "12", "--warmup-steps", "1", "--lr", "1e-2"]


def run_script(*args):
    return run_main(*args)  # in this process (tests/inprocess.py); train_sft.py's subprocess runs are in test_runs.py


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_script("train_sft.py", "--out-dir", str(out), *LEARN)
    return out


def test_tiny_sft_run_writes_everything_and_reloads(sft_run):
    for name in ("model.pt", "config.json", "tokenizer.json", "metrics.jsonl", "metrics.json"):
        assert (sft_run / name).is_file(), name
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(12))
    assert all({"loss", "lr", "tokens_per_s", "val_loss"} <= set(r) for r in rows)
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert 0 <= metrics["eos_rate"] <= 1 and 0 <= metrics["grammatical_rate"] <= 1
    # it learned: held-out loss well below its start (5.5 nats, ~uniform over 300 tokens) and below a unigram-ish
    # 4.5 (a broken loss mask, a shifted target or a dead optimizer leaves it near the start)
    assert metrics["val_loss"] < 0.85 * rows[0]["val_loss"] and metrics["val_loss"] < 4.5
    assert metrics["train_loss"] < rows[0]["loss"] - 1.0
    config = json.loads((sft_run / "config.json").read_text())
    assert config["args"]["steps"] == 12 and config["model"]["n_layer"] == 1
    model, tok, _ = load_policy(sft_run)
    # the reloaded model runs on a batch of task data
    data, _ = encode_sft(get_task().sft_examples("train", 16), tok, model.config.block_size)
    batch = collate_sft(data, tok.pad_id)
    assert torch.isfinite(model(batch["idx"])).all()


def test_init_from_earlier_run(sft_run, tmp_path):
    # one step at a negligible lr: the result must be the --init run's weights (not a fresh model), same tokenizer
    run_script("train_sft.py", "--out-dir", str(tmp_path / "again"), "--init", str(sft_run), *TINY,
               "--steps", "1", "--lr", "1e-12", "--min-lr", "0", "--warmup-steps", "0")
    a, b = json.loads((sft_run / "config.json").read_text()), json.loads((tmp_path / "again/config.json").read_text())
    assert a["tokenizer_fingerprint"] == b["tokenizer_fingerprint"] and a["model"] == b["model"]
    before, _, _ = load_policy(sft_run)
    after, _, _ = load_policy(tmp_path / "again")
    for (name, p), q in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_init_with_dropout_builds_dropout_modules(sft_run, tmp_path, monkeypatch):
    """--init RUN --dropout p: the model is built with p (setting config.dropout afterwards reaches no module)."""
    import train_sft
    from minirlhf.model import GPT
    built = []

    class Recording(GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            built.append(self)

    monkeypatch.setattr(train_sft, "GPT", Recording)
    train_sft.main(["--out-dir", str(tmp_path / "drop"), "--init", str(sft_run), *TINY, "--steps", "1",
                    "--dropout", "0.5"])
    model, = built
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.5 for m in drops)
    assert all(blk.attn.dropout == 0.5 for blk in model.transformer.h)
    x = torch.randint(3, 200, (2, 10))
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic in train mode
    model.eval()
    assert torch.equal(model(x), model(x))
    assert json.loads((tmp_path / "drop/config.json").read_text())["model"]["dropout"] == 0.5


def test_user_data_and_clear_errors(tmp_path, sft_run):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(30)))
    run_script("train_sft.py", "--out-dir", str(tmp_path / "mine"), "--data", str(data), *TINY)
    assert "grammatical_rate" not in json.loads((tmp_path / "mine/metrics.json").read_text())

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "a"}\n')
    proc = run_fails("train_sft.py", "--out-dir", str(tmp_path / "x"), "--data", str(bad), *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: missing field 'completion'" in proc.stderr

    proc = run_fails("train_sft.py", "--out-dir", str(tmp_path / "y"), "--init", str(tmp_path / "nope"), *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--init" in proc.stderr


def test_checkpoint_mismatches_are_refused(sft_run, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(sft_run, other)
    tok_json = json.loads((other / "tokenizer.json").read_text())
    tok_json["model"]["vocab"]["zzzz"] = 9999
    (other / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(CheckpointError, match="tokenizer.json does not match"):
        load_run(other, "--policy")
    with pytest.raises(CheckpointError, match="expected 'reward'"):
        load_run(sft_run, "--reward", kind="reward")
    cfg = json.loads((sft_run / "config.json").read_text())
    changed = dict(cfg, model=dict(cfg["model"], n_layer=2))
    with pytest.raises(CheckpointError, match="differ in n_layer"):
        check_compatible(("--policy", sft_run, cfg), ("--reward", other, changed))
    (other / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="no model.pt"):
        load_run(other, "--policy")


def test_host_syncs_per_step_and_per_log_step_stay_within_budget(tmp_path, monkeypatch):
    """An SFT step reads nothing back from the device (its loss and gradient norm stay tensors) and copies one
    batch over (idx, targets, loss_mask); a log step adds one read for the NaN watch and one for the loss."""
    import train_sft
    from tests.test_runs import host_syncs_added

    def argv(steps, log_every):
        return lambda n: [*TINY, "--out-dir", str(tmp_path / f"{steps}-{log_every}-{n}"), "--steps", str(steps * n),
                          "--log-interval", str(log_every), "--eval-interval", "1000", "--save-interval", "0"]
    assert host_syncs_added(monkeypatch, train_sft.main, argv(4, 1000)) == {"to_device": 3 * 4}  # 4 more steps
    added = host_syncs_added(monkeypatch, train_sft.main, argv(4, 4))  # 4 more steps, 1 more log step
    assert added.pop("to_device") == 3 * 4 and sum(added.values()) <= 2, added
