"""Stage 1 of RLHF: supervised fine-tuning on demonstrations, loss on completion tokens (and EOS) only.

    python train_sft.py                          # built-in simulated-human task, CPU-sized defaults
    python train_sft.py --data my.jsonl          # your {"prompt", "completion"} or {"text"} records
    python train_sft.py --device cuda --n-layer 12 --n-embd 768 --batch-size 128   # same script, bigger
    python train_sft.py --arch llama             # RoPE, RMSNorm, SwiGLU, grouped-query attention (also qwen2, qwen3)
    python train_sft.py --init-from Qwen/Qwen2.5-0.5B   # a pretrained GPT-2, Llama, Qwen2 or Qwen3 (dir or Hub id)
    torchrun --standalone --nproc_per_node 2 train_sft.py ...   # data parallel: each rank a shard of the batch
"""
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.data import collate_sft, encode_sft, load_sft_jsonl
from minirlhf.evaluation.metrics import print_samples
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import load_run, load_state
from minirlhf.harness.cli import RunArgs, arg, parse_args, run
from minirlhf.harness.perf import device_peak_flops, mfu
from minirlhf.harness.stage import Stage
from minirlhf.interop.hf import load_hf_dir, resolve_source
from minirlhf.model import ARCHS, GPT, arch_config, compile_model
from minirlhf.sampling import sample_policy
from minirlhf.scoring import is_compiled, token_logprobs
from minirlhf.tasks import get_task
from minirlhf.tokenizer import Tokenizer
from minirlhf.utils import UserError, adamw, autocast, check, cosine_lr


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Supervised fine-tuning (stage 1 of RLHF)."""
    out_dir: str = arg("out/sft", "run directory to write")
    task: str = arg("reviews", "built-in task (minirlhf/tasks/<task>.py) for data, prompts and evaluation")
    data: Optional[str] = arg(None, "JSONL of {prompt, completion} or {text} records instead of the built-in task")
    init: Optional[str] = arg(None, "start from this earlier run directory (its tokenizer and model config)")
    init_from: Optional[str] = arg(None, "start from a pretrained Hugging Face GPT-2, Llama, Qwen2 or Qwen3: a "
                                   "directory or a Hub id")
    tokenizer: Optional[str] = arg(None, "use this tokenizer.json instead of training one")
    compile: bool = arg(False, "torch.compile the model")
    peak_tflops: float = arg(0.0, "the card's dense bf16 peak for the MFU (0 = look the card up in harness/perf.py)",
                             ">= 0")
    resume: bool = arg(False, "continue the unfinished run in <out-dir>.partial from its last resume checkpoint")
    save_interval: int = arg(100, "steps between resume checkpoints (0 = none)", ">= 0")
    # model (ignored with --init; with --init-from only --block-size and --dropout apply)
    vocab_size: int = arg(512, "BPE vocabulary size to train (the model rounds it up to a multiple of 64)",
                          ">= 259 (256 byte tokens + PAD, BOS, EOS)")
    block_size: int = arg(64, "context length in tokens (prompt + response)", ">= 2")
    n_layer: int = arg(4, "transformer blocks", "> 0")
    n_head: int = arg(4, "attention heads", "> 0")
    n_embd: int = arg(128, "embedding width", "> 0")
    arch: str = arg("gpt2", "gpt2, or the Llama/Qwen family (RoPE, RMSNorm, SwiGLU, grouped-query attention): llama, "
                    "qwen2 (+ q/k/v biases), qwen3 (+ q/k norms)", choices=tuple(ARCHS))
    n_kv_head: int = arg(0, "key/value heads of a llama/qwen model (0 = n_head / 2)", ">= 0")
    dropout: float = arg(0.0, "dropout during SFT (later stages always turn it off)", "in [0, 1)")
    # data
    n_train: int = arg(20000, "built-in task: demonstrations generated for training", "> 0")
    n_val: int = arg(1000, "held-out examples (test prompts of the task; a share of --data otherwise)", "> 0")
    # optimisation
    steps: int = arg(700, "optimizer steps", "> 0")
    batch_size: int = arg(64, "sequences per step", "> 0")
    lr: float = arg(2e-3, "peak learning rate", "> 0")
    min_lr: float = arg(1e-4, "final learning rate of the cosine schedule", ">= 0")
    warmup_steps: int = arg(50, "linear warmup steps", ">= 0")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)", ">= 0")
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)", ">= 0")
    log_interval: int = arg(25, "steps between metrics.jsonl lines", "> 0")
    eval_interval: int = arg(200, "steps between held-out loss evaluations", "> 0")
    # end-of-run samples
    n_samples: int = arg(256, "test prompts sampled at the end for eos_rate / grammatical_rate", "> 0")
    max_new_tokens: int = arg(48, "response budget when sampling", "> 0")
    temperature: float = arg(1.0, "sampling temperature for the end-of-run samples", ">= 0")


def sft_loss(model, batch):
    """Mean cross-entropy over completion tokens + EOS (loss_mask); prompt and padding do not count. The
    log-probs come a chunk of positions at a time (scoring.token_logprobs), so the (B, T, V) float32 logits never
    exist: at batch 8 x 256 and GPT-2's vocabulary they would be 393 MB, held three times (logits, log-softmax,
    gradient)."""
    h = model(batch["idx"], hidden=True)  # (B, T, C) right-padded: plain causal attention, PAD only after tokens
    logp = token_logprobs(h, model.lm_head.weight, batch["targets"], compile=is_compiled(model))  # (B, T)
    return -(logp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def load_records(args: Args, task):
    """(train, held-out) demonstrations: the user's --data (a seeded share held out) or the task's."""
    if not args.data:
        return (task.sft_examples("train", args.n_train, seed=args.seed),
                task.sft_examples("test", args.n_val, seed=args.seed))
    records = load_sft_jsonl(args.data)
    random.Random(args.seed).shuffle(records)
    n_val = min(args.n_val, max(1, len(records) // 20))
    if len(records) <= n_val:
        raise UserError(f"--data {args.data}: needs at least 2 records (one is held out)")
    return records[n_val:], records[:n_val]


def build_model(args: Args, task, train_recs, resumed_dir=None):
    """(model, tokenizer): from a Hugging Face model (--init-from: BOS/EOS as tokenizer.py reads them, a PAD added), an
    earlier run (--init) or fresh weights with a tokenizer given, trained on the data, or the resumed run's own."""
    if args.init_from:
        weights, cfg, tok, _ = load_hf_dir(resolve_source(args.init_from, "--init-from"), "--init-from", "policy",
                                           block_size=args.block_size, dropout=args.dropout)
        model = GPT(cfg)
        model.load_state_dict(weights)
        return model, tok
    if args.init:  # built with the requested dropout: load_run's config has dropout 0, as every later stage needs
        weights, cfg, tok, _ = load_run(args.init, "--init", kind="policy")
        return load_state(GPT(dataclasses.replace(cfg, dropout=args.dropout)), weights, f"--init {args.init}"), tok
    for path, flag in ((resumed_dir and resumed_dir / "tokenizer.json", "--resume: cannot reuse"),
                       (args.tokenizer, "--tokenizer")):
        if path:
            try:
                tok = Tokenizer.load(path)
                break
            except ValueError as e:  # not a file tokenizers can read: one line naming the flag
                raise UserError(f"{flag} {e}") from None
    else:
        texts = [r["prompt"] + r["completion"] for r in train_recs] if args.data else task.corpus(5000, args.seed)
        tok = Tokenizer.train(texts, args.vocab_size)
    cfg = arch_config(args.arch, vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=args.block_size,
                      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                      n_kv_head=args.n_kv_head)
    return GPT(cfg), tok


def main(argv=None):
    args = parse_args(Args, argv)
    check(args.n_embd % args.n_head == 0, f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    check(args.arch != "gpt2" or not args.n_kv_head, "--n-kv-head: only for --arch llama / qwen2 / qwen3")
    check(not args.n_kv_head or args.n_head % args.n_kv_head == 0,
          f"--n-kv-head {args.n_kv_head} must divide --n-head {args.n_head}")
    check(args.arch == "gpt2" or (args.n_embd // args.n_head) % 2 == 0,
          f"--arch {args.arch}: RoPE needs an even head size (--n-embd / --n-head = {args.n_embd // args.n_head})")
    check(not (args.init and args.tokenizer), "--tokenizer cannot be combined with --init (the run given to --init "
          "brings its own tokenizer, which its weights were trained with)")
    check(not (args.init_from and (args.init or args.tokenizer)),
          "--init-from: the model brings its own tokenizer and weights; drop --init / --tokenizer")
    check(args.arch == "gpt2" or not (args.init or args.init_from),
          f"--arch {args.arch}: the model given to --init / --init-from brings its own architecture; drop --arch")
    W = dist.env_world_size()
    check(args.batch_size >= W, f"--batch-size {args.batch_size}: must be >= the number of processes ({W}; it is the "
          f"global batch, split across them)")
    task = get_task(args.task)  # (imports a module: no random draws before the seed is set)
    st = Stage("train_sft.py", args, inputs={"--data": args.data, "--init": args.init, "--init-from": args.init_from,
                                             "--tokenizer": args.tokenizer})
    device, dtype = st.device, st.dtype

    # ---- data: demonstrations as (prompt, completion) records; the tokenizer and the model
    train_recs, val_recs = load_records(args, task)
    model, tok = build_model(args, task, train_recs, st.dir if st.saved is not None else None)
    model.to(device)
    if st.saved is None:  # a resumed run keeps the tokenizer its data were encoded with
        tok.save(st.dir / "tokenizer.json")
    train_data, n_cut = encode_sft(train_recs, tok, model.config.block_size)
    val_data, _ = encode_sft(val_recs, tok, model.config.block_size)
    if n_cut:
        print(f"warning: {n_cut} completions were longer than the context and were truncated (no EOS)")
    print(f"{len(train_data)} train / {len(val_data)} held-out examples, vocab {tok.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters, device {device} ({dtype})")

    opt = adamw(model, args.lr, args.weight_decay, device)
    train_model = compile_model(dist.wrap(model, device), args.compile)  # DDP under torchrun, else the model itself

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
    gen = torch.Generator().manual_seed(args.seed)
    extra = {"tokens_seen": 0, "val_loss": float("nan")}
    extra.update(st.resume(model=model, optimizer=opt, generators=[gen]))
    peak = device_peak_flops(peak_tflops=args.peak_tflops) if device.startswith("cuda") or args.peak_tflops else None
    model.train()
    bar = st.steps(args.steps, "sft")
    for step in bar:
        lr = cosine_lr(step, args.steps, args.lr, args.min_lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        # every rank draws the same global batch (same generator) and trains on its shard of it
        rows = torch.randint(len(train_data), (args.batch_size,), generator=gen)
        batch = collate_sft([train_data[i] for i in dist.shard(rows)], tok.pad_id, device)
        with autocast(device, dtype):
            loss = dist.global_mean(sft_loss(train_model, batch), batch["loss_mask"].sum())
        grad_norm, = st.optimize(opt, loss, model, step=step)
        extra["tokens_seen"] += dist.all_reduce_sum(batch["idx"].numel())
        last = step == args.steps - 1
        if step % args.eval_interval == 0 or last:
            extra["val_loss"] = held_out_loss()
        if step % args.log_interval == 0 or last:
            st.check({}, step)  # a NaN stops the run here, naming its step, before anything is logged or saved
            # the global batch's mean loss and the gradient norm, in one host transfer
            loss_mean, norm = torch.stack([dist.mean_over_ranks(loss.detach()), grad_norm]).float().tolist()
            row = {"step": step, "loss": loss_mean, "val_loss": extra["val_loss"], "lr": lr, "grad_norm": norm,
                   "tokens_per_s": extra["tokens_seen"] / st.elapsed(), "elapsed_s": st.elapsed()}
            if peak:  # model FLOPs utilisation against the card's (or --peak-tflops) dense bf16 peak, per device
                row["mfu"] = mfu(model.flops_per_token(batch["idx"].size(1)), row["tokens_per_s"] / W, peak)
            st.log(row, step)
            bar.log(step, loss=row["loss"], val=extra["val_loss"], tok_s=round(row["tokens_per_s"]))
        st.save(step, last, **extra)
    train_seconds = st.elapsed()
    st.save_model(model, tok, kind="policy", stage="sft")

    # ---- samples on held-out prompts: do they stop, and does the grammar accept them?
    prompts = [r["prompt"] for r in val_recs][:args.n_samples]
    samples = sample_policy(model, tok, prompts, args.max_new_tokens, args.temperature, seed=args.seed, device=device,
                            dtype=dtype)
    metrics = {"train_loss": loss_mean, "val_loss": extra["val_loss"],
               "eos_rate": sum(s["eos"] for s in samples) / len(samples), "n_samples": len(samples),
               "train_seconds": train_seconds}
    if not args.data:
        gram = [s["eos"] and task.is_grammatical(s["prompt"] + s["response"]) for s in samples]
        gold = [task.gold_reward(s["prompt"], s["response"], s["eos"]) for s in samples]
        metrics.update(grammatical_rate=sum(gram) / len(gram), gold_mean=sum(gold) / len(gold))
    print_samples(samples)
    st.finish(metrics, summary=True)


if __name__ == "__main__":
    run(main)
