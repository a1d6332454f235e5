"""Batched sampling with a static KV cache: prefill the left-padded prompts once, then one token per step.

The prompts fill columns 0..P-1 of a cache of P + N columns (N = the largest row budget); response token t goes to
column P + t. Every decode step (sample token t, update the bookkeeping, run token t through the model) has the
same shapes, and the loop asks the device "are all rows done?" only every CHECK_EVERY steps, so nothing stops it
between tokens. That makes the step capturable: generate(..., compile=True) runs it through torch.compile (CUDA
graphs via mode="reduce-overhead" on CUDA); the eager step is the default and the reference.
"""
import functools
import weakref

import torch

from minirlhf.model import KVCache
from minirlhf.scoring import banned_mask, sampling_logprobs
from minirlhf.utils import UserError, evaluating

CHECK_EVERY = 8  # decode steps between host syncs asking whether every row has finished
# Compiled steps specialise on their shapes (dynamic=False): one graph (and on CUDA one recorded graph) per model,
# batch size and cache length. The cache length is rounded up to a power of two (at least CACHE_MIN columns), so a
# block of 1,024 gives at most 7 lengths, and the graphs of all models together may number MAX_DECODE_GRAPHS: past
# that torch.compile would silently run the step eagerly; here it is a one-line error instead.
CACHE_MIN = 32
MAX_DECODE_GRAPHS = 64


def cache_columns(n: int) -> int:
    """The compiled cache length for n columns: the next power of two, at least CACHE_MIN."""
    return max(CACHE_MIN, 1 << (n - 1).bit_length())


def next_token(logits, noise, temperature: float, top_k: int, top_p: float, ban):
    """The next token of each row and its log-prob, both (B,), under sampling_logprobs(logits, ...). noise (B, V) ~
    Exp(1), or None for greedy: argmax_i p_i / q_i picks i with probability p_i (q_i / p_i ~ Exp(p_i), and the smallest
    of independent exponentials is i's with probability p_i / sum p). torch.multinomial(p, 1) computes exactly this,
    drawing q from its generator the same way, so a seed gives the same tokens; written out, it makes none of
    multinomial's host syncs and runs inside the compiled step."""
    logp = sampling_logprobs(logits, temperature, top_k, top_p, ban)  # (B, V) float32
    tok = logp.argmax(-1) if noise is None else (logp.exp() / noise).argmax(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def decode_step(model, logits, noise, done, key_mask, t, col, budget, prompt_len, cache: KVCache,
                eos_id: int, pad_id: int, temperature: float, top_k: int, top_p: float, ban):
    """Response token t of every row from `logits`, then its forward pass. logits (B, V) float32; noise (B, V) or
    None (greedy); done (B,) bool = rows that have finished; key_mask (B, L) bool = cache columns holding real
    tokens; t, col (1,) long = the token's index and its cache column; budget, prompt_len (B,) long.
    Returns the token (B,) (PAD on finished rows), its log-prob (B,) (0 there), alive (B,) bool (the row was still
    generating), the new done and key_mask, and the next-token logits (B, V). Fixed shapes, no host syncs: this
    is what gets compiled, sampling and bookkeeping included."""
    tok, logp = next_token(logits, noise, temperature, top_k, top_p, ban)
    alive = ~done
    tok, logp = tok.masked_fill(done, pad_id), logp.masked_fill(done, 0.0)
    done = done | (tok == eos_id) | (t + 1 >= budget)  # EOS, or this row's budget is spent
    # feed token t at column col, position prompt_len + t (finished rows: PAD, garbage outputs, never used)
    key_mask = key_mask.index_copy(1, col, alive[:, None])
    pos = (prompt_len + t).clamp(max=model.config.block_size - 1)[:, None]  # (B, 1)
    mask = key_mask[:, None, None, :]  # (B, 1, 1, L): causal by construction (later columns are not set yet)
    h = model.trunk(tok[:, None], pos, mask, cache, col)  # (B, 1, C)
    return tok, logp, alive, done, key_mask, model.logits(h[:, -1])


_compiled = weakref.WeakKeyDictionary()  # model -> its compiled decode_step (one per model; shapes specialise)
_static_caches = weakref.WeakKeyDictionary()  # model -> {(B, L, dtype): KVCache} reused by compiled calls


def compiled_decode_step(model):
    """decode_step compiled for `model`, made once per model and reused. On CUDA mode="reduce-overhead" records
    CUDA graphs (one per batch size / cache length); the cache buffers are marked static in generate()."""
    step = _compiled.get(model)
    if step is None:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        compiled = torch.compile(decode_step, mode=mode, dynamic=False)
        ref = weakref.ref(model)  # no strong reference from the cache value back to its key

        def step(*args, **kwargs):
            # the limit is torch.compile's per function, so the decode steps of every model share it
            with torch._dynamo.config.patch(recompile_limit=MAX_DECODE_GRAPHS, fail_on_recompile_limit_hit=True):
                try:
                    out = compiled(ref(), *args, **kwargs)
                except torch._dynamo.exc.FailOnRecompileLimitHit:
                    raise UserError(f"--compile: the decode step has been compiled for {MAX_DECODE_GRAPHS} shapes "
                                    f"(models x batch sizes x cache lengths x sampling settings) in this process, "
                                    f"the most it keeps; use fewer distinct batch sizes, or run without --compile"
                                    ) from None
            # a CUDA-graph output is overwritten by the next replay, and done / key_mask / logits feed that replay
            return [x.clone() for x in out] if out[0].is_cuda else out
        _compiled[model] = step
    return step


def reused_cache(model, B: int, L: int, dtype) -> KVCache:
    """A KVCache for the compiled step whose buffers stay at the same addresses from call to call (CUDA graphs
    replay fixed addresses; new buffers each call would mean re-recording). Stale columns from an earlier call
    are never read: the attention mask only opens columns this call has written."""
    pool = _static_caches.setdefault(model, {})
    cache = pool.get((B, L, dtype))
    if cache is None:
        cfg = model.config
        cache = KVCache(cfg.n_layer, L)
        device = next(model.parameters()).device
        cache.allocate(B, cfg.kv_heads, cfg.head_size, dtype, device)
        if device.type == "cuda":
            for buf in cache.k + cache.v:
                torch._dynamo.mark_static_address(buf)
        pool[(B, L, dtype)] = cache
    return cache


@evaluating
def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator = None,
             banned=None, compile: bool = False):
    """Sample responses to left-padded prompts (B, P); temperature 0 = greedy. Each row stops at its EOS (then PAD,
    mask 0) and has its own budget, min(max_new_tokens, block_size - its prompt length), so whether a row is cut off
    never depends on the other prompts. banned: ids or a (V,) bool mask never sampled (Tokenizer.unsampleable_ids).
    compile: the one-token step through torch.compile (same tokens and log-probs as the eager default).
    Returns resp_ids (B, N) long, resp_mask (B, N) long (EOS included) and logprobs (B, N) float32 under the
    distribution actually sampled from (0 on padding), so a fresh forward with the same settings reproduces them."""
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_len = prompt_mask.sum(1)  # (B,)
    budget = (model.config.block_size - prompt_len).clamp(max=max_new_tokens)  # (B,) per-row budget
    N, shortest = (int(x) for x in torch.stack([budget.max(), budget.min()]).tolist())  # one sync, before the loop
    if shortest < 1:
        raise ValueError(f"a prompt of {model.config.block_size - shortest} tokens leaves no room to generate in "
                         f"block_size {model.config.block_size}")
    ban = banned_mask(banned, model.config.vocab_size, dev)
    L = P + N  # cache columns: prompt | response
    if compile:  # round up, so batches of other prompt widths reuse one compiled shape (extra columns stay masked)
        L = cache_columns(L)
        autocast_on = torch.is_autocast_enabled(dev.type)
        kv_dtype = torch.get_autocast_dtype(dev.type) if autocast_on else next(model.parameters()).dtype
        cache = reused_cache(model, B, L, kv_dtype)
    else:
        cache = KVCache(model.config.n_layer, L)  # buffers allocated by the first write, in the attention's dtype
    key_mask = torch.zeros(B, L, dtype=torch.bool, device=dev)  # (B, L) columns holding real tokens
    key_mask[:, :P] = prompt_mask.bool()

    # ---- prefill: the whole prompt at once; lm_head only at the last column (the only logits used)
    pos = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, P) positions count real tokens only
    cols = torch.arange(L, device=dev)
    causal = cols[None, :] <= cols[:P, None]  # (P, L)
    mask = (causal[None] & key_mask[:, None, :]) | (cols[None, None, :] == cols[:P, None])  # (B, P, L)
    h = model.trunk(prompt_ids, pos, mask[:, None], cache, cols[:P])  # (B, P, C)
    logits = model.logits(h[:, -1])  # (B, V) float32

    step = compiled_decode_step(model) if compile else functools.partial(decode_step, model)
    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=dev)
    resp_mask = torch.zeros(B, N, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, N, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = torch.arange(N, device=dev)
    for t in range(N):
        # the sampling noise is drawn outside the step: a compiled graph cannot advance a torch.Generator
        noise = torch.empty_like(logits).exponential_(generator=generator) if temperature > 0 else None
        tok, logp, alive, done, key_mask, logits = step(
            logits, noise, done, key_mask, steps[t:t + 1], cols[P + t:P + t + 1], budget, prompt_len, cache,
            eos_id, pad_id, temperature, top_k, top_p, ban)
        tokens[:, t], logprobs[:, t], resp_mask[:, t] = tok, logp, alive
        if (t + 1) % CHECK_EVERY == 0 and bool(done.all()):
            break
    n = int(resp_mask.sum(1).max())  # trailing columns no row used (steps after all rows finished)
    return tokens[:, :n], resp_mask[:, :n], logprobs[:, :n]
