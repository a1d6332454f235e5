"""Hugging Face interop: safetensors by hand, GPT-2 import (Conv1D transposes, names, config checks), export, the
<|endoftext|> + PAD tokenizer convention, and a tiny SFT -> RM -> PPO -> DPO chain from an imported GPT-2 directory.
The GPT-2-format directories here are written by the test itself from a tiny random model, in HF names and Conv1D
layout, with a naive converter independent of minirlhf/hf.py."""
import json
import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from minirlhf.interop import hf
from minirlhf.harness.checkpoint import CheckpointError, load_policy, load_run, load_scalar, save_run
from minirlhf.data import encode_prompt, left_pad, right_pad
from minirlhf.generation import generate
from minirlhf.interop.hf import HFError, SafetensorsError, read_safetensors, write_safetensors
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.scoring import reward_at_eos
from minirlhf.tasks import get_task
from minirlhf.tokenizer import ENDOFTEXT, PAD, Tokenizer
from minirlhf.utils import UserError
from tests.inprocess import run_fails, run_main

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, check=True, env=None):
    if check and env is None:  # a run that must succeed: in this process (tests/inprocess.py)
        return run_main(*args)
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip_all_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5, generator=g), "b.f16": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "d.scalar": torch.tensor(1.5),
               "e.empty": torch.zeros(0, 4), "f.i64": torch.arange(6).view(2, 3), "g.bool": torch.tensor([True, False])}
    tensors["a.f32"][0, 0] = float("-inf")  # special values survive as bits
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    back, meta = read_safetensors(path)
    assert meta == {"format": "pt"} and set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].view(-1).view(torch.uint8) if t.numel() else back[k], t.view(-1).view(torch.uint8)
                           if t.numel() else t), k  # bit-identical
    # the bytes follow the format, read with a plain struct decoder (not our reader): little-endian u64 header
    # length, JSON header, then row-major little-endian data at the header's offsets
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    begin, end = header["a.f32"]["data_offsets"]
    floats = struct.unpack("<15f", raw[8 + n + begin:8 + n + end])
    assert list(floats) == tensors["a.f32"].flatten().tolist()
    assert header["c.bf16"]["dtype"] == "BF16" and header["b.f16"]["dtype"] == "F16"
    # deterministic: the same tensors give the same bytes
    write_safetensors(tmp_path / "y.safetensors", dict(reversed(list(tensors.items()))), {"format": "pt"})
    assert (tmp_path / "y.safetensors").read_bytes() == raw


def st_bytes(header: dict, data: bytes, n_override=None) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head) if n_override is None else n_override) + head + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "too short": (b"\x01\x02", "shorter than the 8-byte header length"),
    "header length beyond file": (st_bytes({"t": F32x2}, bytes(8), n_override=10 ** 6), "goes beyond the file"),
    "header not json": (struct.pack("<Q", 5) + b"{nope" + bytes(8), "header is not JSON"),
    "header not object": (st_bytes([1, 2], b""), "not an object"),
    "offsets out of range": (st_bytes({"t": {**F32x2, "data_offsets": [0, 16]}}, bytes(8)), "outside the"),
    "overlap": (st_bytes({"t": F32x2, "u": F32x2}, bytes(8)), "overlapping"),
    "gap": (st_bytes({"t": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), "a gap before"),
    "trailing bytes": (st_bytes({"t": F32x2}, bytes(12)), "cover 8 of the 12"),
    "unknown dtype": (st_bytes({"t": {**F32x2, "dtype": "F8_E4M3"}}, bytes(8)), "unknown dtype"),
    "shape size mismatch": (st_bytes({"t": {**F32x2, "shape": [3]}}, bytes(8)), "needs 12 bytes"),
    "negative dim": (st_bytes({"t": {**F32x2, "shape": [-2]}}, bytes(8)), "non-negative integers"),
    "entry not a dict": (st_bytes({"t": [0, 8]}, bytes(8)), "is not a {dtype, shape, data_offsets} object"),
    "bad metadata": (st_bytes({"__metadata__": {"a": 1}, "t": F32x2}, bytes(8)), "__metadata__"),
    "dtype not a string": (st_bytes({"t": {**F32x2, "dtype": ["F32"]}}, bytes(8)), "unknown dtype"),
    "dim past 2^63": (st_bytes({"t": {"dtype": "F32", "shape": [0, 2 ** 64], "data_offsets": [0, 0]}}, b""),
                      "non-negative integers below 2^63"),
    "header nested too deeply": (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "header number too long": (struct.pack("<Q", 5008) + b'{"a":' + b"1" * 5000 + b"}  ", "header is not JSON"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_safetensors_give_one_clear_line(tmp_path, kind):
    data, expect = MALFORMED[kind]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as e:
        read_safetensors(path)
    msg = str(e.value)
    assert expect in msg and str(path) in msg and "\n" not in msg
    assert isinstance(e.value, UserError)


def test_malformed_weights_through_a_script_is_one_line_exit_2(tmp_path):
    d = write_gpt2_dir(tmp_path / "g", *tiny_source(tmp_path))
    (d / "model.safetensors").write_bytes(MALFORMED["overlap"][0])
    proc = run_script("export_hf.py", d, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "overlapping" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ GPT-2 fixtures
def gpt2_tokenizer(tmp_path, vocab_size=300) -> Path:
    """A GPT-2-style tokenizer.json: byte-level BPE with <|endoftext|> as its only special token, added last
    (GPT-2's is id 50256 of 50257), trained on the task's corpus."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(get_task().corpus(2000, 0), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.add_special_tokens([ENDOFTEXT])
    path = tmp_path / "gpt2_tokenizer.json"
    t.save(str(path))
    return path


def random_gpt(n_tokens: int, n_positions=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=n_tokens, block_size=n_positions, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms trivial: make every parameter matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_source(tok_dir: Path, n_positions=64, seed=0):
    """A random tiny GPT whose vocabulary is exactly a GPT-2-style tokenizer's (no PAD: like GPT-2 itself)."""
    tok_path = gpt2_tokenizer(tok_dir)
    n_tokens = len(json.loads(tok_path.read_text())["model"]["vocab"]) + 1  # + <|endoftext|>
    return random_gpt(n_tokens, n_positions, seed), tok_path


def naive_hf_tensors(model: GPT, prefix="transformer.", lm_head=False, mask_buffers=True) -> dict:
    """Our GPT -> HF GPT-2 names and Conv1D layout, written out by hand (the reference for the importer)."""
    out = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        short = name[len("transformer."):]
        layer_kind = short.split(".", 2)[-1] if short.startswith("h.") else short
        is_conv1d = layer_kind in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        out[prefix + short] = p.t().contiguous() if is_conv1d else p.clone()
    if lm_head:
        out["lm_head.weight"] = model.lm_head.weight.detach().clone()
    if mask_buffers:  # GPT-2 files often carry the causal-mask buffers; they are not weights
        for i in range(model.config.n_layer):
            T = model.config.block_size
            out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def gpt2_config(model: GPT, **over) -> dict:
    c = model.config
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": c.vocab_size - 1,
            "eos_token_id": c.vocab_size - 1, **over}


def write_gpt2_dir(d: Path, model, tok_path, tensors=None, **config_over) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(gpt2_config(model, **config_over)))
    (d / "tokenizer.json").write_text(Path(tok_path).read_text())
    write_safetensors(d / "model.safetensors", naive_hf_tensors(model) if tensors is None else tensors,
                      {"format": "pt"})
    return d


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_source(tmp_path_factory.mktemp("tok"))


def random_ids(n_tokens, B=3, T=20, seed=1):
    return torch.randint(n_tokens, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ tokenizer
def test_gpt2_tokenizer_convention(source):
    _, tok_path = source
    raw = Tokenizer.load(tok_path)
    n = len(json.loads(tok_path.read_text())["model"]["vocab"]) + 1
    eot = n - 1
    assert raw.bos_id == raw.eos_id == eot  # <|endoftext|> is both, as GPT-2 was pretrained
    assert raw.pad_id == n and raw.vocab_size == n + 1 and raw.pad_id != raw.eos_id  # PAD added, distinct
    assert (raw.bos_token, raw.eos_token, raw.pad_token) == (ENDOFTEXT, ENDOFTEXT, PAD)
    # text spelling the special token stays text; decode drops BOS/EOS/PAD
    assert eot not in raw.encode("a <|endoftext|> b")
    assert raw.decode([eot] + raw.encode(" the food") + [eot, raw.pad_id]) == " the food"
    # saved and reloaded: same ids, same fingerprint (so the mismatch checks between stages keep working)
    raw.save(source[1].parent / "saved.json")
    again = Tokenizer.load(source[1].parent / "saved.json")
    assert (again.pad_id, again.bos_id, again.eos_id) == (raw.pad_id, raw.bos_id, raw.eos_id)
    assert again.fingerprint() == raw.fingerprint()


def test_own_tokenizer_keeps_three_distinct_tokens():
    tok = Tokenizer.train(get_task().corpus(300, 0), 300)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and tok.bos_token == "<|bos|>"


# ------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("prefix,lm_head", [("transformer.", False), ("", False), ("transformer.", True)])
def test_import_gives_the_logits_of_the_source_model(tmp_path, source, prefix, lm_head):
    model, tok_path = source
    d = write_gpt2_dir(tmp_path / "gpt2", model, tok_path, naive_hf_tensors(model, prefix, lm_head))
    imported, tok, config = load_policy(d)
    V = model.config.vocab_size
    assert tok.vocab_size == V + 1 and imported.config.vocab_size == 64 * ((V + 1 + 63) // 64)  # grown for PAD
    assert config["kind"] == "policy" and imported.config.dropout == 0.0
    idx = random_ids(V)
    with torch.no_grad():
        want, got = model.eval()(idx), imported.eval()(idx)
    torch.testing.assert_close(got[..., :V], want, rtol=0, atol=1e-6)
    # the new rows (PAD and the round-up) start as the mean embedding
    wte = imported.transformer.wte.weight
    torch.testing.assert_close(wte[V:], model.transformer.wte.weight.mean(0).expand(wte.size(0) - V, -1))
    assert imported.lm_head.weight is wte


def test_import_transposes_every_conv1d_including_square_attn_c_proj(tmp_path, source):
    """attn.c_proj is (n_embd, n_embd): loading it untransposed raises no shape error, only wrong numbers."""
    model, tok_path = source
    w = model.transformer.h[0].attn.c_proj.weight
    assert not torch.allclose(w, w.t())  # else this test could not tell
    d = write_gpt2_dir(tmp_path / "gpt2", model, tok_path)
    imported, _, _ = load_policy(d)
    for i in range(model.config.n_layer):
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            a = model.get_submodule(f"transformer.h.{i}.{sub}").weight
            b = imported.get_submodule(f"transformer.h.{i}.{sub}").weight
            assert torch.equal(a, b), (i, sub)
    # and a file written WITHOUT the transpose (as a buggy exporter would) gives a different model
    bad = naive_hf_tensors(model)
    bad["transformer.h.0.attn.c_proj.weight"] = w.detach().clone()
    wrong, _, _ = load_policy(write_gpt2_dir(tmp_path / "bad", model, tok_path, bad))
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (wrong(idx)[..., :model.config.vocab_size] - model(idx)).abs().max() > 1e-3


def test_sharded_weights_and_vocab_merges_tokenizer(tmp_path, source):
    """model.safetensors.index.json + shards, and GPT-2's original vocab.json + merges.txt instead of
    tokenizer.json, load to the same model and the same token ids."""
    model, tok_path = source
    d = write_gpt2_dir(tmp_path / "gpt2", model, tok_path)
    tensors, _ = read_safetensors(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        write_safetensors(d / f, {k: tensors[k] for k in keys}, {"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (d / "model.safetensors").unlink()
    from tokenizers import Tokenizer as HFTok
    HFTok.from_file(str(tok_path)).model.save(str(d))  # writes vocab.json and merges.txt
    vocab = json.loads((d / "vocab.json").read_text())
    (d / "vocab.json").write_text(json.dumps({**vocab, ENDOFTEXT: len(vocab)}))  # GPT-2's vocab.json has it last
    (d / "tokenizer.json").unlink()
    imported, tok, _ = load_policy(d)
    ref_tok = Tokenizer.load(tok_path)
    text = " the food was very good . but the service felt slow ."
    assert tok.encode(text) == ref_tok.encode(text) and len(ref_tok.encode(text)) < len(text.encode())  # merges used
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref_tok.bos_id, ref_tok.eos_id, ref_tok.pad_id)
    idx = random_ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(imported(idx)[..., :model.config.vocab_size], model(idx), rtol=0, atol=1e-6)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: "../evil.safetensors"}}))
    with pytest.raises(HFError, match="outside the directory"):
        load_policy(d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_import_as_float32(tmp_path, source, dtype):
    model, tok_path = source
    tensors = {k: v.to(dtype) for k, v in naive_hf_tensors(model, mask_buffers=False).items()}
    imported, _, _ = load_policy(write_gpt2_dir(tmp_path / "gpt2", model, tok_path, tensors))
    w = imported.transformer.h[1].mlp.c_fc.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.transformer.h[1].mlp.c_fc.weight.to(dtype).float())


def test_export_of_a_model_without_biases(tmp_path, source):
    """bias=False has no GPT-2 equivalent except zero biases: the same function."""
    tok = Tokenizer.load(source[1])
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32, bias=False)).eval()
    save_run(tmp_path / "run", model, tok, None, kind="policy")
    hf.export_hf(*load_run(tmp_path / "run", "RUN_DIR"), tmp_path / "hf")
    tensors, _ = read_safetensors(tmp_path / "hf/model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.bias"].shape == (96,) and not tensors["transformer.ln_f.bias"].any()
    back, _, _ = load_policy(tmp_path / "hf")
    idx = random_ids(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), model(idx), rtol=0, atol=1e-6)


def test_block_size_cut_keeps_logits(tmp_path, source):
    model, tok_path = source
    d = write_gpt2_dir(tmp_path / "gpt2", model, tok_path)
    state, cfg, tok, _ = hf.load_hf_dir(d, "--init-from", "policy", block_size=24)
    assert cfg.block_size == 24 and state["transformer.wpe.weight"].shape == (24, 32)
    short = GPT(cfg)
    short.load_state_dict(state)
    idx = random_ids(model.config.vocab_size, T=24)
    with torch.no_grad():
        torch.testing.assert_close(short(idx)[..., :model.config.vocab_size], model(idx), rtol=0, atol=1e-6)
    with pytest.raises(HFError, match="n_positions"):
        hf.load_hf_dir(d, "--init-from", "policy", block_size=65)


@pytest.mark.parametrize("field,value", [("model_type", "mistral"), ("activation_function", "relu"),
                                         ("layer_norm_epsilon", 1e-6), ("n_inner", 100),
                                         ("scale_attn_by_inverse_layer_idx", True), ("tie_word_embeddings", False),
                                         ("n_layer", 0), ("scale_attn_weights", False)])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, source, field, value):
    model, tok_path = source
    d = write_gpt2_dir(tmp_path / "gpt2", model, tok_path, **{field: value})
    with pytest.raises(HFError, match=field):
        load_policy(d)


def test_wrong_weights_are_refused(tmp_path, source):
    model, tok_path = source
    t = naive_hf_tensors(model, lm_head=True)
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    with pytest.raises(HFError, match="lm_head.weight differs"):
        load_policy(write_gpt2_dir(tmp_path / "a", model, tok_path, t))
    t = naive_hf_tensors(model)
    del t["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(HFError, match="'h.1.mlp.c_fc.bias' is missing"):
        load_policy(write_gpt2_dir(tmp_path / "b", model, tok_path, t))
    with pytest.raises(HFError, match="unexpected tensor 'h.1.*n_layer 1"):  # config says 1 layer fewer
        load_policy(write_gpt2_dir(tmp_path / "c", model, tok_path, naive_hf_tensors(model), n_layer=1))
    d = write_gpt2_dir(tmp_path / "e", model, tok_path)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(HFError, match="not a readable tokenizer.json"):
        load_policy(d)
    t = naive_hf_tensors(model)
    t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"].t().contiguous()  # Linear layout
    with pytest.raises(HFError, match=r"shape \(128, 32\), config.json implies \(32, 128\)"):
        load_policy(write_gpt2_dir(tmp_path / "d", model, tok_path, t))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, source):
    model, tok_path = source
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(gpt2_config(model)))
    (d / "tokenizer.json").write_text(tok_path.read_text())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(HFError, match="pytorch_model.bin.*Convert it to model.safetensors"):
        load_policy(d)
    assert not marker.exists()


def test_hub_id_without_package_or_network_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(HFError, match="huggingface_hub is not installed.*pass that directory"):
        hf.resolve_source("openai-community/gpt2", "--init-from")
    with pytest.raises(HFError, match="not a directory"):
        hf.resolve_source("no such/dir with spaces", "--init-from")
    # the package (when importable) cannot reach the Hub: offline mode makes it fail at once, as no network would
    monkeypatch.undo()
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        pytest.skip("huggingface_hub not installed: the download path cannot be tried")
    proc = run_script("train_sft.py", "--init-from", "openai-community/gpt2", "--out-dir", tmp_path / "o",
                      "--device", "cpu", check=False,
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "downloading it from the Hugging Face Hub failed" in proc.stderr and "pass that directory" in proc.stderr


def test_weights_and_config_values_that_would_load_wrong_are_refused(tmp_path, source):
    model, tok_path = source
    ints = naive_hf_tensors(model)
    ints["transformer.h.0.mlp.c_fc.weight"] = ints["transformer.h.0.mlp.c_fc.weight"].to(torch.int32)
    with pytest.raises(HFError, match="'h.0.mlp.c_fc.weight' is stored as int32; weights must be floating point"):
        load_policy(write_gpt2_dir(tmp_path / "ints", model, tok_path, tensors=ints))
    nans = naive_hf_tensors(model)
    nans["transformer.ln_f.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights .* in transformer.ln_f.weight"):
        load_policy(write_gpt2_dir(tmp_path / "nans", model, tok_path, tensors=nans))
    with pytest.raises(HFError, match="layer_norm_epsilon = 'x' is not supported"):
        load_policy(write_gpt2_dir(tmp_path / "eps", model, tok_path, layer_norm_epsilon="x"))
    sharded = write_gpt2_dir(tmp_path / "sharded", model, tok_path)
    (sharded / "model.safetensors").rename(sharded / "part1.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": 1}}))
    with pytest.raises(HFError, match="is not a safetensors index .*weight_map must map tensor names to shard"):
        load_policy(sharded)
    # an exported reward model's score offset must be a number
    rm = reward_model(model.config.vocab_size, zero_head=True)  # zero head: the offset cannot be folded, it is kept
    tok = Tokenizer.load(tok_path)
    save_run(tmp_path / "rm", rm, tok, None, kind="reward")
    run_script("export_hf.py", tmp_path / "rm", tmp_path / "hf_rm")
    config = json.loads((tmp_path / "hf_rm" / "config.json").read_text())
    assert math.isfinite(config["minirlhf_score_offset"])
    for bad, shown in ((float("nan"), "nan"), ("0.5", "'0.5'")):
        (tmp_path / "hf_rm" / "config.json").write_text(json.dumps({**config, "minirlhf_score_offset": bad}))
        with pytest.raises(HFError, match=f"minirlhf_score_offset = {shown} must be a finite number"):
            load_scalar(tmp_path / "hf_rm")


# ------------------------------------------------------------------------------------------------ export
def test_export_then_import_gives_identical_logits(tmp_path, source):
    model, tok_path = source
    imported, tok, _ = load_policy(write_gpt2_dir(tmp_path / "gpt2", model, tok_path))
    save_run(tmp_path / "run", imported, tok, {"note": "test"}, kind="policy")
    run_script("export_hf.py", tmp_path / "run", tmp_path / "hf")
    out = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    C = model.config.n_embd
    assert config["vocab_size"] == imported.config.vocab_size and config["n_positions"] == 64
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                        tok.pad_id)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["pad_token_id"] == tok.pad_id != tok.eos_id
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == (ENDOFTEXT, ENDOFTEXT, PAD)
    # text that spells a special token is text, in the export as in minirlhf: the setting travels in
    # tokenizer_config.json (tokenizer.json alone does not keep it)
    assert tc["split_special_tokens"] is True
    exported = HFTokenizer.from_file(str(out / "tokenizer.json"))
    exported.encode_special_tokens = tc["split_special_tokens"]
    literal = f"the food {ENDOFTEXT} was {PAD} good"
    assert exported.encode(literal, add_special_tokens=False).ids == tok.encode(literal)
    assert tok.eos_id not in tok.encode(literal) and tok.pad_id not in tok.encode(literal)
    tensors, meta = read_safetensors(out / "model.safetensors")
    assert meta == {"format": "pt"} and "lm_head.weight" not in tensors
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D layout
    assert torch.equal(tensors["transformer.h.0.attn.c_proj.weight"], imported.transformer.h[0].attn.c_proj.weight.t())
    again, tok2, _ = load_policy(out)
    assert tok2.fingerprint() == tok.fingerprint() and again.config == imported.config
    idx = random_ids(tok.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(idx), imported(idx))
    proc = run_fails("export_hf.py", tmp_path / "run", tmp_path / "hf")  # no overwrite
    assert proc.returncode == 2 and "not empty" in proc.stderr


def reward_model(tok_vocab: int, zero_head=False) -> ScalarModel:
    torch.manual_seed(3)
    rm = ScalarModel(GPTConfig(vocab_size=64 * ((tok_vocab + 63) // 64), block_size=32, n_layer=1, n_head=2,
                               n_embd=32))
    with torch.no_grad():
        rm.head.bias.fill_(0.7)
        rm.gain.fill_(2.5)
        rm.bias.fill_(-1.3)
        if zero_head:
            rm.head.weight.zero_()
    return rm.eval()


def hf_style_score(tensors: dict, model_for_trunk: GPT, ids, pad_id):
    """GPT2ForSequenceClassification's read-out: score.weight . h at each row's last non-PAD token."""
    h = model_for_trunk.hidden_states(ids)  # right-padded: plain causal attention
    last = (torch.arange(ids.size(1)) * (ids != pad_id)).argmax(-1)
    return h[torch.arange(ids.size(0)), last] @ tensors["score.weight"][0]


@pytest.mark.parametrize("zero_head", [False, True])
def test_reward_model_export_matches_eos_read_out(tmp_path, source, zero_head):
    tok = Tokenizer.load(source[1])
    rm = reward_model(tok.vocab_size, zero_head)
    save_run(tmp_path / "rm", rm, tok, None, kind="reward")
    proc = run_script("export_hf.py", tmp_path / "rm", tmp_path / "hf")
    assert ("could not be folded" in proc.stdout) == zero_head
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 1
    assert "generation_config.json" not in os.listdir(tmp_path / "hf")
    tensors, _ = read_safetensors(tmp_path / "hf/model.safetensors")
    assert tensors["score.weight"].shape == (1, 32) and "score.bias" not in tensors
    # right-padded rows BOS + prompt + response + EOS: our reward at EOS == HF's score at the last non-PAD token
    rows = [[tok.bos_id] + tok.encode(p) for p in ("the food was", "the service")]
    resps = [tok.encode(r) + [tok.eos_id] for r in (" very good .", " slow . but the food was fine .")]
    p_ids, p_mask = left_pad(rows, tok.pad_id)
    r_ids, r_mask = right_pad(resps, tok.pad_id)
    with torch.no_grad():
        ours = reward_at_eos(rm, p_ids, p_mask, r_ids, r_mask)
        back, _, _ = load_scalar(tmp_path / "hf")
        torch.testing.assert_close(reward_at_eos(back, p_ids, p_mask, r_ids, r_mask), ours, rtol=0, atol=1e-5)
        ids, _ = right_pad([p + r for p, r in zip(rows, resps)], tok.pad_id)
        theirs = hf_style_score(tensors, back.gpt, ids, tok.pad_id) + config.get("minirlhf_score_offset", 0.0)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert abs(ours).max() > 0.1  # a non-trivial check
    with pytest.raises(HFError, match="expected a policy"):
        load_policy(tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ generation
def test_generation_stops_at_eos_when_bos_is_eos(tmp_path, source):
    """With <|endoftext|> as BOS and EOS every prompt starts with the EOS id: generation must still run, each row
    must stop at its first generated EOS and hold PAD (mask 0) after it. The model is nudged to emit EOS with
    probability ~0.3 per step, so rows stop at different steps."""
    model, tok_path = source
    imported, tok, _ = load_policy(write_gpt2_dir(tmp_path / "gpt2", model, tok_path))
    with torch.no_grad():  # h += s * e adds s |e|^2 ~ 5 to the EOS logit (tied embeddings), ~0 elsewhere on average
        e = imported.transformer.wte.weight[tok.eos_id]
        imported.transformer.ln_f.bias.add_(e * 5.0 / e.dot(e))
    prompts = [encode_prompt(tok, p, 64) for p in ("the food was", "the service felt", "a")] * 6
    ids, mask = left_pad(prompts, tok.pad_id)
    resp, resp_mask, _ = generate(imported, ids, mask, 12, tok.eos_id, tok.pad_id, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0))
    stops = []
    for row, m in zip(resp.tolist(), resp_mask.tolist()):
        n = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        assert m == [1] * n + [0] * (len(row) - n) and row[n:] == [tok.pad_id] * (len(row) - n)
        stops.append(n if tok.eos_id in row else None)
    assert len({s for s in stops if s is not None}) >= 3, stops  # rows stopped at several different steps
    assert None not in stops or resp.size(1) == 12


# ------------------------------------------------------------------------------------------------ the whole chain
def pretrained_like(tok_path, seed=0) -> GPT:
    """A tiny "pretrained" GPT-2 for the task: whatever the context it puts its mass on the task's words and on
    <|endoftext|> (p ~ 1/4), so the chain's samples end with EOS without a long SFT (as test_rm.py's fixture)."""
    tok, task = Tokenizer.load(tok_path), get_task()
    model = random_gpt(tok.vocab_size - 1, seed=seed)  # the file's tokens, without the PAD minirlhf adds
    words = task.NOUNS + task.VERBS + list(task.ADVERBS) + list(task.ADJECTIVES) + task.CONNECTIVES + ["the", "."]
    word_ids = sorted({i for w in words for i in tok.encode(" " + w)})
    target = torch.full((model.config.vocab_size,), -30.0)
    target[word_ids] = 0.0
    target[tok.eos_id] = math.log(len(word_ids) / 3)
    with torch.no_grad():  # hidden state ~ 10 * e_0 + small, tied lm_head: logit_j ~ 10 * wte[j, 0]
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[:, 0] = target / 10.0
    return model


def test_sft_rm_ppo_dpo_chain_from_an_imported_gpt2_directory(tmp_path, source):
    _, tok_path = source
    model = pretrained_like(tok_path)
    g = write_gpt2_dir(tmp_path / "gpt2", model, tok_path)
    sft, rm, ppo, dpo = (tmp_path / n for n in ("sft", "rm", "ppo", "dpo"))
    run_script("train_sft.py", "--init-from", g, "--out-dir", sft, "--steps", 6, "--n-train", 64, "--n-val", 8,
               "--n-samples", 4, "--batch-size", 8, "--device", "cpu", "--max-new-tokens", 8, "--block-size", 48,
               "--lr", 1e-4)
    cfg = json.loads((sft / "config.json").read_text())
    assert cfg["model"]["block_size"] == 48 and cfg["model"]["n_layer"] == 2 and cfg["args"]["init_from"] == str(g)
    policy, tok, _ = load_policy(sft)
    assert tok.bos_id == tok.eos_id == model.config.vocab_size - 1 and tok.pad_id == model.config.vocab_size
    run_script("train_rm.py", "--policy", sft, "--out-dir", rm, "--n-prompts", 16, "--n-test-prompts", 8, "--k", 3,
               "--max-new-tokens", 8, "--epochs", 1, "--batch-size", 8, "--n-norm", 16, "--n-eval", 16,
               "--device", "cpu")
    run_script("train_ppo.py", "--policy", sft, "--reward", rm, "--out-dir", ppo, "--iterations", 2,
               "--batch-size", 8, "--minibatches", 2, "--epochs", 1, "--max-new-tokens", 8, "--n-eval", 8,
               "--device", "cpu")
    run_script("train_dpo.py", "--policy", sft, "--prefs", rm / "prefs.jsonl", "--out-dir", dpo, "--epochs", 1,
               "--batch-size", 8, "--n-eval", 4, "--max-new-tokens", 8, "--device", "cpu")
    # the GPT-2 directory itself as DPO's policy and reference (its reference log-probs are keyed on the weights)
    run_script("train_dpo.py", "--policy", g, "--prefs", rm / "prefs.jsonl", "--out-dir", tmp_path / "dpo_hf",
               "--epochs", 1, "--batch-size", 8, "--n-eval", 4, "--max-new-tokens", 8, "--device", "cpu")
    assert (tmp_path / "dpo_hf" / "ref_logps.pt").is_file()
    for d in (ppo, dpo):
        out, tok2, _ = load_policy(d)
        assert tok2.fingerprint() == tok.fingerprint() and out.config == policy.config
    # the GPT-2 directory itself is accepted where a policy run is, e.g. as one of the evaluated policies
    proc = run_script("evaluate.py", "--policies", ppo, dpo, g, "--ref", sft, "--reward", rm, "--out-dir",
                      tmp_path / "ev", "--n-prompts", 4, "--max-new-tokens", 8, "--device", "cpu")
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert set(report["policies"]) == {"ppo", "dpo", "gpt2"}, proc.stdout[-2000:]
    # and a mismatch between the raw directory (block 64) and the SFT run (block 48) is named, in one line
    proc = run_fails("train_ppo.py", "--policy", g, "--reward", rm, "--out-dir", tmp_path / "x", "--device", "cpu")
    assert proc.returncode == 2 and "block_size" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_routes_init_from_to_sft_only(tmp_path):
    sys.path.insert(0, str(ROOT))
    import pipeline
    plan = pipeline.stages(tmp_path, "gpt2")
    assert plan[0][2][-2:] == ["--init-from", "gpt2"]
    assert all("--init-from" not in argv for _, _, argv, *_ in plan[1:])
    assert all("--init-from" not in argv for _, _, argv, *_ in pipeline.stages(tmp_path))


# ------------------------------------------------------------------------------------------------ transformers
def test_export_against_transformers(tmp_path, source):
    """Optional (transformers is not a dependency): the exported directory loads in transformers and gives the
    same logits, greedy generation and reward-model scores as minirlhf."""
    transformers = pytest.importorskip("transformers")
    model, tok_path = source
    policy, tok, _ = load_policy(write_gpt2_dir(tmp_path / "gpt2", model, tok_path))
    save_run(tmp_path / "run", policy, tok, None, kind="policy")
    run_script("export_hf.py", tmp_path / "run", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = " the food was very good . but the service felt slow ."
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    literal = f" the food {ENDOFTEXT} was {PAD} good"  # spelled special tokens stay text in both
    assert hf_tok(literal)["input_ids"] == tok.encode(literal)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    idx = random_ids(tok.vocab_size, T=40)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, policy(idx), rtol=0, atol=1e-4)
    prompt = torch.tensor([[tok.bos_id] + tok.encode("the food")])
    ours, _, _ = generate(policy, prompt, torch.ones_like(prompt), 12, tok.eos_id, tok.pad_id, temperature=0)
    theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=ours.size(1),
                               do_sample=False)[:, prompt.size(1):]
    assert theirs.tolist() == ours.tolist()
    # reward model: HF's score at the last non-PAD token of right-padded rows == our reward at EOS
    rm = reward_model(tok.vocab_size)
    save_run(tmp_path / "rm", rm, tok, None, kind="reward")
    run_script("export_hf.py", tmp_path / "rm", tmp_path / "hf_rm")
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_rm").eval()
    rows = [[tok.bos_id] + tok.encode(p) for p in ("the food was", "the service")]
    resps = [tok.encode(r) + [tok.eos_id] for r in (" very good .", " slow . but the food was fine .")]
    p_ids, p_mask = left_pad(rows, tok.pad_id)
    r_ids, r_mask = right_pad(resps, tok.pad_id)
    ids, mask = right_pad([p + r for p, r in zip(rows, resps)], tok.pad_id)
    with torch.no_grad():
        ours = reward_at_eos(rm, p_ids, p_mask, r_ids, r_mask)
        theirs = hf_rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
