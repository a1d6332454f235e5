"""Run directories: model.pt (state_dict), config.json (model config + the run's args), tokenizer.json.

config.json = {"kind": "policy" | "reward", "model": GPTConfig fields, "tokenizer_fingerprint": ..., "args": ...,
plus stage-specific extras}. A later stage loads an earlier one's directory through load_run, which refuses a
missing or mismatched checkpoint with one message naming the flag and the directory.
"""
import dataclasses
import json
from pathlib import Path

import torch

from .model import GPT, GPTConfig, ScalarModel
from .runs import recover, unfinished_message
from .tokenizer import Tokenizer
from .utils import UserError, atomic_write, torch_save, write_json


class CheckpointError(UserError):
    pass


def save_run(out_dir, model, tokenizer: Tokenizer, args=None, kind: str = "policy", **extra):
    """Write model.pt, config.json and tokenizer.json into out_dir, each atomically; the same weights give the same
    model.pt bytes (utils.atomic_write). The stage scripts pass their Run's staging folder (minirlhf/runs.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(out_dir / "model.pt", state)
    atomic_write(out_dir / "tokenizer.json", tokenizer.save)
    config = {"kind": kind, "model": dataclasses.asdict(model.config),
              "tokenizer_fingerprint": tokenizer.fingerprint(),
              "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args, **extra}
    write_json(out_dir / "config.json", config)


def load_run(run_dir, flag: str, kind: str = None):
    """Read a run directory written by save_run. Returns (state_dict, GPTConfig, Tokenizer, config dict).
    The returned GPTConfig has dropout 0: every stage after SFT runs without it (TRL #3500, #744)."""
    run_dir = Path(run_dir)
    where = f"{flag} {run_dir}"
    recover(run_dir)  # a swap interrupted by a crash (runs.py)
    unfinished = unfinished_message(run_dir, flag)
    if unfinished:
        raise CheckpointError(unfinished)
    for name in ("model.pt", "config.json", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{where}: no {name} there (run the stage that writes it first)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        model_config = dataclasses.replace(GPTConfig(**config["model"]), dropout=0.0)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: config.json is not a minirlhf run config ({e})") from None
    if kind is not None and config.get("kind") != kind:
        raise CheckpointError(f"{where}: holds a {config.get('kind')!r} checkpoint, expected {kind!r}")
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    if tokenizer.fingerprint() != config.get("tokenizer_fingerprint"):
        raise CheckpointError(f"{where}: tokenizer.json does not match the tokenizer the model was trained with")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size}")
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: cannot read model.pt, a damaged or truncated file? ({first})") from None
    return state, model_config, tokenizer, config


def _load_state(model, state, where):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: model.pt does not fit its config.json ({str(e).splitlines()[0]})") from None
    return model


def load_policy(run_dir, flag: str = "--policy", device="cpu"):
    """A GPT from a policy run directory (SFT, PPO, DPO). Returns (model, tokenizer, config dict)."""
    state, model_config, tokenizer, config = load_run(run_dir, flag, kind="policy")
    model = _load_state(GPT(model_config), state, f"{flag} {run_dir}")
    return model.to(device), tokenizer, config


def load_scalar(run_dir, flag: str = "--reward", device="cpu"):
    """A ScalarModel (reward model) from its run directory. Returns (model, tokenizer, config dict)."""
    state, model_config, tokenizer, config = load_run(run_dir, flag, kind="reward")
    model = _load_state(ScalarModel(model_config), state, f"{flag} {run_dir}")
    return model.to(device), tokenizer, config


def check_compatible(a: tuple, b: tuple):
    """a, b = (flag, run_dir, config dict): refuse to combine runs with different tokenizers or model shapes."""
    (fa, da, ca), (fb, db, cb) = a, b
    if ca["tokenizer_fingerprint"] != cb["tokenizer_fingerprint"]:
        raise CheckpointError(f"{fa} {da} and {fb} {db} use different tokenizers; they cannot be combined")
    if ca["model"] != cb["model"]:
        diff = sorted(k for k in ca["model"] if ca["model"].get(k) != cb["model"].get(k))
        raise CheckpointError(f"{fa} {da} and {fb} {db} have different model configs (differ in {', '.join(diff)})")
