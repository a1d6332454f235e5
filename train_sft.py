"""Stage 1 of RLHF: supervised fine-tuning on demonstrations, loss on completion tokens (and EOS) only.

    python train_sft.py                          # built-in simulated-human task, CPU-sized defaults
    python train_sft.py --data my.jsonl          # your {"prompt", "completion"} or {"text"} records
    python train_sft.py --device cuda --n-layer 12 --n-embd 768 --batch-size 128   # same script, bigger
    torchrun --standalone --nproc_per_node 2 train_sft.py ...   # data parallel: each rank a shard of the batch
"""
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from minirlhf.data import collate_sft, encode_sft, load_sft_jsonl
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import load_run, load_state, save_run
from minirlhf.harness.cli import (FRACTION, NON_NEGATIVE, POSITIVE, MetricsLog, Progress, arg, check_flags, parse_args,
                                  resolve_device, resolve_dtype, run, set_seed)
from minirlhf.harness.files import write_json
from minirlhf.harness.perf import device_peak_flops, mfu
from minirlhf.harness.runs import FiniteCheck, Run, rng_state, set_rng_state
from minirlhf.interop.hf import load_hf_dir, resolve_source
from minirlhf.model import GPT, GPTConfig
from minirlhf.sampling import sample_policy
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError, adamw, autocast, check, cosine_lr


@dataclass
class Args:
    """Supervised fine-tuning (stage 1 of RLHF)."""
    out_dir: str = arg("out/sft", "run directory to write")
    task: str = arg("reviews", "built-in task (minirlhf/tasks/<task>.py) for data, prompts and evaluation")
    data: Optional[str] = arg(None, "JSONL of {prompt, completion} or {text} records instead of the built-in task")
    init: Optional[str] = arg(None, "start from this earlier run directory (its tokenizer and model config)")
    init_from: Optional[str] = arg(None, "start from a pretrained Hugging Face GPT-2: a directory (config.json, "
                                         "model.safetensors, tokenizer.json) or a Hub id like gpt2 (needs network); "
                                         "its tokenizer and model config; --block-size must not exceed its n_positions")
    tokenizer: Optional[str] = arg(None, "use this tokenizer.json instead of training one")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = arg("auto", "float32 or bfloat16 autocast; auto = bfloat16 on CUDA, float32 on CPU")
    seed: int = arg(0, "random seed")
    compile: bool = arg(False, "torch.compile the model")
    peak_tflops: float = arg(0.0, "the card's dense bf16 peak for the MFU in metrics.jsonl (0 = look the CUDA device "
                                  "up in minirlhf.perf's table; no MFU for an unknown card)")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(100, "steps between resume checkpoints in <out-dir>.partial (0 = none)")
    # model (ignored with --init; with --init-from only --block-size and --dropout apply)
    vocab_size: int = arg(512, "BPE vocabulary size to train (the model rounds it up to a multiple of 64)")
    block_size: int = arg(64, "context length in tokens (prompt + response)")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(128, "embedding width")
    dropout: float = arg(0.0, "dropout during SFT (later stages always turn it off)")
    # data
    n_train: int = arg(20000, "built-in task: demonstrations generated for training")
    n_val: int = arg(1000, "held-out examples (test prompts on the built-in task; a share of --data otherwise)")
    # optimisation
    steps: int = arg(700, "optimizer steps")
    batch_size: int = arg(64, "sequences per step")
    lr: float = arg(2e-3, "peak learning rate")
    min_lr: float = arg(1e-4, "final learning rate of the cosine schedule")
    warmup_steps: int = arg(50, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)")
    log_interval: int = arg(25, "steps between metrics.jsonl lines")
    eval_interval: int = arg(200, "steps between held-out loss evaluations")
    # end-of-run samples
    n_samples: int = arg(256, "test prompts sampled at the end for eos_rate / grammatical_rate")
    max_new_tokens: int = arg(48, "response budget when sampling")
    temperature: float = arg(1.0, "sampling temperature for the end-of-run samples")


def sft_loss(model, batch, count=None):
    """Mean cross-entropy over completion tokens + EOS (loss_mask); prompt and padding do not count.
    count: the divisor, by default this batch's number of loss tokens. Under torchrun each rank passes
    (global loss tokens) / world size: DDP averages the ranks' gradients, so the mean over ranks of
    sum_r / (global / world) is sum / global, the per-token mean of the whole global batch, also when the
    ranks' shards hold different numbers of tokens (a per-rank mean would weight their tokens unequally)."""
    logits = model(batch["idx"])  # right-padded: plain causal attention, PAD only ever follows real tokens
    nll = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none")
    return (nll * batch["loss_mask"].flatten()).sum() / (batch["loss_mask"].sum() if count is None else count)


def validate(a: Args):
    """Every flag's range, before any work (one line naming the flag, exit 2)."""
    check_flags(a, {"vocab_size": (lambda v: v >= 259, ">= 259 (256 byte tokens + PAD, BOS, EOS)"),
                    "block_size": (lambda v: v >= 2, ">= 2"), "n_layer": POSITIVE, "n_head": POSITIVE,
                    "n_embd": POSITIVE, "dropout": FRACTION, "n_train": POSITIVE, "n_val": POSITIVE,
                    "steps": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE, "min_lr": NON_NEGATIVE,
                    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
                    "log_interval": POSITIVE, "eval_interval": POSITIVE, "n_samples": POSITIVE,
                    "max_new_tokens": POSITIVE, "temperature": NON_NEGATIVE})
    check(a.n_embd % a.n_head == 0, f"--n-embd {a.n_embd} must be divisible by --n-head {a.n_head}")
    check(not (a.init and a.tokenizer), "--tokenizer cannot be combined with --init (the run given to --init "
                                        "brings its own tokenizer, which its weights were trained with)")
    check(not (a.init_from and (a.init or a.tokenizer)),
          "--init-from: the model brings its own tokenizer and weights; drop --init / --tokenizer")


def main(argv=None):
    a = parse_args(Args, argv)
    validate(a)
    device = dist.setup(resolve_device(a.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(a.dtype, device)
    check(a.batch_size >= dist.world_size(), f"--batch-size {a.batch_size}: must be >= the number of processes "
                                             f"({dist.world_size()}; it is the global batch, split across them)")
    set_seed(a.seed)
    task = get_task(a.task)
    # before any work: is the output location writable, free and no input of the run?
    run_ = Run(a.out_dir, a, resume=a.resume, inputs={"--data": a.data, "--init": a.init,
                                                       "--init-from": a.init_from, "--tokenizer": a.tokenizer})
    state = run_.load_resume()

    # ---- data: demonstrations as (prompt, completion) records
    if a.data:
        records = load_sft_jsonl(a.data)
        random.Random(a.seed).shuffle(records)
        n_val = min(a.n_val, max(1, len(records) // 20))
        train_recs, val_recs = records[n_val:], records[:n_val]
        if not train_recs:
            raise UserError(f"--data {a.data}: needs at least 2 records (one is held out)")
    else:
        train_recs = task.sft_examples("train", a.n_train, seed=a.seed)
        val_recs = task.sft_examples("test", a.n_val, seed=a.seed)

    # ---- tokenizer and model
    if a.init_from:  # pretrained GPT-2: <|endoftext|> is BOS and EOS, a PAD is added (see minirlhf/hf.py)
        weights, cfg, tok, _ = load_hf_dir(resolve_source(a.init_from, "--init-from"), "--init-from", "policy",
                                           block_size=a.block_size, dropout=a.dropout)
        model = GPT(cfg)
        model.load_state_dict(weights)
    elif a.init:
        # Build the model with the requested dropout (load_run returns the config with dropout 0, the setting of
        # every later stage); setting config.dropout afterwards would not reach the nn.Dropout modules.
        weights, cfg, tok, _ = load_run(a.init, "--init", kind="policy")
        cfg = dataclasses.replace(cfg, dropout=a.dropout)
        model = load_state(GPT(cfg), weights, f"--init {a.init}")
    else:
        if state is not None:  # the resumed run's own tokenizer (its training data were encoded with it)
            try:
                tok = Tokenizer.load(run_.path("tokenizer.json"))
            except ValueError as e:
                raise UserError(f"--resume: {e}; run without --resume to start over") from None
        elif a.tokenizer:
            try:
                tok = Tokenizer.load(a.tokenizer)
            except ValueError as e:  # not a file tokenizers can read: one line naming the flag
                raise UserError(f"--tokenizer {e}") from None
        else:
            texts = [r["prompt"] + r["completion"] for r in train_recs] if a.data else task.corpus(5000, a.seed)
            tok = Tokenizer.train(texts, a.vocab_size)
        cfg = GPTConfig(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=a.block_size,
                        n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=a.dropout)
        model = GPT(cfg)
    model.to(device)
    if state is None:
        tok.save(run_.path("tokenizer.json"))
    train_data, n_cut = encode_sft(train_recs, tok, cfg.block_size)
    val_data, _ = encode_sft(val_recs, tok, cfg.block_size)
    if n_cut:
        print(f"warning: {n_cut} completions were longer than the context and were truncated (no EOS)")
    print(f"{len(train_data)} train / {len(val_data)} held-out examples, vocab {tok.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters, device {device} ({dtype})")

    opt = adamw(model, a.lr, a.weight_decay, device)
    train_model = dist.wrap(model, device)  # DDP under torchrun (averages gradients), else the model itself
    train_model = torch.compile(train_model) if a.compile else train_model

    @torch.no_grad()
    def held_out_loss():
        model.eval()
        losses = []
        for i in range(0, len(val_data), 256):
            with autocast(device, dtype):
                losses.append(sft_loss(model, collate_sft(val_data[i:i + 256], tok.pad_id, device)).item())
        model.train()
        return sum(losses) / len(losses)

    # ---- training loop
    out = run_.dir  # everything is written to the staging folder; run_.finish() moves it to --out-dir
    gen = torch.Generator().manual_seed(a.seed)
    t0, tokens_seen, val_loss, start = time.time(), 0, float("nan"), 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], [gen])
        start, tokens_seen, val_loss = state["step"], state["tokens_seen"], state["val_loss"]
        t0 -= state["elapsed_s"]
    log = MetricsLog(out / "metrics.jsonl", keep_rows=state["log_rows"] if state else None)
    finite = FiniteCheck("train_sft.py")
    model.train()
    bar = Progress(range(start, a.steps), desc="sft", total=a.steps)
    for step in bar:
        lr = cosine_lr(step, a.steps, a.lr, a.min_lr, a.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # every rank draws the same global batch (same generator) and trains on its shard of it
        rows = torch.randint(len(train_data), (a.batch_size,), generator=gen)
        batch = collate_sft([train_data[i] for i in dist.shard(rows)], tok.pad_id, device)
        count = n_tokens = None
        if dist.enabled():  # global loss-token and token counts, one all-reduce
            count, n_tokens = dist.all_reduce_sum(torch.stack([batch["loss_mask"].sum(),
                                                               torch.tensor(float(batch["idx"].numel()),
                                                                            device=device)])).unbind()
            count = count / dist.world_size()
        with autocast(device, dtype):
            loss = sft_loss(train_model, batch, count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else 1e9)
        opt.step()
        finite.watch(step, loss=loss, grad_norm=grad_norm)
        tokens_seen += batch["idx"].numel() if n_tokens is None else int(n_tokens)
        last = step == a.steps - 1
        if step % a.eval_interval == 0 or last:
            val_loss = held_out_loss()
        if step % a.log_interval == 0 or last:
            finite.check()  # a NaN stops the run here, naming its step, before anything is logged or saved
            elapsed = time.time() - t0
            loss_global = dist.all_reduce_sum(loss.detach()) / dist.world_size() if dist.enabled() else loss
            row = {"step": step, "loss": loss_global.item(), "val_loss": val_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            peak = device_peak_flops(peak_tflops=a.peak_tflops) if device.startswith("cuda") or a.peak_tflops else None
            if peak:  # model FLOPs utilisation against the detected card's (or --peak-tflops) dense bf16 peak
                row["mfu"] = mfu(model.flops_per_token(batch["idx"].size(1)),  # per device: tokens/s over ranks
                                 row["tokens_per_s"] / dist.world_size(), peak)
            log.write(row)
            bar.log(step, loss=row["loss"], val=val_loss, tok_s=round(row["tokens_per_s"]))
        if a.save_interval and (step + 1) % a.save_interval == 0 and not last:
            run_.save_resume({"step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "rng": rng_state([gen]), "tokens_seen": tokens_seen, "val_loss": val_loss,
                              "log_rows": log.rows, "elapsed_s": time.time() - t0}, finite, [model])
    log.close()
    finite.check(model)
    dist.assert_identical(model)  # under torchrun: every rank ends with the same weights
    save_run(out, model, tok, a, kind="policy", stage="sft")  # rank 0 only
    if not dist.is_main():  # the end-of-run samples and the report are rank 0's
        run_.finish()
        return

    # ---- samples on held-out prompts: do they stop, and does the grammar accept them?
    prompts = [r["prompt"] for r in val_recs][:a.n_samples]
    samples = sample_policy(model, tok, prompts, a.max_new_tokens, a.temperature, seed=a.seed, device=device,
                            dtype=dtype)
    eos_rate = sum(s["eos"] for s in samples) / len(samples)
    metrics = {"train_loss": loss_global.item(), "val_loss": val_loss, "eos_rate": eos_rate, "n_samples": len(samples),
               "train_seconds": time.time() - t0}
    if not a.data:
        gram = [s["eos"] and task.is_grammatical(s["prompt"] + s["response"]) for s in samples]
        gold = [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in samples]
        metrics.update(grammatical_rate=sum(gram) / len(gram), gold_mean=sum(gold) / len(gold))
    write_json(out / "metrics.json", metrics)
    run_.finish()
    out = run_.out
    print("samples (prompt | response):")
    for s in samples[:5]:
        print(f"  {s['prompt']!r} | {s['response']!r}{'' if s['eos'] else '  [no EOS]'}")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"wrote {out}/model.pt, config.json, tokenizer.json, metrics.jsonl, metrics.json")


if __name__ == "__main__":
    run(main)
