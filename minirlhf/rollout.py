"""One rollout batch for on-policy RL (PPO, GRPO/RLOO): sample, score, and the log-probs the update needs.

Both train_ppo.py and train_grpo.py call collect_rollout: responses sampled at the rollout temperature (KV cache,
per-row stop at EOS); old and reference log-probs from fresh full-sequence forwards at the same temperature --
exactly what the update repeats, so the first ratio is 1 up to float noise (the sampler's log-probs are kept to
check that); values when a value model is given; the RM score at EOS, or a fixed -penalty for a response cut off
by the budget (the "EOS trick", losses.score_with_eos_penalty); and the gold reward, logged, never trained on.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from minirlhf.data import encode_prompt, left_pad, read_jsonl
from minirlhf.generation import generate
from minirlhf.losses import score_with_eos_penalty
from minirlhf.scoring import last_index, response_logprobs, response_values, reward_at_eos
from minirlhf.utils import autocast


def training_prompts(prompts_file, task, n: int, seed: int, tok, block_size: int):
    """The n train prompts of an RL run, in order: a user's {"prompt"} JSONL cycled through, or the task's train split
    (seeded). Returns (texts, token ids BOS + prompt); a prompt too long for the context is a FILE:LINE error."""
    if prompts_file:
        recs = read_jsonl(prompts_file, ("prompt",))
        picked = [recs[i % len(recs)] for i in range(n)]
        texts, wheres = [r["prompt"] for r in picked], [r["_where"] for r in picked]
    else:
        texts = task.sample_prompts("train", n, seed=seed)
        wheres = ["built-in task prompt"] * n
    return texts, [encode_prompt(tok, t, block_size, w) for t, w in zip(texts, wheres)]


@dataclass
class Rollout:
    """A batch of B sampled responses. Tensors on the policy's device; P = prompt columns, R = response columns."""
    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long
    resp: torch.Tensor  # (B, R) long, right-padded with PAD
    resp_mask: torch.Tensor  # (B, R) long, 1 on response tokens (EOS included)
    mask: torch.Tensor  # (B, R) float, resp_mask as float (what the losses take)
    sample_logp: torch.Tensor  # (B, R) float32, log-probs from the sampling loop (KV cache): a check only
    old_logp: torch.Tensor  # (B, R) float32, log pi_old from a full forward at the sampling temperature
    ref_logp: torch.Tensor  # (B, R) float32, log pi_ref likewise
    values: Optional[torch.Tensor]  # (B, R) value-model outputs, None without a value model
    rm_score: torch.Tensor  # (B,) raw RM score at the last response token
    score: torch.Tensor  # (B,) rm_score, or -missing_eos_penalty where the response has no EOS
    has_eos: torch.Tensor  # (B,) bool
    prompts: list  # B prompt strings
    responses: list  # B decoded responses (EOS not shown)
    gold: Optional[list]  # B gold rewards (built-in task), else None

    @property
    def lengths(self):
        """(B,) long: response tokens per row, EOS included."""
        return self.resp_mask.sum(1)


@torch.no_grad()
def collect_rollout(policy, ref, reward_model, tok, prompt_ids: list, prompts: list, max_new_tokens: int,
                    temperature: float, missing_eos_penalty: float, generator: torch.Generator, device="cpu",
                    dtype="float32", value_model=None, task=None, compile: bool = False) -> Rollout:
    """Sample one response per entry of prompt_ids (token-id lists; repeat a prompt for a group) and score it; prompts:
    the matching strings (gold, logs). Returns a Rollout. PAD, BOS and unused ids are banned in sampling and both
    scorings; the update must pass the same `banned` to response_logprobs, or the first ratio breaks."""
    p_ids, p_mask = left_pad(prompt_ids, tok.pad_id, device)  # (B, P)
    banned = tok.unsampleable_ids(policy.config.vocab_size)
    with autocast(device, dtype):
        resp, resp_mask, sample_logp = generate(policy, p_ids, p_mask, max_new_tokens, tok.eos_id, tok.pad_id,
                                                temperature, generator=generator, banned=banned,
                                                compile=compile)  # (B, R) each
        old_logp = response_logprobs(policy, p_ids, p_mask, resp, resp_mask, temperature, banned=banned)  # (B, R)
        ref_logp = response_logprobs(ref, p_ids, p_mask, resp, resp_mask, temperature, banned=banned)  # (B, R)
        values = None if value_model is None else response_values(value_model, p_ids, p_mask, resp, resp_mask)
        rm_score = reward_at_eos(reward_model, p_ids, p_mask, resp, resp_mask)  # (B,)
    B = resp.size(0)
    last = last_index(resp_mask)  # (B,)
    has_eos = (resp[torch.arange(B, device=resp.device), last] == tok.eos_id) & (resp_mask.sum(1) > 0)
    score = score_with_eos_penalty(rm_score, has_eos, missing_eos_penalty)
    # texts: one device->host transfer for the whole batch, then decode on the host (no per-row sync)
    rows = torch.cat([resp_mask.sum(1, keepdim=True), has_eos[:, None].long(), resp], 1).tolist()  # (B, 2 + R)
    responses = [tok.decode(row[2:2 + row[0]]) for row in rows]
    eos = [bool(row[1]) for row in rows]
    gold = None
    if task is not None:  # gold reward: logged to expose reward hacking, never trained on
        gold = [task.gold_reward(prompts[j], responses[j], eos[j]) for j in range(B)]
    return Rollout(p_ids, p_mask, resp, resp_mask, resp_mask.float(), sample_logp, old_logp, ref_logp, values,
                   rm_score, score, has_eos, list(prompts), responses, gold)


def cat_rows(rollouts: list, rows: list, pad_id: int) -> Rollout:
    """One Rollout from rows of several: rows = [(which rollout, which row)], in order. Prompt columns are
    left-padded and response columns right-padded to the widest of them (padding is masked everywhere)."""
    P, R = max(r.prompt_ids.size(1) for r in rollouts), max(r.resp.size(1) for r in rollouts)
    out = {}
    for f in dataclasses.fields(Rollout):
        vals = [getattr(r, f.name) for r in rollouts]
        if vals[0] is None or isinstance(vals[0], list):
            out[f.name] = None if vals[0] is None else [vals[k][i] for k, i in rows]
            continue
        if vals[0].dim() == 2:
            left = f.name.startswith("prompt")
            fill = pad_id if f.name in ("prompt_ids", "resp") else 0
            vals = [F.pad(v, ((P - v.size(1), 0) if left else (0, R - v.size(1))), value=fill) for v in vals]
        out[f.name] = torch.stack([vals[k][i] for k, i in rows])
    return Rollout(**out)


def dynamic_rollout(draw, group_size: int, max_draws: int, pad_id: int, tol: float = 1e-6):
    """DAPO's dynamic sampling (Yu et al. 2025, 2503.14476): draw(r) returns rollout r (G groups of group_size samples,
    fresh prompts); groups whose scores differ (an all-equal group has advantage 0) are kept until G are or max_draws
    rollouts are drawn, then equal-score groups fill the batch. Returns (Rollout, rollouts drawn, groups kept)."""
    rollouts, varied, equal = [], [], []
    for r in range(max_draws):
        rollouts.append(draw(r))
        s = rollouts[-1].score.view(-1, group_size)  # (G, k)
        for g, differs in enumerate(((s.max(1).values - s.min(1).values) > tol).tolist()):
            (varied if differs else equal).append((r, g))
        if len(varied) >= s.size(0):
            break
    picked = (varied + equal)[:s.size(0)]
    rows = [(r, g * group_size + j) for r, g in picked for j in range(group_size)]
    return cat_rows(rollouts, rows, pad_id), len(rollouts), len(varied)
