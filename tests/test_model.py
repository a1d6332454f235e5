"""The transformer, the KV cache, padding, and sampling log-probs (all fp32 on CPU)."""
import pytest
import torch

from minirlhf.generation import generate
from minirlhf.model import GPT, GPTConfig, KVCache, ScalarModel
from minirlhf.scoring import filter_logits, response_logprobs

PAD, BOS, EOS = 0, 1, 2


def tiny_gpt(seed=0, vocab=32, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so attention is far from uniform and bugs show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def test_causality():
    model = tiny_gpt()
    idx = torch.randint(3, 32, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1 - 3) % 29 + 3
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)  # the change is visible from position 7 on


def test_kv_cache_matches_full_recompute():
    model = tiny_gpt()
    idx = torch.randint(3, 32, (3, 14))
    full = model(idx)
    cache = KVCache(model.config.n_layer, 14)
    steps = [model(idx[:, :6], cache=cache)]  # prefill 6 tokens, then one token at a time
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(6, 14)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def greedy_by_recompute(model, prompt, n):
    seq = prompt.clone()
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.size(1):]


def test_greedy_generation_with_cache_equals_recompute():
    model = tiny_gpt(vocab=40)
    prompt = torch.randint(3, 40, (4, 5))
    resp, mask, _ = generate(model, prompt, torch.ones_like(prompt), 10, eos_id=-1, pad_id=PAD, temperature=0)
    assert mask.all()
    assert torch.equal(resp, greedy_by_recompute(model, prompt, 10))


def test_left_padding_gives_the_same_logprobs():
    model = tiny_gpt()
    prompt, resp = torch.randint(3, 32, (1, 5)), torch.randint(3, 32, (1, 7))
    ones = torch.ones_like
    ref = response_logprobs(model, prompt, ones(prompt), resp, ones(resp))
    padded_prompt = torch.cat([torch.full((1, 4), PAD), prompt], 1)
    padded_mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), ones(prompt)], 1)
    got = response_logprobs(model, padded_prompt, padded_mask, resp, ones(resp))
    assert torch.allclose(ref, got, atol=1e-5)
    # without the mask (PAD attended, positions shifted) the numbers differ: the mask is what makes this work
    wrong = response_logprobs(model, padded_prompt, torch.ones_like(padded_mask), resp, ones(resp))
    assert not torch.allclose(ref, wrong, atol=1e-3)


def test_ragged_batch_matches_rows_alone():
    model = tiny_gpt()
    rows = [torch.randint(3, 32, (n,)) for n in (3, 8, 5)]
    P = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((P - len(r),), PAD), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(P - len(r)), torch.ones(len(r))]) for r in rows]).long()
    batched = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(r[None])
        assert torch.allclose(batched[i, P - len(r):], alone[0], atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8)])
def test_sampling_logprobs_equal_a_fresh_forward_pass(temperature, top_k, top_p):
    model = tiny_gpt(vocab=8)  # small vocab: EOS (id 2) comes up often, so rows stop at different steps
    lens = [2, 5, 3, 4]
    prompts = [torch.randint(3, 8, (n,)) for n in lens]
    P = max(lens)
    p_ids = torch.stack([torch.cat([torch.full((P - n,), PAD), p]) for n, p in zip(lens, prompts)])
    p_mask = (torch.arange(P)[None] >= (P - torch.tensor(lens))[:, None]).long()
    gen = torch.Generator().manual_seed(0)
    resp, r_mask, logp = generate(model, p_ids, p_mask, 12, EOS, PAD, temperature, top_k, top_p, generator=gen)
    fresh = response_logprobs(model, p_ids, p_mask, resp, r_mask, temperature, top_k, top_p)
    assert torch.allclose(logp, fresh, atol=1e-5)
    assert torch.isfinite(logp).all()
    for row, m in zip(resp, r_mask):  # after EOS: PAD with mask 0, and the EOS itself is kept (mask 1)
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert (row[n:] == PAD).all()
        if n < len(row):
            assert row[n - 1] == EOS


def test_top_k_top_p_filtering_against_naive():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.1, -1.0]])
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert kept_k == [True, True, False, False, False]
    probs = logits.softmax(-1)[0].tolist()  # naive nucleus: smallest prefix (by prob) whose mass reaches top_p
    for top_p in (0.3, 0.6, 0.8, 0.95):
        mass, naive = 0.0, []
        for p in probs:
            naive.append(mass < top_p)
            mass += p
        assert torch.isfinite(filter_logits(logits, top_p=top_p))[0].tolist() == naive


def test_tied_embeddings_stable_parameter_names_and_scalar_trunk():
    """The lm_head is the token embedding (tied), the state_dict keys are the ones checkpoints are saved under
    (GPT-2's naming scheme, kept stable so old model.pt files load; this is not a GPT-2 weight-loading test), and
    a ScalarModel's trunk takes a policy's state_dict as is (the RM starts from the SFT weights)."""
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = {n for n, _ in model.named_parameters()}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
            "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight"} <= names
    rm = ScalarModel(model.config)
    rm.gpt.load_state_dict(model.state_dict())
    assert rm(torch.randint(3, 32, (2, 6))).shape == (2, 6)


def test_too_long_sequence_is_a_clear_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
