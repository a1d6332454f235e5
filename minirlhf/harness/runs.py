"""Run directories that are finished in one atomic step, resumable after a crash, and never hold NaN weights.

A stage writes into a staging folder `<out_dir>.partial/` (metrics.jsonl, resume.pt, every final file);
Run.finish() writes metrics.json last and swaps the folder into place (out_dir -> out_dir.replaced, .partial ->
out_dir, delete .replaced), and recover() completes a swap a crash interrupted. The output location is checked
against the run's inputs, locked for the run's lifetime, and replaced only when it holds a finished run. resume.pt
(saved every --save-interval steps) continues a run with the same args. The protocol in full: docs/runs.md.
"""
import atexit
import dataclasses
import fcntl
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minirlhf.harness import dist
from minirlhf.harness.files import torch_load, torch_save, write_json
from minirlhf.utils import UserError

STAGING, REPLACED = ".partial", ".replaced"
RESUME, RUN_JSON = "resume.pt", "run.json"
NOT_COMPARED = ("resume", "save_interval")  # args that may change between a run and its resumption


def staging_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + STAGING)


def replaced_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + REPLACED)


FINAL_FILES = ("metrics.json", "report.json")  # written last by a stage / by evaluate.py: the run is complete


def is_finished_run(d) -> bool:
    """A folder holding a finished minirlhf run (a stage's metrics.json or an evaluation's report.json)."""
    return any((Path(d) / name).is_file() for name in FINAL_FILES)


def is_complete_staging(d) -> bool:
    """A staging folder whose finish() had begun: run.json removed, its final file written."""
    d = Path(d)
    return d.is_dir() and not (d / RUN_JSON).exists() and is_finished_run(d)


def recover(out_dir):
    """Complete a swap that a crash interrupted (see the module docstring). Safe to call any time."""
    out, staging, old = Path(out_dir), staging_dir(out_dir), replaced_dir(out_dir)
    if not old.exists():
        return
    if not out.exists():
        # The first rename happened, the second did not. Only a staging folder that finish() had completed is
        # promoted; an unfinished one stays (resumable) and the old run is put back.
        (staging if is_complete_staging(staging) else old).rename(out)
    shutil.rmtree(old, ignore_errors=True)


def check_output_location(out_dir, inputs: dict):
    """Refuse an --out-dir that equals, contains or lies inside an input of the run (finishing the run would
    replace or write into it). inputs: {flag: a path, a list of paths, or None}."""
    out = Path(out_dir).resolve()
    pairs = [(flag, p) for flag, ps in inputs.items() for p in (ps if isinstance(ps, (list, tuple)) else [ps])]
    for flag, path in pairs:
        if not path:
            continue
        p = Path(path).resolve()
        how = "is" if p == out else "contains" if out in p.parents else "lies inside" if p in out.parents else None
        if how:
            raise UserError(f"--out-dir {out_dir}: {how} the input {flag} {path}; the run would replace it (choose "
                            f"another --out-dir)")


def check_replaceable(out_dir):
    """Refuse an existing --out-dir that a finished run would replace although it is not a minirlhf run."""
    out = Path(out_dir)
    if out.is_file():
        raise UserError(f"--out-dir {out}: is a file, not a folder")
    if out.is_dir() and not is_finished_run(out) and any(out.iterdir()):
        raise UserError(f"--out-dir {out}: exists and is not a finished minirlhf run (no metrics.json or "
                        f"report.json); a run would replace its files: choose another --out-dir or empty it")


_locks = {}  # lock file -> open descriptor held by this process


def lock_location(out_dir) -> Path:
    """Take the exclusive lock of an output location (.<name>.lock beside it) for this process; a second run on the
    same location stops with one line. The lock is released (and its file removed) by unlock_location or at exit."""
    path = Path(out_dir).with_name(f".{Path(out_dir).name}.lock")
    unlock_location(path)  # an earlier, abandoned run of this same process (tests call main() repeatedly)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--out-dir {out_dir}: another run is writing there right now (it holds {path}); "
                            f"wait for it to end or choose another --out-dir") from None
        try:  # the holder before us may have removed the file on release: ours must be the one at the path
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _locks[path] = fd
    return path


def unlock_location(lock_path):
    fd = _locks.pop(Path(lock_path), None)
    if fd is not None:
        Path(lock_path).unlink(missing_ok=True)  # while still locked: the next holder re-creates it
        os.close(fd)


@atexit.register
def _unlock_all():
    for path in list(_locks):
        unlock_location(path)


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
        weights = [torch.isfinite(v).all() for m in models for v in m.state_dict().values() if v.is_floating_point()]
        flags = list(self.first.values()) + ([torch.stack(weights).all().long()] if weights else [])
        if not flags:
            return
        host = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # one host transfer for all of it
        bad = {name: s for name, s in zip(self.first, host) if s >= 0}
        if bad:
            name, step = min(bad.items(), key=lambda kv: kv[1])
            raise NonFiniteError(f"{self.script}: {name} became non-finite (NaN/inf) at {self.unit} {step}; stopped "
                                 f"without saving (lower --lr, or check the data)")
        if weights and not host[-1]:  # parameters and float buffers (the RM's gain and bias)
            raise NonFiniteError(f"{self.script}: the weights became non-finite (NaN/inf); stopped without "
                                 f"saving (lower --lr)")


# ----------------------------------------------------------------------------------------------- the run
class Run:
    """One stage's output, built in <out_dir>.partial and swapped into place by finish().

        run = Run(a.out_dir, a, resume=a.resume)    # checks the location is writable before any work
        state = run.load_resume()                   # None on a fresh start
        ... run.path("model.pt") ... run.save_resume({...}) every --save-interval steps ...
        run.finish()                                # after metrics.json: the run appears at out_dir

    Under torchrun only rank 0 owns the run directory: the other ranks write into a private scratch folder deleted at
    exit, never save a resume checkpoint, and get rank 0's resume state from load_resume()."""

    def __init__(self, out_dir, args, resume: bool = False, inputs: dict = None):
        if not str(out_dir).strip() or Path(out_dir).name in ("", ".", ".."):
            raise UserError(f"--out-dir {str(out_dir)!r}: must name a run folder (e.g. out/sft), not "
                            f"{'an empty path' if not str(out_dir).strip() else 'the current or a parent folder'}")
        self.out = Path(out_dir)
        self.dir = staging_dir(self.out)
        self.args = args_dict(args)
        if self.out.name.endswith(STAGING) or self.out.name.endswith(REPLACED):
            raise UserError(f"--out-dir {self.out}: names ending in {STAGING} or {REPLACED} are reserved for "
                            f"unfinished runs")
        check_output_location(self.out, inputs or {})
        self.resumed, self.finished, self.lock = resume, False, None
        if not dist.is_main():  # rank 0 checks and owns the location; this rank's files are thrown away
            self.dir = Path(tempfile.mkdtemp(prefix=f"minirlhf-rank{dist.rank()}-"))
            atexit.register(shutil.rmtree, self.dir, True)
            return
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock = lock_location(self.out)  # before recover(): a run finishing there now completes first
            recover(self.out)
        except (FileExistsError, NotADirectoryError):
            files = [p for p in self.out.parents if p.is_file()]
            raise UserError(f"--out-dir {self.out}: {files[-1] if files else self.out.parent} is a file, not a "
                            f"folder") from None
        except OSError as e:
            raise UserError(f"--out-dir {self.out}: cannot create or use {e.filename or self.out.parent}: "
                            f"{e.strerror or e}") from None
        check_replaceable(self.out)
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
            atexit.register(self._drop_if_unresumable)
        self.inode = self.dir.stat().st_ino  # the staging folder this run owns (see _check_staging)

    def _drop_if_unresumable(self):
        """At exit: a fresh run stopped before its first resume checkpoint (a data error, a mistyped path, Ctrl-C)
        leaves no staging folder behind; there is nothing in it to resume."""
        try:
            if not self.finished and self.dir.is_dir() and self.dir.stat().st_ino == self.inode \
                    and not (self.dir / RESUME).exists():
                shutil.rmtree(self.dir, ignore_errors=True)
        except OSError:
            pass

    def _check_staging(self):
        """The staging folder must be the one this run created: one that vanished (deleted by hand, or taken over)
        is not silently re-created and finished half-empty."""
        try:  # run.json too: a re-created folder may get the same inode number
            ok = self.dir.stat().st_ino == self.inode and (self.dir / RUN_JSON).is_file()
        except OSError:
            ok = False
        if not ok:
            raise UserError(f"the staging folder {self.dir} vanished or was replaced during the run; nothing was "
                            f"written to {self.out} (run again)")

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
        where = f"--resume: {self.dir / RESUME}"
        state = torch_load(self.dir / RESUME, where)
        # save_resume records the state's keys and the run's args: a damaged file, or one copied from another run,
        # is refused here rather than failing on a missing key (or training past its end) later
        keys = state.get("keys") if isinstance(state, dict) else None
        if not isinstance(keys, list) or any(k not in state for k in keys) or type(state.get("step")) is not int:
            raise UserError(f"{where} is damaged (missing entries); run without --resume to start over")
        diff = args_diff(state.get("args", {}), self.args)
        if diff:
            raise UserError(f"{where} belongs to another run ({'; '.join(diff)}); run without --resume to start over")
        total = self.args.get("steps", self.args.get("iterations"))
        if not 0 <= state["step"] <= (total if type(total) is int else state["step"]):
            raise UserError(f"{where} is at {state.get('unit', 'step')} {state['step']}, outside this run's "
                            f"{total}; run without --resume to start over")
        print(f"resuming from {self.dir / RESUME} ({state.get('unit', 'step')} {state['step']})", flush=True)
        return state

    def save_resume(self, state: dict, check: FiniteCheck = None, models=()):
        """Write resume.pt atomically; never with non-finite weights (check raises first)."""
        if check is not None:
            check.check(*models)
        if dist.is_main():  # one checkpoint per run (every rank holds the same weights)
            self._check_staging()
            torch_save(self.dir / RESUME, {**state, "keys": sorted(state), "args": comparable(self.args)})

    def finish(self):
        """Swap the finished staging folder into place (see the module docstring). Call after the last file.
        Other ranks than 0 just drop their scratch folder."""
        if not dist.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        self._check_staging()
        check_replaceable(self.out)  # a folder of someone else's files that appeared there during the run
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
        self.finished = True
        unlock_location(self.lock)
