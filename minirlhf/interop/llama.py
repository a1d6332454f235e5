"""The Llama/Qwen family in Hugging Face's layout: config.json fields and tensor names to and from our GPT's.

model_type llama, qwen2, qwen3 (*ForCausalLM and *ForSequenceClassification). Tensor names, under `model.`:
embed_tokens, layers.{i}.input_layernorm, layers.{i}.self_attn.{q,k,v,o}_proj (q/k/v biases: Qwen2),
layers.{i}.self_attn.{q,k}_norm (Qwen3), layers.{i}.post_attention_layernorm, layers.{i}.mlp.{gate,up,down}_proj,
norm; then lm_head (untied only) or score. Every weight is in nn.Linear's layout, as ours: q/k/v are stacked into
our c_attn, gate/up into mlp.c_fc. HF's q/k rows already pair RoPE's dimensions half-split, as model.rotate does.
Pure functions on dicts and tensors; what does not fit raises ValueError naming the field (hf.py adds the folder).
"""
import re

import torch

from minirlhf.model import GPTConfig

FAMILY = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # model_type -> class-name prefix
IGNORED = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # a buffer older files carry


def _positive_int(hf, field):
    v = hf.get(field)
    if type(v) is not int or v < 1:
        raise ValueError(f"config.json needs a positive integer {field} (got {v!r})")
    return v


def config_from_hf(hf: dict) -> GPTConfig:
    """A Llama / Qwen2 / Qwen3 config.json -> GPTConfig (block_size = max_position_embeddings, vocab as stored).
    What the model does not implement is refused naming the field: other rope scalings, sliding windows, MoE,
    biases beyond Qwen2's q/k/v, activations other than SiLU."""
    def need(field, ok, want):
        if not ok:
            raise ValueError(f"config.json {field} = {hf.get(field)!r} is not supported (minirlhf implements {want})")

    kind = hf.get("model_type")
    need("model_type", kind in FAMILY, "gpt2, " + ", ".join(FAMILY))
    C, n_head = _positive_int(hf, "hidden_size"), _positive_int(hf, "num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_head
    need("num_key_value_heads", type(n_kv) is int and n_kv >= 1 and n_head % n_kv == 0,
         f"a divisor of num_attention_heads = {n_head}")
    head_dim = hf.get("head_dim") or C // n_head
    need("head_dim", type(head_dim) is int and head_dim % 2 == 0 and (hf.get("head_dim") or C % n_head == 0),
         "an even head size (hidden_size divisible by num_attention_heads when head_dim is not given)")
    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "silu (a SwiGLU MLP)")
    need("attention_bias", not hf.get("attention_bias", False) or kind == "qwen2",
         "no attention biases (Qwen2's q/k/v biases come with its model_type)")
    need("mlp_bias", not hf.get("mlp_bias", False), "an MLP without biases")
    need("use_sliding_window", not hf.get("use_sliding_window", False), "full attention in every layer")
    need("layer_types", all(t == "full_attention" for t in hf.get("layer_types") or []), "full attention only")
    for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
        need(moe, not hf.get(moe), "a dense MLP (no mixture of experts)")
    eps = hf.get("rms_norm_eps", 1e-6)
    need("rms_norm_eps", type(eps) in (int, float) and 0 < eps < 1, "a positive epsilon")
    # transformers 5 writes rope_parameters (rope_theta inside), earlier versions rope_theta + rope_scaling
    rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(rope_field) or {}
    need(rope_field, isinstance(rope, dict), "a dict or null")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_field, rope_type in ("default", "linear", "llama3"), "rope types default, linear and llama3")
    need("partial_rotary_factor", rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) == 1.0,
         "RoPE over the whole head")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    need("rope_theta", type(theta) in (int, float) and theta > 1, "a base > 1")
    cfg = GPTConfig(vocab_size=_positive_int(hf, "vocab_size"), block_size=_positive_int(hf, "max_position_embeddings"),
                    n_layer=_positive_int(hf, "num_hidden_layers"), n_head=n_head, n_embd=C, bias=False,
                    norm="rmsnorm", norm_eps=float(eps), pos="rope", rope_theta=float(theta), mlp="swiglu",
                    mlp_hidden=_positive_int(hf, "intermediate_size"), n_kv_head=n_kv,
                    head_dim=head_dim if head_dim * n_head != C else 0, qkv_bias=kind == "qwen2",
                    qk_norm=kind == "qwen3", tie_embeddings=hf.get("tie_word_embeddings", False) is True)
    if rope_type != "default":
        cfg.rope_scaling, cfg.rope_factor = rope_type, float(rope.get("factor", 1.0))
        need(rope_field, cfg.rope_factor >= 1, "a factor >= 1")
    if rope_type == "llama3":
        cfg.rope_low_freq_factor = float(rope.get("low_freq_factor", 1.0))
        cfg.rope_high_freq_factor = float(rope.get("high_freq_factor", 4.0))
        cfg.rope_original_max = int(rope.get("original_max_position_embeddings", 8192))
        need(rope_field, cfg.rope_high_freq_factor > cfg.rope_low_freq_factor, "high_freq_factor > low_freq_factor")
    return cfg


def family(cfg: GPTConfig) -> str:
    """The model_type a GPTConfig exports as: qwen3 with q/k norms, qwen2 with q/k/v biases, llama otherwise.
    ValueError naming the switch when the combination is none of them (e.g. RoPE with LayerNorm)."""
    for field, want in (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu"), ("bias", False)):
        if getattr(cfg, field) != want:
            raise ValueError(f"model field {field} = {getattr(cfg, field)!r}: the Llama/Qwen family needs {want!r}")
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("model fields qk_norm and qkv_bias are both on: no Hugging Face architecture has both")
    if cfg.qkv_bias and cfg.head_dim and cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise ValueError(f"model field head_dim = {cfg.head_dim}: Qwen2 needs n_embd / n_head")
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def config_to_hf(cfg: GPTConfig, reward: bool) -> dict:
    """config.json fields of the exported model (the token ids are hf.py's)."""
    kind = family(cfg)
    rope = None
    if cfg.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max}
    c = {"architectures": [FAMILY[kind] + ("ForSequenceClassification" if reward else "ForCausalLM")],
         "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.mlp_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "max_position_embeddings": cfg.block_size,
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope, "hidden_act": "silu",
         "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
         "use_cache": True, "torch_dtype": "float32"}
    c.update({"llama": {"attention_bias": False, "mlp_bias": False},
              "qwen2": {"use_sliding_window": False}, "qwen3": {"attention_bias": False, "use_sliding_window": False}
              }[kind])
    return c


def _layer_shapes(cfg: GPTConfig) -> dict:
    C, hd, H = cfg.n_embd, cfg.head_size, cfg.mlp_size
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    shapes = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
              "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
              "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
              "mlp.gate_proj.weight": (H, C), "mlp.up_proj.weight": (H, C), "mlp.down_proj.weight": (C, H)}
    if cfg.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if cfg.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    return shapes


def unprefixed(tensors: dict, prefix: str) -> dict:
    """{name without `prefix`: tensor}: HF files store a model with the prefix or without it (a bare *Model)."""
    by_name = {}
    for name, t in tensors.items():
        short = name.removeprefix(prefix)
        if short in by_name:
            raise ValueError(f"tensor {short!r} is stored twice (with and without the {prefix} prefix)")
        by_name[short] = t
    return by_name


def check_tensors(by_name: dict, expected: dict, optional: tuple, ignored, what: str = "this config"):
    """Every tensor of `expected` ({name: shape}) there with its shape, nothing beyond them, `optional` and names
    the `ignored` pattern matches; all of them floating point (integer weights cast to float would train, on
    nonsense). ValueError naming the first tensor that breaks a rule."""
    extra = sorted(k for k in by_name if k not in expected and k not in optional and not ignored.fullmatch(k))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r} for {what} ({len(extra)} such; is config.json the one of "
                         f"these weights?)")
    for name in [*expected, *optional]:
        if name not in by_name:
            if name in expected:
                raise ValueError(f"tensor {name!r} is missing from the checkpoint")
            continue
        t = by_name[name]
        if name in expected and tuple(t.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} is stored as {str(t.dtype).removeprefix('torch.')}; weights must be "
                             f"floating point (F32, F16, BF16 or F64)")


def tensors_from_hf(tensors: dict, cfg: GPTConfig) -> tuple:
    """HF tensors (with or without the `model.` prefix) -> (our GPT's state dict, score weight (1, C) or None).
    With tied embeddings a stored lm_head.weight must equal embed_tokens and the state has none; untied, it must
    be there, except in a sequence classifier (score.weight), which has none."""
    by_name = unprefixed(tensors, "model.")
    expected = {"embed_tokens.weight": (cfg.vocab_size, cfg.n_embd), "norm.weight": (cfg.n_embd,)}
    expected.update({f"layers.{i}.{p}": s for i in range(cfg.n_layer) for p, s in _layer_shapes(cfg).items()})
    classifier = "score.weight" in by_name  # *ForSequenceClassification: no LM head of its own
    if not cfg.tie_embeddings and not classifier:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.n_embd)
    check_tensors(by_name, expected, ("lm_head.weight", "score.weight"), IGNORED)
    w = {k: v.float() for k, v in by_name.items()}
    state = {"transformer.wte.weight": w["embed_tokens.weight"], "transformer.ln_f.weight": w["norm.weight"]}
    for i in range(cfg.n_layer):
        hf, ours = f"layers.{i}.", f"transformer.h.{i}."
        state[ours + "ln_1.weight"] = w[hf + "input_layernorm.weight"]
        state[ours + "ln_2.weight"] = w[hf + "post_attention_layernorm.weight"]
        state[ours + "attn.c_attn.weight"] = torch.cat([w[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            state[ours + "attn.c_attn.bias"] = torch.cat([w[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        if cfg.qk_norm:
            state[ours + "attn.q_norm.weight"] = w[hf + "self_attn.q_norm.weight"]
            state[ours + "attn.k_norm.weight"] = w[hf + "self_attn.k_norm.weight"]
        state[ours + "attn.c_proj.weight"] = w[hf + "self_attn.o_proj.weight"]
        state[ours + "mlp.c_fc.weight"] = torch.cat([w[hf + "mlp.gate_proj.weight"], w[hf + "mlp.up_proj.weight"]])
        state[ours + "mlp.c_proj.weight"] = w[hf + "mlp.down_proj.weight"]
    if cfg.tie_embeddings:  # (the caller ties lm_head to wte once the vocabulary has its final size)
        if "lm_head.weight" in w and not torch.equal(w["lm_head.weight"], state["transformer.wte.weight"]):
            raise ValueError("lm_head.weight differs from embed_tokens.weight although config.json has "
                             "tie_word_embeddings true")
    else:  # a reward model never uses its trunk's lm_head: a classifier's is filled with the embedding
        state["lm_head.weight"] = w["lm_head.weight"] if "lm_head.weight" in w else w["embed_tokens.weight"].clone()
    score = w.get("score.weight")
    if score is not None and tuple(score.shape) != (1, cfg.n_embd):
        raise ValueError(f"score.weight has shape {tuple(score.shape)}; only one label (1, {cfg.n_embd}) is supported")
    return {k: v.contiguous() for k, v in state.items()}, score


def tensors_to_hf(state: dict, cfg: GPTConfig) -> dict:
    """Our GPT's state dict -> HF tensors under `model.` (+ lm_head.weight when untied), float32."""
    t = {k: v.detach().float().cpu() for k, v in state.items()}
    q, kv, H = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.mlp_size
    out = {"model.embed_tokens.weight": t["transformer.wte.weight"], "model.norm.weight": t["transformer.ln_f.weight"]}
    for i in range(cfg.n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        out[hf + "input_layernorm.weight"] = t[ours + "ln_1.weight"]
        out[hf + "post_attention_layernorm.weight"] = t[ours + "ln_2.weight"]
        for name, part in zip("qkv", t[ours + "attn.c_attn.weight"].split([q, kv, kv])):
            out[hf + f"self_attn.{name}_proj.weight"] = part
        if cfg.qkv_bias:
            for name, part in zip("qkv", t[ours + "attn.c_attn.bias"].split([q, kv, kv])):
                out[hf + f"self_attn.{name}_proj.bias"] = part
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = t[ours + "attn.q_norm.weight"]
            out[hf + "self_attn.k_norm.weight"] = t[ours + "attn.k_norm.weight"]
        out[hf + "self_attn.o_proj.weight"] = t[ours + "attn.c_proj.weight"]
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = t[ours + "mlp.c_fc.weight"].split([H, H])
        out[hf + "mlp.down_proj.weight"] = t[ours + "mlp.c_proj.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}
