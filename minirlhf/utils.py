"""Small shared plumbing: user-facing errors, Args-dataclass -> dash-style flags, device/dtype, JSON files."""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import torch


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


def parse_args(args_cls, argv=None):
    """Build an argparse parser from an Args dataclass: field `out_dir` becomes `--out-dir`."""
    parser = argparse.ArgumentParser(description=(args_cls.__doc__ or "").strip(),
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
    return args_cls(**vars(parser.parse_args(argv)))


def run(main):
    """Run a script's main(); a UserError ends it with one clear line and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


def write_json(path, obj):
    """Write strict JSON atomically (temp file in the same folder, then rename); non-finite floats become null."""
    path = Path(path)
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False)  # before the temp file: nothing left on error
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl: one JSON line per log step, flushed as written so a crashed run keeps its history."""

    def __init__(self, path):
        self.f = open(path, "w")

    def write(self, row: dict):
        row = finite_json({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
        self.f.write(json.dumps(row, allow_nan=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()
