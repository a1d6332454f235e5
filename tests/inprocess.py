"""Run a script's main() inside the test process: runs that must succeed, and runs refused with a one-line error.

A subprocess pays ~1.5 s of interpreter and torch start-up per run; a tiny stage runs in about as long again. What
only a process shows stays a subprocess: kill and resume, torchrun, signals, and what happens at exit (a refused
run's staging folder is removed then). Every script keeps at least one refused run as a subprocess, and every
train_*.py one that succeeds, so their `run(main)` entry points are exercised as users meet them.
"""
import contextlib
import importlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import torch

from minirlhf.harness import runs
from minirlhf.harness.cli import run

ROOT = Path(__file__).resolve().parents[1]


def run_main(script, *args) -> subprocess.CompletedProcess:
    """`python script args...` without a new interpreter: main(argv) with stdout and stderr captured. An error
    propagates with its traceback (the test fails), where a subprocess would have exited non-zero."""
    module = importlib.import_module(Path(str(script)).stem)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        module.main([str(a) for a in args])
    return subprocess.CompletedProcess([str(script), *map(str, args)], 0, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in a subprocess with OMP_NUM_THREADS=1: for a run compared with such a subprocess's,
    whose float reductions must happen in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_ok(script, *args, in_process: bool = True, env=None) -> subprocess.CompletedProcess:
    """A run that must succeed: run_main, or with in_process=False `python script args...` in a subprocess (from the
    repository root, environment `env`) whose exit status must be 0."""
    if in_process:
        return run_main(script, *args)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_fails(script, *args) -> subprocess.CompletedProcess:
    """A run expected to stop with one line: main(argv) through harness.cli.run, as `python script` runs it, with
    its exit status (0 when it did not stop) and captured output. An exception run() lets through -- what a user
    would see as a traceback -- propagates, and the test fails. What else happens at a process's exit does not
    happen here (an unresumable staging folder stays): tests of that run a subprocess."""
    module = importlib.import_module(Path(str(script)).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    on_sigterm = signal.getsignal(signal.SIGTERM)  # run() installs its own handler
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(lambda: module.main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        runs._unlock_all()  # as the end of its process would: the output location it locked is free again
    return subprocess.CompletedProcess([str(script), *map(str, args)], code, out.getvalue(), err.getvalue())
