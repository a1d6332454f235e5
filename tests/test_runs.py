"""Runs that never fail silently: atomic finish, resume after kill -9, NaN stops, reproducible files,
OS errors, the pipeline's checks and signal handling, progress output without a terminal."""
import collections
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minirlhf.harness import runs
from minirlhf.harness.checkpoint import CheckpointError, load_policy
from minirlhf.utils import UserError
from minirlhf.harness.files import torch_save
from tests.inprocess import one_thread, run_fails, run_main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--vocab-size", "300",
         "--device", "cpu"]
SFT = ["--n-train", "300", "--n-val", "8", "--n-samples", "4", "--batch-size", "8", "--log-interval", "5",
       "--eval-interval", "10", "--max-new-tokens", "8", *MODEL]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_script(*args, check=True, cwd=ROOT):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny SFT run that emits EOS often enough to give preference pairs, and an RM run on it."""
    d = tmp_path_factory.mktemp("chain")
    run_main("train_sft.py", "--out-dir", d / "sft", *SFT, "--steps", "200")  # in this process: only inputs here
    run_main("train_rm.py", "--policy", d / "sft", "--out-dir", d / "rm", *RM)
    return d


RM = ["--device", "cpu", "--n-prompts", "24", "--n-test-prompts", "8", "--k", "3", "--max-new-tokens", "24",
      "--batch-size", "2", "--n-norm", "32", "--n-eval", "32", "--log-interval", "5"]


def stage_flags(stage, chain):
    """(script, flags) of a tiny run of each stage, long enough to be killed after its first resume checkpoint."""
    return {
        "sft": ("train_sft.py", [*SFT, "--steps", "80", "--save-interval", "10"]),
        "rm": ("train_rm.py", ["--policy", chain / "sft", *RM, "--epochs", "30", "--save-interval", "5"]),
        "ppo": ("train_ppo.py", ["--policy", chain / "sft", "--reward", chain / "rm", "--device", "cpu",
                                 "--iterations", "12", "--batch-size", "8", "--minibatches", "2", "--epochs", "2",
                                 "--max-new-tokens", "8", "--n-eval", "8", "--target-kl", "1", "--save-interval", "2"]),
        "dpo": ("train_dpo.py", ["--policy", chain / "sft", "--prefs", chain / "rm" / "prefs.jsonl", "--device", "cpu",
                                 "--epochs", "30", "--batch-size", "2", "--log-interval", "2", "--eval-interval", "4",
                                 "--n-eval", "4", "--max-new-tokens", "8", "--save-interval", "5"]),
    }[stage]


def kill_after_first_checkpoint(script, out, flags, min_rows=0):
    """Start a run, kill -9 it as soon as a resume checkpoint exists (and metrics.jsonl has min_rows lines, to get
    past the step-0 checkpoint of RM and DPO); return the staging folder."""
    staging = runs.staging_dir(out)
    proc = subprocess.Popen([sys.executable, script, "--out-dir", str(out), *map(str, flags)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rows():
        try:
            return (staging / "metrics.jsonl").read_text().count("\n")
        except OSError:
            return 0
    while not ((staging / runs.RESUME).exists() and rows() >= min_rows) and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    return staging


def metric_rows(path):
    timing = ("elapsed_s", "tokens_per_s", "pairs_per_s", "rollout_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "dpo"])
def test_killed_run_resumes_to_the_same_weights(stage, chain, tmp_path):
    script, flags = stage_flags(stage, chain)
    out, ref = tmp_path / "run", tmp_path / "ref"
    staging = kill_after_first_checkpoint(script, out, flags, min_rows={"rm": 2, "dpo": 4}.get(stage, 0))
    assert not out.exists() and (staging / runs.RESUME).is_file()
    proc = run_script(script, "--out-dir", out, *flags, "--resume")
    assert "resuming from" in proc.stdout
    if stage == "rm":
        assert "reusing the" in proc.stdout  # the collected preferences survived the kill
    if stage == "dpo":
        assert "reference log-probs: reusing" in proc.stdout
    with one_thread():  # the same run, never interrupted (in this process, on one thread as the subprocesses)
        run_main(script, "--out-dir", ref, *flags)
    assert (out / "model.pt").read_bytes() == (ref / "model.pt").read_bytes()
    assert metric_rows(out / "metrics.jsonl") == metric_rows(ref / "metrics.jsonl")
    assert not staging.exists() and not (out / runs.RESUME).exists() and not (out / runs.RUN_JSON).exists()
    import pipeline  # a resumed run is up to date for the same command without --resume
    assert pipeline.why_rerun(script, ["--out-dir", str(out), *map(str, flags)], out, "metrics.json", []) == ""
    if stage == "rm":
        assert (out / "prefs.jsonl").read_text() == (ref / "prefs.jsonl").read_text()
    if stage == "dpo":  # a rerun over the finished run finds its reference cache there
        again = run_main(script, "--out-dir", ref, *flags, "--save-interval", "0")
        assert f"reusing {ref / 'ref_logps.pt'}" in again.stdout


def test_resume_refuses_other_args_and_nothing_to_resume(chain, tmp_path):
    script, flags = stage_flags("sft", chain)
    out = tmp_path / "run"
    proc = run_fails(script, "--out-dir", out, *flags, "--resume")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr
    kill_after_first_checkpoint(script, out, flags)
    proc = run_fails(script, "--out-dir", out, *flags, "--lr", "0.01", "--resume")
    assert proc.returncode == 2 and "lr 0.002 -> 0.01" in proc.stderr and "Traceback" not in proc.stderr
    # a later stage refuses the unfinished run with one line that says what to do
    with pytest.raises(CheckpointError, match=r"is not finished .*--resume"):
        load_policy(out)


# ----------------------------------------------------------------------------------------------- atomic finish
def test_killed_rerun_leaves_the_finished_run_intact_and_is_not_skipped(chain, tmp_path):
    import pipeline
    script, flags = stage_flags("sft", chain)
    out = tmp_path / "sft"
    run_main(script, "--out-dir", out, *flags)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    argv = ["--out-dir", str(out), *map(str, flags), "--seed", "1"]
    kill_after_first_checkpoint(script, out, argv[2:])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # old run untouched, metrics.jsonl included
    assert "seed 0 -> 1" in pipeline.why_rerun(script, argv, out, "metrics.json", [])
    assert pipeline.should_resume(script, argv, out)  # the pipeline continues it rather than starting over
    assert not pipeline.should_resume(script, argv + ["--lr", "0.01"], out)


def test_finish_swaps_atomically_and_a_crash_between_the_renames_is_recovered(tmp_path):
    out = tmp_path / "run"
    old = runs.Run(out, {"x": 1})
    (old.path("metrics.json")).write_text("old")
    old.finish()
    new = runs.Run(out, {"x": 2})
    (new.path("model.pt")).write_text("new weights")  # killed here: nothing of the new run is visible
    assert (out / "metrics.json").read_text() == "old" and not (out / "model.pt").exists()
    (new.path("metrics.json")).write_text("new")
    # crash after the first rename of finish(): out is missing, the complete new run waits in out.partial
    out.rename(runs.replaced_dir(out))
    (new.dir / runs.RUN_JSON).unlink()
    runs.recover(out)
    assert (out / "metrics.json").read_text() == "new" and not runs.replaced_dir(out).exists()
    assert not new.dir.exists()


def test_resume_before_the_first_checkpoint_keeps_the_staging_files(tmp_path):
    out = tmp_path / "rm"
    first = runs.Run(out, {"lr": 1.0, "save_interval": 5})
    first.path("collected.json").write_text("pairs")  # killed here, before any resume checkpoint
    again = runs.Run(out, {"lr": 1.0, "save_interval": 9, "resume": True}, resume=True)
    assert again.load_resume() is None and again.path("collected.json").read_text() == "pairs"
    with pytest.raises(UserError, match=r"other args \(lr 1.0 -> 2.0\)"):
        runs.Run(out, {"lr": 2.0}, resume=True)
    runs.Run(out, {"lr": 2.0})  # a fresh start discards it
    assert not (runs.staging_dir(out) / "collected.json").exists()


def test_same_seed_gives_identical_files_with_mode_0644(chain, tmp_path):
    script, flags = stage_flags("sft", chain)
    flags = [*flags[:-2], "--steps", "6", "--save-interval", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run_script(script, "--out-dir", a, *flags)
    with one_thread():  # and in this process: the same bytes as the subprocess's
        run_main(script, "--out-dir", b, *flags)
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    for f in a.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no .partial, .replaced or temp files
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "metrics.json", "metrics.jsonl", "model.pt",
                                                   "tokenizer.json"]
    # not a terminal: periodic log lines, no carriage-return frames of a progress bar
    assert "\r" not in proc.stdout + proc.stderr and "sft 5/6 | loss" in proc.stdout


def test_torch_save_is_deterministic_and_leaves_no_temp_files(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch_save(tmp_path / "x.pt", state)
    first = (tmp_path / "x.pt").read_bytes()
    torch_save(tmp_path / "x.pt", state)
    assert (tmp_path / "x.pt").read_bytes() == first
    assert os.listdir(tmp_path) == ["x.pt"]


# ----------------------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("stage,bad", [("sft", ["--lr", "1e3", "--temperature", "0"]), ("rm", ["--lr", "1e5"]),
                                       ("ppo", ["--lr", "1e30"]), ("dpo", ["--lr", "1e30"])])
def test_non_finite_loss_stops_without_writing_weights(stage, bad, chain, tmp_path):
    script, flags = stage_flags(stage, chain)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("the earlier run")
    proc = run_fails(script, "--out-dir", out, *flags, "--save-interval", "1", *bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and ("at step" in proc.stderr or "at iteration" in proc.stderr)
    assert (out / "metrics.json").read_text() == "the earlier run" and not (out / "model.pt").exists()
    staging = runs.staging_dir(out)
    assert not (staging / "model.pt").exists()
    if (staging / runs.RESUME).exists():  # a resume checkpoint, if any, holds finite weights only
        state = torch.load(staging / runs.RESUME, weights_only=True)
        for key in ("model", "policy"):
            if key in state:
                assert all(torch.isfinite(v).all() for v in state[key].values() if v.is_floating_point())


def test_finite_check_names_the_first_bad_step():
    check = runs.FiniteCheck("x.py")
    for step, v in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        check.watch(step, loss=torch.tensor(v), grad_norm=torch.tensor(1.0))
    with pytest.raises(runs.NonFiniteError, match="loss became non-finite .* at step 2"):
        check.check()
    ok = runs.FiniteCheck("x.py")
    ok.watch(0, loss=torch.tensor(1.0))
    m = torch.nn.Linear(2, 2)
    ok.check(m)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(runs.NonFiniteError, match="weights"):
        ok.check(m)


def count_host_syncs(monkeypatch):
    """Count the device-to-host reads a block makes (.item(), .tolist(), bool(), int(), float(), .cpu(), .numpy() of
    a tensor) and its host-to-device batch copies (data.to_device, as "to_device"). Calls from torch's own Python code
    are not counted: on the CPU AdamW reads each step counter (on CUDA the scripts use the fused AdamW, which does
    not), and a device context (torch.device as a mode) re-dispatches each call once more."""
    import minirlhf.data as data
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if f"{os.sep}torch{os.sep}" not in sys._getframe(1).f_code.co_filename:
                calls.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_copy = data.to_device

    def copy(*a, **kw):
        calls.append("to_device")
        return real_copy(*a, **kw)
    monkeypatch.setattr(data, "to_device", copy)
    return calls


def host_syncs_added(monkeypatch, main, argv_of) -> dict:
    """How many more host syncs (count_host_syncs) main(argv_of(2)) makes than main(argv_of(1)), by kind: what one
    more iteration / step / log step costs, the setup and the final report cancelling out."""
    counts = []
    for n in (1, 2):
        calls = count_host_syncs(monkeypatch)
        main(argv_of(n))
        monkeypatch.undo()
        counts.append(collections.Counter(calls))
    return dict(counts[1] - counts[0])


def test_the_nan_check_reads_the_device_once(monkeypatch):
    """FiniteCheck.check of two watched values and a model's every weight tensor: one host transfer in all (not
    one per value and per parameter tensor: ~300 syncs per check at GPT-2 small)."""
    check, model = runs.FiniteCheck("x.py"), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check.watch(0, loss=torch.tensor(1.0), grad_norm=torch.tensor(2.0))
    calls = count_host_syncs(monkeypatch)
    check.check(model)
    assert calls == ["tolist"]


# ----------------------------------------------------------------------------------------------- OS errors
def test_unwritable_output_location_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    t = time.time()
    proc = run_script("train_sft.py", "--out-dir", blocker / "sft", *SFT, "--steps", "5", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert time.time() - t < 30
    # an early user error leaves no staging folder behind
    proc = run_script("train_rm.py", "--policy", tmp_path / "nope", "--out-dir", tmp_path / "rm", check=False)
    assert proc.returncode == 2 and "--policy" in proc.stderr and not runs.staging_dir(tmp_path / "rm").exists()
    with pytest.raises(UserError, match="reserved"):
        runs.Run(tmp_path / "x.partial", {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = run_script("train_sft.py", "--out-dir", ro / "sft", *SFT, "--steps", "5", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(ro) in proc.stderr


def test_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tiny tmpfs here")
    try:
        proc = run_script("train_sft.py", "--out-dir", full / "sft", *SFT, "--steps", "3", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "No space left on device" in proc.stderr
        # no temp file, no half-written run, and no staging folder either (nothing in it to resume)
        assert not runs.staging_dir(full / "sft").exists() and not (full / "sft").exists()
        assert [p.name for p in full.iterdir()] == []
    finally:
        subprocess.run(["umount", str(full)])


# ----------------------------------------------------------------------------------------------- pipeline
def test_pipeline_compares_resolved_paths(tmp_path):
    """Stages that finished when the pipeline ran from inside tmp_path with --out out are up to date for the same
    pipeline started from the repository with an absolute --out (the stages get absolute paths either way)."""
    import pipeline
    out = tmp_path / "out"
    for name, script, argv, out_dir, marker, _ in pipeline.stages(out)[:2]:  # sft, then rm (reads sft)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"args": pipeline.stage_args(script, list(map(str, argv)))}))
        (out_dir / marker).write_text("{}")
        time.sleep(0.01)
    for cwd, flag in ((tmp_path, "out"), (ROOT, str(out)), (tmp_path / "out", "../out")):
        proc = run_script(ROOT / "pipeline.py", "--dry-run", "--out", flag, cwd=cwd)
        assert "== sft: " in proc.stdout and "up to date" in proc.stdout.split("== rm")[0], proc.stdout
        assert "up to date" in proc.stdout.split("== rm")[1].split("== ppo")[0], proc.stdout
        assert "up to date" not in proc.stdout.split("== ppo")[1]
    # a path stored relative (older runs) is resolved against the current folder
    rm = out / "rm"
    config = json.loads((rm / "config.json").read_text())
    config["args"]["policy"] = os.path.relpath(config["args"]["policy"], ROOT)
    (rm / "config.json").write_text(json.dumps(config))
    argv = ["--policy", str(out / "sft"), "--out-dir", str(rm)]
    assert pipeline.why_rerun("train_rm.py", argv, rm, "metrics.json", []) == ""
    argv[1] = str(tmp_path / "other")
    assert "config changed: policy" in pipeline.why_rerun("train_rm.py", argv, rm, "metrics.json", [])


@pytest.mark.parametrize("flags,message", [(["--n-layr", "2"], "unknown flag --n-layr (no stage"),
                                           (["--n-layer", "2"], "not a flag of train_rm.py"),
                                           (["--seed", "x"], "invalid int value: 'x'"),
                                           (["--resume"], "managed by the pipeline")])
def test_pipeline_rejects_bad_flags_before_running(flags, message, tmp_path):
    proc = run_script("pipeline.py", "--out", tmp_path / "out", "--dry-run", *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert "== sft" not in proc.stdout and not (tmp_path / "out").exists()


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ignore_sigint: the pipeline starts with SIGINT ignored, as a background job of a script or a CI runner starts it;
# its stage must still stop on the SIGINT the pipeline forwards (it used to inherit "ignored" and run on)
@pytest.mark.parametrize("sig,preexec", [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGKILL, None),
                                         (signal.SIGINT, ignore_sigint)])
def test_stopping_the_pipeline_stops_its_stage(sig, preexec, tmp_path):
    proc = subprocess.Popen([sys.executable, "pipeline.py", "--out", str(tmp_path / "out")], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)
    try:
        marker = runs.staging_dir(tmp_path / "out" / "sft") / runs.RUN_JSON  # the SFT stage has started
        t = time.time()
        while not marker.exists() and time.time() - t < 120:
            time.sleep(0.02)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        child = Path(f"/proc/{children[0]}/stat")
        t = time.time()
        while child.exists() and child.read_text().split()[2] != "Z" and time.time() - t < 30:
            time.sleep(0.05)
        assert not child.exists() or child.read_text().split()[2] == "Z", "the stage kept running"
    finally:
        if proc.poll() is None:
            proc.kill()
