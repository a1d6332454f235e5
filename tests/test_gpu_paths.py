"""The GPU-shaped code paths, checked on the CPU (and on a card with MINIRLHF_TEST_DEVICE=cuda): the static-cache
(and compiled) decode step against a naive sampler, sampling as multinomial's exponential race, per-row budgets,
banned ids, chunked float32 log-probs (values and gradients), bf16 agreement between sampling and scoring, compiled
scoring of batches wider than the block in one graph, compiled against eager gradients, length batching, the peak
memory of SFT and DPO steps, the float32 heads' precision, and the MFU peak table."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minirlhf.data import length_batches, padding_share
from minirlhf.sampling import response_logprob_sums, sample_policy
from minirlhf import generation
from minirlhf.generation import generate
from minirlhf.losses import ppo_policy_loss
from minirlhf.model import GPT, GPTConfig
from minirlhf.scoring import RATIO_TOLERANCE, response_logprobs, sampling_logprobs, token_logprobs
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.harness.perf import device_peak_flops
from minirlhf.utils import UserError, autocast

PAD, BOS, EOS = 0, 1, 2
# MINIRLHF_TEST_DEVICE=cuda runs these tests on a card (every tensor and generator made there); without one they skip
DEVICE = os.environ.get("MINIRLHF_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"MINIRLHF_TEST_DEVICE={DEVICE} but no CUDA device", allow_module_level=True)
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="measures or emulates the CPU")


@pytest.fixture(autouse=True)
def on_device():
    with torch.device(DEVICE):  # factory functions (randn, zeros, arange, modules' parameters) make their tensors there
        yield


def gen():
    return torch.Generator(DEVICE)


def tiny_gpt(seed=0, vocab=16, block_size=32, n_layer=2, n_embd=32, scale=0.3):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, position-dependent distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, scale)
    return model


def ragged_prompts(vocab=16):
    lens = [2, 6, 4, 5]
    g = gen().manual_seed(1)
    P = max(lens)
    ids = torch.full((len(lens), P), PAD)
    for i, n in enumerate(lens):
        ids[i, P - n:] = torch.randint(3, vocab, (n,), generator=g)
    return ids, (ids != PAD).long()


@torch.no_grad()
def naive_generate(model, p_ids, p_mask, n_new, eos_id, temperature, top_k, generator):
    """The sampler before the static cache, without any cache: one full forward over [prompt | response so far]
    per token, positions from the attention mask, the whole batch stopping together."""
    B = p_ids.size(0)
    ids, mask = p_ids.clone(), p_mask.clone()
    done = torch.zeros(B, dtype=torch.bool)
    toks, logps = [], []
    for _ in range(n_new):
        logp = sampling_logprobs(model(ids, attention_mask=mask)[:, -1], temperature, top_k)
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1) if temperature > 0 else logp.argmax(-1)
        lp = logp.gather(1, tok[:, None]).squeeze(1)
        tok = tok.masked_fill(done, PAD)
        toks.append(tok)
        logps.append(lp.masked_fill(done, 0.0))
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done = done | (tok == eos_id)
        if done.all():
            break
    P = p_ids.size(1)
    return torch.stack(toks, 1), mask[:, P:], torch.stack(logps, 1)


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_static_cache_matches_the_naive_sampler(temperature, top_k):
    model = tiny_gpt()
    p_ids, p_mask = ragged_prompts()
    ref = naive_generate(model, p_ids, p_mask, 12, EOS, temperature, top_k, gen().manual_seed(0))
    got = generate(model, p_ids, p_mask, 12, EOS, PAD, temperature, top_k, generator=gen().manual_seed(0))
    lengths = ref[1].sum(1)
    if temperature > 0:
        assert (ref[0] == EOS).any() and lengths.min() < lengths.max()  # EOS and ragged rows are exercised
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_layer", [1, 3])  # 3: every layer writes and reads its own cache buffer
def test_compiled_decode_step_gives_the_same_tokens_and_logprobs(n_layer):
    model = tiny_gpt(n_layer=n_layer, n_embd=16)
    p_ids, p_mask = ragged_prompts()
    eager = generate(model, p_ids, p_mask, 12, EOS, PAD, 1.0, generator=gen().manual_seed(3))
    torch._dynamo.utils.counters.clear()
    compiled = generate(model, p_ids, p_mask, 12, EOS, PAD, 1.0, generator=gen().manual_seed(3),
                        compile=True)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert sum(breaks.values()) == 0, breaks  # sampling and bookkeeping run inside the one compiled step
    naive = naive_generate(model, p_ids, p_mask, 12, EOS, 1.0, 0, gen().manual_seed(3))
    assert eager[1].sum(1).min() < eager[1].sum(1).max()  # ragged: some rows stopped at EOS
    for out in (compiled, naive):
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
        torch.testing.assert_close(out[2], eager[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.7, 6, 0.9)])
def test_compiled_decode_agrees_when_greedy_and_when_filtered(temperature, top_k, top_p):
    model = tiny_gpt(n_layer=2, n_embd=16)
    p_ids, p_mask = ragged_prompts()
    runs = [generate(model, p_ids, p_mask, 12, EOS, PAD, temperature, top_k, top_p, banned=[PAD, BOS, 7],
                     generator=gen().manual_seed(5), compile=c) for c in (False, True)]
    assert not (runs[0][0] == 7).any()
    assert torch.equal(runs[1][0], runs[0][0]) and torch.equal(runs[1][1], runs[0][1])
    torch.testing.assert_close(runs[1][2], runs[0][2], atol=1e-5, rtol=0)


def test_sampling_is_multinomials_exponential_race_without_its_host_syncs(monkeypatch):
    """generation.next_token draws what torch.multinomial(p, 1) draws from the same generator (the same tokens,
    the generator left in the same state), and generate reads the device only before the loop, every
    CHECK_EVERY tokens and at the end: never torch.multinomial, which checks the probabilities on the host."""
    from tests.test_runs import count_host_syncs
    g1, g2 = gen().manual_seed(0), gen().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen().manual_seed(1)) * 3
    noise = torch.empty_like(logits).exponential_(generator=g1)
    tok, logp = generation.next_token(logits, noise, 1.0, 0, 1.0, None)
    assert torch.equal(tok, torch.multinomial(logits.softmax(-1), 1, generator=g2).squeeze(1))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1))
    model = tiny_gpt(block_size=64)
    p_ids, p_mask = ragged_prompts()

    def no_multinomial(*a, **k):
        raise AssertionError("torch.multinomial syncs with the host")
    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    calls = count_host_syncs(monkeypatch)
    generate(model, p_ids, p_mask, 24, -1, PAD, 1.0, generator=gen().manual_seed(0))
    assert len(calls) == 1 + 24 // generation.CHECK_EVERY + 1, calls


def test_each_row_has_its_own_budget():
    """A short prompt's row gets min(max_new_tokens, block_size - its own length) tokens whatever its neighbours,
    even when the padded width + budget exceeds block_size (positions come from the mask)."""
    model = tiny_gpt(block_size=16)
    short, long_ = torch.tensor([5, 6, 7]), torch.randint(3, 16, (12,))
    alone = generate(model, short[None], torch.ones(1, 3, dtype=torch.long), 13, -1, PAD, 0.0)
    ids = torch.stack([torch.cat([torch.full((9,), PAD), short]), long_])
    mask = (ids != PAD).long()
    mask[1] = 1
    batched = generate(model, ids, mask, 13, -1, PAD, 0.0)
    assert alone[1].sum() == 13 and batched[1][0].sum() == 13  # 3 + 13 = 16 = block_size for the short row
    assert batched[1][1].sum() == 4  # the long row is cut at its own budget, 16 - 12
    assert torch.equal(batched[0][0], alone[0][0])
    torch.testing.assert_close(batched[2][0], alone[2][0], atol=1e-5, rtol=0)
    # the fresh full forward (width 12 + 13 > block_size) scores the same and a real overflow is still refused
    fresh = response_logprobs(model, ids, mask, batched[0], batched[1])
    torch.testing.assert_close(fresh, batched[2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(3, 16, (1, 17)), attention_mask=torch.ones(1, 17, dtype=torch.long))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(get_task("reviews").corpus(300, seed=0), 300)


def test_unsampleable_ids_are_never_sampled_and_text_matches_tokens(tok):
    V = 64 * math.ceil(tok.vocab_size / 64)
    banned = tok.unsampleable_ids(V)
    assert tok.pad_id in banned and tok.bos_id in banned and tok.eos_id not in banned
    assert set(range(tok.vocab_size, V)) <= set(banned) and len(banned) == 2 + V - tok.vocab_size
    tok.bos_id, bos = tok.eos_id, tok.bos_id  # GPT-2's convention: BOS == EOS is never banned
    try:
        assert tok.eos_id not in tok.unsampleable_ids(V) and tok.pad_id in tok.unsampleable_ids(V)
    finally:
        tok.bos_id = bos
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # make the banned ids the likeliest tokens
        model.transformer.wte.weight[banned] += 3 * model.transformer.wte.weight.std()
    prompts = ["the food was", "the room", "we stayed"] * 4
    p_ids = torch.tensor([[tok.bos_id] + tok.encode("the food was")])
    unbanned, _, _ = generate(model, p_ids, torch.ones_like(p_ids), 20, tok.eos_id, tok.pad_id, 1.0,
                              generator=gen().manual_seed(0))
    assert set(unbanned[0].tolist()) & set(banned)  # without the ban they are sampled: the test can fail
    samples = sample_policy(model, tok, prompts, 20, seed=0, batch_size=5)  # several length-sorted batches
    assert [s["prompt"] for s in samples] == prompts  # back in input order
    for s in samples:
        assert not set(s["tokens"]) & set(banned)
        body = s["tokens"][:-1] if s["eos"] else s["tokens"]
        assert tok.eos_id not in body and tok.decode(body) == s["response"]
        assert all(t < tok.vocab_size for t in body)  # only ids decode() keeps: the text is the tokens
    # scoring uses the same distribution: summed sampling log-probs == a fresh scoring pass
    fresh = response_logprob_sums(model, tok, samples)
    for s, f in zip(samples, fresh):
        assert abs(sum(s["logprobs"]) - f) < 1e-4


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.9)])
def test_chunked_logprobs_equal_full_values_and_gradients(temperature, top_k, top_p):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 8, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(20, 8) * 2).requires_grad_()
    y = torch.randint(0, 18, (3, 7))
    banned = [18, 19]

    def full():
        logp_all = sampling_logprobs(h @ w.T, temperature, top_k, top_p, banned)  # (B, T, V)
        logp = logp_all.gather(-1, y[..., None]).squeeze(-1)
        p = logp_all.exp()
        return logp, -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)

    ref_lp, ref_ent = full()
    weights = torch.randn(3, 7)
    finite = torch.isfinite(ref_lp)
    (ref_lp.masked_fill(~finite, 0) * weights).sum().add(ref_ent.sum()).backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lp, ent = token_logprobs(h, w, y, temperature, top_k, top_p, banned, with_entropy=True, chunk_rows=4)
    assert torch.equal(torch.isfinite(lp), finite)
    torch.testing.assert_close(lp[finite], ref_lp[finite], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)
    (lp.masked_fill(~finite, 0) * weights).sum().add(ent.sum()).backward()
    torch.testing.assert_close(h.grad, ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, atol=1e-5, rtol=1e-5)


def test_chunked_path_never_builds_full_logits(monkeypatch):
    """At most chunk_rows rows of float32 logits exist at once (recorded through F.linear's output)."""
    import minirlhf.scoring as scoring
    seen = []
    real_linear = scoring.F.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(out.shape)
        return out
    monkeypatch.setattr(scoring.F, "linear", spy)
    h, w, y = torch.randn(4, 10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True), torch.randint(30, (4, 10))
    token_logprobs(h, w, y, chunk_rows=16).sum().backward()
    assert seen and max(s[0] for s in seen) == 16 and all(s[-1] == 30 for s in seen)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_sampling_and_scoring_logprobs_agree_within_the_ratio_tolerance(temperature):
    """Under bf16 autocast on the CPU: the KV-cache sampling log-probs, the full-batch scoring pass (PPO's old
    log-probs) and a trimmed, permuted minibatch (PPO's first update) agree within RATIO_TOLERANCE["bfloat16"],
    and the float32 lm_head matters: the same comparison with a bf16 head is measurably worse."""
    model = tiny_gpt(vocab=64, n_layer=2, n_embd=64, scale=0.15)
    p_ids, p_mask = ragged_prompts(64)
    with autocast(DEVICE, "bfloat16"):
        resp, r_mask, sample_lp = generate(model, p_ids, p_mask, 16, EOS, PAD, temperature,
                                           generator=gen().manual_seed(0))
        old = response_logprobs(model, p_ids, p_mask, resp, r_mask, temperature)
        idx = torch.tensor([2, 0, 3])
        R = int(r_mask[idx].sum(1).max())
        new = response_logprobs(model, p_ids[idx], p_mask[idx], resp[idx, :R], r_mask[idx, :R], temperature)
    valid = r_mask.bool()
    assert valid.sum() > 20
    gap_sample = (sample_lp - old)[valid].abs().max().item()
    _, st = ppo_policy_loss(new, old[idx, :R], torch.zeros(3, R), r_mask[idx, :R].float())
    ratio_dev = (st["ratio"][r_mask[idx, :R].bool()] - 1).abs().max().item()
    tol = RATIO_TOLERANCE["bfloat16"]
    assert math.expm1(gap_sample) < tol and ratio_dev < tol, (gap_sample, ratio_dev)
    # the float32 lm_head keeps the typical gap far below a bf16 head's (~3e-3 nats on this model)
    assert (sample_lp - old)[valid].abs().mean().item() < 5e-4
    # float32 reference: the bf16 passes are close to the exact log-probs too
    exact = response_logprobs(model, p_ids, p_mask, resp, r_mask, temperature)
    assert (old - exact)[valid].abs().max().item() < tol


def test_length_batches_cover_every_index_once_and_cut_padding():
    g = gen().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 200, (1000,), generator=g)]
    batches = length_batches(lengths, 32, window=256, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and all(len(b) <= 32 for b in batches)
    assert batches == length_batches(lengths, 32, window=256, seed=1)  # deterministic per seed
    assert batches != length_batches(lengths, 32, window=256, seed=2)  # and the seed shuffles the batches
    plain = [list(range(i, min(i + 32, 1000))) for i in range(0, 1000, 32)]
    assert padding_share(lengths, batches) < 0.5 * padding_share(lengths, plain)
    values = [l * 10 for l in lengths]  # results put back in input order through the indices
    restored = [None] * 1000
    for b in batches:
        for i in b:
            restored[i] = values[i]
    assert restored == values
    assert padding_share([3, 3], [[0, 1]]) == 0.0 and abs(padding_share([1, 3], [[0, 1]]) - 1 / 3) < 1e-12


@cpu_only
def test_peak_flops_table():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert device_peak_flops("NVIDIA L4") == 121e12
    assert device_peak_flops("Some Unknown Card") is None
    assert device_peak_flops("Some Unknown Card", peak_tflops=100) == 100e12


def test_length_batched_passes_return_results_in_input_order():
    """DPO's reference pass and the RM's pair scoring batch by length and put results back in input order: equal
    to scoring each pair alone, and the padding share is reported."""
    import random
    from minirlhf import dpo
    from minirlhf.model import ScalarModel
    from minirlhf.preferences import all_pair_rewards, pair_rewards
    model = tiny_gpt()
    rng = random.Random(0)
    rand = lambda k: [rng.randrange(3, 16) for _ in range(k)]  # noqa: E731
    pairs = [([BOS] + rand(rng.randint(1, 8)), rand(rng.randint(1, 12)) + [EOS], rand(rng.randint(1, 12)) + [EOS])
             for _ in range(23)]
    stats = {}
    logps, lens = dpo.all_pair_logps(model, pairs, PAD, DEVICE, "float32", 4, banned=[PAD, BOS], stats=stats)
    for i in (0, 7, 22):
        alone, n = dpo.pair_logps(model, dpo.pair_batch(pairs[i:i + 1], PAD, DEVICE), DEVICE, "float32",
                                  banned=[PAD, BOS])
        torch.testing.assert_close(logps[i], alone, atol=1e-5, rtol=0)
        assert lens[i].tolist() == n.tolist()
    assert 0 < stats["padding_share"] < 0.5
    torch.manual_seed(0)
    rm = ScalarModel(tiny_gpt().config)
    seq_pairs = [(p + c, p + r) for p, c, r in pairs]
    rc, rr = all_pair_rewards(rm, seq_pairs, PAD, batch_size=5, stats=stats)
    with torch.no_grad():
        ref_c, ref_r = pair_rewards(rm.eval(), seq_pairs, PAD)
    torch.testing.assert_close(rc, ref_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(rr, ref_r, atol=1e-5, rtol=0)


def test_a_batch_wider_than_the_block_scores_in_one_compiled_graph():
    """Rows padded to a width past block_size, each of whose real tokens fits: the compiled scoring forward runs
    as one graph (the length check happens on the host first, not as a sync inside the graph), with the eager
    log-probs; a row that does not fit is refused in one line, compiled or not."""
    model = tiny_gpt(n_layer=1, n_embd=16, block_size=9)
    p_ids, p_mask = ragged_prompts()  # prompt lengths 2, 6, 4, 5 padded to 6
    lens = torch.tensor([5, 3, 4, 4])  # real lengths 7, 9, 8, 9 <= 9, padded width 6 + 5 = 11 > 9
    resp_mask = (torch.arange(5)[None] < lens[:, None]).long()
    resp = torch.randint(3, 16, (4, 5), generator=gen().manual_seed(2)) * resp_mask
    eager = response_logprobs(model, p_ids, p_mask, resp, resp_mask)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = response_logprobs(torch.compile(model), p_ids, p_mask, resp, resp_mask)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert sum(breaks.values()) == 0, breaks
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    too_long = resp_mask.clone()
    too_long[1] = 1  # row 1: 6 + 5 = 11 real tokens
    for m in (model, torch.compile(model)):
        with pytest.raises(ValueError, match="sequence of 11 tokens exceeds the model's block_size 9"):
            response_logprobs(m, p_ids, p_mask, resp, too_long)


def test_compiled_decode_shapes_are_few_and_known_and_too_many_fail_loudly(monkeypatch):
    assert [generation.cache_columns(n) for n in (1, 32, 33, 64, 65, 1000, 1025)] == [32, 32, 64, 64, 128, 1024, 2048]
    model = tiny_gpt(n_layer=1, n_embd=16, block_size=64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for width in (5, 9, 12):  # prompt widths 5 / 9 / 12 + 8 new tokens: all in the 32-column bucket, one graph
        ids = torch.randint(3, 16, (3, width), generator=gen().manual_seed(width))
        generate(model, ids, torch.ones_like(ids), 8, -1, PAD, 1.0, generator=gen().manual_seed(0),
                 compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # more shapes than the step keeps: a one-line error, not a silent fall-back to the eager step
    monkeypatch.setattr(generation, "MAX_DECODE_GRAPHS", 2)
    torch._dynamo.reset()
    for B in (2, 3):
        ids = torch.randint(3, 16, (B, 4), generator=gen().manual_seed(B))
        generate(model, ids, torch.ones_like(ids), 4, -1, PAD, 1.0, compile=True)
    ids = torch.randint(3, 16, (4, 4), generator=gen().manual_seed(4))
    with pytest.raises(UserError, match="the decode step has been compiled for 2 shapes") as e:
        generate(model, ids, torch.ones_like(ids), 4, -1, PAD, 1.0, compile=True)
    assert "\n" not in str(e.value)


def test_compiled_training_gradients_equal_eager_ones_under_bf16_autocast():
    """model.compile_model: the compiled backward runs in the forward's dtypes, so the float32 lm_head's weight
    gradient is float32 as in eager mode (torch.compile's default re-applies autocast: 2.7e-3 relative error)."""
    from minirlhf.model import compile_model
    cfg = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(128, (4, 16), generator=gen().manual_seed(1))

    def grads(compiled):
        torch.manual_seed(0)
        model = GPT(cfg)
        f = compile_model(model) if compiled else model
        with torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16):
            loss = F.cross_entropy(f(idx).float().flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        return {"head": model.lm_head.weight.grad, **{n: p.grad for n, p in model.named_parameters()}}

    eager, compiled = grads(False), grads(True)
    head = eager["head"]  # (tied to the embedding: its gradient also holds the embedding's, a float32 lookup)
    assert ((compiled["head"] - head).norm() / head.norm()).item() < 1e-5
    for name, g in eager.items():  # the bf16 trunk: the same rounding as eager, not exactly the same sums
        assert ((compiled[name] - g).norm() / g.norm().clamp(min=1e-12)).item() < 2e-2, name


def test_the_banned_mask_is_built_once_per_list_and_device():
    """scoring.banned_mask: the same ids give the same (cached) device mask, so scoring a minibatch does not rebuild
    it on the host and copy it over every call; other ids get their own."""
    from minirlhf.scoring import banned_mask
    a, b = banned_mask([0, 1, 5], 16, DEVICE), banned_mask([0, 1, 5], 16, DEVICE)
    assert a is b and a.tolist() == [i in (0, 1, 5) for i in range(16)]
    assert banned_mask([0, 2], 16, DEVICE).tolist() == [i in (0, 2) for i in range(16)]


PEAK_MEMORY = r"""
import gc, sys, torch
sys.path.insert(0, sys.argv[1])
from minirlhf.dpo import pair_batch, pair_logps
from minirlhf.model import GPT, GPTConfig
from train_sft import sft_loss

def status(key):  # kB in /proc/self/status
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

torch.set_num_threads(1)
torch.manual_seed(0)
V, T = 50304, 256
model = GPT(GPTConfig(vocab_size=V, block_size=T + 1, n_layer=1, n_head=2, n_embd=32))
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
if sys.argv[2] == "sft":
    B = 8
    batch = {"idx": torch.randint(3, V, (B, T), generator=g), "targets": torch.randint(3, V, (B, T), generator=g),
             "loss_mask": torch.ones(B, T)}
    step = lambda: sft_loss(model, batch).backward()
else:  # 4 pairs: 8 sequences of T positions
    B = 8
    batch = pair_batch([(ids(16), ids(T + 1 - 16), ids(T + 1 - 16)) for _ in range(B // 2)], 0, "cpu")
    step = lambda: pair_logps(model, batch, "cpu", "float32", banned=[0, 1])[0].sum().backward()
step()  # warm-up: gradients allocated, the allocator's pools grown
model.zero_grad(set_to_none=False)
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM) to the current one
base = status("VmRSS")
step()
print((status("VmHWM") - base) / (B * T * V * 4))
"""


@cpu_only
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("stage,limit", [("sft", 1.3), ("dpo", 1.0)])
def test_sft_and_dpo_steps_never_hold_the_full_logits(stage, limit):
    """Peak memory of one SFT / DPO forward + backward at GPT-2's vocabulary (batch 8 x 256: one (B, T, V)
    float32 tensor is 412 MB), measured as the process's peak resident size over the step: below 1.3x that tensor
    for SFT and below 1x for DPO, since the log-probs come a chunk of positions at a time."""
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, root, stage], capture_output=True, text=True, check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert 0 < ratio < limit, ratio


def tf32(x):
    """x (float32) rounded to TF32's 10 mantissa bits, to nearest even: what the tensor cores read."""
    i = x.view(torch.int32)
    return ((i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


@cpu_only
def test_tf32_heads_move_logprobs_far_less_than_the_first_ratio_tolerance():
    """The measurement behind --head-precision auto = tf32 under bf16 on CUDA: at GPT-2's width (768) with logits
    of std 4, log-probs of sampled tokens against float64: IEEE float32 ~1e-6 nats, TF32 (emulated) ~7e-4, bf16
    inputs ~6e-3, a bf16 head ~2e-2. TF32 stays 50x below the bf16 first-ratio tolerance."""
    assert tf32(torch.tensor([1.0, 1 + 2 ** -11, 1 + 2 ** -10 + 2 ** -11])).tolist() == [1.0, 1.0, 1 + 2 ** -9]
    g = gen().manual_seed(0)
    h, w = torch.randn(64, 768, generator=g), torch.randn(8192, 768, generator=g) * (4 / 768 ** 0.5)
    ref = torch.log_softmax(h.double() @ w.double().T, -1)
    y = torch.multinomial(ref.exp(), 1, generator=g)

    def err(logits):
        return (torch.log_softmax(logits.float(), -1).double().gather(1, y) - ref.gather(1, y)).abs().mean().item()
    ieee, t32 = err(h @ w.T), err(tf32(h) @ tf32(w).T)
    bf16_in, bf16 = err(h.bfloat16().float() @ w.bfloat16().float().T), err(h.bfloat16() @ w.bfloat16().T)
    assert ieee < 1e-5 < t32 < 2e-3 < bf16_in < bf16, (ieee, t32, bf16_in, bf16)
    assert t32 < RATIO_TOLERANCE["bfloat16"] / 50


def test_head_precision_switches_tf32_on_cuda_only(monkeypatch):
    from minirlhf.harness.cli import set_head_precision
    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(matmul, "allow_tf32", False)  # restored afterwards
    assert set_head_precision("auto", "cpu", "float32") == "ieee"
    assert set_head_precision("auto", "cpu", "bfloat16") == "ieee"
    assert not matmul.allow_tf32
    assert set_head_precision("tf32", "cpu", "bfloat16") == "tf32" and not matmul.allow_tf32  # no TF32 on the CPU
    assert set_head_precision("auto", "cuda", "bfloat16") == "tf32" and matmul.allow_tf32
    assert set_head_precision("auto", "cuda:1", "float32") == "ieee" and not matmul.allow_tf32  # exact float32 asked
    assert set_head_precision("tf32", "cuda", "float32") == "tf32" and matmul.allow_tf32
    assert set_head_precision("ieee", "cuda", "bfloat16") == "ieee" and not matmul.allow_tf32
