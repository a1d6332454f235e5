"""Command lines: an Args dataclass -> dash-style flags with their ranges, one-line errors, device / dtype / seed,
and the console: progress bars and metrics.jsonl."""
import argparse
import dataclasses
import json
import random
import re
import signal
import sys
import typing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minirlhf.harness import dist
from minirlhf.harness.files import finite_json
from minirlhf.utils import UserError, check


def arg(default, help: str, must: str = None, choices: tuple = None):
    """An Args field: its default, its one-line --help, and what a value must be, checked by parse_args before any
    work: `must` is "> 0", ">= 2 (why)", "in [0, 1)" (the why, if any, goes into the error), `choices` a tuple."""
    meta = {"help": help, "must": must, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def satisfies(value, must: str) -> bool:
    """Does value meet a range written as in arg(): "> 0", ">= 2", "in [0, 1)", "in (0, 1]"?"""
    m = re.match(r"(>=|>) (\S+)", must)
    if m:
        return value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
    lo_open, lo, hi, hi_open = re.match(r"in ([\[(])(\S+), (\S+?)([\])])", must).groups()
    lo, hi = float(lo), float(hi)
    return (value > lo if lo_open == "(" else value >= lo) and (value < hi if hi_open == ")" else value <= hi)


@dataclasses.dataclass
class RunArgs:
    """The flags every script shares, one spelling everywhere: a script's Args dataclass extends it."""
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    head_precision: str = arg("auto", "float32 heads' matmuls on CUDA: ieee (exact) or tf32 (tensor cores); auto = "
                              "tf32 under bfloat16", choices=("auto", "ieee", "tf32"))
    seed: int = arg(0, "random seed")


MAX_SEED = 2 ** 32  # numpy's seeds are 32-bit
MAX_INT_FLAG = 2 ** 40  # larger counts are typos (and overflow torch's index arithmetic)


def parse_args(args_cls, argv=None):
    """Build an argparse parser from an Args dataclass (field `out_dir` becomes `--out-dir`), parse argv and check
    every field's declared range and choices (one line naming the flag). Integer flags are bounded for every
    script: --seed in [0, 2^32), any other below 2^40."""
    args = args_cls(**vars(build_parser(args_cls).parse_args(argv)))
    for f in dataclasses.fields(args_cls):
        v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        values = [x for x in (v if isinstance(v, list) else [v]) if x is not None]
        shown = " ".join(map(str, v)) if isinstance(v, list) else v
        if f.name == "seed":
            check(0 <= v < MAX_SEED, f"{flag} {v}: must be in [0, 2^32)")
        elif any(type(x) is int and abs(x) >= MAX_INT_FLAG for x in values):
            raise UserError(f"{flag} {shown}: too large (must be below 2^40)")
        must, choices = f.metadata.get("must"), f.metadata.get("choices")
        if must and not all(satisfies(x, must) for x in values):
            raise UserError(f"{flag} {shown}: must be {must}")
        if choices and not all(x in choices for x in values):
            raise UserError(f"{flag} {shown}: choose one of {', '.join(choices)}")
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
        help_ = f.metadata.get("help", "") + (f"; {f.metadata['must']}" if f.metadata.get("must") else "") \
            + (f" (one of {', '.join(f.metadata['choices'])})" if f.metadata.get("choices") else "")
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


# TF32 in the float32 heads moves sampled tokens' log-probs by 7e-4 nats (emulated on the CPU at GPT-2's width),
# 70x below the bf16 first-ratio tolerance, at about half of bf16's rate (docs/performance.md has the table).
def set_head_precision(choice: str, device: str, dtype: str) -> str:
    """--head-precision: 'auto' -> tf32 under bfloat16 on CUDA, ieee otherwise (the CPU has no TF32; under float32
    the run asked for exact float32). Sets torch's CUDA TF32 switch accordingly; returns the choice."""
    if choice == "auto":
        choice = "tf32" if device.startswith("cuda") and dtype == "bfloat16" else "ieee"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = choice == "tf32"
    return choice


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
