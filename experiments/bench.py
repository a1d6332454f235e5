"""Time the pipeline's hot loops on one device with random weights and random tokens (no download, no data).

    python experiments/bench.py   # CPU: the tiny default model (4 x 128, vocab 512, block 64), ~1 minute
    python experiments/bench.py --device cuda   # GPU: GPT-2-small shapes (12 x 768, vocab 50304, block 1024), bf16
    python experiments/bench.py --device cuda --compile --peak-tflops 989

Measures (a) one SFT training step (tokens/s, MFU against the card's dense bf16 peak: minirlhf/harness/perf.py), (b) batched
sampling with the static KV cache (new tokens/s at two batch sizes, eager and --compile'd decode step; EOS is never
sampled, so every row runs the whole budget), (c) one PPO iteration split into rollout / scoring / update seconds
(policy + frozen reference + value model + reward model, built here from the library's pieces: generation.generate,
scoring.response_logprobs/response_values/reward_at_eos, losses.kl_shaped_rewards/gae_advantages/ppo_policy_loss/
ppo_value_loss), (d) DPO pairs/s (policy forward + backward on chosen and rejected through the chunked log-prob
path) and (e) peak GPU memory of each (CUDA only). Prints one table and writes bench.json.
Each measurement runs warm-up iterations first and synchronises the device around the timed region.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: minirlhf and the stage scripts

import torch
import torch.nn.functional as F

from minirlhf.generation import generate
from minirlhf.losses import (gae_advantages, kl_shaped_rewards, masked_mean, masked_whiten, ppo_policy_loss,
                             ppo_value_loss, preference_loss)
from minirlhf.model import GPT, GPTConfig, ScalarModel, compile_model
from minirlhf.harness.perf import device_peak_flops, mfu
from minirlhf.scoring import response_logprobs, response_values, reward_at_eos, token_logprobs
from minirlhf.utils import UserError, adamw, autocast
from minirlhf.harness.cli import RunArgs, arg, parse_args, resolve_device, resolve_dtype, run, set_head_precision
from train_sft import sft_loss

# shapes per device kind: (GPT-2 small on CUDA, the pipeline's tiny CPU model scaled to finish in ~1 minute)
SHAPES = {
    "cuda": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, sft_batch=16, sft_seq=1024,
                 sample_batches=[64, 256], prompt_len=64, new_tokens=128, ppo_prompts=64, dpo_pairs=32, dpo_seq=256,
                 iters=10),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=64, sft_batch=64, sft_seq=64,
                sample_batches=[64, 256], prompt_len=16, new_tokens=48, ppo_prompts=64, dpo_pairs=32, dpo_seq=64,
                iters=3),
}


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Benchmark SFT, sampling, a PPO iteration and DPO on random weights and tokens; writes bench.json."""
    compile: bool = arg(False, "torch.compile what the scripts compile; time the compiled decode step beside eager")
    peak_tflops: float = arg(0.0, "dense bf16 peak of the card for MFU (0 = harness/perf.py's table)")
    n_layer: int = arg(0, "transformer blocks (0 = 12 on CUDA, 4 on CPU)")
    n_head: int = arg(0, "attention heads (0 = 12 on CUDA, 4 on CPU)")
    n_embd: int = arg(0, "width (0 = 768 on CUDA, 128 on CPU)")
    vocab_size: int = arg(0, "vocabulary (0 = 50304 on CUDA, 512 on CPU)")
    block_size: int = arg(0, "context (0 = 1024 on CUDA, 64 on CPU)")
    iters: int = arg(0, "timed iterations per measurement (0 = 10 on CUDA, 3 on CPU); one warm-up before")
    epochs: int = arg(4, "PPO passes over the rollout batch")
    minibatches: int = arg(4, "PPO minibatches per pass")
    threads: int = arg(1, "CPU threads for torch (0 = torch's default; docs/performance.md says why 1)")
    out: str = arg("bench.json", "where to write the numbers")


class Timer:
    """Wall-clock seconds of a region, with the device synchronised at both ends; peak CUDA memory inside it."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def timed(fn, iters: int, device: str):
    """Run fn once to warm up (compilation, allocator, CUDA graphs), then `iters` times; mean seconds and peak GB."""
    fn()
    with Timer(device) as t:
        for _ in range(iters):
            fn()
    return t.seconds / iters, t.peak_gb


def random_prompts(B, P, V, device, gen):
    ids = torch.randint(3, V, (B, P), device=device, generator=gen)
    return ids, torch.ones_like(ids)


def main():
    a = parse_args(Args)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    s = dict(SHAPES["cuda" if device.startswith("cuda") else "cpu"])
    for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "iters"):
        if getattr(a, k):
            s[k] = getattr(a, k)
    if s["n_embd"] % s["n_head"]:
        raise UserError(f"--n-embd {s['n_embd']} must be divisible by --n-head {s['n_head']}")
    for key in ("sft_seq", "dpo_seq"):
        s[key] = min(s[key], s["block_size"])
    s["prompt_len"] = min(s["prompt_len"], s["block_size"] // 4)
    s["new_tokens"] = min(s["new_tokens"], s["block_size"] - s["prompt_len"])
    if s["ppo_prompts"] % a.minibatches:
        raise UserError(f"--minibatches {a.minibatches} must divide the {s['ppo_prompts']} PPO prompts")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    cfg = GPTConfig(vocab_size=s["vocab_size"], block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                    n_embd=s["n_embd"])
    V, it = cfg.vocab_size, s["iters"]
    peak = device_peak_flops(peak_tflops=a.peak_tflops) if device.startswith("cuda") or a.peak_tflops else None
    head_precision = set_head_precision(a.head_precision, device, dtype)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device {name} ({dtype}), model {cfg.n_layer} x {cfg.n_embd} (heads {cfg.n_head}), vocab {V}, "
          f"block {cfg.block_size}, compile {a.compile}, float32 heads {head_precision}, {torch.get_num_threads()} CPU "
          f"threads; {it} timed iterations each after one warm-up")
    results, rows = {}, []

    # ---- (a) SFT training step
    policy = GPT(cfg).to(device)
    n_params = policy.num_params()
    opt = adamw(policy, 1e-4, 0.0, device)
    fwd = compile_model(policy, a.compile)
    B, T = s["sft_batch"], s["sft_seq"]
    idx = torch.randint(3, V, (B, T + 1), device=device, generator=gen)
    batch = {"idx": idx[:, :-1], "targets": idx[:, 1:], "loss_mask": torch.ones(B, T, device=device)}

    def sft_step(head_in_autocast: bool):
        with autocast(device, dtype):
            if head_in_autocast:  # nanoGPT's way: lm_head in the autocast dtype (bf16 logits; fine for a CE loss)
                logits = policy.lm_head(fwd(idx[:, :-1], hidden=True))
                loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
            else:  # what train_sft.py does: lm_head in float32, the log-probs a chunk of positions at a time
                loss = sft_loss(fwd, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    results["sft"] = []
    # with fp32 params and no autocast both variants are the same computation: time the second only under bf16
    for head_in_autocast in ([False, True] if dtype == "bfloat16" else [False]):
        sec, mem = timed(lambda: sft_step(head_in_autocast), it, device)
        tps = B * T / sec
        util = mfu(policy.flops_per_token(T), tps, peak)
        head = dtype if head_in_autocast else "float32"
        results["sft"].append({"batch": B, "seq": T, "lm_head": head, "step_s": sec, "tokens_per_s": tps,
                               "mfu": util, "peak_gb": mem})
        rows.append((f"SFT step (batch {B} x {T}, {head} lm_head)",
                     f"{tps:,.0f} tok/s" + (f", MFU {util:.1%}" if util else ""), sec, mem))
    del opt

    # ---- (b) sampling: new tokens/s, every row running the whole budget (eos_id -1 never matches)
    P, N = s["prompt_len"], s["new_tokens"]
    results["sampling"] = []
    for Bs in s["sample_batches"]:
        for compiled in ([False, True] if a.compile else [False]):
            ids, mask = random_prompts(Bs, P, V, device, gen)

            def sample():
                with autocast(device, dtype):
                    generate(policy, ids, mask, N, -1, 0, 1.0, generator=gen, compile=compiled)
            sec, mem = timed(sample, it, device)
            results["sampling"].append({"batch": Bs, "prompt": P, "new_tokens": N, "compiled": compiled,
                                        "seconds": sec, "new_tokens_per_s": Bs * N / sec, "peak_gb": mem})
            rows.append((f"sampling {'compiled' if compiled else 'eager'} (batch {Bs}, {P} + {N})",
                         f"{Bs * N / sec:,.0f} new tok/s", sec, mem))

    # ---- (c) one PPO iteration: rollout / scoring / update
    ref = GPT(cfg).to(device).eval()
    ref.load_state_dict(policy.state_dict())
    value_model, reward_model = ScalarModel(cfg).to(device), ScalarModel(cfg).to(device).eval()
    opt = torch.optim.AdamW([{"params": policy.parameters()}, {"params": value_model.parameters()}], lr=1e-6,
                            weight_decay=0.0, eps=1e-5, fused=device.startswith("cuda"))
    # --compile: what train_ppo.py compiles: the update's models and the rollout's scoring passes
    train_policy, train_value, score_policy, score_ref, score_value, score_rm = [
        compile_model(m, a.compile) for m in (policy, value_model, policy, ref, value_model, reward_model)]
    Bp = s["ppo_prompts"]
    p_ids, p_mask = random_prompts(Bp, P, V, device, gen)

    def ppo_iteration():
        t = {}
        with Timer(device) as tm, torch.no_grad(), autocast(device, dtype):
            resp, r_mask, _ = generate(policy, p_ids, p_mask, N, -1, 0, 1.0, generator=gen, compile=a.compile)
        t["rollout_s"] = tm.seconds
        with Timer(device) as tm, torch.no_grad(), autocast(device, dtype):
            mask = r_mask.float()
            old_logp = response_logprobs(score_policy, p_ids, p_mask, resp, r_mask)
            ref_logp = response_logprobs(score_ref, p_ids, p_mask, resp, r_mask)
            old_values = response_values(score_value, p_ids, p_mask, resp, r_mask)
            score = reward_at_eos(score_rm, p_ids, p_mask, resp, r_mask)
            rewards, _, _ = kl_shaped_rewards(score, old_logp, ref_logp, mask, 0.05)
            adv, returns = gae_advantages(rewards, old_values, mask, 1.0, 0.95)
            adv = masked_whiten(adv, mask)
        t["scoring_s"] = tm.seconds
        with Timer(device) as tm:
            mb = Bp // a.minibatches
            stats = []
            for _ in range(a.epochs):
                perm = torch.randperm(Bp, device=device)
                for k in range(a.minibatches):
                    i = perm[k * mb:(k + 1) * mb]
                    with autocast(device, dtype):
                        logp, ent = response_logprobs(train_policy, p_ids[i], p_mask[i], resp[i], r_mask[i],
                                                      with_entropy=True)
                        values = response_values(train_value, p_ids[i], p_mask[i], resp[i], r_mask[i])
                    pg_loss, pg = ppo_policy_loss(logp, old_logp[i], adv[i], mask[i])
                    vf_loss, _ = ppo_value_loss(values, old_values[i], returns[i], mask[i])
                    opt.zero_grad(set_to_none=True)
                    (pg_loss + vf_loss).backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), 1.0)
                    opt.step()
                    stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), pg["approx_kl"],
                                              masked_mean(ent.detach(), mask[i])]))
            torch.stack(stats).mean(0).tolist()  # the one host transfer of the statistics per iteration
        t["update_s"] = tm.seconds
        return t, tm.peak_gb

    ppo_iteration()  # warm-up
    runs = [ppo_iteration() for _ in range(it)]
    ppo = {k: sum(r[0][k] for r in runs) / it for k in ("rollout_s", "scoring_s", "update_s")}
    ppo["total_s"] = sum(ppo.values())
    ppo.update(prompts=Bp, new_tokens=N, epochs=a.epochs, minibatches=a.minibatches,
               peak_gb=max(r[1] for r in runs) if device.startswith("cuda") else None)
    results["ppo_iteration"] = ppo
    rows.append((f"PPO iteration ({Bp} x {N} new, {a.epochs} x {a.minibatches} mb)",
                 f"rollout {ppo['rollout_s']:.2f}s, scoring {ppo['scoring_s']:.2f}s, update {ppo['update_s']:.2f}s",
                 ppo["total_s"], ppo["peak_gb"]))

    # ---- (d) DPO: pairs per second (policy forward + backward on chosen and rejected; reference log-probs cached)
    opt = adamw(policy, 1e-6, 0.0, device)
    Bd, Td = s["dpo_pairs"], s["dpo_seq"]
    seqs = torch.randint(3, V, (2 * Bd, Td + 1), device=device, generator=gen)
    resp_mask = torch.zeros(2 * Bd, Td, device=device)
    resp_mask[:, Td // 4:] = 1  # the first quarter is the prompt
    ref_lp = torch.randn(Bd, 2, device=device)

    def dpo_step(compiled=a.compile):
        with autocast(device, dtype):
            h = (train_policy if compiled else policy)(seqs[:, :-1], hidden=True)
            lp = token_logprobs(h, policy.lm_head.weight, seqs[:, 1:], compile=compiled)
            lp = lp.masked_fill(resp_mask == 0, 0.0).sum(1)
        loss = preference_loss("sigmoid", lp[:Bd], lp[Bd:], ref_lp[:, 0], ref_lp[:, 1], 0.1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # --compile: the eager step too, side by side (alternating, the best of 3 each): a ratio from one run
    for compiled in ([False, True] if a.compile else [False]):
        timed(lambda: dpo_step(compiled), 1, device)  # warm-up (compilation)
    best = {}
    for _ in range(3 if a.compile else 1):
        for compiled in ([False, True] if a.compile else [False]):
            sec, mem = timed(lambda: dpo_step(compiled), it, device)
            best[compiled] = min(best.get(compiled, (sec, mem)), (sec, mem), key=lambda x: x[0])
    for compiled, (sec, mem) in best.items():
        results["dpo" + ("_compiled" if compiled else "")] = {"pairs": Bd, "seq": Td, "step_s": sec,
                                                              "pairs_per_s": Bd / sec, "peak_gb": mem}
        rows.append((f"DPO step {'compiled' if compiled else 'eager'} ({Bd} pairs x {Td})", f"{Bd / sec:,.1f} pairs/s",
                     sec, mem))

    # ---- table and bench.json
    results["config"] = {"device": name, "dtype": dtype, "compile": a.compile, "head_precision": head_precision,
                         "params": n_params,
                         "peak_flops": peak, **asdict(cfg), "iters": it, "torch": torch.__version__,
                         "threads": torch.get_num_threads()}
    w = max(len(r[0]) for r in rows)
    print(f"\n| {'measurement':<{w}} | {'throughput':<58} | seconds | peak GPU GB |")
    print(f"|{'-' * (w + 2)}|{'-' * 60}|---------|-------------|")
    for label, what, sec, mem in rows:
        print(f"| {label:<{w}} | {what:<58} | {sec:7.3f} | {'-' if mem is None else f'{mem:.2f}':>11} |")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"\nwrote {a.out} ({n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    run(main)
