"""train_sft.py end to end (tiny), checkpoint round trip, and the user-facing error paths."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.checkpoint import CheckpointError, check_compatible, load_policy, load_run
from minirlhf.data import collate_sft, encode_sft
from minirlhf.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--n-train", "64", "--n-val", "8", "--n-samples", "4", "--batch-size", "8",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300", "--device", "cpu",
        "--log-interval", "1", "--eval-interval", "2", "--max-new-tokens", "8"]


def run_script(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_script("train_sft.py", "--out-dir", str(out), *TINY)
    return out


def test_tiny_sft_run_writes_everything_and_reloads(sft_run):
    for name in ("model.pt", "config.json", "tokenizer.json", "metrics.jsonl", "metrics.json"):
        assert (sft_run / name).is_file(), name
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all({"loss", "lr", "tokens_per_s", "val_loss"} <= set(r) for r in rows)
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert 0 <= metrics["eos_rate"] <= 1 and 0 <= metrics["grammatical_rate"] <= 1
    config = json.loads((sft_run / "config.json").read_text())
    assert config["args"]["steps"] == 4 and config["model"]["n_layer"] == 1
    model, tok, _ = load_policy(sft_run)
    # the reloaded model runs on a batch of task data
    data, _ = encode_sft(get_task().sft_examples("train", 16), tok, model.config.block_size)
    batch = collate_sft(data, tok.pad_id)
    assert torch.isfinite(model(batch["idx"])).all()


def test_init_from_earlier_run(sft_run, tmp_path):
    run_script("train_sft.py", "--out-dir", str(tmp_path / "again"), "--init", str(sft_run), *TINY)
    a, b = json.loads((sft_run / "config.json").read_text()), json.loads((tmp_path / "again/config.json").read_text())
    assert a["tokenizer_fingerprint"] == b["tokenizer_fingerprint"] and a["model"] == b["model"]


def test_user_data_and_clear_errors(tmp_path, sft_run):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(30)))
    run_script("train_sft.py", "--out-dir", str(tmp_path / "mine"), "--data", str(data), *TINY)
    assert "grammatical_rate" not in json.loads((tmp_path / "mine/metrics.json").read_text())

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "a"}\n')
    proc = run_script("train_sft.py", "--out-dir", str(tmp_path / "x"), "--data", str(bad), *TINY, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: missing field 'completion'" in proc.stderr

    proc = run_script("train_sft.py", "--out-dir", str(tmp_path / "y"), "--init", str(tmp_path / "nope"), *TINY,
                      check=False)
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
