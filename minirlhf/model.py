"""A decoder-only transformer, written out: GPT-2 by default, the Llama/Qwen family with a few switches.

GPT-2: learned positions, pre-LayerNorm blocks, GELU(tanh), biases, tied embeddings. The Llama/Qwen family
(SmolLM2, Qwen2.5, Qwen3, Llama 3): RoPE, RMSNorm, a SwiGLU MLP, fewer key/value heads than query heads (GQA), no
biases except Qwen2's on q/k/v, Qwen3's RMSNorm of each head's q and k, tied or untied embeddings: each one
GPTConfig field (`ARCHS` names the combinations). Parameter names are GPT-2's for every architecture (q/k/v fused
in c_attn, SwiGLU's gate and up in mlp.c_fc); interop/ maps them to Hugging Face's. Beyond nanoGPT, RLHF needs:
  * left-padded batches: PAD keys masked and positions from the mask, so a padded row gives the same per-token
    logits as the row unpadded;
  * a KV cache: prefill the prompt once, then decode one token per step;
  * hidden states, so a scalar head (reward or value model) can sit on the same trunk (ScalarModel).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 64  # longest sequence (prompt + response, padding included)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # RLHF stages force it off: dropout makes the KL and PPO ratios noisy (TRL #3500)
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2)
    # the Llama/Qwen family's switches (defaults: GPT-2's)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos: str = "learned"  # learned (wpe) | rope
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 (Llama 3.1+: long wavelengths stretched, short ones kept)
    rope_factor: float = 1.0  # linear and llama3: how much longer the context is than in pretraining
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max: int = 8192  # llama3 only: the pretraining context
    mlp: str = "gelu"  # gelu (tanh GELU) | swiglu (down(silu(gate(x)) * up(x)))
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # 0 = n_embd // n_head (Qwen3 sets it larger)
    qkv_bias: bool = False  # biases on q/k/v even when bias is off (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    tie_embeddings: bool = True  # lm_head is wte

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd


# Fresh models of each family (train_sft.py --arch): the switches, sizes aside. n_kv_head = n_head // 2 and the
# SwiGLU width (~8/3 n_embd, a multiple of 64, so the MLP has about GELU's 8 n_embd^2 weights) come from the sizes.
ARCHS = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False),
    "qwen2": dict(norm="rmsnorm", norm_eps=1e-6, pos="rope", mlp="swiglu", bias=False, qkv_bias=True),
    "qwen3": dict(norm="rmsnorm", norm_eps=1e-6, pos="rope", mlp="swiglu", bias=False, qk_norm=True),
}


def arch_config(arch: str, **sizes) -> GPTConfig:
    """GPTConfig of a fresh `arch` model (ARCHS) with the given sizes (vocab_size, n_layer, ...; any other field
    given overrides the family's)."""
    cfg = GPTConfig(**{**ARCHS[arch], **sizes})
    if arch != "gpt2":
        kv = cfg.n_head // 2 if cfg.n_head % 2 == 0 else cfg.n_head
        cfg.n_kv_head, cfg.mlp_hidden = cfg.n_kv_head or kv, cfg.mlp_hidden or 64 * math.ceil(8 * cfg.n_embd / 192)
    return cfg


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32 whatever the input (as Llama's), cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: GPTConfig, dim: int):
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg: GPTConfig) -> torch.Tensor:
    """RoPE's rotation speeds (head_size / 2,) float32: theta^(-2i/d) (Su et al. 2021, "RoFormer"), divided by
    rope_factor for linear scaling; llama3 scaling divides only the slow ones (wavelength past original_max /
    low_freq_factor), keeps the fast ones (shorter than original_max / high_freq_factor) and interpolates between."""
    d = cfg.head_size
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        wavelen = 2 * math.pi / inv
        slow = torch.where(wavelen > cfg.rope_original_max / cfg.rope_low_freq_factor, inv / cfg.rope_factor, inv)
        smooth = ((cfg.rope_original_max / wavelen - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        mid = ((wavelen >= cfg.rope_original_max / cfg.rope_high_freq_factor)
               & (wavelen <= cfg.rope_original_max / cfg.rope_low_freq_factor))
        inv = torch.where(mid, (1 - smooth) * slow / cfg.rope_factor + smooth * slow, slow)
    return inv


def rope_angles(inv_freq, pos):
    """cos and sin of each position's angles, (B, 1, T, head_size) float32, for rotate(). pos (B, T) long: from
    the attention mask, so a left-padded row is rotated exactly like the same row unpadded."""
    with torch.autocast(pos.device.type, enabled=False):
        angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, head_size / 2)
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """RoPE on (B, heads, T, head_size): each pair (x_i, x_{i + d/2}) turned by its angle (the half-split pairing
    of Hugging Face's Llama weights, not the interleaved one of Meta's originals)."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


class KVCache:
    """A static key/value cache for incremental decoding: each layer's keys and values in a buffer of their own, of
    fixed length max_len (prompt + budget), allocated on first use in the attention's dtype. New k/v are written at
    column tensors (`index_copy_`) and attention runs over all max_len columns with a mask hiding those not written
    yet, so a decode step has the same shapes every time (what CUDA graphs and torch.compile need). One tensor per
    layer, not one (n_layer, ...) tensor: torch.compile turns a write into a view of a shared buffer into a copy of
    the whole buffer. k[layer], v[layer]: (B, n_kv_head, max_len, head_dim); `length`: columns hidden_states filled."""

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None  # lists of n_layer tensors once allocated
        self.length = 0  # tokens already stored (hidden_states' append path)

    def allocate(self, B: int, n_head: int, head_dim: int, dtype, device):
        shape = (B, n_head, self.max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layer)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, write_at: torch.Tensor):
        """Write this step's k, v (B, nh, T, hd) of `layer` at columns write_at (T,) long; return the layer's whole
        buffers (B, nh, max_len, hd) (unwritten columns are zeros, hidden by the attention mask)."""
        B, nh, T, hd = k.shape
        if self.k is None:
            self.allocate(B, nh, hd, k.dtype, k.device)
        self.k[layer].index_copy_(2, write_at, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, write_at, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # its enable_gqa (torch 2.5 on)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.head_dim or cfg.n_embd % cfg.n_head == 0
        assert cfg.n_head % cfg.kv_heads == 0
        self.n_head, self.n_kv, self.hd, self.dropout = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)

    def forward(self, x, attn_mask=None, cache: KVCache = None, layer: int = 0, write_at=None, rope=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=2)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v = (t.view(B, T, self.n_kv, self.hd).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin), see rope_angles
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, write_at)  # (B, n_kv, max_len, hd): the cache holds n_kv heads only
            q = q.to(k.dtype)
        gqa = {}
        if self.n_kv != self.n_head:  # grouped-query attention: query heads i*g .. i*g+g-1 share key/value head i
            if SDPA_GQA:  # SDPA reads the shared heads itself: no repeated copy of the whole cache per token
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(self.n_head // self.n_kv, 1) for t in (k, v))
        # attn_mask: (B, 1, T, S) bool, True = may attend; None = plain causal (no padding, no cache).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0, **gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.mlp_size, bias=cfg.bias)  # SwiGLU: gate, up
        self.c_proj = nn.Linear(cfg.mlp_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:  # Shazeer 2020, "GLU variants improve Transformer"
            gate, up = self.c_fc(x).chunk(2, -1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None, layer=0, write_at=None, rope=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, write_at, rope)
        return x + self.mlp(self.ln_2(x))


def positions_and_mask(attention_mask, past: int, T: int, S: int = None):
    """Position ids and the SDPA mask for T new tokens after `past` cached ones. attention_mask (B, past + T), 1 = real:
    positions count real tokens only; each query also sees itself (rows of pure padding stay finite). S (default past
    + T) = key columns; keys past past + T are hidden. Returns pos (B, T), mask (B, 1, T, S) bool."""
    S = past + T if S is None else S
    keys = attention_mask.bool()
    if S > past + T:
        keys = torch.cat([keys, keys.new_zeros(keys.size(0), S - past - T)], 1)  # (B, S)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    q_idx = torch.arange(past, past + T, device=attention_mask.device)[:, None]
    k_idx = torch.arange(S, device=attention_mask.device)[None, :]
    mask = (k_idx <= q_idx)[None] & keys[:, None, :]
    mask = mask | (k_idx == q_idx)[None]
    return pos, mask[:, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **({"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)} if cfg.pos == "learned" else {}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg, cfg.n_embd),
        ))
        if cfg.pos == "rope":  # not a weight (persistent=False): recomputed from the config
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B, as in nanoGPT's MFU estimate."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * seq_len

    def hidden_states(self, idx, attention_mask=None, cache: KVCache = None):
        """idx (B, T) -> final hidden states (B, T, n_embd). attention_mask (B, past + T) is needed for padded batches
        and with a cache (covering the cached tokens, after which the T tokens go); without either the batch must be
        unpadded or right-padded. A padded batch may be wider than block_size if every row's real tokens fit."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None and cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the model's block_size {self.config.block_size}")
            pos, mask = torch.arange(T, device=idx.device)[None], None
            return self.trunk(idx, pos, mask)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        pos, mask = positions_and_mask(attention_mask, past, T, cache.max_len if cache is not None else None)
        # Only then can a position be too large (one host sync, rare). Not while compiling: that sync would break the
        # graph; the compiled scoring passes check on the host first (scoring.concat).
        if past + T > self.config.block_size and not torch.compiler.is_compiling():
            longest = int(attention_mask.long().sum(1).max())
            if longest > self.config.block_size:
                raise ValueError(f"sequence of {longest} tokens exceeds the model's block_size "
                                 f"{self.config.block_size}")
        write_at = torch.arange(past, past + T, device=idx.device) if cache is not None else None
        h = self.trunk(idx, pos, mask, cache, write_at)
        if cache is not None:
            cache.length += T
        return h

    def trunk(self, idx, pos, mask, cache: KVCache = None, write_at=None):
        """The transformer on explicit inputs, with no checks and no host syncs (the fixed-shape decode step calls
        this directly): idx, pos (B, T) long; mask (B, 1, T, S) bool or None (plain causal); with a cache, the
        new k/v go to columns write_at (T,) long and S = cache.max_len. Returns hidden states (B, T, n_embd)."""
        if self.config.pos == "rope":
            x, rope = self.transformer.drop(self.transformer.wte(idx)), rope_angles(self.inv_freq, pos)
        else:
            x, rope = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos)), None
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, write_at, rope)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """lm_head in float32 whatever the autocast: (..., n_embd) -> (..., vocab_size) float32. Under bf16 autocast
        a bf16 lm_head rounds logits of size ~15 to steps of 0.06, about 0.016 nats per token on average, the size
        of a PPO ratio signal; .float() afterwards cannot bring it back."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.lm_head.weight.float())

    def forward(self, idx, attention_mask=None, cache: KVCache = None, hidden: bool = False):
        """Logits (B, T, vocab_size) float32; hidden=True returns the hidden states (B, T, n_embd) instead (the
        chunked log-prob path of scoring.py applies lm_head itself, a few rows at a time)."""
        h = self.hidden_states(idx, attention_mask, cache)
        return h if hidden else self.logits(h)


class ScalarModel(nn.Module):
    """A GPT trunk with a linear head giving one scalar per position: the reward model and the value model.

    The head is initialised N(0, 1/sqrt(n_embd + 1)) as in OpenAI's lm-human-preferences. `gain` and `bias` are
    set after reward-model training so that rewards of the SFT policy's samples have mean 0 and std 1.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gpt = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    @property
    def config(self):
        return self.gpt.config

    def forward(self, idx, attention_mask=None):
        """Scalars at every position, (B, T), in float32."""
        h = self.gpt.hidden_states(idx, attention_mask)
        with torch.autocast(h.device.type, enabled=False):  # the head in float32, like GPT.logits
            r = F.linear(h.float(), self.head.weight.float(), self.head.bias.float()).squeeze(-1)
        return r * self.gain + self.bias


def compile_model(model, enabled: bool = True):
    """torch.compile (the model itself when not enabled), with the backward in the forward's own dtypes, as eager: by
    default a compiled backward re-applies the forward's autocast, so the float32 lm_head's weight gradient came out
    of a bf16 matmul (2.7e-3 relative error against eager's 9e-8; tests/test_gpu_paths.py)."""
    if not enabled:
        return model
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "backward_pass_autocast"):
        functorch_config.backward_pass_autocast = "off"  # (process-wide: every compiled model alike)
    return torch.compile(model)
