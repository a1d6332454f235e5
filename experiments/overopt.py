"""Reward over-optimisation (Gao, Schulman & Hilton 2022, 2210.10760) on the built-in task, in one command.

    python experiments/overopt.py   # -> out_overopt/{sft,rm-all,rm-1000,rm-4000,ppo-*}, report.*
    python experiments/overopt.py --sft out/sft              # reuse an SFT run
    python experiments/overopt.py --rm-pairs 1000 0 --ppo-kl 0 --ppo-iterations 200 --dry-run

Optimising a learned reward too hard raises the proxy (the RM score) while the true reward first rises, then falls.
With the simulated human both are measured exactly. For each reward model (trained on --rm-pairs pairs of one
collection: train_rm.py --max-pairs; 0 = all of it):
- best-of-n of the SFT policy for n = 1, 2, 4, ... --bon-max, on --bon-prompts held-out prompts, the same samples for
  every RM (a sample without EOS scores -2 under the RM, as in training), KL from the closed form log n - (n-1)/n;
- PPO with a weak KL penalty (--ppo-kl, default 0.01) for --ppo-iterations, its policy evaluated every
  --eval-interval iterations on --eval-prompts held-out prompts (train_ppo.py --eval-interval: one sample per
  prompt; gold gain over the SFT's samples of the same prompts +- paired s.e., KL +- s.e., RM score as trained on).
The gold gain over SFT is fitted with both of Gao et al.'s forms in d = sqrt(KL) (minirlhf/evaluation/overopt.py):
best-of-n d(alpha - beta d), RL d(alpha - beta log d), and the KL at which the fitted gold peaks is reported with
the measured peak. Each RM's test accuracy is reported beside the Bayes ceiling of its labels, and, since the task
breaks its gold reward into parts (tasks/reviews.py gold_components: sentiment, repeated words, ...), how each RM
prices every part in gold units and which parts the best-of-n picks and the PPO policies move: what the proxy
misses is what the optimisation exploits.

Writes into --out: report.json, report.md and report.png (gold and proxy gains against d = sqrt(KL), both fits, the
peaks marked; needs matplotlib, which pipeline.sh / setup.sh install).
Stages that are up to date are skipped, as in pipeline.py.
"""
import argparse
import json
import sys
import math
import shlex
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: minirlhf and the stage scripts

import pipeline
import sweep  # the stage runner and the report's plumbing
from minirlhf.evaluation.metrics import best_of_n_kl, mean_parts
from minirlhf.evaluation.overopt import fit_gao, gao_curve
from minirlhf.harness.files import pyplot, save_figure

COLORS = ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple"]


def rm_name(n: int) -> str:
    return "rm-all" if n == 0 else f"rm-{n}"


def plan_runs(root: Path, sft, rm_pairs, ppo_kl: float, ppo_iterations: int, flags: dict, eval_interval: int = 5,
              eval_prompts: int = 512, rm_min_steps: int = 100):
    """pipeline.py-style stages: the SFT (unless given), the collecting RM rm-all (all pairs), an RM per other
    --rm-pairs size trained on rm-all's prefs.jsonl for at least rm_min_steps steps (2 epochs of 1,000 pairs are 9
    steps, inside the warmup: measured test accuracy 0.56, against 0.66 with 100 steps), and a PPO run per RM. Returns (plan, sft dir, {rm name:
    (rm dir, ppo dir)})."""
    plan = []
    if sft is None:
        sft = root / "sft"
        plan.append(("sft", "train_sft.py", ["--out-dir", sft, *flags["sft"]], sft, "metrics.json", []))
    sft = Path(sft).resolve()
    sft_dep = ["sft"] if plan else []
    full = root / "rm-all"
    plan.append(("rm-all", "train_rm.py", ["--policy", sft, "--out-dir", full, *flags["rm"]], full, "metrics.json",
                 sft_dep))
    runs = {}
    for n in sorted(set(rm_pairs), key=lambda n: n or math.inf):
        name = rm_name(n)
        if n:
            plan.append((name, "train_rm.py", ["--policy", sft, "--prefs", full / "prefs.jsonl", "--max-pairs", n,
                                               "--min-steps", rm_min_steps, "--out-dir", root / name, *flags["rm"]],
                         root / name, "metrics.json", sft_dep + ["rm-all"]))
        ppo = root / f"ppo-{name}"
        plan.append((f"ppo-{name}", "train_ppo.py", ["--policy", sft, "--reward", root / name, "--kl-coef", ppo_kl,
                                                     "--iterations", ppo_iterations, "--eval-interval",
                                                     eval_interval, "--eval-prompts", eval_prompts, "--out-dir", ppo,
                                                     *flags["ppo"]], ppo, "metrics.json", sft_dep + [name]))
        runs[name] = (root / name, ppo)
    return plan, sft, runs


def ppo_curve(metrics_jsonl: Path) -> list:
    """[{iter, kl, kl_sem, gain, gain_sem, rm_gain}] from the held-out evaluations in a PPO run's metrics.jsonl
    (train_ppo.py --eval-interval): KL(pi || SFT), the gold gain over the SFT's samples of the same prompts (paired
    s.e.) and the gain of the RM score as PPO trains on it (a response without EOS scores -penalty)."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    return [{"iter": r["iter"], "kl": max(0.0, r["eval_kl_mean"]), "kl_sem": r["eval_kl_sem"],
             "gain": r["eval_gold_gain"], "gain_sem": r["eval_gold_gain_sem"],
             "rm_gain": r["eval_score_mean"] - r["eval_ref_score_mean"],
             "parts": {k[len("eval_part_"):]: v for k, v in r.items() if k.startswith("eval_part_")}}
            for r in rows if "eval_kl_mean" in r]


def bon_curve(gold, scores, ns, parts=None) -> list:
    """Best-of-n along n from P prompts x N samples: gold (P, N) and RM scores (P, N) as nested lists. For each n,
    the best of the first n samples under the RM (first on ties). Gains are over the SFT policy itself, paired by
    prompt: the pick's gold minus the mean gold of that prompt's N samples. Returns [{n, kl (closed-form bound),
    gain, gain_sem (s.e. over prompts), rm_gain, parts}]; parts: the samples' gold parts (P, N) of dicts
    (evaluation.gold_parts), whose means over the picks go to "parts" ({} without)."""
    import numpy as np
    g, s = np.asarray(gold, dtype=np.float64), np.asarray(scores, dtype=np.float64)  # (P, N) each
    rows = np.arange(len(g))
    out = []
    for n in ns:
        picks = s[:, :n].argmax(1)  # the first maximum on ties
        gain = g[rows, picks] - g.mean(1)  # (P,)
        out.append({"n": n, "kl": best_of_n_kl(n), "gain": float(gain.mean()),
                    "gain_sem": float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else 0.0,
                    "rm_gain": float((s[rows, picks] - s.mean(1)).mean()),
                    "parts": mean_parts([parts[i][j] for i, j in enumerate(picks.tolist())]) if parts else {}})
    return out


def fit_curve(points, form: str) -> dict:
    """fit_gao on the points' gold gains (those with KL > 0 carry the fit), plus the measured peak."""
    try:
        fit = fit_gao([p["kl"] for p in points], [p["gain"] for p in points], form)
    except ValueError as e:
        fit = {"form": form, "error": str(e)}
    best = max(points, key=lambda p: p["gain"])
    fit["measured_peak"] = {"kl": best["kl"], "gain": best["gain"], "gain_sem": best["gain_sem"]}
    return fit


def analyse(sft_dir: Path, runs: dict, a) -> dict:
    """Best-of-n for every RM on one set of SFT samples, the PPO curves, the fits, the RM accuracies."""
    import torch
    from minirlhf.harness.checkpoint import load_policy, load_scalar
    from minirlhf.evaluation.metrics import gold_parts, gold_scores
    from minirlhf.sampling import reward_model_scores
    from minirlhf.losses import score_with_eos_penalty
    from minirlhf.sampling import sample_many
    from minirlhf.tasks import get_task
    from minirlhf.harness.cli import resolve_device, resolve_dtype
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
    parts = gold_parts(task, samples)
    parts_pn = [parts[i * N:(i + 1) * N] for i in range(P)] if parts else None
    ns = [2 ** i for i in range(int(math.log2(N)) + 1)]
    eos = torch.tensor([s["eos"] for s in samples])
    rep = {"bon_prompts": P, "bon_max": N, "sft_gold_test": sum(gold) / len(gold), "rms": {},
           "sft_parts": mean_parts(parts) if parts else {}, "gold_weights": getattr(task, "GOLD_WEIGHTS", None)}
    print(f"sampled {len(samples)} SFT responses in {time.time() - t:.0f}s")
    for name, (rm_dir, ppo_dir) in runs.items():
        rm, _, _ = load_scalar(rm_dir, "--reward", device)
        rm.eval()
        raw = torch.tensor(reward_model_scores(rm, tok, samples, 512, device, dtype), dtype=torch.float64)
        score = score_with_eos_penalty(raw, eos, a.missing_eos_penalty).tolist()  # as PPO trains on it
        bon = bon_curve(gold_pn, [score[i * N:(i + 1) * N] for i in range(P)], ns, parts_pn)
        ppo = ppo_curve(ppo_dir / "metrics.jsonl")
        m = json.loads((Path(rm_dir) / "metrics.json").read_text())
        acc, ceil = m.get("test_accuracy"), m.get("bayes_accuracy")
        rep["rms"][name] = {
            "n_train_pairs": m.get("n_train_pairs"), "test_accuracy": acc, "bayes_accuracy": ceil,
            "share_of_ceiling": acc / ceil if acc is not None and ceil else None,
            "gold_spearman": m.get("gold_spearman"), "part_weights": m.get("gold_part_weights"),
            "bon": bon, "bon_fit": fit_curve(bon, "bon"),
            "ppo": ppo, "ppo_fit": fit_curve(ppo, "rl") if ppo else None}
    return rep


def fmt_fit(f) -> str:
    if f is None or "alpha" not in f:
        return "-"
    peak = "no turnover" if f["peak_kl"] is None else f"peak KL {f['peak_kl']:.2f} (gain {f['peak_gain']:+.2f})"
    return f"α {f['alpha']:.3f}, β {f['beta']:.3f}, rmse {f['rmse']:.3f}; {peak}"


def write_markdown(rep: dict, path: Path):
    ar = rep["args"]
    lines = ["# Reward over-optimisation", "",
             f"Best-of-n: {rep['bon_prompts']} held-out prompts × {rep['bon_max']} SFT samples, the same for every RM "
             f"(SFT gold {rep['sft_gold_test']:+.3f}); PPO: kl-coef {ar['ppo_kl']}, {ar['ppo_iterations']} "
             f"iterations, evaluated every {ar['eval_interval']} on {ar['eval_prompts']} held-out prompts. Gains are "
             "gold − the SFT's gold on the same prompts (± paired s.e.); KL in nats; RM gains are of the score as PPO "
             "trains on it.", "",
             "| RM | train pairs | test acc | Bayes ceiling | share | best-of-n fit d(α−βd) | PPO fit d(α−β log d) | "
             "measured gold peak (bon / PPO) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rep["rms"].items():
        mp = [f"{f['measured_peak']['gain']:+.2f} ± {f['measured_peak']['gain_sem']:.2f} at KL "
              f"{f['measured_peak']['kl']:.2f}" for f in (r["bon_fit"], r["ppo_fit"]) if f]
        share = "-" if r["share_of_ceiling"] is None else f"{100 * r['share_of_ceiling']:.1f}%"
        lines.append(f"| {name} | {r['n_train_pairs']} | {r['test_accuracy']:.3f} | {r['bayes_accuracy']:.3f} | "
                     f"{share} | {fmt_fit(r['bon_fit'])} | {fmt_fit(r['ppo_fit'])} | {' / '.join(mp)} |")
    lines += ["", "Best-of-n (n: KL bound, gold gain ± s.e., RM score gain):", ""]
    for name, r in rep["rms"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['n']}: {p['kl']:.2f} {p['gain']:+.2f}±{p['gain_sem']:.2f} "
                                               f"{p['rm_gain']:+.2f}" for p in r["bon"]))
    lines += ["", "PPO along training, held-out (iteration: KL, gold gain ± s.e., RM score gain):", ""]
    for name, r in rep["rms"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['iter'] + 1}: {p['kl']:.2f} {p['gain']:+.2f}±{p['gain_sem']:.2f} "
                                               f"{p['rm_gain']:+.2f}" for p in r["ppo"]))
    if rep.get("sft_parts"):
        lines += ["", "What each RM misses, and what the optimisation then does: the RM's price of each part of the "
                  "gold reward in gold units (a least-squares fit of its scores on the parts, on fresh SFT samples; "
                  "train_rm.py's gold_part_weights), and the mean parts of the responses (SFT; best-of-n at the "
                  "largest n; PPO at its measured gold peak and at the end):", ""]
        for name, r in rep["rms"].items():
            w = r.get("part_weights")
            if w:
                lines.append(f"- {name} prices: " + ", ".join(
                    f"{k} {'n/a' if v is None else f'{v:+.2f}'} (gold {w['gold_weights'][k]:+.2f})"
                    for k, v in w["weights"].items()) + f"; R² {w['r2']:.2f}")
        lines.append(f"- SFT responses: {fmt_parts(rep['sft_parts'])}")
        for name, r in rep["rms"].items():
            seg = [f"best-of-{r['bon'][-1]['n']} {fmt_parts(r['bon'][-1]['parts'])}"]
            if r["ppo"]:
                peak = max(r["ppo"], key=lambda q: q["gain"])
                seg += [f"PPO at its gold peak (KL {peak['kl']:.1f}) {fmt_parts(peak['parts'])}",
                        f"PPO at the end (KL {r['ppo'][-1]['kl']:.1f}) {fmt_parts(r['ppo'][-1]['parts'])}"]
            lines.append(f"- {name}: " + "; ".join(seg))
    lines += [""] + sweep.report_tail(rep)
    path.write_text("\n".join(lines) + "\n")


def fmt_parts(parts: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) if parts else "-"


def write_plot(rep: dict, path: Path) -> bool:
    """Two panels (best-of-n, PPO), gold and proxy gains against d = sqrt(KL) as Gao et al. plot them (the weak-KL
    PPO runs reach tens of nats, which a KL axis would squeeze the peaks out of): gold points with s.e. and the fit,
    RM-score gains as crosses, the fitted peak as a dotted line and the measured one as a ring."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, form in ((axes[0], "bon", "bon"), (axes[1], "ppo", "rl")):
        for c, (name, r) in zip(COLORS, rep["rms"].items()):
            pts = r[kind]
            if not pts:
                continue
            d = [math.sqrt(p["kl"]) for p in pts]
            d_sem = [p.get("kl_sem", 0.0) / (2 * x) if x > 0 else 0.0 for p, x in zip(pts, d)]
            ax.errorbar(d, [p["gain"] for p in pts], yerr=[p["gain_sem"] for p in pts], xerr=d_sem, fmt="o", ms=4,
                        capsize=2, color=c, label=f"{name} gold ({r['n_train_pairs']} pairs)")
            ax.plot(d, [p["rm_gain"] for p in pts], "x--", color=c, alpha=0.6, label=f"{name} proxy (RM score)")
            f = r[f"{kind}_fit"]
            if f and "alpha" in f:
                xs = [max(d) * i / 200 for i in range(201)]
                ax.plot(xs, gao_curve(xs, f["alpha"], f["beta"], form), "-", color=c, lw=1)
                if f["peak_d"] is not None and f["peak_d"] <= max(d):
                    ax.axvline(f["peak_d"], color=c, ls=":", lw=1)
            mp = f["measured_peak"] if f else None
            if mp:
                ax.plot([math.sqrt(mp["kl"])], [mp["gain"]], "o", ms=11, mfc="none", color=c)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("d = √KL(π ‖ π_SFT), KL in nats" + (" (closed-form bound)" if kind == "bon" else ""))
        ax.set_ylabel("gain over SFT (gold: points + fit; RM: crosses)")
        ax.set_title("best-of-n: d(α − β d)" if kind == "bon" else "PPO, weak KL, held-out: d(α − β log d)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="out_overopt", help="folder for the runs and the report")
    p.add_argument("--sft", default=None, help="an existing SFT run directory (default: train one in --out)")
    p.add_argument("--rm-pairs", type=int, nargs="+", default=[1000, 4000, 0], help="train pairs of each RM (0 = all)")
    p.add_argument("--rm-min-steps", type=int, default=100, help="train_rm.py --min-steps of the RMs on a subset")
    p.add_argument("--ppo-kl", type=float, default=0.01, help="PPO --kl-coef (weak, so the RM gets over-optimised)")
    p.add_argument("--ppo-iterations", type=int, default=120, help="PPO iterations per RM")
    p.add_argument("--eval-interval", type=int, default=5, help="PPO iterations between held-out evaluations")
    p.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts per PPO evaluation")
    p.add_argument("--bon-max", type=int, default=256, help="largest n of best-of-n (a power of 2)")
    p.add_argument("--bon-prompts", type=int, default=128, help="held-out prompts for best-of-n")
    p.add_argument("--missing-eos-penalty", type=float, default=2.0, help="best-of-n: score of a sample without EOS")
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
    if a.eval_interval < 1 or a.ppo_iterations < 2 * a.eval_interval:
        pipeline.fail(f"--eval-interval {a.eval_interval}: must be >= 1 and at most half of --ppo-iterations "
                      f"{a.ppo_iterations} (a curve needs two points)")
    if a.bon_prompts < 2 or a.eval_prompts < 2 or a.ppo_kl < 0:
        pipeline.fail("--bon-prompts and --eval-prompts must be >= 2, --ppo-kl >= 0")
    flags = {k: shlex.split(getattr(a, f"{k}_flags")) for k in ("sft", "rm", "ppo")}
    root = Path(a.out).resolve()
    plan, sft, runs = plan_runs(root, a.sft, a.rm_pairs, a.ppo_kl, a.ppo_iterations, flags, a.eval_interval,
                                a.eval_prompts, a.rm_min_steps)
    for _, script, argv, *_ in plan:
        pipeline.check_flags([(None, script, [str(x) for x in argv])], [])
    t0 = time.time()
    timings = sweep.run_plan(plan, a.force, a.dry_run)
    if a.dry_run:
        return timings
    t = time.time()
    rep = analyse(sft, runs, a)
    timings.append(("analysis", round(time.time() - t, 1)))
    rep["args"], rep["timings"], rep["seconds"] = vars(a), timings, round(time.time() - t0, 1)
    sweep.write_report(root, rep, write_plot, write_markdown, "overopt")
    return timings


if __name__ == "__main__":
    main()
