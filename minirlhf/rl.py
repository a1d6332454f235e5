"""What train_ppo.py and train_grpo.py share around their algorithms: the models, the minibatches of an update, the
statistics experts look for, and the final comparison with the SFT policy. The algorithms stay in the scripts."""
import copy

import torch

from minirlhf.harness import dist
from minirlhf.harness.checkpoint import check_compatible, load_policy, load_scalar
from minirlhf.losses import masked_mean
from minirlhf.scoring import RATIO_TOLERANCE
from minirlhf.utils import UserError


def load_models(args, device, value_model: bool = False):
    """(tok, policy, frozen reference = an SFT copy, frozen reward model[, value model initialised from the RM: N+
    details, TRL]). Dropout is off (load_run) and every model in eval(): with dropout the rollout and training
    forwards disagree, the first ratio is not 1 and the KL is noise (TRL #3500); eval() does not stop gradients."""
    policy, tok, pol_cfg = load_policy(args.policy, "--policy", device)
    reward_model, _, rm_cfg = load_scalar(args.reward, "--reward", device)
    check_compatible(("--policy", args.policy, pol_cfg), ("--reward", args.reward, rm_cfg))
    models = [policy, copy.deepcopy(policy), reward_model] + ([copy.deepcopy(reward_model)] if value_model else [])
    for m in models[1:3]:
        m.requires_grad_(False)
    for m in models:
        m.eval()
    print(f"policy {args.policy} ({policy.num_params() / 1e6:.2f}M), reward {args.reward}, device {device}")
    return (tok, *models)


def minibatches(n: int, n_minibatches: int, lengths: list, generator, device):
    """One shuffled pass over a rollout batch of n rows: yields (row indices (n / n_minibatches,), R), R = the longest
    response among them (trailing padding cut; lengths are on the host, so R costs no sync). The order comes from the
    loop's generator on the CPU (resumable), from the device's own stream on CUDA."""
    perm = torch.randperm(n, generator=generator, device=device) if device == "cpu" else \
        torch.randperm(n, device=device)
    host = perm.tolist()  # one sync per pass
    size = n // n_minibatches
    for k in range(n_minibatches):
        yield perm[k * size:(k + 1) * size], max(lengths[i] for i in host[k * size:(k + 1) * size])


def ratio_stats(ratio, mask, first: bool) -> dict:
    """The ratio pi / pi_old over valid tokens: mean and max, and at an iteration's first minibatch (nothing updated
    yet) its largest deviation from 1, which must be rounding only (check_first_ratio). Tensors (no sync)."""
    valid = mask.bool()  # masked reductions: boolean indexing would sync
    out = {"ratio_mean": masked_mean(ratio, mask), "ratio_max": ratio.masked_fill(~valid, float("-inf")).max()}
    if first:
        out["first_ratio_dev"] = ((ratio - 1).abs() * valid).max()
    return out


MAXIMA = ("ratio_max", "first_ratio_dev")  # Stats(maxima=MAXIMA): the rest are means over minibatches and ranks


def check_first_ratio(dev: float, dtype: str, it: int) -> float:
    """Abort (one line) when the first minibatch's max |ratio - 1| exceeds the dtype's tolerance (nothing is updated
    yet, so it is rounding only: scoring.RATIO_TOLERANCE); returns the tolerance. It catches gross mismatches
    (scoring at T 0.7 instead of 1: 0.37; dropout 0.1 left on: 0.17); float32's 1e-5 small ones too (T 0.9)."""
    tol = RATIO_TOLERANCE[dtype]
    if not dev <= tol:  # `not <=` so that NaN fails too
        raise UserError(f"iteration {it}: the ratio at the first minibatch deviates from 1 by {dev:.2e} (tolerance "
                        f"{tol:g} for {dtype}): rollout and training log-probs disagree")
    return tol


class FirstRatio:
    """The first minibatch's ratio deviation: checked every iteration, the first iteration's and the largest kept."""

    def __init__(self):
        self.first, self.max = None, 0.0

    def check(self, dev: float, dtype: str, it: int) -> dict:
        tol = check_first_ratio(dev, dtype, it)
        self.first = dev if self.first is None else self.first
        self.max = max(self.max, dev)
        return {"first_ratio_dev": dev, "first_ratio_tol": tol}

    def metrics(self, dtype: str) -> dict:
        return {"first_ratio_dev": self.first, "first_ratio_dev_max": self.max,
                "first_ratio_tol": RATIO_TOLERANCE[dtype]}


def rollout_stats(ro, seq_kl, **more) -> dict:
    """The rollout's statistics of the whole batch (per-sequence vectors gathered over ranks): RM score, the score
    trained on, KL(pi_old || ref) per sequence, length, EOS rate, how far the sampler's log-probs are from the
    recomputed ones, plus `more` (0-d tensors), in one host transfer; and the gold reward, logged only."""
    g = dist.all_gather_cat
    rm_score = g(ro.rm_score)
    stats = {"rm_score_mean": rm_score.mean(), "rm_score_std": rm_score.std(), "score_mean": g(ro.score).mean(),
             "kl": g(seq_kl).mean(), "resp_len": g(ro.lengths).float().mean(), "eos_rate": g(ro.has_eos).float().mean(),
             "sample_logp_diff": dist.all_reduce_max(((ro.sample_logp - ro.old_logp) * ro.mask).abs().max()), **more}
    row = dict(zip(stats, torch.stack([v.float() for v in stats.values()]).tolist()))
    if ro.gold is not None:  # gold reward: logged to expose reward hacking, never trained on
        gold = dist.all_gather_objects(ro.gold)
        row["gold_mean"] = sum(gold) / len(gold)
    return row


def console_line(it: int, row: dict, *keys) -> str:
    """it | rm | gold | kl, then `keys` (name, row key, format) of the row."""
    head = f"it {it:4d} | rm {row['rm_score_mean']:+.3f} | gold {row.get('gold_mean', float('nan')):+.3f}" \
           f" | kl {row['kl']:.2f}"
    return head + "".join(f" | {name} {row[k]:{fmt}}" for name, k, fmt in keys)
