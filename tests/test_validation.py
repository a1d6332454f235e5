"""Bad flags, bad files and bad run directories: each is one clear UserError line before any work is done.

The scripts are called in-process (main(argv)), which is what utils.run turns into `error: ...` and exit code 2;
one subprocess call checks that last step end to end."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train_dpo
import train_ppo
import train_rm
import train_sft
from minirlhf.harness.checkpoint import CheckpointError, load_policy, load_run, save_run
from minirlhf.model import GPT, GPTConfig
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError
from minirlhf.harness.files import finite_json, write_json

ROOT = Path(__file__).resolve().parents[1]

# (script, flags, expected message). Each must fail in validation: no run directory is needed, none is created.
BAD_FLAGS = [
    (train_sft, ["--steps", "0"], "--steps 0: must be > 0"),
    (train_sft, ["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (train_sft, ["--n-head", "3"], "--n-embd 128 must be divisible by --n-head 3"),
    (train_sft, ["--n-samples", "0"], "--n-samples 0: must be > 0"),
    (train_sft, ["--dropout", "1"], r"--dropout 1.0: must be in \[0, 1\)"),
    (train_sft, ["--lr", "-1"], "--lr -1.0: must be > 0"),
    (train_sft, ["--block-size", "1"], "--block-size 1: must be >= 2"),
    (train_sft, ["--vocab-size", "10"], "--vocab-size 10: must be >= 259"),
    (train_sft, ["--init", "somewhere", "--tokenizer", "tok.json"], "--tokenizer cannot be combined with --init"),
    (train_rm, ["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (train_rm, ["--k", "1"], "--k 1: must be >= 2"),
    (train_rm, ["--epochs", "0"], "--epochs 0.0: must be > 0"),
    (train_rm, ["--test-frac", "1.5"], r"--test-frac 1.5: must be in \[0, 1\)"),
    (train_rm, ["--n-norm", "1"], "--n-norm 1: must be >= 2"),
    (train_ppo, ["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (train_ppo, ["--minibatches", "0"], "--minibatches 0: must be > 0"),
    (train_ppo, ["--epochs", "0"], "--epochs 0: must be > 0"),
    (train_ppo, ["--batch-size", "10", "--minibatches", "4"], "--batch-size 10 must be divisible by --minibatches 4"),
    (train_ppo, ["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (train_ppo, ["--gamma", "1.5"], r"--gamma 1.5: must be in \(0, 1\]"),
    (train_ppo, ["--iterations", "0"], "--iterations 0: must be > 0"),
    (train_ppo, ["--target-kl", "6", "--kl-coef", "0"], "--kl-coef 0 with --target-kl"),
    (train_dpo, ["--epochs", "-1"], "--epochs -1.0: must be > 0"),
    (train_dpo, ["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (train_dpo, ["--beta", "0"], "--beta 0.0: must be > 0"),
    (train_dpo, ["--label-smoothing", "0.5"], r"--label-smoothing 0.5: must be in \[0, 0.5\)"),
    (train_dpo, ["--max-pairs", "-1"], "--max-pairs -1: must be >= 0"),
    (evaluate, ["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (evaluate, ["--n-prompts", "1"], "--n-prompts 1: must be >= 2"),
    (evaluate, ["--frontier", "--frontier-samples", "1"], "--frontier-samples 1: must be >= 2"),
    (evaluate, ["--betas", "1", "-2"], "--betas 1.0 -2.0: must be > 0"),
    (evaluate, ["--best-of", "4", "0"], "--best-of 4 0: must be >= 1"),
]


@pytest.mark.parametrize("script,flags,message", BAD_FLAGS,
                         ids=[f"{s.__name__} {' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_any_work(script, flags, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as e:
        script.main(["--out-dir", str(out), "--device", "cpu", *flags])
    assert "\n" not in str(e.value)
    assert not out.exists()  # refused before anything was written


def test_bad_flag_exits_2_with_one_line(tmp_path):
    res = subprocess.run([sys.executable, "train_sft.py", "--steps", "0", "--out-dir", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == "error: --steps 0: must be > 0\n"


# ------------------------------------------------------------------------------------------------ run directories
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "sft"
    tok = Tokenizer.train(get_task("reviews").corpus(200), 300)
    torch.manual_seed(0)
    save_run(d, GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16)), tok, {"x": 1})
    return d


def edited_copy(run, tmp_path, edit):
    other = tmp_path / "edited"
    shutil.copytree(run, other)
    cfg = json.loads((other / "config.json").read_text())
    edit(cfg)
    (other / "config.json").write_text(json.dumps(cfg))
    return other


@pytest.mark.parametrize("field,value,message", [
    ("n_layer", "4", "model field 'n_layer' must be int, got '4'"),
    ("n_embd", 16.0, "model field 'n_embd' must be int, got 16.0"),
    ("bias", "yes", "model field 'bias' must be bool"),
    ("n_head", 3, "n_embd 16 is not divisible by n_head 3"),
    ("block_size", 0, r"model field 'block_size' = 0 must be in \[1, 1048576\]"),
])
def test_config_json_field_types_are_checked(tiny_run, tmp_path, field, value, message):
    other = edited_copy(tiny_run, tmp_path, lambda c: c["model"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=f"--policy {other}: config.json: {message}"):
        load_run(other, "--policy")


def test_garbage_tokenizer_json_is_one_line(tiny_run, tmp_path):
    other = tmp_path / "garbage"
    shutil.copytree(tiny_run, other)
    (other / "tokenizer.json").write_text("this is not json")
    with pytest.raises(CheckpointError, match=f"--policy {other}: .*not a readable tokenizer.json"):
        load_policy(other)
    with pytest.raises(UserError, match="--tokenizer .*not a readable tokenizer.json"):
        train_sft.main(["--tokenizer", str(other / "tokenizer.json"), "--out-dir", str(tmp_path / "o"),
                        "--device", "cpu", "--n-train", "20", "--n-val", "4"])


# ------------------------------------------------------------------------------------------------ strict JSON out
def test_metrics_json_never_holds_bare_nan(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": 2, "e": "x", "f": None,
           "g": (0.5, float("nan"))}
    assert finite_json(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2, "e": "x", "f": None,
                                "g": [0.5, None]}
    write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
    assert math.isclose(json.loads(text)["b"][0], 1.0)
