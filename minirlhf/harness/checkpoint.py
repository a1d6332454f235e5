"""Run directories: model.pt (state_dict), config.json ({"kind": "policy" | "reward", "model": GPTConfig fields,
"tokenizer_fingerprint", "args", plus stage-specific extras}), tokenizer.json. A later stage loads an earlier
one's directory through load_run, which refuses a missing or mismatched checkpoint with one line naming the flag.
"""
import dataclasses
from pathlib import Path

import torch

from minirlhf.harness import dist
from minirlhf.harness.files import atomic_write, read_json, torch_load, torch_save, write_json
from minirlhf.harness.runs import recover, unfinished_message
from minirlhf.interop.hf import is_hf_dir, load_hf_dir
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError


class CheckpointError(UserError):
    pass


# Sizes past these are a damaged or hand-edited config, not a model: refused before any tensor is allocated.
MODEL_LIMITS = {"vocab_size": 2 ** 24, "block_size": 2 ** 20, "n_layer": 1024, "n_head": 1024, "n_embd": 2 ** 16}


def check_state_dict(state, where: str):
    """A state dict (names -> tensors) whose floating tensors are all finite; one line naming the file otherwise.
    NaN weights would give NaN rewards that look like numbers in a report, or fail deep inside sampling."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{where}: does not hold a state dict (parameter names -> tensors) but a "
                              f"{type(state).__name__}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}: holds non-finite weights (NaN/inf) in {bad[0]}"
                              + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                              + "; it cannot be used (retrain it, with a lower --lr)")


def save_run(out_dir, model, tokenizer: Tokenizer, args=None, kind: str = "policy", **extra):
    """Write model.pt, config.json and tokenizer.json into out_dir, each atomically; the same weights give the same
    model.pt bytes (files.atomic_write). The stage scripts pass their staging folder (harness/stage.py).
    Under torchrun only rank 0 writes (every rank holds the same weights): a checkpoint is written once."""
    if not dist.is_main():
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(out_dir / "model.pt", state)
    atomic_write(out_dir / "tokenizer.json", tokenizer.save)
    config = {"kind": kind, "model": dataclasses.asdict(model.config),
              "tokenizer_fingerprint": tokenizer.fingerprint(),
              "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args, **extra}
    write_json(out_dir / "config.json", config)


def check_model_config(cfg: GPTConfig, where: str):
    """Refuse a model config with wrong field types or impossible shapes (a hand-edited config.json with
    "n_layer": "4", n_embd not divisible by n_head, ...) with one line, before any tensor is built."""
    for f in dataclasses.fields(GPTConfig):
        v, want = getattr(cfg, f.name), type(f.default)  # the type of the field's default
        if want not in (int, float, bool, str):  # a field without a plain default: nothing to check here
            continue
        if not isinstance(v, (int, float) if want is float else want) or (want is not bool and isinstance(v, bool)):
            raise CheckpointError(f"{where}: model field {f.name!r} must be {want.__name__}, got {v!r}")
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if not 1 <= getattr(cfg, name) <= MODEL_LIMITS[name]:
            raise CheckpointError(f"{where}: model field {name!r} = {getattr(cfg, name)} must be in [1, "
                                  f"{MODEL_LIMITS[name]}]")
    if cfg.n_embd % cfg.n_head and not cfg.head_dim:
        raise CheckpointError(f"{where}: n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    for name, choices in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")), ("mlp", ("gelu", "swiglu")),
                          ("rope_scaling", ("none", "linear", "llama3"))):
        if getattr(cfg, name) not in choices:
            raise CheckpointError(f"{where}: model field {name!r} must be one of {', '.join(choices)}, got "
                                  f"{getattr(cfg, name)!r}")
    for name in ("n_kv_head", "head_dim", "mlp_hidden"):
        if not 0 <= getattr(cfg, name) <= MODEL_LIMITS["n_embd"] * 4:
            raise CheckpointError(f"{where}: model field {name!r} = {getattr(cfg, name)} must be in [0, "
                                  f"{MODEL_LIMITS['n_embd'] * 4}] (0 = derived from the other sizes)")
    if cfg.n_head % cfg.kv_heads:
        raise CheckpointError(f"{where}: n_head {cfg.n_head} is not a multiple of n_kv_head {cfg.n_kv_head}")
    if cfg.pos == "rope" and cfg.head_size % 2:
        raise CheckpointError(f"{where}: RoPE needs an even head size, got {cfg.head_size}")
    if not 0 < cfg.norm_eps < 1 or not 0.0 <= cfg.dropout < 1.0:
        raise CheckpointError(f"{where}: norm_eps {cfg.norm_eps} must be in (0, 1) and dropout {cfg.dropout} in "
                              f"[0, 1)")


def load_run(run_dir, flag: str, kind: str = None):
    """Read a run directory written by save_run. Returns (state_dict, GPTConfig, Tokenizer, config dict); the GPTConfig
    has dropout 0, as every stage after SFT needs (TRL #3500, #744). A Hugging Face directory is accepted too,
    wherever a run directory is (hf.load_hf_dir; its config dict has "args": None)."""
    run_dir = Path(run_dir)
    where = f"{flag} {run_dir}"
    recover(run_dir)  # a swap interrupted by a crash (runs.py)
    unfinished = unfinished_message(run_dir, flag)
    if unfinished:
        raise CheckpointError(unfinished)
    if is_hf_dir(run_dir):
        state, model_config, tokenizer, config = load_hf_dir(run_dir, flag, kind)
        check_state_dict(state, f"{where}: the safetensors weights")
        return state, model_config, tokenizer, config
    for name in ("model.pt", "config.json", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{where}: no {name} there (run the stage that writes it first)")
    config = read_json(run_dir / "config.json", where)
    try:
        model_config = dataclasses.replace(GPTConfig(**config["model"]), dropout=0.0)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: config.json is not a minirlhf run config ({e})") from None
    check_model_config(model_config, f"{where}: config.json")
    if kind is not None and config.get("kind") != kind:
        raise CheckpointError(f"{where}: holds a {config.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if tokenizer.fingerprint() != config.get("tokenizer_fingerprint"):
        raise CheckpointError(f"{where}: tokenizer.json does not match the tokenizer the model was trained with")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size}")
    state = torch_load(run_dir / "model.pt", where)
    check_state_dict(state, f"{where}: model.pt")
    return state, model_config, tokenizer, config


def load_state(model, state, where):
    """model.load_state_dict(state), a mismatch as one line naming `where`."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: model.pt does not fit its config.json ({str(e).splitlines()[0]})") from None
    return model


def load_policy(run_dir, flag: str = "--policy", device="cpu"):
    """A GPT from a policy run directory (SFT, PPO, DPO). Returns (model, tokenizer, config dict)."""
    state, model_config, tokenizer, config = load_run(run_dir, flag, kind="policy")
    model = load_state(GPT(model_config), state, f"{flag} {run_dir}")
    return model.to(device), tokenizer, config


def load_scalar(run_dir, flag: str = "--reward", device="cpu"):
    """A ScalarModel (reward model) from its run directory. Returns (model, tokenizer, config dict)."""
    state, model_config, tokenizer, config = load_run(run_dir, flag, kind="reward")
    model = load_state(ScalarModel(model_config), state, f"{flag} {run_dir}")
    return model.to(device), tokenizer, config


def check_compatible(a: tuple, b: tuple):
    """a, b = (flag, run_dir, config dict): refuse to combine runs with different tokenizers or model shapes."""
    (fa, da, ca), (fb, db, cb) = a, b
    if ca["tokenizer_fingerprint"] != cb["tokenizer_fingerprint"]:
        raise CheckpointError(f"{fa} {da} and {fb} {db} use different tokenizers; they cannot be combined")
    if ca["model"] != cb["model"]:
        diff = sorted(k for k in ca["model"] if ca["model"].get(k) != cb["model"].get(k))
        raise CheckpointError(f"{fa} {da} and {fb} {db} have different model configs (differ in {', '.join(diff)})")
