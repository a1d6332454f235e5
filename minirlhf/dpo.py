"""DPO's pieces around its loss: the pairs as batches, their log-probs under a policy, the reference log-probs computed
once and cached, the per-batch objective with the usual diagnostics, and the fresh pairs of online rounds.

Rafailov et al. 2023 (2305.18290): the optimum of max E[r] - beta KL(pi || ref) is pi* = ref exp(r / beta) / Z(x),
so r = beta log(pi / ref) + beta log Z(x); in the Bradley-Terry likelihood of the labels Z cancels, and the policy
is fitted by a classification loss on delta = log-ratio(chosen) - log-ratio(rejected) (losses.py). The reference
log-probs are computed once before training and cached (ref_logps.pt): no second model in memory. Online DPO (Xu et
al. 2024, 2404.10719; Xiong et al. 2024, 2312.11456): later rounds sample the *current* policy, let the learned RM
(never the gold reward) rank the samples into pairs, and train on them against the same reference.
"""
import hashlib
import json
import time
from pathlib import Path

import torch

from minirlhf.data import collate_sft, in_input_order, length_batches
from minirlhf.harness import dist
from minirlhf.harness.files import torch_save
from minirlhf.harness.stage import Stats
from minirlhf.losses import kto_loss, kto_reference_point, preference_loss, simpo_loss
from minirlhf.preferences import encode_pairs, rank_pairs
from minirlhf.sampling import reward_model_scores, sample_many
from minirlhf.scoring import is_compiled, token_logprobs
from minirlhf.utils import UserError, autocast, evaluating


def pair_batch(pairs, pad_id: int, device):
    """One batch of 2B sequences: the B chosen, then the B rejected, in the SFT layout (BOS + prompt + response,
    right-padded, loss_mask on response tokens and EOS). Right padding with plain causal attention gives the
    same positions and logits as the left-padded scoring layout, and every sequence fits the context."""
    return collate_sft([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id, device)


def pair_logps(model, batch, device, dtype, banned=None):
    """One forward over chosen and rejected together. Returns summed log-probs (2B,) and response lengths (2B,), from
    scoring.token_logprobs (float32 lm_head a chunk of positions at a time, recomputed in the backward).
    banned: the unsampleable ids, so DPO's log-probs are those of the distribution the policy is sampled from."""
    with autocast(device, dtype):
        h = model(batch["idx"], hidden=True)  # (2B, T, C)
        logp = token_logprobs(h, model.lm_head.weight, batch["targets"], banned=banned,
                              compile=is_compiled(model))  # (2B, T) float32
    mask = batch["loss_mask"]
    return logp.masked_fill(mask == 0, 0.0).sum(1), mask.sum(1)  # masked_fill: PAD targets are banned (-inf)


@evaluating
def all_pair_logps(model, pairs, pad_id, device, dtype, batch_size, banned=None, seed: int = 0, stats: dict = None):
    """Log-probs and lengths of every pair: two tensors (N, 2), column 0 = chosen, 1 = rejected, in the order of
    `pairs`. Pairs are batched by length (data.length_batches) so little of each forward is padding; stats
    receives "padding_share" (padding / all positions of those forwards)."""
    lengths = [len(p) + max(len(c), len(r)) - 1 for p, c, r in pairs]  # the batch width this pair needs
    batches = length_batches(lengths, batch_size, seed=seed)
    real, total, rows = 0, 0, []  # rows: per batch, (b, 2, 2) = [chosen, rejected] x [log-prob, length]
    for idx in batches:
        chunk = [pairs[i] for i in idx]
        batch = pair_batch(chunk, pad_id, device)
        lp, n = pair_logps(model, batch, device, dtype, banned)
        rows.append(torch.stack([torch.stack(lp.split(len(chunk)), 1), torch.stack(n.split(len(chunk)), 1).float()], 1))
        real += sum(len(p) + len(c) + len(p) + len(r) - 2 for p, c, r in chunk)
        total += batch["idx"].numel()
    if stats is not None:
        stats["padding_share"] = 1.0 - real / total if total else 0.0
    out = torch.stack(in_input_order(batches, rows)) if pairs else torch.zeros(0, 2, 2, device=device)
    return out[:, 0].contiguous(), out[:, 1].contiguous()  # log-probs and lengths (N, 2): [chosen, rejected]


def reference_logps(model, train_pairs, test_pairs, args, tok, device, dtype, out: Path, also=()):
    """Reference log-probs (N, 2) of the train and test pairs, computed once with the starting policy and cached in
    `out` for the same prefs file, split and reference weights (hashed as loaded, so an HF directory as --policy
    works too). A cache in one of the folders `also` (the run a rerun will replace) is reused and copied into `out`."""
    h = hashlib.sha256(Path(args.prefs).read_bytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([args.test_frac, args.max_pairs, args.max_test_pairs, args.seed, model.config.block_size, dtype,
                         "banned-unsampleable"]).encode())  # log-probs over the sampling distribution
    key, cache = h.hexdigest(), out / "ref_logps.pt"
    hit = None
    for found in [cache] + [Path(d) / "ref_logps.pt" for d in also] if dist.is_main() else []:
        if not found.is_file():
            continue
        try:
            saved = torch.load(found, map_location="cpu", weights_only=True)
        except Exception:  # unreadable (e.g. a damaged file): recompute it
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"reference log-probs: reusing {found}")
            if found != cache:
                torch_save(cache, saved)
            hit = saved
            break
    hit = dist.broadcast_object(hit)  # under torchrun: rank 0's cache, so every rank decides alike
    if hit is not None:
        return hit["train"].to(device), hit["test"].to(device)
    t0 = time.time()
    pad = {}
    banned = tok.unsampleable_ids(model.config.vocab_size)
    # under torchrun each rank scores a contiguous share of the pairs; all_gather_cat puts them back in order
    ref_train, _ = all_pair_logps(model, dist.shard(train_pairs), tok.pad_id, device, dtype, args.eval_batch_size,
                                  banned, stats=pad)
    ref_test, _ = all_pair_logps(model, dist.shard(test_pairs), tok.pad_id, device, dtype, args.eval_batch_size, banned)
    ref_train, ref_test = dist.all_gather_cat(ref_train), dist.all_gather_cat(ref_test)
    if dist.is_main():
        torch_save(cache, {"key": key, "train": ref_train.cpu(), "test": ref_test.cpu()})
    print(f"reference log-probs of {len(train_pairs) + len(test_pairs)} pairs in {time.time() - t0:.1f}s -> {cache} "
          f"(padding {pad.get('padding_share', 0.0):.0%} of the train pass)")
    return ref_train, ref_test


def global_divisors(chosen_mask, n_pairs: int) -> dict:
    """Under torchrun, dpo_step_loss's divisors: the global pair and chosen-token counts / world size, so the ranks (DDP
    averages) follow the global batch's gradient whatever their shards hold. {} in one process."""
    if not dist.enabled():
        return {}
    n_tok = dist.all_reduce_sum(chosen_mask.sum())
    return dict(n_pairs=n_pairs / dist.world_size(), n_tokens=n_tok.clamp(min=1) / dist.world_size())


def dpo_step_loss(logps, lens, ref, args, n_pairs=None, n_tokens=None, z0=0.0):
    """The training objective and the usual DPO diagnostics for one batch. logps, lens (2B,) = policy log-probs and
    lengths of [chosen; rejected]; ref (B, 2) reference log-probs. n_pairs, n_tokens: the divisors of the pair means
    and of the NLL (default: this batch's counts; under torchrun global_divisors', so loss and stats are this rank's
    part of the global batch's). Returns (loss, stats), stats as 0-d tensors: rewards/* = beta * log-ratio (the
    implicit reward, Rafailov et al. eq. 5, up to beta log Z(x)); accuracy = share of pairs it ranks right (ties half).
    The NLL term (args.nll_coef; RPO, Pang et al. 2024, per token over the batch): plain DPO constrains only the
    difference of two log-ratios, and pushing a rejected response down raises every other token's probability (the
    "squeezing" of Ren & Sutherland 2024, 2407.10490), most of all tokens the data never uses; the chosen responses'
    NLL keeps them down (docs/results.md measures it). --loss simpo (ref ignored: beta * length-averaged log-probs)
    and kto (z0: kto_reference_point of the batch; a pair's loss is the mean of its halves') as in losses.py."""
    B = ref.size(0)
    pi_c, pi_r = logps[:B], logps[B:]
    ref_c, ref_r = ref[:, 0], ref[:, 1]
    n_c, n_r = lens[:B].clamp(min=1), lens[B:].clamp(min=1)  # response lengths (B,) each
    if args.loss == "ipo" and args.ipo_length_average:  # per-token log-ratios: the margin no longer grows with length
        pi_c, pi_r, ref_c, ref_r = pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r
    if args.loss == "simpo":
        losses = simpo_loss(pi_c, pi_r, n_c, n_r, args.beta, args.simpo_gamma)  # (B,)
    elif args.loss == "kto":
        losses = sum(kto_loss(pi_c, pi_r, ref_c, ref_r, z0, args.beta, args.kto_desirable_weight,
                              args.kto_undesirable_weight)) / 2  # (B,)
    else:
        losses = preference_loss(args.loss, pi_c, pi_r, ref_c, ref_r, args.beta, args.label_smoothing)  # (B,)
    mean = (lambda x: x.mean()) if n_pairs is None else (lambda x: x.sum() / n_pairs)
    loss = mean(losses)
    # per-token NLL of the chosen responses (as SFT's loss)
    nll = -logps[:B].sum() / (lens[:B].sum().clamp(min=1) if n_tokens is None else n_tokens)
    if args.nll_coef:
        loss = loss + args.nll_coef * nll
    with torch.no_grad():  # tensors, not floats: no host sync per step (Stats.host once per log step)
        if args.loss == "simpo":  # SimPO's implicit reward: no reference
            r_c, r_r = args.beta * pi_c / n_c, args.beta * pi_r / n_r
        else:
            r_c, r_r = args.beta * (pi_c - ref_c), args.beta * (pi_r - ref_r)
        stats = {"loss": loss.detach(), "pref_loss": mean(losses), "nll_chosen": nll.detach(),
                 "rewards/chosen": mean(r_c), "rewards/rejected": mean(r_r),
                 "rewards/accuracy": mean((r_c > r_r).float() + 0.5 * (r_c == r_r).float()),
                 "rewards/margin": mean(r_c - r_r),
                 "logps/chosen": mean(logps[:B]), "logps/rejected": mean(logps[B:]),
                 **({"kto_z0": torch.as_tensor(z0, device=logps.device)} if args.loss == "kto" else {})}
    return loss, stats


@evaluating
def kto_z0(model, ref_model, pairs, pad_id: int, device, dtype, banned=None):
    """KTO's reference point on a batch of pairs: each prompt with the next pair's chosen response (mismatched,
    cut to the context), scored by the policy and the frozen reference; kto_reference_point of the log-ratios
    (the global batch's under torchrun)."""
    L = model.config.block_size
    mism = [(p, pairs[(i + 1) % len(pairs)][1][:L - len(p) + 1]) for i, (p, _, _) in enumerate(pairs)]
    batch = collate_sft(mism, pad_id, device)
    pi, _ = pair_logps(model, batch, device, dtype, banned)
    ref, _ = pair_logps(ref_model, batch, device, dtype, banned)
    return kto_reference_point(pi, ref, all_reduce=dist.all_reduce_sum)


@torch.no_grad()
def test_pair_stats(model, pairs, ref, args, tok, device, dtype):
    """The same diagnostics on the test pairs (pair-weighted means over all of them), prefixed 'test/'."""
    pad = {}
    logps, lens = all_pair_logps(model, pairs, tok.pad_id, device, dtype, args.eval_batch_size,
                                 tok.unsampleable_ids(model.config.vocab_size), stats=pad)
    _, stats = dpo_step_loss(torch.cat([logps[:, 0], logps[:, 1]]), torch.cat([lens[:, 0], lens[:, 1]]), ref, args)
    host = Stats()
    host.add(**stats)
    return {f"test/{k}": v for k, v in {**host.host(), **pad}.items()}


def online_pairs(model, ref_model, reward_model, tok, task, args, rnd: int, device, dtype, out: Path = None):
    """The pairs of online round `rnd` (1 = the first after the offline one): --round-k samples per prompt of
    --round-prompts fresh train prompts from the *current* policy, ranked by the RM (never the gold reward), and
    their reference log-probs (N, 2) from `ref_model`, written to out/round<rnd+1>_prefs.jsonl. Returns (pairs, ref,
    stats)."""
    seed = args.seed * 1000 + rnd  # a new sample of prompts and responses each round
    prompts = task.sample_prompts("train", args.round_prompts, seed=seed)
    samples = sample_many(model, tok, [p for p in prompts for _ in range(args.round_k)], args.max_new_tokens, seed,
                          args.eval_batch_size, device, dtype, desc=f"round {rnd + 1} samples")  # (generate: eval mode)
    scores = reward_model_scores(reward_model, tok, samples, args.eval_batch_size, device, dtype)
    records, stats = rank_pairs(prompts, samples, scores, args.round_k, args.round_pairs, tok.fingerprint())
    if not records:
        raise UserError(f"online round {rnd + 1}: none of the {len(samples)} samples formed a pair (no two distinct "
                        f"EOS-ended responses of one prompt): raise --round-k or --max-new-tokens")
    if out is not None:
        with open(out / f"round{rnd + 1}_prefs.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    for r in records:
        r["_where"] = f"round {rnd + 1} pair"
    pairs, _ = encode_pairs(records, tok, model.config.block_size, model.config.vocab_size, targets=True)
    ref, _ = all_pair_logps(ref_model, pairs, tok.pad_id, device, dtype, args.eval_batch_size,
                            tok.unsampleable_ids(model.config.vocab_size), seed=seed)
    stats["eos_rate"] = sum(s["eos"] for s in samples) / len(samples)
    stats["rm_mean"] = sum(scores) / len(scores)
    print(f"round {rnd + 1}: {len(pairs)} pairs labelled by {args.reward} from {stats['n_samples']} samples of the "
          f"current policy (EOS {stats['eos_rate']:.3f}, RM mean {stats['rm_mean']:+.3f})")
    return pairs, ref, stats
