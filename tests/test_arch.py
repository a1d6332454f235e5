"""The Llama/Qwen family beside GPT-2: RoPE, RMSNorm, SwiGLU and grouped-query attention against naive references;
the KV cache, the compiled decode step and left padding for each variant; Hugging Face Llama / Qwen2 / Qwen3
directories in and out (written here by a naive converter in HF's names, independent of interop/llama.py), the
refusals, the tokenizer conventions, a reward model's export, and a tiny SFT -> RM -> PPO -> GRPO -> DPO -> evaluate
chain from an imported Llama-shaped directory. Against transformers itself when it is installed (optional)."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minirlhf.data import left_pad, right_pad
from minirlhf.generation import generate
from minirlhf.harness.checkpoint import load_policy, load_run, load_scalar, save_run
from minirlhf.interop.hf import HFError, export_hf, load_hf_dir, write_safetensors
from minirlhf.model import GPT, KVCache, RMSNorm, ScalarModel, arch_config, rope_angles, rope_inv_freq, rotate
from minirlhf.scoring import sampling_logprobs
from minirlhf.tasks import get_task
from minirlhf.tokenizer import ENDOFTEXT, LLAMA3, Tokenizer
from tests.inprocess import run_fails, run_main

ROOT = Path(__file__).resolve().parents[1]
PAD, BOS, EOS = 0, 1, 2
# (arch, extra GPTConfig fields): every switch appears in at least one variant
VARIANTS = {
    "llama": ("llama", {}),
    # wavelengths 2 pi 10^(4j/4): kept (6.3 < 64/4), interpolated (63), divided by 8 (628, 6283 > 64)
    "llama-untied-llama3-rope": ("llama", dict(tie_embeddings=False, rope_scaling="llama3", rope_factor=8.0,
                                               rope_original_max=64)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16, tie_embeddings=False)),  # head_dim * n_head != n_embd, as in Qwen3
}


def tiny(variant="llama", vocab=40, n_layer=2, seed=0, scale=0.3, **over):
    arch, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = GPT(arch_config(arch, **{**dict(vocab_size=vocab, block_size=32, n_layer=n_layer, n_head=4, n_embd=32),
                                     **extra, **over})).eval()
    with torch.no_grad():  # norms and biases away from their trivial init; peaked, position-dependent attention
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, scale)
    return model


def ragged(vocab=40, lens=(2, 6, 4, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lens), max(lens)), PAD)
    for i, n in enumerate(lens):
        ids[i, max(lens) - n:] = torch.randint(3, vocab, (n,), generator=g)
    return ids, (ids != PAD).long()


# ------------------------------------------------------------------------------------------------ the pieces
def test_switches_build_the_named_architecture():
    shapes = {name: {k: tuple(v.shape) for k, v in tiny(name).state_dict().items()} for name in VARIANTS}
    for name, s in shapes.items():
        assert "transformer.wpe.weight" not in s and not any(k.endswith("ln_1.bias") for k in s)  # RoPE, RMSNorm
        assert s["transformer.h.0.mlp.c_fc.weight"] == (2 * 128, 32)  # SwiGLU gate + up, ~8/3 n_embd -> 128
    hd = {"qwen3": 16}
    for name, s in shapes.items():  # 4 query heads, 2 key/value heads
        assert s["transformer.h.0.attn.c_attn.weight"] == ((4 + 2 * 2) * hd.get(name, 8), 32)
    assert "transformer.h.0.attn.c_attn.bias" in shapes["qwen2"] and "transformer.h.0.attn.c_proj.bias" not in \
        shapes["qwen2"] and "transformer.h.0.attn.c_attn.bias" not in shapes["llama"]
    assert shapes["qwen3"]["transformer.h.0.attn.q_norm.weight"] == (16,)
    tied, untied = tiny("llama"), tiny("llama-untied-llama3-rope")
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert "inv_freq" not in tied.state_dict()  # recomputed from the config, not a weight


def test_rope_is_a_complex_rotation_of_half_split_pairs():
    cfg = tiny("llama").config
    x = torch.randn(2, 3, 5, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 7, 20, 31]])
    out = rotate(x, *rope_angles(rope_inv_freq(cfg), pos))
    theta = torch.tensor([cfg.rope_theta ** (-2 * j / 8) for j in range(4)], dtype=torch.float64)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.polar(
        torch.ones(2, 1, 5, 4, dtype=torch.float64), pos[:, None, :, None].double() * theta)
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], -1).float(), atol=1e-5, rtol=0)
    # rotations preserve norms, and q.k depends on the positions only through their difference
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = [(rotate(q, *rope_angles(rope_inv_freq(cfg), torch.tensor([[a]])))
             * rotate(k, *rope_angles(rope_inv_freq(cfg), torch.tensor([[b]])))).sum() for a, b in ((3, 1), (9, 7))]
    torch.testing.assert_close(dots[0], dots[1], atol=1e-5, rtol=0)


def test_llama3_rope_scaling_against_its_definition():
    cfg = tiny("llama-untied-llama3-rope").config
    base = [cfg.rope_theta ** (-2 * j / 8) for j in range(4)]
    want = []
    for f in base:  # Llama 3.1's rule, one frequency at a time
        wavelen = 2 * math.pi / f
        low, high = cfg.rope_original_max / cfg.rope_low_freq_factor, cfg.rope_original_max / cfg.rope_high_freq_factor
        if wavelen < high:
            want.append(f)
        elif wavelen > low:
            want.append(f / cfg.rope_factor)
        else:
            span = cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
            s = (cfg.rope_original_max / wavelen - cfg.rope_low_freq_factor) / span
            want.append((1 - s) * f / cfg.rope_factor + s * f)
    assert len({round(w / f, 6) for w, f in zip(want, base)}) == 3  # kept, interpolated and divided all occur
    torch.testing.assert_close(rope_inv_freq(cfg), torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)


def test_rmsnorm_and_swiglu_against_naive():
    norm = RMSNorm(6, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 6)
    want = torch.stack([norm.weight * r / math.sqrt(float((r * r).mean()) + 1e-6) for r in x])
    torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=0)
    mlp = tiny("llama").transformer.h[0].mlp
    x = torch.randn(2, 32)
    gate, up = mlp.c_fc.weight[:128], mlp.c_fc.weight[128:]
    want = (x @ gate.T / (1 + torch.exp(-(x @ gate.T))) * (x @ up.T)) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_sdpa", [True, False])  # SDPA's enable_gqa, and the repeat_interleave of torch < 2.5
def test_grouped_query_attention_equals_full_attention_with_shared_kv_heads(monkeypatch, in_sdpa):
    import minirlhf.model
    monkeypatch.setattr(minirlhf.model, "SDPA_GQA", in_sdpa)
    gqa = tiny("llama")
    mha = GPT(dataclasses.replace(gqa.config, n_kv_head=4)).eval()
    state = dict(gqa.state_dict())
    for i in range(2):  # each key/value head copied to the two query heads that share it
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]
        q, k, v = w.split([32, 16, 16])
        k, v = (t.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32) for t in (k, v))
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    ids, mask = ragged()
    torch.testing.assert_close(mha(ids, mask), gqa(ids, mask), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ RLHF's paths
@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_and_padding_give_the_full_forward(variant):
    model = tiny(variant)
    idx = torch.randint(3, 40, (3, 14))
    full = model(idx)
    cache = KVCache(model.config.n_layer, 14)
    steps = [model(idx[:, :6], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.k[0].shape == (3, 2, 14, model.config.head_size)  # the cache holds the key/value heads only
    ids, mask = ragged()
    padded = model(ids, mask)
    for i in range(ids.size(0)):  # a left-padded row scores exactly like the row alone (positions from the mask)
        n = int(mask[i].sum())
        torch.testing.assert_close(padded[i, -n:], model(ids[i:i + 1, -n:])[0], atol=1e-5, rtol=0)
    scalar = ScalarModel(model.config)
    scalar.gpt.load_state_dict(model.state_dict())
    torch.testing.assert_close(scalar(ids, mask)[0, -2:], scalar(ids[:1, -2:])[0], atol=1e-5, rtol=0)


@torch.no_grad()
def full_forward_sampler(model, ids, mask, n_new, temperature, generator):
    """No cache: a full forward over [prompt | response so far] per token, every row sampled until all stop."""
    done, toks, logps = torch.zeros(ids.size(0), dtype=torch.bool), [], []
    for _ in range(n_new):
        logp = sampling_logprobs(model(ids, attention_mask=mask)[:, -1], temperature)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0] if temperature else logp.argmax(-1)
        logps.append(logp.gather(1, tok[:, None])[:, 0].masked_fill(done, 0.0))
        toks.append(tok.masked_fill(done, PAD))
        ids, mask = torch.cat([ids, toks[-1][:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
        done |= tok == EOS
        if done.all():
            break
    return torch.stack(toks, 1), torch.stack(logps, 1)


@pytest.mark.parametrize("variant", ["llama-untied-llama3-rope", "qwen2", "qwen3"])
def test_static_cache_and_compiled_decode_step_equal_the_full_forward(variant):
    model = tiny(variant, vocab=16, n_layer=1)
    ids, mask = ragged(vocab=16)
    seed = next(s for s in range(50)  # a seed where some rows stop at EOS and others do not
                if 0 < (full_forward_sampler(model, ids, mask, 12, 1.0, torch.Generator().manual_seed(s))[0]
                        == EOS).any(1).sum() < 4)
    ref = full_forward_sampler(model, ids, mask, 12, 1.0, torch.Generator().manual_seed(seed))
    for compile in (False, True):
        toks, resp_mask, logps = generate(model, ids, mask, 12, EOS, PAD, 1.0, compile=compile,
                                          generator=torch.Generator().manual_seed(seed))
        assert torch.equal(toks, ref[0][:, :toks.size(1)]), compile
        torch.testing.assert_close(logps, ref[1][:, :toks.size(1)], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ HF directories
def tokenizer_file(d: Path, specials, vocab_size=300) -> Path:
    """A byte-level BPE tokenizer.json trained on the task's corpus with the family's special tokens added last."""
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(get_task().corpus(2000, 0), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.add_special_tokens(list(specials))
    d.mkdir(parents=True, exist_ok=True)
    t.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


SPECIALS = {"llama": LLAMA3[:2], "qwen2": (ENDOFTEXT, "<|im_start|>", "<|im_end|>"), "qwen3": (ENDOFTEXT,)}


def naive_hf_dir(d: Path, model: GPT, shards=1) -> Path:
    """Our GPT written out by hand in Hugging Face's names and config.json fields, (sharded) safetensors."""
    c = model.config
    kind = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"
    hd, s = c.head_size, model.state_dict()
    t = {"model.embed_tokens.weight": s["transformer.wte.weight"], "model.norm.weight": s["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        t["lm_head.weight"] = s["lm_head.weight"]
    for i in range(c.n_layer):
        p, o = f"model.layers.{i}.", f"transformer.h.{i}."
        w = s[o + "attn.c_attn.weight"]
        t[p + "self_attn.q_proj.weight"] = w[:c.n_head * hd]
        t[p + "self_attn.k_proj.weight"] = w[c.n_head * hd:(c.n_head + c.kv_heads) * hd]
        t[p + "self_attn.v_proj.weight"] = w[(c.n_head + c.kv_heads) * hd:]
        if c.qkv_bias:
            b = s[o + "attn.c_attn.bias"]
            t[p + "self_attn.q_proj.bias"], t[p + "self_attn.k_proj.bias"], t[p + "self_attn.v_proj.bias"] = \
                b[:c.n_head * hd], b[c.n_head * hd:(c.n_head + c.kv_heads) * hd], b[(c.n_head + c.kv_heads) * hd:]
        if c.qk_norm:
            t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = \
                s[o + "attn.q_norm.weight"], s[o + "attn.k_norm.weight"]
        t[p + "self_attn.o_proj.weight"] = s[o + "attn.c_proj.weight"]
        t[p + "mlp.gate_proj.weight"] = s[o + "mlp.c_fc.weight"][:c.mlp_size]
        t[p + "mlp.up_proj.weight"] = s[o + "mlp.c_fc.weight"][c.mlp_size:]
        t[p + "mlp.down_proj.weight"] = s[o + "mlp.c_proj.weight"]
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = s[o + "ln_1.weight"], \
            s[o + "ln_2.weight"]
    rope = None if c.rope_scaling == "none" else {
        "rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
        "high_freq_factor": c.rope_high_freq_factor, "original_max_position_embeddings": c.rope_original_max}
    config = {"model_type": kind, "architectures": [{"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
                                                    + "ForCausalLM"],
              "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.mlp_size,
              "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
              "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "rope_scaling": rope, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings}
    if c.head_dim:
        config["head_dim"] = c.head_dim
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    names = sorted(t)
    parts = [names[i::shards] for i in range(shards)]
    if shards == 1:
        write_safetensors(d / "model.safetensors", {k: v.clone() for k, v in t.items()}, {"format": "pt"})
    else:
        weight_map = {}
        for j, part in enumerate(parts):
            f = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(d / f, {k: t[k].clone() for k in part}, {"format": "pt"})
            weight_map.update({k: f for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def family_source(tmp_path, variant, seed=0, **over):
    """(a tiny random GPT whose vocabulary is exactly the family tokenizer's, the tokenizer.json's directory)."""
    arch = VARIANTS[variant][0]
    d = tmp_path / variant
    tok_path = tokenizer_file(d, SPECIALS[arch])
    n = HFTokenizer.from_file(str(tok_path)).get_vocab_size()
    return tiny(variant, vocab=n, seed=seed, **over), d


@pytest.mark.parametrize("variant,shards", [("llama", 1), ("llama-untied-llama3-rope", 3), ("qwen2", 1),
                                            ("qwen3", 2)])
def test_hf_directories_import_with_exactly_the_logits_and_export_back(tmp_path, variant, shards):
    model, d = family_source(tmp_path, variant)
    naive_hf_dir(d, model, shards)
    state, cfg, tok, config = load_hf_dir(d, "--init-from", "policy")
    assert config["kind"] == "policy" and cfg.vocab_size == 64 * math.ceil((model.config.vocab_size + 1) / 64)
    ours = GPT(cfg).eval()
    ours.load_state_dict(state)
    idx = torch.randint(model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(idx)[..., :model.config.vocab_size], model(idx))
        # export (our writer) -> import: the same function, to the bit
        export_hf(ours.state_dict(), cfg, tok, config, tmp_path / "export")
        state2, cfg2, tok2, _ = load_hf_dir(tmp_path / "export", "RUN_DIR", "policy")
        back = GPT(cfg2).eval()
        back.load_state_dict(state2)
        assert cfg2 == cfg and tok2.fingerprint() == tok.fingerprint() and torch.equal(back(idx), ours(idx))
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"][0].startswith({"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[
        VARIANTS[variant][0]])
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                           tok.pad_id)


def test_family_tokenizer_conventions(tmp_path):
    llama = Tokenizer.load(tokenizer_file(tmp_path / "l", LLAMA3[:2]))
    assert (llama.bos_token, llama.eos_token, llama.pad_token) == (*LLAMA3[:2], "<|pad|>")
    assert len({llama.bos_id, llama.eos_id, llama.pad_id}) == 3
    llama31 = Tokenizer.load(tokenizer_file(tmp_path / "l31", LLAMA3))
    assert llama31.pad_token == LLAMA3[2] and llama31.vocab_size == llama.vocab_size  # its own PAD: nothing added
    qwen = Tokenizer.load(tokenizer_file(tmp_path / "q", SPECIALS["qwen2"]))
    assert qwen.bos_id == qwen.eos_id == qwen.hf.token_to_id(ENDOFTEXT) and qwen.pad_token == "<|pad|>"
    im_start = qwen.hf.token_to_id("<|im_start|>")
    banned = qwen.unsampleable_ids(64 * math.ceil(qwen.vocab_size / 64))
    assert im_start in banned and qwen.eos_id not in banned  # special tokens decode() would drop are never sampled
    assert qwen.decode(qwen.encode(" the food <|im_start|> was")) == " the food <|im_start|> was"  # text stays text


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("use_sliding_window", True), ("num_experts", 8),
    ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True), ("num_key_value_heads", 3),
    ("layer_types", ["sliding_attention", "full_attention"]), ("model_type", "qwen2_moe")])
def test_what_the_model_does_not_implement_is_refused_naming_the_field(tmp_path, field, value):
    model, d = family_source(tmp_path, "llama")
    naive_hf_dir(d, model)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(HFError, match=field):
        load_hf_dir(d, "--init-from", "policy")


def test_tied_but_different_and_missing_weights_are_refused(tmp_path):
    model, d = family_source(tmp_path, "llama")
    naive_hf_dir(d, model)
    from minirlhf.interop.hf import read_safetensors
    tensors = read_safetensors(d / "model.safetensors")[0]
    write_safetensors(d / "model.safetensors", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]
                                                + 1.0})
    with pytest.raises(HFError, match="lm_head.weight differs"):
        load_hf_dir(d, "--init-from", "policy")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(HFError, match="up_proj.weight' is missing"):
        load_hf_dir(d, "--init-from", "policy")


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])  # tied; untied (the classifier has no lm_head)
def test_a_family_reward_model_exports_with_its_offset_and_reads_back(tmp_path, variant):
    model, d = family_source(tmp_path, variant)
    naive_hf_dir(d, model)
    state, cfg, tok, _ = load_hf_dir(d, "--init-from", "policy")
    rm = ScalarModel(cfg).eval()
    rm.gpt.load_state_dict(state)
    with torch.no_grad():
        rm.head.bias.fill_(0.3)
        rm.gain.fill_(1.7)
        rm.bias.fill_(-0.2)
    save_run(tmp_path / "rm", rm, tok, None, kind="reward")
    proc = subprocess.run([sys.executable, "export_hf.py", tmp_path / "rm", tmp_path / "hf_rm"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{variant.title()}ForSequenceClassification" in proc.stdout and "minirlhf_score_offset" in proc.stdout
    written = json.loads((tmp_path / "hf_rm" / "config.json").read_text())
    assert written["minirlhf_score_offset"] == pytest.approx(0.3 * 1.7 - 0.2)
    back, _, _ = load_scalar(tmp_path / "hf_rm")
    ids, mask = ragged(vocab=tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), rm(ids, mask), atol=1e-5, rtol=0)


def test_gpt2_export_refuses_a_mix_no_architecture_has(tmp_path):
    _, d = family_source(tmp_path, "llama")
    tok = Tokenizer.load(d / "tokenizer.json")
    mixed = GPT(arch_config("gpt2", vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=16, n_layer=1,
                            n_head=2, n_embd=16, pos="rope"))
    with pytest.raises(HFError, match="model field norm"):
        export_hf(mixed.state_dict(), mixed.config, tok, {"kind": "policy"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ the whole chain
def pretrained_like(d: Path) -> GPT:
    """A tiny "pretrained" Llama (untied) that puts its mass on the task's words and on EOS whatever the context, so
    the chain's samples end without a long SFT: embedding dimension 0 is a constant 30 that no block writes to, the
    final RMSNorm passes only it (h ~ sqrt(n_embd) e_0), and lm_head's column 0 holds the target logits."""
    tok, task = Tokenizer.load(d / "tokenizer.json"), get_task()
    model = tiny("llama-untied-llama3-rope", vocab=tok.vocab_size - 1, scale=0.05, block_size=64)  # (no PAD yet)
    words = task.NOUNS + task.VERBS + list(task.ADVERBS) + list(task.ADJECTIVES) + task.CONNECTIVES + ["the", "."]
    word_ids = sorted({i for w in words for i in tok.encode(" " + w)})
    target = torch.full((model.config.vocab_size,), -30.0)
    target[word_ids] = 0.0
    target[tok.eos_id] = math.log(len(word_ids) / 3)
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = 30.0
        for block in model.transformer.h:
            block.attn.c_proj.weight[0] = 0.0
            block.mlp.c_proj.weight[0] = 0.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = target / math.sqrt(model.config.n_embd)
    return model


def run_script(*args):
    return run_main(*args)  # in this process (tests/inprocess.py), as are the refusals below


def test_sft_rm_ppo_grpo_dpo_evaluate_chain_from_an_imported_llama_directory(tmp_path):
    tokenizer_file(tmp_path / "llama", LLAMA3[:2])
    g = naive_hf_dir(tmp_path / "llama", pretrained_like(tmp_path / "llama"))
    sft, rm, ppo, grpo, dpo = (tmp_path / n for n in ("sft", "rm", "ppo", "grpo", "dpo"))
    common = ("--device", "cpu", "--max-new-tokens", 8)
    run_script("train_sft.py", "--init-from", g, "--out-dir", sft, "--steps", 4, "--n-train", 64, "--n-val", 8,
               "--n-samples", 4, "--batch-size", 8, "--block-size", 48, "--lr", 1e-4, *common)
    policy, tok, config = load_policy(sft)
    assert config["model"]["pos"] == "rope" and config["model"]["n_kv_head"] == 2 and policy.config.block_size == 48
    assert tok.bos_token == LLAMA3[0] and tok.eos_token == LLAMA3[1]
    run_script("train_rm.py", "--policy", sft, "--out-dir", rm, "--n-prompts", 16, "--n-test-prompts", 8, "--k", 3,
               "--epochs", 1, "--batch-size", 8, "--n-norm", 16, "--n-eval", 16, *common)
    run_script("train_ppo.py", "--policy", sft, "--reward", rm, "--out-dir", ppo, "--iterations", 2,
               "--batch-size", 8, "--minibatches", 2, "--epochs", 1, "--n-eval", 8, *common)
    run_script("train_grpo.py", "--policy", sft, "--reward", rm, "--out-dir", grpo, "--iterations", 2,
               "--prompts-per-iter", 4, "--group-size", 2, "--n-eval", 8, *common)
    run_script("train_dpo.py", "--policy", sft, "--prefs", rm / "prefs.jsonl", "--out-dir", dpo, "--epochs", 1,
               "--batch-size", 8, "--n-eval", 4, *common)
    for d in (ppo, grpo, dpo):
        out, tok2, _ = load_policy(d)
        assert tok2.fingerprint() == tok.fingerprint() and out.config == policy.config
    # the Llama directory itself is accepted where a policy run is
    run_script("evaluate.py", "--policies", sft, ppo, grpo, dpo, g, "--ref", sft, "--reward", rm, "--out-dir",
               tmp_path / "ev", "--n-prompts", 4, *common)
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo", "grpo", "dpo", "llama"}
    eos_rate = json.loads((sft / "metrics.json").read_text())["eos_rate"]
    assert eos_rate > 0  # the rigged model's samples end, so every stage saw finished responses
    run_script("export_hf.py", ppo, tmp_path / "hf_ppo")
    assert json.loads((tmp_path / "hf_ppo/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert load_run(tmp_path / "hf_ppo", "--policy")[1] == policy.config


def test_fresh_llama_through_train_sft_flags(tmp_path):
    run_script("train_sft.py", "--arch", "qwen3", "--n-kv-head", 1, "--out-dir", tmp_path / "sft", "--steps", 2,
               "--n-train", 64, "--n-val", 8, "--n-samples", 2, "--batch-size", 8, "--n-layer", 1, "--device", "cpu")
    cfg = json.loads((tmp_path / "sft/config.json").read_text())["model"]
    got = (cfg["norm"], cfg["pos"], cfg["mlp"], cfg["qk_norm"], cfg["n_kv_head"])
    assert got == ("rmsnorm", "rope", "swiglu", True, 1)
    for argv, flag in ((["--arch", "gpt2", "--n-kv-head", "2"], "--n-kv-head"),
                       (["--arch", "llama", "--n-kv-head", "3"], "--n-kv-head"),
                       (["--arch", "llama", "--init", str(tmp_path / "sft")], "--arch")):
        proc = run_fails("train_sft.py", *argv, "--out-dir", tmp_path / "x")
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_against_transformers(tmp_path, kind):
    """Optional (transformers is not a dependency): random models saved by transformers import with its logits and
    greedy generation, and our exports load back in transformers with the same logits."""
    transformers = pytest.importorskip("transformers")
    tokenizer_file(tmp_path, SPECIALS[kind])
    V = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    extra = {"llama": dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(head_dim=16, tie_word_embeddings=False)}[kind]
    config = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[kind])(
        vocab_size=V, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path)
    policy, tok, _ = load_policy(tmp_path)
    idx = torch.randint(V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(policy(idx)[..., :V], theirs(idx).logits, atol=1e-4, rtol=0)
    ids, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in ("the food was", "the")], tok.pad_id)
    ours = generate(policy, ids, mask, 10, tok.eos_id, tok.pad_id, temperature=0.0, banned=None)[0]
    hf_ids = torch.where(mask.bool(), ids, 0)
    theirs_out = theirs.generate(hf_ids, attention_mask=mask, max_new_tokens=ours.size(1), do_sample=False,
                                 pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)[:, ids.size(1):]
    for row, their_row in zip(ours.tolist(), theirs_out.tolist()):  # up to our EOS (then PAD)
        n = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        assert their_row[:n] == row[:n]
    save_run(tmp_path / "run", policy, tok, None, kind="policy")
    run_script("export_hf.py", tmp_path / "run", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, policy(idx), atol=1e-4, rtol=0)
    # a reward model: transformers' score at the last non-PAD token of right-padded rows + the recorded offset ==
    # minirlhf's reward at EOS
    rm = ScalarModel(policy.config).eval()
    rm.gpt.load_state_dict(policy.state_dict())
    with torch.no_grad():
        rm.head.bias.fill_(0.4)
        rm.gain.fill_(1.5)
    save_run(tmp_path / "rm", rm, tok, None, kind="reward")
    run_script("export_hf.py", tmp_path / "rm", tmp_path / "hf_rm")
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_rm").eval()
    offset = json.loads((tmp_path / "hf_rm/config.json").read_text())["minirlhf_score_offset"]
    rows = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in ("the food was very good .", "the service")]
    r_ids, r_mask = right_pad(rows, tok.pad_id)
    with torch.no_grad():
        ours_r = rm(r_ids, r_mask).gather(1, (r_mask.sum(1) - 1)[:, None])[:, 0]
        theirs_r = hf_rm(input_ids=r_ids, attention_mask=r_mask).logits[:, 0] + offset
    torch.testing.assert_close(theirs_r, ours_r, atol=1e-4, rtol=0)
