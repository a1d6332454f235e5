"""Run directories that are finished in one atomic step, resumable after a crash, and never hold NaN weights.

A stage builds its run in a staging folder beside the target, `<out_dir>.partial/`: metrics.jsonl, the resume
checkpoint (resume.pt) and every final file go there. Run.finish() writes metrics.json last and then swaps the
staging folder into place:

    out_dir -> out_dir.replaced     (only if an earlier run is there)
    out_dir.partial -> out_dir
    delete out_dir.replaced

so a reader sees the complete old run or the complete new one, never a mix (issue 14, item 8). A crash between the
two renames leaves out_dir missing beside a complete out_dir.partial and out_dir.replaced; recover() finishes the
swap (every Run and every load_run calls it). A run killed before finish() leaves the earlier run untouched.

Resume: every --save-interval steps a stage saves resume.pt (models, optimizer, step, RNG states, its own extras)
into the staging folder; --resume continues from it and refuses when the saved args differ from the new ones in
anything but --resume / --save-interval (a run killed before its first checkpoint starts over but keeps its staging
files: the RM's collected preferences, DPO's reference log-probs). run.json in the staging folder holds those args (pipeline.py reads it to
decide whether to pass --resume).
"""
import atexit
import dataclasses
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import dist
from .utils import UserError, torch_save, write_json

STAGING, REPLACED = ".partial", ".replaced"
RESUME, RUN_JSON = "resume.pt", "run.json"
NOT_COMPARED = ("resume", "save_interval")  # args that may change between a run and its resumption


def staging_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + STAGING)


def replaced_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + REPLACED)


def recover(out_dir):
    """Complete a swap that a crash interrupted (see the module docstring). Safe to call any time."""
    out, staging, old = Path(out_dir), staging_dir(out_dir), replaced_dir(out_dir)
    if not old.exists():
        return
    if not out.exists():
        # The first rename happened, the second did not: finish() only renames a complete staging folder.
        (staging if staging.is_dir() else old).rename(out)
    shutil.rmtree(old, ignore_errors=True)


def unfinished_message(out_dir, flag: str = None) -> str:
    """Why out_dir is not a finished run, or '' when nothing suggests an unfinished one."""
    out, staging = Path(out_dir), staging_dir(out_dir)
    where = f"{flag} {out}" if flag else str(out)
    if out.name.endswith(STAGING):
        return f"{where} is the staging folder of an unfinished run, not a run (pass {out.name[:-len(STAGING)]})"
    if not out.exists() and staging.is_dir():
        return f"{where} is not finished ({staging} exists: rerun its stage with --resume)"
    return ""


def comparable(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in NOT_COMPARED}


def args_dict(args) -> dict:
    """Args dataclass -> plain JSON types (what config.json and run.json store)."""
    return json.loads(json.dumps(dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args))


def args_diff(old: dict, new: dict) -> list:
    old, new = comparable(old), comparable(new)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ----------------------------------------------------------------------------------------------- RNG states
def rng_state(generators=()) -> dict:
    """Every random stream a training loop draws from, as tensors and plain types (loadable with
    weights_only=True): python random, numpy, torch CPU, CUDA (when initialised) and the loop's own Generators."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state: dict, generators=()):
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


# ----------------------------------------------------------------------------------------------- NaN / inf
class NonFiniteError(UserError):
    pass


class FiniteCheck:
    """Remembers the first step at which a watched value (loss, grad norm) was NaN or inf, without a host sync per
    step: the flags live in tensors on the values' device and are read only by check() at log and save steps."""

    def __init__(self, script: str, unit: str = "step"):
        self.script, self.unit, self.first = script, unit, {}

    def watch(self, step: int, **values):
        for name, v in values.items():
            v = torch.as_tensor(v).detach()
            bad = ~torch.isfinite(v).all()
            first = self.first.get(name)
            if first is None:
                first = torch.full((), -1, dtype=torch.long, device=v.device)
            self.first[name] = torch.where(bad & (first < 0), torch.full_like(first, step), first)

    def check(self, *models):
        """Raise NonFiniteError naming the first bad step (and value), also when a model's weights are not finite."""
        bad = {name: int(s) for name, s in self.first.items() if int(s) >= 0}
        if bad:
            name, step = min(bad.items(), key=lambda kv: kv[1])
            raise NonFiniteError(f"{self.script}: {name} became non-finite (NaN/inf) at {self.unit} {step}; stopped "
                                 f"without saving (lower --lr, or check the data)")
        for m in models:  # parameters and float buffers (the RM's gain and bias)
            if not all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point()):
                raise NonFiniteError(f"{self.script}: the weights became non-finite (NaN/inf); stopped without "
                                     f"saving (lower --lr)")


# ----------------------------------------------------------------------------------------------- the run
class Run:
    """One stage's output, built in <out_dir>.partial and swapped into place by finish().

        run = Run(a.out_dir, a, resume=a.resume)    # checks the location is writable before any work
        state = run.load_resume()                   # None on a fresh start
        ... run.path("model.pt") ... run.save_resume({...}) every --save-interval steps ...
        run.finish()                                # after metrics.json: the run appears at out_dir

    Under torchrun (minirlhf.dist) only rank 0 owns the run directory: the other ranks write whatever the script
    writes into a private scratch folder that is deleted at exit, never save a resume checkpoint, and get rank 0's
    resume state from load_resume() (so every rank agrees on it, also across nodes without a shared disk).
    """

    def __init__(self, out_dir, args, resume: bool = False):
        self.out = Path(out_dir)
        self.dir = staging_dir(self.out)
        self.args = args_dict(args)
        if self.out.name.endswith(STAGING) or self.out.name.endswith(REPLACED):
            raise UserError(f"--out-dir {self.out}: names ending in {STAGING} or {REPLACED} are reserved for "
                            f"unfinished runs")
        self.resumed = resume
        if not dist.is_main():  # rank 0 checks and owns the location; this rank's files are thrown away
            self.dir = Path(tempfile.mkdtemp(prefix=f"minirlhf-rank{dist.rank()}-"))
            atexit.register(shutil.rmtree, self.dir, True)
            return
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            recover(self.out)
        except (FileExistsError, NotADirectoryError):
            files = [p for p in self.out.parents if p.is_file()]
            raise UserError(f"--out-dir {self.out}: {files[-1] if files else self.out.parent} is a file, not a "
                            f"folder") from None
        except OSError as e:
            raise UserError(f"--out-dir {self.out}: cannot create or use {e.filename or self.out.parent}: "
                            f"{e.strerror or e}") from None
        if resume:
            if not self.dir.is_dir():
                raise UserError(f"--resume: no unfinished run in {self.dir} (nothing to resume: run without "
                                f"--resume)")
            try:
                saved = json.loads((self.dir / RUN_JSON).read_text())["args"]
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"--resume: {self.dir / RUN_JSON} is missing or unreadable (run without "
                                f"--resume to start over)") from None
            diff = args_diff(saved, self.args)
            if diff:
                raise UserError(f"--resume: {self.dir} was started with other args ({'; '.join(diff)}); use the "
                                f"same flags, or run without --resume to start over")
        else:
            if self.dir.exists():
                print(f"note: discarding the unfinished run in {self.dir} (--resume continues one instead)",
                      file=sys.stderr)
            try:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir.mkdir()
            except OSError as e:
                raise UserError(f"--out-dir {self.out}: cannot create {self.dir}: {e.strerror or e}") from None
            write_json(self.dir / RUN_JSON, {"args": self.args})  # also proves the folder is writable
            atexit.register(self._drop_if_empty)
        self.resumed = resume

    def _drop_if_empty(self):
        """At exit: a run stopped by an early error (a mistyped path) leaves no staging folder behind."""
        try:
            if self.dir.is_dir() and [p.name for p in self.dir.iterdir()] == [RUN_JSON]:
                shutil.rmtree(self.dir, ignore_errors=True)
        except OSError:
            pass

    def path(self, name: str) -> Path:
        return self.dir / name

    def load_resume(self):
        """The dict given to the last save_resume(), or None on a fresh start. A resumed run that was killed before
        its first checkpoint starts over, but keeps what it left in the staging folder (the RM's collected
        preferences, DPO's reference log-probs). Under torchrun rank 0 reads it and every rank gets a copy."""
        if not self.resumed:
            return None
        if dist.enabled():
            return dist.broadcast_object(self._read_resume() if dist.is_main() else None)
        return self._read_resume()

    def _read_resume(self):
        if not (self.dir / RESUME).is_file():
            print(f"no resume checkpoint in {self.dir} yet: starting over, keeping its files", flush=True)
            return None
        try:
            state = torch.load(self.dir / RESUME, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--resume: cannot read {self.dir / RESUME} ({str(e).splitlines()[0]}); run without "
                            f"--resume to start over") from None
        print(f"resuming from {self.dir / RESUME} ({state.get('unit', 'step')} {state['step']})", flush=True)
        return state

    def save_resume(self, state: dict, check: FiniteCheck = None, models=()):
        """Write resume.pt atomically; never with non-finite weights (check raises first)."""
        if check is not None:
            check.check(*models)
        if dist.is_main():  # one checkpoint per run (every rank holds the same weights)
            torch_save(self.dir / RESUME, state)

    def finish(self):
        """Swap the finished staging folder into place (see the module docstring). Call after the last file.
        Other ranks than 0 just drop their scratch folder."""
        if not dist.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for name in (RESUME, RUN_JSON):
            (self.dir / name).unlink(missing_ok=True)
        for leftover in self.dir.glob(".*.tmp"):  # temp folders of writes a kill -9 interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        old = replaced_dir(self.out)
        try:
            if self.out.exists():
                self.out.rename(old)
            self.dir.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise UserError(f"cannot move {self.dir} to {self.out}: {e.strerror or e}") from None
