"""The whole RLHF pipeline in one command: SFT -> reward model -> PPO, GRPO and DPO -> evaluation, into out/.

    bash pipeline.sh                      # same as python pipeline.py; CPU-sized defaults, <= 15 min on 2 cores
    bash pipeline.sh --device cuda        # any other flag is passed to every stage (--dtype, --seed, --compile, ...)
    bash pipeline.sh --force              # rerun every stage, even those that are up to date
    bash pipeline.sh --out runs/seed1 --seed 1

    out/sft   train_sft.py  --out-dir out/sft
    out/rm    train_rm.py   --sft out/sft --out-dir out/rm              (also writes out/rm/prefs.jsonl)
    out/ppo   train_ppo.py  --policy out/sft --reward out/rm --out-dir out/ppo
    out/grpo  train_grpo.py --policy out/sft --reward out/rm --out-dir out/grpo
    out/dpo   train_dpo.py  --policy out/sft --prefs out/rm/prefs.jsonl --out-dir out/dpo
    out/eval  evaluate.py   --policies out/sft out/ppo out/grpo out/dpo --ref out/sft --reward out/rm --frontier
                            --best-of 4 16 64

A stage is skipped (with a message) when it finished before (its metrics.json / report.json exists), the args in
its config.json equal the ones this command would give it, and it is newer than every stage it reads from; so a
rerun after a crash or after changing one stage's flags redoes only what changed. Because the extra flags go to
every stage, they must be flags that every stage accepts.
"""
import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from minirlhf.utils import parse_args


def stages(root: Path):
    """(name, script, argv, output dir, finished-marker file, names of the stages it reads)."""
    sft, rm, ppo, grpo, dpo, ev = (root / n for n in ("sft", "rm", "ppo", "grpo", "dpo", "eval"))
    return [
        ("sft", "train_sft.py", ["--out-dir", sft], sft, "metrics.json", []),
        ("rm", "train_rm.py", ["--sft", sft, "--out-dir", rm], rm, "metrics.json", ["sft"]),
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


def stored_args(out_dir: Path, marker: str):
    """The args a finished stage ran with (config.json of a run, report.json of the evaluation), or None."""
    f = out_dir / ("report.json" if marker == "report.json" else "config.json")
    try:
        return json.loads(f.read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def why_rerun(script, argv, out_dir: Path, marker: str, input_markers) -> str:
    """'' when the stage's output is up to date, else the reason to run it."""
    done = out_dir / marker
    if not done.is_file():
        return "no finished output yet"
    old = stored_args(out_dir, marker)
    if old is None:
        return f"cannot read its config in {out_dir}"
    module = importlib.import_module(Path(script).stem)  # the stage's own Args: defaults + these flags
    new = json.loads(json.dumps(dataclasses.asdict(parse_args(module.Args, argv))))
    # out_dir is where the output lives, not what it is (a moved run directory stays valid)
    changed = sorted(k for k in set(old) | set(new) if k != "out_dir" and old.get(k) != new.get(k))
    if changed:
        return "config changed: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    newer = [str(f.parent) for f in input_markers if f.is_file() and f.stat().st_mtime > done.stat().st_mtime]
    if newer:
        return f"{', '.join(newer)} changed since it ran"
    return ""


def main():
    parser = argparse.ArgumentParser(description="SFT -> RM -> PPO, GRPO and DPO -> evaluation. Other flags are passed "
                                                 "to every stage.", allow_abbrev=False)
    parser.add_argument("--out", default="out", help="folder that receives sft/ rm/ ppo/ grpo/ dpo/ eval/")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even if up to date")
    parser.add_argument("--dry-run", action="store_true", help="only print which stages would run, and why")
    a, extra = parser.parse_known_args()
    here = Path(__file__).resolve().parent  # the stage scripts sit next to this file
    root = Path(a.out)
    plan = stages(root)
    markers = {name: out_dir / marker for name, _, _, out_dir, marker, _ in plan}
    t_all, timings = time.time(), []
    for name, script, argv, out_dir, marker, inputs in plan:
        argv = [str(x) for x in argv] + extra
        reason = "--force" if a.force else why_rerun(script, argv, out_dir, marker, [markers[i] for i in inputs])
        if not reason:
            print(f"== {name}: {out_dir} is up to date with this config, skipped (--force reruns it)", flush=True)
            timings.append((name, "skipped"))
            continue
        print(f"== {name}: python {script} {' '.join(argv)}   ({reason})", flush=True)
        if a.dry_run:
            continue
        t = time.time()
        rc = subprocess.run([sys.executable, str(here / script), *argv]).returncode
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
