"""Run a script's main() inside the test process, for runs that must succeed.

A subprocess pays ~1.5 s of interpreter and torch start-up per run; a tiny stage runs in about as long again. The
runs whose exit code, stderr line or signal handling is the point (one-line errors, kill and resume, torchrun)
stay subprocesses, and each script keeps at least one subprocess run of its own.
"""
import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main(script, *args) -> subprocess.CompletedProcess:
    """`python script args...` without a new interpreter: main(argv) with stdout and stderr captured. An error
    propagates with its traceback (the test fails), where a subprocess would have exited non-zero."""
    module = importlib.import_module(Path(str(script)).stem)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        module.main([str(a) for a in args])
    return subprocess.CompletedProcess([str(script), *map(str, args)], 0, out.getvalue(), err.getvalue())


def run_ok(script, *args, in_process: bool = True, env=None) -> subprocess.CompletedProcess:
    """A run that must succeed: run_main, or with in_process=False `python script args...` in a subprocess (from the
    repository root, environment `env`) whose exit status must be 0."""
    if in_process:
        return run_main(script, *args)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
