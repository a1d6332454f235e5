"""Small shared plumbing: user-facing errors, Args-dataclass -> dash-style flags, device/dtype, JSON files."""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import typing
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import dist


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data line, missing or mismatched checkpoint).
    Scripts print its message in one line instead of a traceback."""


def check(ok: bool, message: str):
    """Validate a flag or input before any work is done: raise UserError(message) unless ok.
    Message style: "--flag value: must be ..." (one line, names the flag and the bad value)."""
    if not ok:
        raise UserError(message)


def check_flags(a, rules: dict):
    """Declarative range checks of an Args instance, run at the top of main() before any work.
    rules: {field name: (predicate on the value, "what it must be")}; the first failure raises
    UserError("--field-name value: must be ...")."""
    for name, (ok, what) in rules.items():
        value = getattr(a, name)
        check(ok(value), f"--{name.replace('_', '-')} {value}: must be {what}")


# Shorthands for check_flags rules: (predicate, description).
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def arg(default, help: str):
    """An Args field with its one-line documentation (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


MAX_SEED = 2 ** 32  # numpy's seeds are 32-bit
MAX_INT_FLAG = 2 ** 40  # larger counts are typos (and overflow torch's index arithmetic)


def parse_args(args_cls, argv=None):
    """Build an argparse parser from an Args dataclass (field `out_dir` becomes `--out-dir`) and parse argv.
    Integer flags are bounded here for every script: --seed in [0, 2^32), any other below 2^40."""
    args = args_cls(**vars(build_parser(args_cls).parse_args(argv)))
    for f in dataclasses.fields(args_cls):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        values = v if isinstance(v, list) else [v]
        if f.name == "seed":
            check(0 <= v < MAX_SEED, f"{flag} {v}: must be in [0, 2^32)")
        elif any(type(x) is int and abs(x) >= MAX_INT_FLAG for x in values):
            raise UserError(f"{flag} {v if not isinstance(v, list) else ' '.join(map(str, v))}: too large "
                            f"(must be below 2^40)")
    return args


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line ("error: argument --x: ..."), exit 2, like every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(args_cls) -> argparse.ArgumentParser:
    """The argparse parser of an Args dataclass (pipeline.py also uses it to check flags before running)."""
    parser = _OneLineParser(description=(args_cls.__doc__ or "").strip(),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(args_cls)
    for f in dataclasses.fields(args_cls):
        flag, typ = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "")
        if typing.get_origin(typ) is typing.Union:  # Optional[X]
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, nargs="*", type=typing.get_args(typ)[0], default=default, help=help_)
        else:
            parser.add_argument(flag, type=typ, default=default, help=help_)
    return parser


def run(main):
    """Run a script's main(); a UserError ends it with one clear line and exit code 2, and so does an OSError
    (read-only or full disk, a file that vanished): the user can fix those, a traceback does not help them."""
    def terminated(signum, frame):  # SIGTERM (e.g. pipeline.py stopping): unwind, so temp files are removed
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = str(e)
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
                or "can't allocate memory" in text):
            raise
        first = (text.strip().splitlines() or [type(e).__name__])[0][:160]
        print(f"error: out of memory ({first}); try a smaller --batch-size (or --gen-batch-size / "
              f"--eval-batch-size), a shorter --block-size or a smaller model", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: choose float32, bfloat16 or auto")
    return dtype


def autocast(device: str, dtype: str):
    """Mixed precision context: bf16 autocast for the matmuls, parameters and optimizer state stay fp32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at total_steps (nanoGPT's schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw(model, lr: float, weight_decay: float, device: str):
    """AdamW with weight decay on matrices only (not on biases and LayerNorm gains); fused kernels on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), fused=device.startswith("cuda"))


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finite_json(obj):
    """A copy of obj (dicts, lists, tuples, scalars) with every non-finite float (NaN, +-inf) replaced by None, so
    it serialises as strict JSON: bare NaN/Infinity is not JSON and most readers (browsers, jq, pandas' strict
    mode) reject the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write(path, write):
    """Create `path` atomically: write(tmp) fills a file that already has the final name, in a fresh temporary
    folder beside `path`, which is then renamed into place. The final name matters: torch.save names the archive's
    inner folder after the file, so a random temp name would make identical tensors give different bytes. The file
    gets the usual mode (0666 minus umask, i.e. 0644), not mkstemp's 0600. The temp folder never outlives the
    call, also when write() fails (e.g. disk full). An OSError becomes a UserError naming the path.
    (torch_save serialises in memory first, so for it the name matters less; JSON and tokenizer files use this
    directly.)"""
    path = Path(path)
    tmp_dir = None
    try:
        tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_dir) / path.name
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


JSON_ERRORS = (ValueError, RecursionError, UnicodeDecodeError)  # ValueError: bad JSON, integers past 4300 digits


def read_json(path, where: str):
    """A JSON file's contents; a missing, unreadable or malformed file (also one nested too deep, or with numbers
    too long to convert) is a UserError naming `where`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{where}: cannot read {Path(path).name} ({e.strerror or e})") from None
    except JSON_ERRORS as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise UserError(f"{where}: {Path(path).name} is not valid JSON ({why})") from None


def torch_load(path, where: str):
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickled objects (which can
    run code). Anything that fails to load is a UserError naming `where`; a file holding other objects is refused
    without torch's suggestion to load it with weights_only=False."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):  # a torch.save archive holding objects the weights-only unpickler refuses
            raise UserError(f"{where}: {Path(path).name} holds pickled objects other than tensors; minirlhf loads "
                            f"weights only and never unpickles code") from None
        raise UserError(f"{where}: cannot read {Path(path).name}, a damaged or truncated file? (not a torch.save "
                        f"archive)") from None
    except Exception as e:  # torch's first sentence only (the rest is advice for torch's own developers)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise UserError(f"{where}: cannot read {Path(path).name}, a damaged or truncated file? ({first})") from None


def write_json(path, obj):
    """Write strict JSON atomically (see atomic_write); non-finite floats become null."""
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n"  # before any file: nothing left on error
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def torch_save(path, obj):
    """torch.save atomically; the same tensors give the same bytes. Serialised in memory first: the archive's inner
    folder is then always "archive" (not the file's name), and a full disk is a plain OSError from write() instead
    of torch's RuntimeError from deep inside its zip writer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getbuffer()))


class MetricsLog:
    """metrics.jsonl: one JSON line per log step, flushed as written so a crashed run keeps its history.
    keep_rows: continue a resumed run's log, dropping the lines written after its resume checkpoint."""

    def __init__(self, path, keep_rows: int = None):
        self.rows = 0
        if keep_rows is not None and Path(path).is_file():
            lines = Path(path).read_text().splitlines(keepends=True)[:keep_rows]
            Path(path).write_text("".join(lines))
            self.rows = len(lines)
        self.f = open(path, "a" if keep_rows is not None else "w")

    def write(self, row: dict):
        row = finite_json({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        self.f.write(json.dumps(row, allow_nan=False) + "\n")
        self.f.flush()
        self.rows += 1

    def close(self):
        self.f.close()


# ----------------------------------------------------------------------------------------------- progress output
class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe, CI) no carriage-return frames but one plain line per
    log step, written by log(). Scripts call log() at their log steps either way."""

    def __init__(self, iterable, desc: str, total: int = None, **kw):
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.tty = sys.stderr.isatty() and dist.is_main()  # under torchrun: one bar, rank 0's
        self.bar = tqdm(iterable, desc=desc, total=self.total, dynamic_ncols=True, disable=not self.tty, **kw)

    def __iter__(self):
        return iter(self.bar)

    def log(self, step: int, **values):
        """Show the latest values: in the bar on a terminal, else as one printed line."""
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self.tty:
            self.bar.set_postfix(**shown)
        else:
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc} {step}{of} | " + " | ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def write(self, line: str):
        """A line that should be printed on a terminal as well as in a log."""
        if self.tty:
            self.bar.write(line)
        else:
            print(line, flush=True)


def progress(iterable, desc: str, **kw):
    """tqdm on a terminal, the bare iterable otherwise (for inner loops with no log line of their own)."""
    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=not (sys.stderr.isatty() and dist.is_main()), **kw)


# ----------------------------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed (it is optional:
    setup.sh installs it for the report.png of evaluate.py, sweep.py and overopt.py; without it they write text)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path) -> bool:
    """Lay out, write and close a figure; True (what the write_plot functions return when they drew one)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
