"""Hugging Face checkpoints in and out: safetensors read and written by hand, GPT-2's names and layouts here and
the Llama/Qwen family's in llama.py, directories (config.json, weights, tokenizer) for both.

safetensors: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}, then one buffer of every tensor, row-major, little-endian, back to
back. Nothing in it is executed; pickled `.bin` / `.pt` files are refused for that reason.

GPT-2 (GPT2LMHeadModel / GPT2Model / GPT2ForSequenceClassification) uses our names, under `transformer.` (the Hub's
gpt2 is a GPT2Model, stored without the prefix), with lm_head tied to wte and `score` for a reward model. Its c_attn,
c_proj and c_fc are `Conv1D`: weight (in, out), the transpose of nn.Linear's. attn.c_proj is square, so forgetting
to transpose it raises no shape error; the model is just wrong. attn.bias / masked_bias are mask buffers: ignored.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from minirlhf.interop import llama
from minirlhf.model import GPTConfig
from minirlhf.tokenizer import ENDOFTEXT, Tokenizer
from minirlhf.utils import UserError


class SafetensorsError(UserError):
    pass


class HFError(UserError):
    pass


@contextlib.contextmanager
def as_hf_error(where: str):
    """A ValueError of llama.py or the tokenizer (naming the field or tensor) as one HFError line after `where`."""
    try:
        yield
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None


# safetensors dtype -> (torch dtype, little-endian numpy dtype of the same width holding the raw bytes)
DTYPES = {"F64": (torch.float64, "<f8"), "F32": (torch.float32, "<f4"), "F16": (torch.float16, "<f2"),
          "BF16": (torch.bfloat16, "<i2"),  # numpy has no bfloat16: read the 16-bit pattern, view it as bf16
          "I64": (torch.int64, "<i8"), "I32": (torch.int32, "<i4"), "I16": (torch.int16, "<i2"),
          "I8": (torch.int8, "i1"), "U8": (torch.uint8, "u1"), "BOOL": (torch.bool, "?")}
TORCH_TO_ST = {t: name for name, (t, _) in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too: a bigger "header" is a corrupt file


# ------------------------------------------------------------------------------------------------ safetensors
def read_safetensors(path) -> tuple:
    """Tensors of a .safetensors file, copied into memory. Returns ({name: tensor}, metadata dict).
    Any malformation raises SafetensorsError naming the file; the checks follow the format's own rules."""
    path = Path(path)

    def bad(why):
        return SafetensorsError(f"{path}: not a valid safetensors file ({why})")

    try:
        size = path.stat().st_size
        buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read it ({e.strerror})") from None
    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} goes beyond the file's {size} bytes")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except RecursionError:
        raise bad("header is JSON nested too deeply") from None
    except ValueError as e:  # also UnicodeDecodeError, and integers too long to convert
        raise bad(f"header is not JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} is not a {{dtype, shape, data_offsets}} object")
        if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2 ** 63 for d in shape)):
            raise bad(f"tensor {name!r} has shape {str(shape)[:100]}, not a list of non-negative integers below 2^63")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise bad(f"tensor {name!r} has data_offsets {offs!r} outside the {data_len}-byte buffer")
        itemsize = np.dtype(DTYPES[e["dtype"]][1]).itemsize
        if offs[1] - offs[0] != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r}: shape {shape} of {e['dtype']} needs {math.prod(shape) * itemsize} bytes, "
                      f"data_offsets give {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0  # the tensors must tile the buffer exactly, in order: no overlap (aliasing), no gap (hidden bytes)
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {end} "
                      f"({'overlapping' if begin < end else 'a gap before'} it)")
        end = stop
    if end != data_len:
        raise bad(f"tensors cover {end} of the {data_len} buffer bytes")
    tensors = {}
    for begin, stop, name in spans:
        torch_dtype, np_dtype = DTYPES[header[name]["dtype"]]
        raw = np.frombuffer(buf, dtype=np_dtype, count=(stop - begin) // np.dtype(np_dtype).itemsize,
                            offset=data_start + begin)
        t = torch.from_numpy(raw.astype(np.dtype(np_dtype).newbyteorder("="), copy=True))  # own memory, native order
        if torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        tensors[name] = t.reshape(header[name]["shape"])
    return tensors, metadata


def write_safetensors(path, tensors: dict, metadata: dict = None):
    """Write {name: tensor} as safetensors, atomically. Deterministic bytes: names sorted, no timestamps."""
    path = Path(path)
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in TORCH_TO_ST:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors here")
        st = TORCH_TO_ST[t.dtype]
        flat = t.reshape(-1)
        if t.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        data = flat.numpy().astype(DTYPES[st][1]).tobytes()  # little-endian whatever the host
        header[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad with spaces so the buffer starts 8-byte aligned, as the reference writer does
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ GPT-2 layout
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers some files carry


def gpt2_shapes(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> dict:
    """{name without `transformer.`: shape} of a GPT-2 trunk in HF's (Conv1D) layout, in the checkpoint's order."""
    C = n_embd
    block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
             "mlp.c_proj.bias": (C,)}
    return {"wte.weight": (vocab_size, C), "wpe.weight": (n_positions, C),
            **{f"h.{i}.{p}": s for i in range(n_layer) for p, s in block.items()},
            "ln_f.weight": (C,), "ln_f.bias": (C,)}


def check_gpt2_config(hf: dict, where: str) -> dict:
    """The GPT-2 config.json fields our model implements; anything else is refused naming the field."""
    def need(field, ok, want):
        if not ok:
            raise HFError(f"{where}: config.json {field} = {hf.get(field)!r} is not supported (minirlhf's GPT "
                          f"implements {want})")

    need("model_type", hf.get("model_type") == "gpt2", "gpt2 only")
    for field in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if type(hf.get(field)) is not int or hf[field] < 1:
            raise HFError(f"{where}: config.json needs a positive integer {field} (got {hf.get(field)!r})")
    need("n_embd", hf["n_embd"] % hf["n_head"] == 0, f"n_embd divisible by n_head = {hf['n_head']}")
    # gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation, which model.py uses
    need("activation_function", hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         "gelu_new (tanh GELU)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    need("layer_norm_epsilon", type(eps) in (int, float) and abs(eps - 1e-5) < 1e-12, "1e-5, nn.LayerNorm's")
    need("n_inner", hf.get("n_inner") in (None, 4 * hf["n_embd"]), "an MLP of 4 * n_embd")
    need("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "attention scaled by 1/sqrt(head_dim)")
    need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false")
    need("add_cross_attention", not hf.get("add_cross_attention", False), "a decoder without cross-attention")
    need("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "lm_head tied to wte")
    return hf


def gpt2_from_hf(tensors: dict, hf: dict, where: str) -> tuple:
    """HF GPT-2 tensors -> (trunk state dict in our names and nn.Linear layout, score weight or None).

    tensors may carry the `transformer.` prefix or not; lm_head.weight, when present, must equal wte."""
    with as_hf_error(where):
        by_name = llama.unprefixed(tensors, "transformer.")
    n_layer, C = hf["n_layer"], hf["n_embd"]
    expected = gpt2_shapes(n_layer, C, hf["vocab_size"], hf["n_positions"])
    with as_hf_error(where):
        llama.check_tensors(by_name, expected, ("lm_head.weight", "score.weight"), IGNORED,
                            f"a GPT-2 with n_layer {n_layer}")
    state = {}
    for name in expected:
        t = by_name[name].float()
        if name.endswith(CONV1D):
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        state["transformer." + name] = t.contiguous()
    wte = state["transformer.wte.weight"]
    if "lm_head.weight" in by_name and not torch.equal(by_name["lm_head.weight"].float(), wte):
        raise HFError(f"{where}: lm_head.weight differs from wte.weight; minirlhf's GPT ties them")
    score = by_name.get("score.weight")
    if score is not None and tuple(score.shape) != (1, C):
        raise HFError(f"{where}: score.weight has shape {tuple(score.shape)}; only one label (1, {C}) is supported")
    return state, (score.float() if score is not None else None)


def gpt2_to_hf(state: dict, cfg: GPTConfig) -> dict:
    """Our GPT's state dict (keys transformer.*, nn.Linear layout) -> HF GPT-2 tensors (transformer.*, Conv1D
    layout), float32. lm_head is left out (tied; transformers re-ties it). A model without biases (bias=False)
    gets zero biases: exactly the same function."""
    out = {}
    for name, shape in gpt2_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size).items():
        t = state.get("transformer." + name)
        if t is None:  # bias=False: LayerNorm / Linear without a bias == with a zero bias
            t = torch.zeros(shape)
        t = t.detach().float().cpu()
        out["transformer." + name] = (t.t() if name.endswith(CONV1D) else t).contiguous()
    return out


def grow_vocab(state: dict, n_tokens: int) -> int:
    """Make room for n_tokens (the tokenizer's vocabulary, PAD included) in wte and an untied lm_head: round up to
    a multiple of 64 as train_sft.py does (tensor-core friendly) and fill new rows with the mean row, so a new token
    starts as an "average" token, not a random direction (Hewitt 2021). Returns the size."""
    wte = state["transformer.wte.weight"]
    if n_tokens <= wte.size(0):
        return wte.size(0)
    V = 64 * math.ceil(n_tokens / 64)
    for name in ("transformer.wte.weight", "lm_head.weight"):  # (a tied lm_head is not in state yet)
        if name in state:
            w = state[name]
            state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(V - w.size(0), -1)])
    return V


# ------------------------------------------------------------------------------------------------ directories
def is_hf_dir(path) -> bool:
    """A Hugging Face model directory: config.json with a model_type (our run configs have a "kind" instead)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "model_type" in config and "kind" not in config


def read_weights(d: Path, where: str) -> dict:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Pickles are refused."""
    if (d / "model.safetensors").is_file():
        return read_safetensors(d / "model.safetensors")[0]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("its weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
        except RecursionError:
            raise HFError(f"{where}: {index.name} is not a safetensors index (JSON nested too deeply)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{where}: {index.name} is not a safetensors index ({str(e)[:200]})") from None
        tensors = {}
        for f in files:
            if Path(f).name != f:
                raise HFError(f"{where}: {index.name} names a shard outside the directory: {f!r}")
            tensors.update(read_safetensors(d / f)[0])
        return tensors
    pickles = [p.name for p in sorted(d.iterdir()) if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise HFError(f"{where}: only a pickle checkpoint ({pickles[0]}); minirlhf never unpickles downloaded "
                      f"weights (that can run arbitrary code). Convert it to model.safetensors first, e.g. "
                      f"with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
                      f"safe_serialization=True)")
    raise HFError(f"{where}: no model.safetensors there")


def load_tokenizer(d: Path, where: str) -> Tokenizer:
    """tokenizer.json, or GPT-2's original pair vocab.json + merges.txt rebuilt as the same byte-level BPE."""
    if (d / "tokenizer.json").is_file():
        with as_hf_error(where):
            return Tokenizer.load(d / "tokenizer.json")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        try:
            t = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        except Exception as e:  # tokenizers raises a bare Exception
            raise HFError(f"{where}: vocab.json / merges.txt are not a BPE vocabulary ({e})") from None
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT2TokenizerFast's defaults
        t.decoder = decoders.ByteLevel()
        if t.token_to_id(ENDOFTEXT) is not None:
            t.add_special_tokens([ENDOFTEXT])
        return Tokenizer(t)
    raise HFError(f"{where}: no tokenizer.json (nor vocab.json + merges.txt) there")


def load_hf_dir(path, flag: str, kind: str = None, block_size: int = None, dropout: float = 0.0) -> tuple:
    """A Hugging Face GPT-2, Llama, Qwen2 or Qwen3 directory read like a run directory (load_run's four return values).
    kind "policy": a *LMHeadModel / *ForCausalLM / bare *Model; "reward": a one-label *ForSequenceClassification,
    whose state is a ScalarModel's. block_size shortens the context (GPT-2 keeps wpe's first rows)."""
    d = Path(path)
    where = f"{flag} {d}"
    try:
        hf = json.loads((d / "config.json").read_text())
    except RecursionError:
        raise HFError(f"{where}: cannot read config.json (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise HFError(f"{where}: cannot read config.json ({str(e).splitlines()[0][:200]})") from None
    family = isinstance(hf, dict) and hf.get("model_type") in llama.FAMILY
    if family:
        with as_hf_error(where):
            cfg = llama.config_from_hf(hf)
    else:
        check_gpt2_config(hf, where)
    offset = hf.get("minirlhf_score_offset", 0.0)
    if type(offset) not in (int, float) or not math.isfinite(offset):
        raise HFError(f"{where}: config.json minirlhf_score_offset = {offset!r} must be a finite number")
    tokenizer = load_tokenizer(d, where)
    if family:
        with as_hf_error(where):
            state, score = llama.tensors_from_hf(read_weights(d, where), cfg)
    else:
        state, score = gpt2_from_hf(read_weights(d, where), hf, where)
        cfg = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)
    is_reward = score is not None
    if kind is not None and kind != ("reward" if is_reward else "policy"):
        raise HFError(f"{where}: holds a {'reward model (score head)' if is_reward else 'language model'}, "
                      f"expected a {kind} checkpoint")
    if block_size is not None:
        if block_size > cfg.block_size:
            field = "max_position_embeddings" if family else "n_positions"
            raise HFError(f"{where}: the checkpoint has {cfg.block_size} positions ({field}); --block-size "
                          f"{block_size} is more")
        if not family:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()
        cfg.block_size = block_size
    cfg.vocab_size, cfg.dropout = grow_vocab(state, tokenizer.vocab_size), dropout
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    if is_reward:
        # export_hf.py folded the head's bias and the normalisation into score.weight (and GPT-2's ln_f.bias); an
        # offset it could not fold is recorded in config.json and restored here
        state = {"gpt." + k: v for k, v in state.items()}
        state.update({"head.weight": score, "head.bias": torch.zeros(1), "gain": torch.tensor(1.0),
                      "bias": torch.tensor(float(offset))})
    config = {"kind": "reward" if is_reward else "policy", "model": dataclasses.asdict(cfg),
              "tokenizer_fingerprint": tokenizer.fingerprint(), "args": None, "hf_dir": str(d)}
    return state, cfg, tokenizer, config


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def resolve_source(source: str, flag: str) -> Path:
    """A local directory as is; otherwise a Hub id (gpt2, openai-community/gpt2) downloaded with huggingface_hub
    (weights as safetensors only). Every failure is one UserError suggesting the local-directory form."""
    p = Path(source)
    if p.is_dir():
        return p
    local = ("download it where there is network (hf download openai-community/gpt2 --local-dir "
             "gpt2) and pass that directory (config.json, model.safetensors, tokenizer.json)")
    if p.exists() or not HUB_ID.fullmatch(source):
        raise HFError(f"{flag} {source}: not a directory; {local}")
    try:
        import huggingface_hub
    except ImportError:
        raise HFError(f"{flag} {source}: no such directory, and huggingface_hub is not installed to fetch it as a "
                      f"Hub id (pip install huggingface_hub); or {local}") from None
    try:
        d = huggingface_hub.snapshot_download(
            source, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                                    "vocab.json", "merges.txt"])
    except Exception as e:  # offline, unknown repo, gated, disk full: the library raises many types
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise HFError(f"{flag} {source}: no such directory, and downloading it from the Hugging Face Hub failed "
                      f"({type(e).__name__}: {msg}); {local}") from None
    return Path(d)


# ------------------------------------------------------------------------------------------------ export
def export_layout(cfg: GPTConfig) -> str:
    """The model_type a model exports as: gpt2 (learned positions, LayerNorm, GELU) or llama.family's. A mix that
    neither implements is refused naming the field."""
    if (cfg.pos, cfg.norm, cfg.mlp) != ("learned", "layernorm", "gelu"):
        with as_hf_error("cannot export"):
            return llama.family(cfg)
    for field, ok in (("mlp_hidden", cfg.mlp_size == 4 * cfg.n_embd), ("n_kv_head", cfg.kv_heads == cfg.n_head),
                      ("head_dim", cfg.head_size * cfg.n_head == cfg.n_embd), ("qk_norm", not cfg.qk_norm),
                      ("tie_embeddings", cfg.tie_embeddings), ("norm_eps", cfg.norm_eps == 1e-5)):
        if not ok:
            raise HFError(f"cannot export: model field {field} = {getattr(cfg, field)!r} is not GPT-2's")
    return "gpt2"


def hf_config(cfg: GPTConfig, tok: Tokenizer, reward: bool) -> dict:
    """config.json of the exported model (transformers' GPT2Config fields, or llama.config_to_hf's)."""
    if export_layout(cfg) != "gpt2":
        c = llama.config_to_hf(cfg, reward)
        c.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    else:
        c = {"architectures": ["GPT2ForSequenceClassification" if reward else "GPT2LMHeadModel"],
             "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
             "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attn_pdrop": 0.0, "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
             "use_cache": True, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
             "torch_dtype": "float32"}
    if reward:
        c.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return c


def fold_score(state: dict, cfg: GPTConfig) -> tuple:
    """Our reward = (w . h + b) * gain + bias, with h = ln_f(x) = g * x_hat + beta. GPT2ForSequenceClassification
    has score = w' . h and no bias. Take w' = gain * w and fold the constant c = gain * b + bias into ln_f's bias:
    beta' = beta + c * w' / |w'|^2 gives w' . h' = w' . h + c exactly (up to rounding). This works because in that
    model ln_f feeds nothing but the score head (no LM head); the price is that the exported trunk's last hidden
    states are shifted by c * w' / |w'|^2. With w' = 0 nothing can be folded: returns the offset to record. The
    Llama/Qwen family's final RMSNorm has no bias, so there the offset is always recorded.
    Returns (HF tensors, unfolded offset)."""
    trunk = {k[len("gpt."):]: v for k, v in state.items() if k.startswith("gpt.")}
    gpt2 = export_layout(cfg) == "gpt2"
    out = gpt2_to_hf(trunk, cfg) if gpt2 else llama.tensors_to_hf(trunk, cfg)
    out.pop("lm_head.weight", None)  # a sequence classifier has no LM head
    gain, bias = state["gain"].double(), state["bias"].double()
    w = state["head.weight"].double() * gain  # (1, n_embd)
    c = state["head.bias"].double()[0] * gain + bias
    out["score.weight"] = w.float()
    norm2 = (w * w).sum()
    if norm2 == 0 or not gpt2:
        return out, float(c)
    out["transformer.ln_f.bias"] = (out["transformer.ln_f.bias"].double() + c * w[0] / norm2).float()
    return out, 0.0


def _write_json(path, obj):
    """A JSON file of the export (in its staging folder, which is renamed into place as a whole)."""
    Path(path).write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def export_hf(state: dict, cfg: GPTConfig, tok: Tokenizer, config: dict, out_dir) -> dict:
    """Write a loaded run (checkpoint.load_run: a policy or reward run, or an HF directory) as a transformers GPT-2,
    Llama, Qwen2 or Qwen3 directory (export_layout). The directory is assembled next to out_dir and renamed into
    place, so out_dir is either complete or absent. Returns info."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFError(f"OUT_DIR {out_dir}: exists and is not empty (remove it or choose another)")
    reward = config.get("kind") == "reward"
    if reward:
        tensors, offset = fold_score(state, cfg)
    else:
        layout = export_layout(cfg)
        tensors, offset = (gpt2_to_hf(state, cfg) if layout == "gpt2" else llama.tensors_to_hf(state, cfg)), 0.0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        write_safetensors(stage / "model.safetensors", tensors, {"format": "pt"})  # transformers checks "format"
        c = hf_config(cfg, tok, reward)
        if offset:
            c["minirlhf_score_offset"] = offset  # add this to transformers' score to get minirlhf's reward
        _write_json(stage / "config.json", c)
        tok.save(stage / "tokenizer.json")
        specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
        # PreTrainedTokenizerFast reads tokenizer.json as is; it does not add BOS: prepend it yourself (minirlhf
        # sequences are BOS + prompt + response + EOS). split_special_tokens: text that spells a special token
        # ("<|eos|>") is encoded as text, as minirlhf encodes it (tokenizer.json does not store that setting)
        _write_json(stage / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": cfg.block_size,
            "padding_side": "right", "clean_up_tokenization_spaces": False, "split_special_tokens": True})
        _write_json(stage / "special_tokens_map.json", specials)
        if not reward:
            _write_json(stage / "generation_config.json",
                        {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        umask = os.umask(0)
        os.umask(umask)
        for f in stage.iterdir():  # temp files are created 0600; an export is meant to be shared
            f.chmod(0o644 & ~umask)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"kind": config.get("kind"), "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
            "score_offset": offset, "architecture": c["architectures"][0]}
