"""Batched sampling with the KV cache: prefill the left-padded prompts once, then one token per step."""
import torch

from .model import KVCache
from .scoring import sampling_logprobs


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator = None):
    """Sample responses to left-padded prompts (B, P).

    temperature 0 = greedy. Each row stops at its EOS; after that it holds PAD with mask 0. The budget is
    max_new_tokens, cut so that prompt + response fit the model's block_size.
    Returns resp_ids (B, N) long, resp_mask (B, N) long (EOS included) and logprobs (B, N) float32: the
    log-probabilities under the distribution actually sampled from (temperature, top-k, top-p applied; 0 on
    padding), so a fresh forward pass with the same settings reproduces them.
    """
    B, P = prompt_ids.shape
    N = min(max_new_tokens, model.config.block_size - P)
    if N < 1:
        raise ValueError(f"prompts of {P} tokens leave no room to generate in block_size {model.config.block_size}")
    was_training = model.training
    model.eval()
    cache = KVCache(model.config.n_layer, P + N)
    attn = torch.zeros(B, P + N, dtype=torch.long, device=prompt_ids.device)
    attn[:, :P] = prompt_mask
    logits = model(prompt_ids, attention_mask=attn[:, :P], cache=cache)[:, -1]  # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs = [], []
    for t in range(N):
        logp = sampling_logprobs(logits, temperature, top_k, top_p)  # (B, V) float32
        if temperature > 0:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(1, tok[:, None]).squeeze(1)
        tok = tok.masked_fill(done, pad_id)
        tokens.append(tok)
        logprobs.append(tok_logp.masked_fill(done, 0.0))
        attn[:, P + t] = (~done).long()
        done = done | (tok == eos_id)
        if t == N - 1 or bool(done.all()):
            break
        logits = model(tok[:, None], attention_mask=attn[:, :P + t + 1], cache=cache)[:, -1]
    model.train(was_training)
    n = len(tokens)
    return torch.stack(tokens, 1), attn[:, P:P + n].clone(), torch.stack(logprobs, 1)
