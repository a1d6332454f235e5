"""Files that are complete or absent: atomic JSON and torch writes, strict reads with one-line errors, plots."""
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from minirlhf.utils import UserError


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
    gets the usual mode (0666 minus umask), not mkstemp's 0600; the temp folder never outlives the call, also when
    write() fails (e.g. disk full). An OSError becomes a UserError naming the path."""
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
