"""The whole RLHF pipeline in one command: SFT -> reward model -> PPO, GRPO and DPO -> evaluation, into out/.

    bash pipeline.sh                      # same as python pipeline.py; CPU-sized defaults, <= 15 min on 2 cores
    bash pipeline.sh --device cuda        # any other flag is passed to every stage (--dtype, --seed, --compile, ...)
    bash pipeline.sh --force              # rerun every stage, even those that are up to date
    bash pipeline.sh --out runs/seed1 --seed 1
    bash pipeline.sh --init-from gpt2 --data my_sft.jsonl ...   # --init-from goes to train_sft.py only
    bash pipeline.sh --arch llama --out out_llama   # the Llama family from scratch (--arch: train_sft.py only)
    bash pipeline.sh --nproc 8 --device cuda   # every stage under torchrun --standalone --nproc_per_node 8

The stages and what each reads are in stages() below. A stage that finished with the same args, newer than its
inputs, is skipped; an interrupted one is resumed; a flag some stage does not accept is refused before anything
runs (docs/runs.md has the rules).
"""
import argparse
import contextlib
import ctypes
import importlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from minirlhf.harness import runs
from minirlhf.harness.cli import build_parser, parse_args

# Args fields that hold paths: compared after resolving, so "out/sft" and "/abs/out/sft" are the same run
PATH_ARGS = ("out_dir", "sft", "policy", "reward", "prefs", "policies", "ref", "init", "data", "tokenizer", "prompts")


def stages(root: Path, init_from: str = None, arch: str = None):
    """(name, script, argv, output dir, finished-marker file, names of the stages it reads)."""
    sft, rm, ppo, grpo, dpo, ev = (root / n for n in ("sft", "rm", "ppo", "grpo", "dpo", "eval"))
    # only SFT builds the model (later stages read it from the SFT run)
    init = (["--init-from", init_from] if init_from else []) + (["--arch", arch] if arch else [])
    return [
        ("sft", "train_sft.py", ["--out-dir", sft, *init], sft, "metrics.json", []),
        ("rm", "train_rm.py", ["--policy", sft, "--out-dir", rm], rm, "metrics.json", ["sft"]),
        ("ppo", "train_ppo.py", ["--policy", sft, "--reward", rm, "--out-dir", ppo], ppo, "metrics.json",
         ["sft", "rm"]),
        ("grpo", "train_grpo.py", ["--policy", sft, "--reward", rm, "--out-dir", grpo], grpo, "metrics.json",
         ["sft", "rm"]),
        ("dpo", "train_dpo.py", ["--policy", sft, "--prefs", rm / "prefs.jsonl", "--out-dir", dpo], dpo,
         "metrics.json", ["sft", "rm"]),
        ("eval", "evaluate.py", ["--policies", sft, ppo, grpo, dpo, "--ref", sft, "--reward", rm, "--out-dir", ev,
                                 "--frontier", "--best-of", 4, 16, 64], ev, "report.json",
         ["sft", "rm", "ppo", "grpo", "dpo"]),
    ]


def normalised(args: dict) -> dict:
    """args with path fields resolved (relative to the current folder) and the fields that may change freely
    between a run and its resumption (runs.NOT_COMPARED) left out."""
    def res(v):
        return str(Path(v).resolve()) if isinstance(v, str) else v
    return runs.comparable({k: ([res(x) for x in v] if isinstance(v, list) and k in PATH_ARGS else
                                res(v) if k in PATH_ARGS else v) for k, v in args.items()})


def stage_args(script, argv) -> dict:
    module = importlib.import_module(Path(script).stem)  # the stage's own Args: defaults + these flags
    return runs.args_dict(parse_args(module.Args, argv))


def check_flags(plan, extra):
    """Refuse, before anything runs, extra flags that some stage does not accept (a typo would otherwise only
    surface when that stage starts, or never under --dry-run)."""
    for flag in extra:
        if not flag.startswith("--"):
            continue
        name = flag.split("=", 1)[0]
        if name in ("--resume", "--no-resume", "--out-dir"):
            fail(f"{name} is managed by the pipeline (it resumes interrupted stages itself; --out picks the folder)")
        refusing = [script for _, script, *_ in plan  # exact names: no argparse abbreviations
                    if name not in build_parser(importlib.import_module(Path(script).stem).Args)._option_string_actions]
        if len(refusing) == len(plan):
            fail(f"unknown flag {name} (no stage has it; see python <script> --help)")
        if refusing:
            fail(f"{name} is not a flag of {', '.join(refusing)} (extra flags go to every stage; run that stage "
                 f"by hand to use it)")
    for _, script, argv, *_ in plan:  # values of the wrong type: argparse's own one-line message, before any work
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser(importlib.import_module(Path(script).stem).Args).parse_args([str(x) for x in argv] + extra)
        except SystemExit:
            fail(f"{script}: {err.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}")


def fail(msg: str):
    """One line and exit 2, named after the command the user ran (pipeline.py, sweep.py, overopt.py)."""
    print(f"{Path(sys.argv[0]).stem or 'pipeline'}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def saved_args(f: Path):
    """The args a run recorded in `f` (a run's config.json, the evaluation's report.json, a staging run.json), or
    None when there are none to read."""
    try:
        return json.loads(f.read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def should_resume(script, argv, out_dir: Path) -> bool:
    """True when out_dir.partial holds an unfinished run with these same args (with a resume checkpoint, or files
    worth keeping such as the RM's collected preferences)."""
    saved = saved_args(runs.staging_dir(out_dir) / runs.RUN_JSON)
    return saved is not None and normalised(saved) == normalised(stage_args(script, argv))


def why_rerun(script, argv, out_dir: Path, marker: str, input_markers) -> str:
    """'' when the stage's output is up to date, else the reason to run it."""
    runs.recover(out_dir)  # a swap interrupted by a crash
    done = out_dir / marker
    if not done.is_file():
        return "no finished output yet"
    if marker == "report.json" and not (out_dir / "report.md").is_file():  # the table the pipeline prints
        return "its report.md is missing"
    old = saved_args(out_dir / ("report.json" if marker == "report.json" else "config.json"))
    if old is None:
        return f"cannot read its config in {out_dir}"
    old, new = normalised(old), normalised(stage_args(script, argv))
    # out_dir is where the output lives, not what it is (a moved run directory stays valid)
    changed = sorted(k for k in set(old) | set(new) if k != "out_dir" and old.get(k) != new.get(k))
    if changed:
        return "config changed: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    newer = [str(f.parent) for f in input_markers if f.is_file() and f.stat().st_mtime > done.stat().st_mtime]
    if newer:
        return f"{', '.join(newer)} changed since it ran"
    return ""


def _die_with_parent():
    """In the child, before exec: Linux sends it SIGTERM when the pipeline dies, even by SIGKILL. And SIGINT /
    SIGTERM get their default actions back: a pipeline started with them ignored (a background job of a script,
    some CI runners) would hand that on through exec, and the stage would ignore the signals run_stage forwards."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)  # the child's Python then installs its own KeyboardInterrupt handler
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_stage(cmd) -> int:
    """Run one stage; SIGTERM / SIGINT to the pipeline are passed on to it, and the pipeline exits after it."""
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    stopped = []

    def forward(signum, frame):  # only signal here: the wait below (which holds Popen's lock) sees the child end
        stopped.append(signum)
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stopped:
        print(f"pipeline: stopped by signal {stopped[0]}; the same command resumes the interrupted stage",
              file=sys.stderr)
        sys.exit(128 + stopped[0])
    return rc


def main():
    parser = argparse.ArgumentParser(description="SFT -> RM -> PPO, GRPO and DPO -> evaluation. Other flags are passed "
                                                 "to every stage.", allow_abbrev=False)
    parser.add_argument("--out", default="out", help="folder that receives sft/ rm/ ppo/ grpo/ dpo/ eval/")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even if up to date")
    parser.add_argument("--dry-run", action="store_true", help="only print which stages would run, and why")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (> 1: torchrun, one per GPU)")
    parser.add_argument("--init-from", help="pretrained GPT-2 / Llama / Qwen directory or Hub id for train_sft.py (SFT "
                                            "only)")
    parser.add_argument("--arch", help="architecture of the fresh SFT model (train_sft.py --arch: gpt2, llama, qwen2, "
                                       "qwen3)")
    a, extra = parser.parse_known_args()
    if a.nproc < 1:
        fail(f"--nproc {a.nproc}: must be >= 1")
    # torchrun as a module of this Python (the same environment); --standalone: a local rendezvous on a free port
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
    launch = [sys.executable] + (torchrun if a.nproc > 1 else [])
    here = Path(__file__).resolve().parent  # the stage scripts sit next to this file
    root = Path(a.out).resolve()  # stages get absolute paths: the same run from any folder
    plan = stages(root, a.init_from, a.arch)
    check_flags(plan, extra)
    markers = {name: out_dir / marker for name, _, _, out_dir, marker, _ in plan}
    t_all, timings = time.time(), []
    for name, script, argv, out_dir, marker, inputs in plan:
        argv = [str(x) for x in argv] + extra
        reason = "--force" if a.force else why_rerun(script, argv, out_dir, marker, [markers[i] for i in inputs])
        if not reason:
            print(f"== {name}: {out_dir} is up to date with this config, skipped (--force reruns it)", flush=True)
            timings.append((name, "skipped"))
            continue
        if should_resume(script, argv, out_dir):
            argv, reason = argv + ["--resume"], f"resuming the interrupted run in {runs.staging_dir(out_dir)}"
        shown = "python" if a.nproc == 1 else f"torchrun --standalone --nproc_per_node {a.nproc}"
        print(f"== {name}: {shown} {script} {' '.join(argv)}   ({reason})", flush=True)
        if a.dry_run:
            continue
        t = time.time()
        rc = run_stage([*launch, str(here / script), *argv])
        if rc != 0:
            print(f"pipeline: stage {name} failed (exit code {rc}); finished stages are skipped when you rerun",
                  file=sys.stderr)
            sys.exit(rc)
        timings.append((name, f"{time.time() - t:.0f}s"))
    if a.dry_run:
        return
    if timings[-1][1] == "skipped":  # the evaluation did not run: show its table from the last report
        md = (root / "eval" / "report.md").read_text().splitlines()
        print("\n".join(line for line in md if line.startswith("|")))
    print(f"pipeline done in {time.time() - t_all:.0f}s ({', '.join(f'{n} {t}' for n, t in timings)}); "
          f"report: {root / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
