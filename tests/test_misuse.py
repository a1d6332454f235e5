"""What a careless or hostile user can do to the scripts: no input run destroyed, no run finished half-empty, no
silently wrong number, and every mistake one line naming the file, line or flag (exit 2), never a traceback."""
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import pipeline
import train_dpo
import train_grpo
import train_ppo
import train_rm
import train_sft
from minirlhf.preferences import read_collected
from minirlhf.harness import runs
from minirlhf.harness.checkpoint import CheckpointError, load_policy, load_run, load_scalar, save_run
from minirlhf.data import DataError, length_batches, load_pref_jsonl, load_sft_jsonl, read_jsonl
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.preferences import has_gold_columns
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError
from minirlhf.harness.cli import run
from minirlhf.harness.files import torch_save

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "tests" / "data" / "prefs_small.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Run directories of a random tiny policy (block 32) and reward model, and a policy with a shorter context."""
    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer.train(get_task("reviews").corpus(200), 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16)
    save_run(d / "sft", GPT(cfg), tok, {"x": 1}, kind="policy")
    save_run(d / "rm", ScalarModel(cfg), tok, {"x": 1}, kind="reward")
    (d / "rm" / "prefs.jsonl").write_text(PREFS.read_text())
    (d / "rm" / "metrics.json").write_text("{}")
    (d / "sft" / "metrics.json").write_text("{}")
    save_run(d / "short", GPT(GPTConfig(vocab_size=320, block_size=8, n_layer=1, n_head=2, n_embd=16)), tok,
             {"x": 1}, kind="policy")
    return d


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ inputs kept
@pytest.mark.parametrize("script,argv,victim,how", [
    (train_ppo, ["--policy", "{d}/sft", "--reward", "{d}/rm", "--out-dir", "{d}/sft"], "sft", "is the input --policy"),
    (train_grpo, ["--policy", "{d}/sft", "--reward", "{d}/rm", "--out-dir", "{d}/rm"], "rm", "is the input --reward"),
    (train_rm, ["--policy", "{d}/sft", "--out-dir", "{d}/sft"], "sft", "is the input --policy"),
    (train_dpo, ["--policy", "{d}/sft", "--prefs", "{d}/rm/prefs.jsonl", "--out-dir", "{d}/rm"], "rm",
     "contains the input --prefs"),
    (evaluate, ["--policies", "{d}/sft", "--ref", "{d}/sft", "--out-dir", "{d}/sft"], "sft", "is the input --policies"),
    (evaluate, ["--policies", "{d}/sft", "--ref", "{d}/sft", "--out-dir", "{d}/sft/eval"], "sft",
     "lies inside the input --policies"),
    (train_sft, ["--data", "{d}/rm/prefs.jsonl", "--out-dir", "{d}/rm"], "rm", "contains the input --data"),
], ids=["ppo", "grpo", "rm", "dpo", "evaluate", "evaluate-inside", "sft"])
def test_an_output_location_that_is_an_input_is_refused(tiny, script, argv, victim, how):
    before = snapshot(tiny)
    with pytest.raises(UserError, match=f"--out-dir .*: {how}") as e:
        script.main([a.format(d=tiny) for a in argv] + ["--device", "cpu"])
    assert "\n" not in str(e.value)
    assert snapshot(tiny) == before and not runs.staging_dir(tiny / victim).exists()


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 4)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a finished minirlhf run"):
        train_sft.main(["--data", str(tmp_path / "other.jsonl"), "--out-dir", str(d), "--device", "cpu"])
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "x.jsonl"] and not runs.staging_dir(d).exists()
    # an empty folder is fine, and so is a finished run (replaced only once the new one is complete)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runs.Run(empty, {})
    r.path("metrics.json").write_text("{}")
    r.finish()
    again = runs.Run(empty, {"x": 2})
    again.path("metrics.json").write_text('{"x": 2}')
    again.finish()
    assert (empty / "metrics.json").read_text() == '{"x": 2}'


def test_files_that_appear_in_the_output_during_a_run_are_kept(tmp_path):
    out = tmp_path / "out"
    r = runs.Run(out, {})
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    r.path("metrics.json").write_text("{}")
    with pytest.raises(UserError, match="not a finished minirlhf run"):
        r.finish()
    assert (out / "precious.txt").read_text() == "mine"


def test_recover_promotes_only_a_complete_staging_folder(tmp_path):
    out = tmp_path / "run"
    old = runs.Run(out, {"x": 1})
    old.path("metrics.json").write_text("old")
    old.finish()
    new = runs.Run(out, {"x": 2})  # unfinished: run.json still there, no metrics.json
    new.path("model.pt").write_text("half")
    out.rename(runs.replaced_dir(out))  # as if a crash had happened between finish()'s renames
    runs.recover(out)
    assert (out / "metrics.json").read_text() == "old" and not runs.replaced_dir(out).exists()
    assert (new.dir / "model.pt").exists()  # the unfinished run stays, resumable
    # metrics.json written but finish() not begun (run.json present): not complete either
    new.path("metrics.json").write_text("new")
    out.rename(runs.replaced_dir(out))
    runs.recover(out)
    assert (out / "metrics.json").read_text() == "old"


def test_one_run_at_a_time_holds_an_output_location(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom minirlhf.harness.runs import Run\n"
                               "Run(sys.argv[1], {})\nprint('ready', flush=True)\ntime.sleep(120)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(UserError, match="another run is writing there right now"):
            runs.Run(out, {})
    finally:
        holder.kill()
        holder.wait()
    r = runs.Run(out, {})  # the lock died with its holder
    r.path("metrics.json").write_text("{}")
    r.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file left behind


def test_a_staging_folder_that_vanished_is_not_recreated_and_finished(tiny, tmp_path):
    out = tmp_path / "out"
    r = runs.Run(out, {})
    shutil.rmtree(r.dir)  # deleted by hand (or by a second run) mid-run
    policy, tok, _ = load_policy(tiny / "sft")
    save_run(r.dir, policy, tok, {})  # the stage goes on writing its files
    (r.dir / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="vanished or was replaced"):
        r.finish()
    assert not out.exists()
    with pytest.raises(UserError, match="vanished or was replaced"):
        r.save_resume({"step": 1})


def test_an_early_data_error_leaves_no_staging_folder(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 200, "completion": " x"}) + "\n" * 2 +
                    json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "train_sft.py", "--data", str(data), "--out-dir", str(out), "--device",
                           "cpu", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab-size", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "too long for the context" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# ------------------------------------------------------------------------------------------------ silently wrong
def test_non_finite_weights_are_refused_at_load(tiny, tmp_path):
    policy, tok, _ = load_policy(tiny / "sft")
    with torch.no_grad():
        policy.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_run(tmp_path / "nan", policy, tok, {})
    with pytest.raises(CheckpointError, match=r"--policy .*nan: model.pt: holds non-finite weights \(NaN/inf\) in "
                                              r"transformer.h.0.mlp.c_fc.weight"):
        load_policy(tmp_path / "nan")
    rm, tok, _ = load_scalar(tiny / "rm")
    rm.gain.fill_(float("inf"))
    save_run(tmp_path / "inf", rm, tok, {}, kind="reward")
    with pytest.raises(CheckpointError, match="non-finite weights .* in gain"):
        load_scalar(tmp_path / "inf")


def test_report_names_are_unique(tmp_path):
    assert evaluate.report_names(["out/sft", "out/ppo"]) == ["sft", "ppo"]
    assert evaluate.report_names(["/a/sft", "sft", "out/ppo"]) == ["/a/sft", "sft", "ppo"]
    with pytest.raises(UserError, match="would both be reported as 'out/sft'"):
        evaluate.report_names(["out/sft", "out/sft"])


def test_a_reference_with_a_shorter_context_is_refused_before_sampling(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"--ref .*short has a context of 8 tokens, but --policies .*sft's "
                                              r"samples reach"):
        evaluate.main(["--policies", str(tiny / "sft"), "--ref", str(tiny / "short"), "--out-dir",
                       str(tmp_path / "ev"), "--n-prompts", "4", "--max-new-tokens", "8", "--device", "cpu"])
    assert not (tmp_path / "ev").exists()


def test_label_prob_must_be_a_probability(tmp_path):
    f = tmp_path / "p.jsonl"
    rec = {"prompt": "a", "chosen": " b", "rejected": " c", "chosen_gold": 1.0, "rejected_gold": 0.0}
    f.write_text(json.dumps({**rec, "label_prob": 0.7}) + "\n" + json.dumps({**rec, "label_prob": 7.5}) + "\n")
    with pytest.raises(DataError, match=rf"{f}:2: field 'label_prob' 7.5 must be a probability in \[0, 1\]"):
        has_gold_columns(load_pref_jsonl(f))


def test_the_nll_term_is_described_as_it_is_computed():
    help_ = {f.name: f.metadata["help"] for f in train_dpo.Args.__dataclass_fields__.values()}["nll_coef"]
    assert "pooled per token" in help_ and "not Pang et al." in help_


# ------------------------------------------------------------------------------------------------ one line
def test_hostile_json_is_one_line_at_its_line(tmp_path):
    cases = {"deep": "[" * 100_000 + "]" * 100_000, "long number": '{"prompt": ' + "1" * 5000 + "}",
             "surrogate": '{"prompt": "a\\ud800", "completion": " b"}'}
    for name, line in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text('{"prompt": "a", "completion": " b"}\n' + line + "\n")
        with pytest.raises(DataError, match=f"{f}:2: ") as e:
            load_sft_jsonl(f)
        assert "\n" not in str(e.value)
    f = tmp_path / "surrogate_prefs.jsonl"
    f.write_text('{"prompt": "a", "chosen": " b", "rejected": " \\udfff"}\n')
    with pytest.raises(DataError, match=rf"{f}:1: field 'rejected' holds a lone surrogate \(\\udfff\)"):
        read_jsonl(f, ("prompt", "chosen", "rejected"))


def edited_run(tiny, tmp_path, edit_config=None, state=None):
    d = tmp_path / "edited"
    shutil.copytree(tiny / "sft", d)
    if edit_config is not None:
        (d / "config.json").write_text(edit_config((d / "config.json").read_text()))
    if state is not None:
        torch_save(d / "model.pt", state)
    return d


@pytest.mark.parametrize("config,state,message", [
    (lambda c: "[" * 100_000 + "]" * 100_000, None, "config.json is not valid JSON"),
    (lambda c: c.replace('"block_size": 32', '"block_size": 1000000000000'), None,
     r"model field 'block_size' = 1000000000000 must be in \[1, 1048576\]"),
    (None, [torch.zeros(2)], "model.pt: does not hold a state dict .* but a list"),
    (None, torch.zeros(2), "model.pt: does not hold a state dict .* but a Tensor"),
], ids=["deep config", "absurd size", "list", "tensor"])
def test_damaged_run_directories_are_one_line(tiny, tmp_path, config, state, message):
    d = edited_run(tiny, tmp_path, config, state)
    with pytest.raises(UserError, match=message) as e:
        load_run(d, "--policy")
    assert "\n" not in str(e.value)


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_refusal_does_not_suggest_unpickling(tiny, tmp_path, capsys):
    d = edited_run(tiny, tmp_path)
    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    (d / "model.pt").write_bytes(buf.getvalue())
    with pytest.raises(UserError) as e:
        load_run(d, "--policy")
    assert "never unpickles code" in str(e.value) and "weights_only" not in str(e.value)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], r"--seed -1: must be in \[0, 2\^32\)"),
    (["--seed", str(2 ** 32)], r"--seed 4294967296: must be in \[0, 2\^32\)"),
    (["--max-new-tokens", str(10 ** 20)], r"--max-new-tokens 100000000000000000000: too large"),
    (["--out-dir", "."], r"--out-dir '\.': must name a run folder"),
    (["--out-dir", ""], r"--out-dir '': must name a run folder"),
    (["--task", "__init__"], r"--task __init__: unknown task \(built-in: reviews\)"),
    (["--steps", "1e20"], r"argument --steps: invalid int value: '1e20'"),
], ids=["seed<0", "seed>=2^32", "huge int", "dot", "empty", "private module", "float for int"])
def test_bad_flags_are_one_line(tmp_path, argv, message, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # what the script runs as: utils.run(main), its exit code and stderr
    with pytest.raises(SystemExit) as e:
        run(lambda: train_sft.main(["--device", "cpu", *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even in the current folder


def test_out_of_memory_is_one_line(capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def enomem():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
    for main in (oom, enomem):
        with pytest.raises(SystemExit) as e:
            run(main)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: out of memory (") and "--batch-size" in err


def resumable(tmp_path, args, state):
    out = tmp_path / "out"
    r = runs.Run(out, args)
    r.save_resume(state)
    return out


def test_damaged_or_foreign_resume_state_is_refused(tmp_path):
    args = {"steps": 10, "lr": 1.0, "resume": False}
    out = resumable(tmp_path, args, {"step": 4, "model": {}})
    state = torch.load(runs.staging_dir(out) / runs.RESUME, weights_only=True)
    assert runs.Run(out, {**args, "resume": True}, resume=True).load_resume()["step"] == 4
    for damage, message in ((lambda s: s.pop("model"), "is damaged"), (lambda s: s.pop("step"), "is damaged"),
                            (lambda s: s.update(step=11), "is at step 11, outside this run's 10"),
                            (lambda s: s.update(args={**s["args"], "lr": 2.0}), r"belongs to another run \(lr 2.0 "
                                                                                  r"-> 1.0\)")):
        bad = dict(state)
        damage(bad)
        torch_save(runs.staging_dir(out) / runs.RESUME, bad)
        with pytest.raises(UserError, match=message):
            runs.Run(out, {**args, "resume": True}, resume=True).load_resume()
    (runs.staging_dir(out) / runs.RESUME).write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read resume.pt"):
        runs.Run(out, {**args, "resume": True}, resume=True).load_resume()


def test_damaged_staging_files_of_a_resumed_run_are_one_line(tmp_path):
    collected = tmp_path / "collected.json"
    for text in ("not json", '{"train": 1}', "[" * 100_000):
        collected.write_text(text)
        with pytest.raises(UserError, match="--resume"):
            read_collected(collected)


def test_dpo_without_test_pairs_is_one_line(tiny, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(PREFS.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no test pairs"):
        train_dpo.main(["--policy", str(tiny / "sft"), "--prefs", str(one), "--out-dir", str(tmp_path / "dpo"),
                        "--device", "cpu"])


def test_pipeline_reruns_the_evaluation_when_its_report_md_is_gone(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "report.json").write_text(json.dumps({"args": {}}))
    assert pipeline.why_rerun("evaluate.py", [], ev, "report.json", []) == "its report.md is missing"


def test_length_batches_of_nothing():
    assert length_batches([], 4) == []
