"""Reward over-optimisation (Gao, Schulman & Hilton 2022, 2210.10760) on the built-in task, in one command.

    python overopt.py                            # -> out_overopt/{sft,rm-all,rm-1000,rm-4000,ppo-*}, report.*
    python overopt.py --sft out/sft              # reuse an SFT run
    python overopt.py --rm-pairs 1000 0 --ppo-kl 0 --ppo-iterations 200 --dry-run

Optimising a learned reward too hard raises the proxy (the RM score) while the true reward first rises, then falls.
With the simulated human both are measured exactly. For each reward model (trained on --rm-pairs pairs of one
collection: train_rm.py --max-pairs; 0 = all of it):
- best-of-n of the SFT policy for n = 1, 2, 4, ... --bon-max, on --bon-prompts held-out prompts, the same samples for
  every RM (a sample without EOS scores -2 under the RM, as in training), KL from the closed form log n - (n-1)/n;
- PPO with a weak KL penalty (--ppo-kl, default 0.01) for --ppo-iterations, its gold and RM score read from its own
  rollouts along the way (metrics.jsonl: one batch of fresh samples of *train* prompts per iteration, averaged
  over --window iterations per point; these are on-policy samples, not the held-out prompts of evaluate.py).
The gold gain over SFT is fitted with both of Gao et al.'s forms in d = sqrt(KL) (minirlhf/overopt.py):
best-of-n d(alpha - beta d), RL d(alpha - beta log d), and the KL at which the fitted gold peaks is reported with
the measured peak. Each RM's test accuracy is reported beside the Bayes ceiling of its labels.

Writes into --out: report.json, report.md and report.png (needs matplotlib; pipeline.sh / setup.sh install it).
Stages that are up to date are skipped, as in pipeline.py.
"""
import argparse
import json
import math
import shlex
import time
from pathlib import Path

import pipeline
from minirlhf.evaluation import best_of_n_kl
from minirlhf.overopt import fit_gao, gao_curve
from minirlhf.utils import write_json

COLORS = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple"]


def rm_name(n: int) -> str:
    return "rm-all" if n == 0 else f"rm-{n}"


def plan_runs(root: Path, sft, rm_pairs, ppo_kl: float, ppo_iterations: int, flags: dict):
    """pipeline.py-style stages: the SFT (unless given), the collecting RM rm-all (all pairs), an RM per other
    --rm-pairs size trained on rm-all's prefs.jsonl, and a PPO run per RM. Returns (plan, sft dir, {rm name:
    (rm dir, ppo dir)})."""
    plan = []
    if sft is None:
        sft = root / "sft"
        plan.append(("sft", "train_sft.py", ["--out-dir", sft, *flags["sft"]], sft, "metrics.json", []))
    sft = Path(sft).resolve()
    sft_dep = ["sft"] if plan else []
    full = root / "rm-all"
    plan.append(("rm-all", "train_rm.py", ["--sft", sft, "--out-dir", full, *flags["rm"]], full, "metrics.json",
                 sft_dep))
    runs = {}
    for n in sorted(set(rm_pairs), key=lambda n: n or math.inf):
        name = rm_name(n)
        if n:
            plan.append((name, "train_rm.py", ["--sft", sft, "--prefs", full / "prefs.jsonl", "--max-pairs", n,
                                               "--out-dir", root / name, *flags["rm"]], root / name, "metrics.json",
                         sft_dep + ["rm-all"]))
        ppo = root / f"ppo-{name}"
        plan.append((f"ppo-{name}", "train_ppo.py", ["--policy", sft, "--reward", root / name, "--kl-coef", ppo_kl,
                                                     "--iterations", ppo_iterations, "--out-dir", ppo,
                                                     *flags["ppo"]], ppo, "metrics.json", sft_dep + [name]))
        runs[name] = (root / name, ppo)
    return plan, sft, runs


def ppo_curve(metrics_jsonl: Path, window: int) -> list:
    """[{iter, kl, gold, rm}] from a PPO run's metrics.jsonl, each the mean over `window` consecutive iterations
    (one rollout batch each), so a point averages window x batch fresh samples."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "kl" in r and "gold_mean" in r]
    out = []
    for i in range(0, len(rows) - window + 1, window):
        chunk = rows[i:i + window]
        out.append({"iter": chunk[-1]["iter"], "kl": max(0.0, sum(r["kl"] for r in chunk) / window),
                    "gold": sum(r["gold_mean"] for r in chunk) / window,
                    "rm": sum(r["rm_score_mean"] for r in chunk) / window})
    return out


def bon_curve(gold, scores, ns) -> list:
    """Best-of-n along n from P prompts x N samples: gold (P, N) and RM scores (P, N) as nested lists. For each n,
    the best of the first n samples under the RM (first on ties); returns [{n, kl (closed-form bound), gold, rm}]
    with means over prompts."""
    out = []
    for n in ns:
        picks = [max(range(n), key=lambda j: s[j]) for s in scores]
        out.append({"n": n, "kl": best_of_n_kl(n),
                    "gold": sum(g[j] for g, j in zip(gold, picks)) / len(gold),
                    "rm": sum(s[j] for s, j in zip(scores, picks)) / len(scores)})
    return out


def fit_curve(points, base_gold: float, form: str) -> dict:
    """fit_gao on the gold gain of the points (KL > 0) plus the measured peak."""
    kl = [p["kl"] for p in points]
    gain = [p["gold"] - base_gold for p in points]
    try:
        fit = fit_gao(kl, gain, form)
    except ValueError as e:
        fit = {"form": form, "error": str(e)}
    best = max(points, key=lambda p: p["gold"])
    fit["measured_peak"] = {"kl": best["kl"], "gain": best["gold"] - base_gold}
    return fit


def analyse(sft_dir: Path, runs: dict, a) -> dict:
    """Best-of-n for every RM on one set of SFT samples, the PPO curves, the fits, the RM accuracies."""
    import torch
    from minirlhf.checkpoint import load_policy, load_scalar
    from minirlhf.evaluation import gold_scores, reward_model_scores
    from minirlhf.losses import score_with_eos_penalty
    from minirlhf.preferences import sample_many
    from minirlhf.tasks import get_task
    from minirlhf.utils import resolve_device, resolve_dtype
    device = resolve_device(a.device)
    dtype = resolve_dtype("auto", device)
    task = get_task("reviews")
    policy, tok, _ = load_policy(sft_dir, "--sft", device)
    policy.eval()
    N, P = a.bon_max, a.bon_prompts
    t = time.time()
    prompts = task.sample_prompts("test", P, seed=a.seed)
    samples = sample_many(policy, tok, [p for p in prompts for _ in range(N)], a.max_new_tokens, a.seed + 7,
                          512, device, dtype, desc="best-of-n samples")
    gold = gold_scores(task, samples)
    gold_pn = [gold[i * N:(i + 1) * N] for i in range(P)]
    train_prompts = task.sample_prompts("train", a.base_prompts, seed=a.seed + 11)  # PPO's baseline: SFT on train
    base = sample_many(policy, tok, train_prompts, a.max_new_tokens, a.seed + 13, 512, device, dtype, desc="base")
    base_gold_train = sum(gold_scores(task, base)) / len(base)
    base_gold_test = sum(gold) / len(gold)  # the SFT policy's expected gold on the best-of-n prompts
    ns = [2 ** i for i in range(int(math.log2(N)) + 1)]
    eos = torch.tensor([s["eos"] for s in samples])
    rep = {"bon_prompts": P, "bon_max": N, "sft_gold_test": base_gold_test, "sft_gold_train": base_gold_train,
           "rms": {}}
    print(f"sampled {len(samples)} + {len(base)} SFT responses in {time.time() - t:.0f}s")
    for name, (rm_dir, ppo_dir) in runs.items():
        rm, _, _ = load_scalar(rm_dir, "--reward", device)
        rm.eval()
        raw = torch.tensor(reward_model_scores(rm, tok, samples, 512, device, dtype), dtype=torch.float64)
        score = score_with_eos_penalty(raw, eos, 2.0).tolist()
        base_rm_test = sum(score) / len(score)
        base_rm_train = sum(reward_model_scores(rm, tok, base, 512, device, dtype)) / len(base)
        bon = bon_curve(gold_pn, [score[i * N:(i + 1) * N] for i in range(P)], ns)
        ppo = ppo_curve(ppo_dir / "metrics.jsonl", a.window)
        m = json.loads((Path(rm_dir) / "metrics.json").read_text())
        acc, ceil = m.get("test_accuracy"), m.get("bayes_accuracy")
        rep["rms"][name] = {
            "n_train_pairs": m.get("n_train_pairs"), "test_accuracy": acc, "bayes_accuracy": ceil,
            "share_of_ceiling": acc / ceil if acc is not None and ceil else None,
            "gold_spearman": m.get("gold_spearman"),
            "bon": bon, "bon_fit": fit_curve(bon, base_gold_test, "bon"), "bon_rm_base": base_rm_test,
            "ppo": ppo, "ppo_fit": fit_curve(ppo, base_gold_train, "rl") if ppo else None,
            "ppo_rm_base": base_rm_train}
    return rep


def fmt_fit(f) -> str:
    if f is None or "alpha" not in f:
        return "-"
    peak = "no turnover" if f["peak_kl"] is None else f"peak KL {f['peak_kl']:.2f} (gain {f['peak_gain']:+.2f})"
    return f"α {f['alpha']:.3f}, β {f['beta']:.3f}, rmse {f['rmse']:.3f}; {peak}"


def write_markdown(rep: dict, path: Path):
    lines = ["# Reward over-optimisation", "",
             f"Best-of-n: {rep['bon_prompts']} held-out prompts × {rep['bon_max']} SFT samples, the same for every RM "
             f"(SFT gold {rep['sft_gold_test']:+.3f}); PPO: kl-coef {rep['args']['ppo_kl']}, "
             f"{rep['args']['ppo_iterations']} iterations, points = means over {rep['args']['window']} rollout "
             f"batches of train prompts (SFT gold on train prompts {rep['sft_gold_train']:+.3f}). Gains are gold − "
             "SFT gold; KL in nats.", "",
             "| RM | train pairs | test acc | Bayes ceiling | share | best-of-n fit d(α−βd) | PPO fit d(α−β log d) | "
             "measured gold peak (bon / PPO) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rep["rms"].items():
        mp = [f"{f['measured_peak']['gain']:+.2f} at KL {f['measured_peak']['kl']:.2f}"
              for f in (r["bon_fit"], r["ppo_fit"]) if f]
        share = "-" if r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:.1f}%"
        lines.append(f"| {name} | {r['n_train_pairs']} | {r['test_accuracy']:.3f} | {r['bayes_accuracy']:.3f} | "
                     f"{share} | {fmt_fit(r['bon_fit'])} | {fmt_fit(r['ppo_fit'])} | {' / '.join(mp)} |")
    lines += ["", "Best-of-n (n: KL bound, gold gain, RM score gain):", ""]
    for name, r in rep["rms"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['n']}: {p['kl']:.2f} {p['gold'] - rep['sft_gold_test']:+.2f} "
                                               f"{p['rm'] - r['bon_rm_base']:+.2f}" for p in r["bon"]))
    lines += ["", "PPO along training (iteration: KL, gold gain, RM score gain):", ""]
    for name, r in rep["rms"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['iter']}: {p['kl']:.2f} {p['gold'] - rep['sft_gold_train']:+.2f} "
                                               f"{p['rm'] - r['ppo_rm_base']:+.2f}" for p in r["ppo"]))
    if rep.get("timings"):
        lines += ["", "Stages: " + ", ".join(f"{n} {t if isinstance(t, str) else f'{t:.0f}s'}"
                                             for n, t in rep["timings"])]
    lines += ["", f"Plot: `{rep['plot']}`" if rep.get("plot") else "No plot (matplotlib is not installed)."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rep: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, form, base in ((axes[0], "bon", "bon", rep["sft_gold_test"]),
                                 (axes[1], "ppo", "rl", rep["sft_gold_train"])):
        for c, (name, r) in zip(COLORS, rep["rms"].items()):
            pts = r[kind]
            if not pts:
                continue
            kl = [p["kl"] for p in pts]
            ax.plot(kl, [p["gold"] - base for p in pts], "o", color=c, label=f"{name} gold")
            ax.plot(kl, [p["rm"] - r[f"{kind}_rm_base"] for p in pts], "x--", color=c, alpha=0.6,
                    label=f"{name} proxy (RM)")
            f = r[f"{kind}_fit"]
            if f and "alpha" in f:
                xs = [max(kl) * i / 100 for i in range(101)]
                ys = gao_curve([math.sqrt(x) for x in xs], f["alpha"], f["beta"], form)
                ax.plot(xs, ys, "-", color=c, lw=1)
                if f["peak_kl"] is not None and f["peak_kl"] <= 1.5 * max(kl):
                    ax.axvline(f["peak_kl"], color=c, ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("KL(π ‖ π_SFT), nats" + (" (closed-form bound)" if kind == "bon" else ""))
        ax.set_ylabel("gain over SFT (gold: points + fit; RM: crosses)")
        ax.set_title("best-of-n: d(α − β d)" if kind == "bon" else "PPO (weak KL): d(α − β log d)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="out_overopt", help="folder for the runs and the report")
    p.add_argument("--sft", default=None, help="an existing SFT run directory (default: train one in --out)")
    p.add_argument("--rm-pairs", type=int, nargs="+", default=[1000, 4000, 0],
                   help="train pairs of each RM (0 = all that rm-all collected)")
    p.add_argument("--ppo-kl", type=float, default=0.01, help="PPO --kl-coef (weak, so the RM gets over-optimised)")
    p.add_argument("--ppo-iterations", type=int, default=120, help="PPO iterations per RM")
    p.add_argument("--window", type=int, default=6, help="PPO iterations averaged per curve point")
    p.add_argument("--bon-max", type=int, default=256, help="largest n of best-of-n (a power of 2)")
    p.add_argument("--bon-prompts", type=int, default=128, help="held-out prompts for best-of-n")
    p.add_argument("--base-prompts", type=int, default=1024, help="train prompts for the SFT baseline of PPO's gain")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    for kind in ("sft", "rm", "ppo"):
        p.add_argument(f"--{kind}-flags", default="", help=f"extra flags for the {kind} stages (one string)")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    a = p.parse_args(argv)
    if any(n < 0 for n in a.rm_pairs):
        pipeline.fail("--rm-pairs: sizes must be >= 0 (0 = all)")
    if a.bon_max < 2 or a.bon_max & (a.bon_max - 1):
        pipeline.fail("--bon-max: must be a power of 2, >= 2")
    if a.window < 1 or a.ppo_iterations < 2 * a.window or a.bon_prompts < 1 or a.ppo_kl < 0:
        pipeline.fail("--window >= 1, --ppo-iterations >= 2 x --window, --bon-prompts >= 1, --ppo-kl >= 0")
    flags = {k: shlex.split(getattr(a, f"{k}_flags")) for k in ("sft", "rm", "ppo")}
    root = Path(a.out).resolve()
    plan, sft, runs = plan_runs(root, a.sft, a.rm_pairs, a.ppo_kl, a.ppo_iterations, flags)
    for _, script, argv, *_ in plan:
        pipeline.check_flags([(None, script, [str(x) for x in argv])], [])
    import sweep  # the same stage runner
    t0 = time.time()
    timings = sweep.run_plan(plan, a.force, a.dry_run)
    if a.dry_run:
        return timings
    t = time.time()
    rep = analyse(sft, runs, a)
    timings.append(("analysis", round(time.time() - t, 1)))
    rep["args"], rep["timings"], rep["seconds"] = vars(a), timings, round(time.time() - t0, 1)
    rep["plot"] = "report.png" if write_plot(rep, root / "report.png") else None
    write_json(root / "report.json", rep)
    write_markdown(rep, root / "report.md")
    print((root / "report.md").read_text())
    print(f"overopt done in {rep['seconds']:.0f}s; wrote {root}/report.md, report.json"
          f"{', report.png' if rep['plot'] else ''}")
    return timings


if __name__ == "__main__":
    main()
