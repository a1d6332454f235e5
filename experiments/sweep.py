"""Today's RL menu against the optimal frontier over seeds, or every algorithm at several KL strengths.

    python experiments/sweep.py --seeds 0 1 2   # the menu (METHODS), 3 seeds each -> out_sweep/, report.*
    python experiments/sweep.py --dry-run       # the plan: which runs exist, which would run and why
    python experiments/sweep.py --methods --ppo-kl 0.03 0.07 0.15 --grpo-kl 0.03 0.07 0.15 --dpo-beta 0.1 0.2 0.5 \
        --online-dpo-beta 0.5 1.0               # no menu ("--methods" = none): the KL-strength grid instead

The menu (METHODS): PPO, RLOO, GRPO, Dr. GRPO, DAPO, GSPO, CISPO, REINFORCE++ (baseline variant), offline and
online DPO, SimPO, KTO, and best-of-n, one strength each (see METHODS for how each was chosen). --seeds reruns
every run with each seed (the SFT and RM are shared, seed 0); a run of seed s > 0 is named <run>-s<s>. The report
then gives each method's gold, KL and share of the optimal gain as mean ± s.e. over its seeds, ranked by the
share, with the methods it is ahead of by more than two standard errors of the difference (one seed cannot rank
algorithms: the KL and the share move by several points between seeds), and the plot has one point per method
with the seeds' spread as error bars.

The DPO paper (Rafailov et al. 2023, Fig. 2) compares algorithms by the gold reward each reaches at each KL to the
reference, sweeping PPO's KL target and DPO's beta. The built-in task's simulated human makes the gold reward and
the *optimal* frontier (pi* = pi_ref exp(g / beta) / Z, estimated by evaluate.py --frontier) exact, so each run is
also scored by its share of the best gain any policy could reach at its KL.

One SFT run and one reward model are shared by every run (the sweep's first two stages); PPO and GRPO/RLOO train on
that RM at each --ppo-kl / --grpo-kl coefficient, DPO on the RM's preference file at each --dpo-beta, online DPO
(train_dpo.py --rounds: later rounds on fresh samples of the current policy, ranked by the same RM) at each
--online-dpo-beta (--dpo-flags go to both kinds of DPO run). One evaluate.py call then scores every policy
the same way (the same held-out prompts and seed: gold +- s.e., KL +- s.e., paired gain), adds best-of-n for each
--best-of n and the optimal frontier. A run whose output is up to date with its flags is skipped (the same rules as
pipeline.py: same args, newer than its inputs), an interrupted one is resumed, so a rerun after adding one grid
point trains only that point (the evaluation reruns, as its policy list changed).

Writes into --out: report.json (one row per run: algorithm, its knob, gold, KL, their s.e., share of the optimum;
the frontier), report.md (the table) and report.png (gold vs KL, a point with error bars per run, one colour per
algorithm, the frontier as a line; needs matplotlib, which pipeline.sh / setup.sh install).

Default grid, and why: PPO and RLOO kl-coef 0.03 / 0.07 / 0.15 (the scripts' default in the middle, one point on
each side) spread those runs over KL ~2.5-6 nats, where the frontier estimate (1024 samples per prompt) is measured
up to ~4.3 and bounded beyond. Offline DPO spends little KL at any beta (~1-1.5 nats): beta 0.1 (the default), 0.2
and 0.5 cover where its share of the optimum peaks (0.05 and 1.0 were measured worse: docs/results.md); online DPO
at beta 0.5 and 1.0 (3 rounds) reaches PPO's KL range. Best-of-n 4 / 16 / 64 traces what the RM alone gives.
That grid runs in ~15 minutes on a 2-core CPU (measured: docs/results.md), within the 20-minute budget.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: minirlhf and the stage scripts

import pipeline  # the up-to-date / resume / run-a-stage logic, shared with the pipeline
from minirlhf.harness.files import pyplot, save_figure, write_json

ALGOS = ("ppo", "grpo", "dpo", "dpo-online", "bon", "sft")
# The menu: name -> (script, flags). One strength each, not tuned per method: the group methods share RLOO's best
# kl-coef of the KL-strength sweep (0.15, docs/results.md) with the KL in the reward, except GRPO and Dr. GRPO,
# whose papers put it in the loss (k3): Dr. GRPO keeps the papers' beta 0.04, GRPO gets 0.2 (at 0.04 it hacked the
# RM, KL 21, and at 0.2 it did not: docs/grpo.md); PPO and offline DPO run at their scripts' defaults, online
# DPO at its best beta of that sweep (1.0, two rounds here to fit the time budget); the methods' own settings are
# their papers' (DAPO clip 0.2 / 0.28, GSPO 3e-4 / 4e-4, SimPO beta 2 gamma 1, KTO beta 0.1 and unit weights),
# CISPO's eps_high 0.28 (DAPO's; the paper tunes it, no value is given), DAPO's overlong buffer 8 of 48 tokens.
GROUP = ["--baseline", "grpo", "--scale-by-std"]
METHODS = {
    "ppo": ("train_ppo.py", []),
    "rloo": ("train_grpo.py", ["--kl-coef", "0.15"]),
    "grpo": ("train_grpo.py", [*GROUP, "--loss-agg", "sequence", "--kl-in", "loss", "--kl-coef", "0.2"]),
    "dr-grpo": ("train_grpo.py", ["--baseline", "grpo", "--loss-agg", "constant", "--kl-in", "loss", "--kl-coef",
                                  "0.04"]),
    "dapo": ("train_grpo.py", [*GROUP, "--loss-agg", "token", "--clip-high", "0.28", "--dynamic-sampling",
                               "--overlong-buffer", "8", "--kl-coef", "0.15"]),
    "gspo": ("train_grpo.py", [*GROUP, "--pg-loss", "gspo", "--loss-agg", "sequence", "--clip", "3e-4",
                               "--clip-high", "4e-4", "--kl-coef", "0.15"]),
    "cispo": ("train_grpo.py", [*GROUP, "--pg-loss", "cispo", "--clip", "1", "--clip-high", "0.28", "--kl-coef",
                                "0.15"]),
    "reinforce++": ("train_grpo.py", ["--baseline", "reinforce++-baseline", "--kl-coef", "0.15"]),
    "dpo": ("train_dpo.py", []),
    "dpo-online": ("train_dpo.py", ["--rounds", "2", "--beta", "1.0"]),
    "simpo": ("train_dpo.py", ["--loss", "simpo", "--beta", "2.0", "--simpo-gamma", "1.0"]),
    "kto": ("train_dpo.py", ["--loss", "kto"]),
}
KIND = {"train_ppo.py": "ppo", "train_grpo.py": "grpo", "train_dpo.py": "dpo"}  # which --<kind>-flags apply
COLORS = {"ppo": "tab:blue", "grpo": "tab:green", "dpo": "tab:red", "dpo-online": "tab:orange", "bon": "tab:purple",
          "sft": "black"}


def fmt(x: float) -> str:
    return f"{x:g}"


def seeded(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-s{seed}"


def split_seed(name: str) -> tuple:
    """"rloo-s2" -> ("rloo", 2); a name without a seed suffix is seed 0."""
    head, _, tail = name.rpartition("-s")
    return (head, int(tail)) if head and tail.isdigit() else (name, 0)


def plan_runs(root: Path, ppo_kl, grpo_kl, dpo_beta, best_of, flags: dict, extra=(), online_beta=(),
              online_rounds: int = 3, methods=(), seeds=(0,)):
    """The sweep's stages as pipeline.py describes them: (name, script, argv, output dir, marker, inputs), then
    {name: (algorithm, knob value)} for every trained policy. flags: extra argv per stage kind (the "dpo" flags go
    to the online DPO runs too). online_beta: online DPO runs (train_dpo.py --rounds online_rounds), one per beta.
    extra: finished policy run directories trained elsewhere on the same SFT/RM (e.g. DPO variants), evaluated
    with the rest (algorithm from their config.json's stage, knob None). methods: names of METHODS (algorithm =
    the method's name, knob None). Every run is planned once per seed (seeded names, --seed s)."""
    sft, rm, ev = root / "sft", root / "rm", root / "eval"
    plan = [("sft", "train_sft.py", ["--out-dir", sft, *flags["sft"]], sft, "metrics.json", []),
            ("rm", "train_rm.py", ["--policy", sft, "--out-dir", rm, *flags["rm"]], rm, "metrics.json", ["sft"])]
    inputs = {"train_ppo.py": ["--reward", rm], "train_grpo.py": ["--reward", rm],
              "train_dpo.py": ["--prefs", rm / "prefs.jsonl", "--reward", rm]}
    runs = ([(f"ppo-kl{fmt(c)}", "train_ppo.py", ["--kl-coef", c], ("ppo", c)) for c in ppo_kl]
            + [(f"grpo-kl{fmt(c)}", "train_grpo.py", ["--kl-coef", c], ("grpo", c)) for c in grpo_kl]
            + [(f"dpo-b{fmt(b)}", "train_dpo.py", ["--beta", b], ("dpo", b)) for b in dpo_beta]
            + [(f"dpo-online-b{fmt(b)}", "train_dpo.py", ["--beta", b, "--rounds", online_rounds], ("dpo-online", b))
               for b in online_beta]
            + [(m, METHODS[m][0], METHODS[m][1], (m, None)) for m in methods])
    policies = {}
    for seed in seeds:
        for base, script, knob_flags, label in runs:
            name = seeded(base, seed)
            argv = ["--policy", sft, *inputs[script], *knob_flags, "--out-dir", root / name,
                    *(["--seed", seed] if seed else []), *flags[KIND[script]]]
            plan.append((name, script, argv, root / name, "metrics.json", ["sft", "rm"]))
            policies[name] = label
    dirs, grid = [root / n for n in policies], list(policies)
    for d in extra:
        d = Path(d).resolve()
        try:
            stage = json.loads((d / "config.json").read_text()).get("stage", "?")
        except (OSError, ValueError):
            stage = "?"
        policies[d.name] = (stage, None)
        dirs.append(d)
    bon = ["--best-of", *best_of] if best_of else []
    plan.append(("eval", "evaluate.py", ["--policies", sft, *dirs, "--ref", sft, "--reward",
                                         rm, "--frontier", *bon, "--out-dir", ev, *flags["eval"]], ev, "report.json",
                 ["sft", "rm", *grid]))
    return plan, policies


def run_plan(plan, force=False, dry_run=False, here: Path = None):
    """Run the stages that are not up to date (pipeline.why_rerun), resuming interrupted ones. Returns
    [(name, "skipped" | "would run: reason" | seconds)]."""
    here = here or Path(__file__).resolve().parents[1]
    markers = {name: out_dir / marker for name, _, _, out_dir, marker, _ in plan}
    done = []
    for name, script, argv, out_dir, marker, inputs in plan:
        argv = [str(x) for x in argv]
        reason = "--force" if force else pipeline.why_rerun(script, argv, out_dir, marker,
                                                            [markers[i] for i in inputs])
        if not reason:
            print(f"== {name}: {out_dir} is up to date, skipped", flush=True)
            done.append((name, "skipped"))
            continue
        if pipeline.should_resume(script, argv, out_dir):
            argv, reason = argv + ["--resume"], f"resuming {out_dir}.partial"
        print(f"== {name}: python {script} {' '.join(argv)}   ({reason})", flush=True)
        if dry_run:
            done.append((name, f"would run: {reason}"))
            continue
        t = time.time()
        rc = pipeline.run_stage([sys.executable, str(here / script), *argv])
        if rc != 0:
            print(f"sweep: error: stage {name} failed (exit code {rc}); finished stages are skipped when you rerun",
                  file=sys.stderr)
            sys.exit(rc)
        done.append((name, round(time.time() - t, 1)))
    return done


def summarise(ev: dict, policies: dict) -> dict:
    """report.json of the sweep from the evaluation's: one row per policy (trained runs, best-of-n, the SFT)."""
    rows = []
    for name, m in ev["policies"].items():
        if name in policies:
            algo, knob = policies[name]
        elif name.startswith("bon-"):
            algo, knob = "bon", m["best_of"]
        else:
            algo, knob = "sft", None
        rows.append({"name": name, "algo": algo, "knob": knob, "method": split_seed(name)[0] if name in policies
                     else name, "seed": split_seed(name)[1] if name in policies else 0,
                     "gold": m["gold_mean"], "gold_sem": m["gold_sem"],
                     "gain": m["gold_gain"], "gain_sem": m["gold_gain_sem"], "kl": m["kl_mean"],
                     "kl_sem": m["kl_sem"], "kl_is_bound": bool(m.get("kl_is_bound")), "win_rate": m["win_rate"],
                     "rm": m.get("rm_mean"), "frontier_gold": m.get("frontier_gold"),
                     "frac_optimal": m.get("frac_optimal"), "frac_optimal_sem": m.get("frac_optimal_sem"),
                     "frontier_extrapolated": m.get("frontier_extrapolated"), "parts": m.get("gold_parts")})
    best = {}
    for r in rows:
        if r["frac_optimal"] is not None and r["algo"] != "sft" and \
                (r["algo"] not in best or r["frac_optimal"] > best[r["algo"]]["frac_optimal"]):
            best[r["algo"]] = r
    return {"runs": rows, "methods": over_seeds(rows),
            "best_share": {k: {"name": v["name"], "frac_optimal": v["frac_optimal"]} for k, v in best.items()},
            "frontier": ev.get("frontier", []), "frontier_info": ev.get("frontier_info"), "ref_gold":
            ev["policies"][next(iter(ev["policies"]))]["ref_gold_mean"], "n_prompts": ev["n_prompts"]}


def over_seeds(rows: list) -> list:
    """One row per method (a run name without its seed suffix; best-of-n rows are their own): gold, KL, win rate
    and share of the optimum as mean ± s.e. over the seeds (with one seed: the run's own s.e.), ranked by the share,
    and `ahead_of`: the methods whose share is lower by more than 2 s.e. of the difference."""
    groups = {}
    for r in rows:
        if r["algo"] != "sft":
            groups.setdefault(r["method"], []).append(r)

    def mean_se(rs, key, sem_key):
        vals = [r[key] for r in rs]
        if any(v is None for v in vals):
            return None, None
        m = sum(vals) / len(vals)
        if len(vals) == 1:
            return m, rs[0].get(sem_key)
        return m, (sum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) ** 0.5

    out = []
    for name, rs in groups.items():
        row = {"method": name, "algo": rs[0]["algo"], "n_seeds": len(rs), "kl_is_bound": rs[0]["kl_is_bound"],
               "frontier_extrapolated": any(r["frontier_extrapolated"] for r in rs)}
        for key, sem_key in (("gold", "gold_sem"), ("kl", "kl_sem"), ("win_rate", None),
                             ("frac_optimal", "frac_optimal_sem")):
            row[key], row[key + "_se"] = mean_se(rs, key, sem_key)
        out.append(row)
    out.sort(key=lambda r: -1e9 if r["frac_optimal"] is None else -r["frac_optimal"])
    for a in out:
        a["ahead_of"] = [b["method"] for b in out if b is not a and None not in (a["frac_optimal"], b["frac_optimal"])
                         and a["frac_optimal"] - b["frac_optimal"] > 2 * ((a["frac_optimal_se"] or 0) ** 2
                                                                          + (b["frac_optimal_se"] or 0) ** 2) ** 0.5]
    return out


def knob_label(r) -> str:
    return {"ppo": "kl-coef", "grpo": "kl-coef", "dpo": "beta", "dpo-online": "beta", "bon": "n"}.get(r["algo"], "")


def write_markdown(rep: dict, path: Path):
    lines = ["# Reward-KL sweep", "",
             f"Every policy on the same {rep['n_prompts']} held-out prompts (one sample each, temperature 1); gold ± "
             "s.e., KL(π ‖ π_SFT) ± s.e. in nats (best-of-n: the closed-form bound), share of the optimal gold gain "
             "at the run's KL ± its s.e. (policy and frontier noise; ≥: past the frontier's measured range, a lower "
             "bound).", "",
             ]
    if any(m["n_seeds"] > 1 for m in rep.get("methods", [])):
        lines += ["Ranking over seeds (mean ± s.e. over the seeds; best-of-n: one run, its own s.e.), by the share of "
                  "the optimum; 'ahead of': the methods it beats by more than 2 s.e. of the difference.", "",
                  "| method | seeds | gold ± se | KL ± se | win vs SFT | % of optimal ± se | ahead of |",
                  "|---|---|---|---|---|---|---|"]
        for m in rep["methods"]:
            share = "-" if m["frac_optimal"] is None else \
                f"{'≥' if m['frontier_extrapolated'] else ''}{100 * m['frac_optimal']:.0f}% ± " \
                f"{100 * (m['frac_optimal_se'] or 0):.0f}"
            lines.append(f"| {m['method']} | {m['n_seeds']} | {m['gold']:+.3f} ± {m['gold_se'] or 0:.3f} | "
                         f"{'≤' if m['kl_is_bound'] else ''}{m['kl']:.2f} ± {m['kl_se'] or 0:.2f} | "
                         f"{m['win_rate']:.3f} | {share} | {', '.join(m['ahead_of']) or '-'} |")
        lines += ["", "Every run:", ""]
    lines += ["| run | algorithm | knob | gold ± se | KL ± se | win vs SFT | % of optimal |",
              "|---|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        se = r.get("frac_optimal_sem")
        share = "-" if r["frac_optimal"] is None else \
            f"{'≥' if r['frontier_extrapolated'] else ''}{100 * r['frac_optimal']:.0f}%" + \
            ("" if se is None else f" ± {100 * se:.0f}")
        knob = "-" if r["knob"] is None else f"{knob_label(r)} {fmt(r['knob'])}"
        kl = f"{'≤' if r['kl_is_bound'] else ''}{r['kl']:.2f} ± {r['kl_sem']:.2f}"
        lines.append(f"| {r['name']} | {r['algo']} | {knob} | {r['gold']:+.3f} ± {r['gold_sem']:.3f} | {kl} | "
                     f"{r['win_rate']:.3f} | {share} |")
    names = next((list(r["parts"]) for r in rep["runs"] if r.get("parts")), None)
    if names:  # the parts the gold reward sums (task.gold_components): where each run's gain came from
        lines += ["", "What the gold reward of each run is made of (means per response; the gold reward is "
                  "sentiment minus the penalties):", "", "| run | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {r['name']} | " + " | ".join(f"{r['parts'][k]:.2f}" for k in names) + " |"
                  for r in rep["runs"] if r.get("parts")]
    lines += ["", "Best share of the optimum per algorithm: " + ", ".join(
        f"{k} {100 * v['frac_optimal']:.0f}% ({v['name']})" for k, v in rep["best_share"].items()), ""]
    if rep["frontier"]:
        lines += ["Optimal frontier (KL: gold*): " + ", ".join(f"{p['kl']:.2f}: {p['gold']:+.2f}"
                                                               for p in rep["frontier"]), ""]
    lines += report_tail(rep)
    path.write_text("\n".join(lines) + "\n")


def report_tail(rep: dict) -> list:
    """The last lines of a report.md (sweep.py, overopt.py): the stages' times and where the plot is."""
    lines = []
    if rep.get("timings"):
        lines += ["Stages: " + ", ".join(f"{n} {t if isinstance(t, str) else f'{t:.0f}s'}"
                                         for n, t in rep["timings"]) + f" ({rep['seconds']:.0f}s in all)", ""]
    lines.append(f"Plot: `{rep['plot']}`" if rep.get("plot") else "No plot (matplotlib is not installed).")
    return lines


def write_report(root: Path, rep: dict, write_plot, write_markdown, what: str):
    """report.png (when matplotlib is there), report.json and report.md into root; prints the markdown."""
    rep["plot"] = "report.png" if write_plot(rep, root / "report.png") else None
    write_json(root / "report.json", rep)
    write_markdown(rep, root / "report.md")
    print((root / "report.md").read_text())
    print(f"{what} done in {rep['seconds']:.0f}s; wrote {root}/report.md, report.json"
          f"{', report.png' if rep['plot'] else ''}")


def write_plot(rep: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rep["frontier"]:
        fr = sorted(rep["frontier"], key=lambda p: p["kl"])
        ax.plot([0] + [p["kl"] for p in fr], [rep["frontier_info"]["ref_gold"]] + [p["gold"] for p in fr], "k--",
                label="optimal frontier (π* ∝ π_SFT·exp(g/β))")
    if any(m["n_seeds"] > 1 for m in rep.get("methods", [])):  # one point per method, the seeds' spread as bars
        cmap = plt.get_cmap("tab20")
        for i, m in enumerate(rep["methods"]):
            ax.errorbar([m["kl"]], [m["gold"]], xerr=[m["kl_se"] or 0], yerr=[m["gold_se"] or 0], fmt="o",
                        color=cmap(i % 20), capsize=3, label=f"{m['method']} ({m['n_seeds']})")
        ax.set_xlabel("KL(π ‖ π_SFT), nats")
        ax.set_ylabel("gold reward (held-out prompts)")
        ax.set_title("reward-KL: methods over seeds vs the optimum")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", ncol=2)
        return save_figure(plt, fig, path)
    for algo in ALGOS:
        rs = sorted([r for r in rep["runs"] if r["algo"] == algo], key=lambda r: r["kl"])
        if not rs:
            continue
        ax.errorbar([r["kl"] for r in rs], [r["gold"] for r in rs], xerr=[r["kl_sem"] for r in rs],
                    yerr=[r["gold_sem"] for r in rs], fmt="o-" if algo == "bon" else "o", color=COLORS[algo],
                    capsize=3, label=algo if algo != "bon" else "best-of-n (KL bound)")
        for r in rs:
            if r["algo"] != "sft":
                ax.annotate(r["name"] if r["knob"] is None else fmt(r["knob"]), (r["kl"], r["gold"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7, color=COLORS[algo])
    ax.set_xlabel("KL(π ‖ π_SFT), nats")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("reward-KL frontier: runs vs the optimum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(plt, fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out_sweep", help="folder that receives every run and the report")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                   help="methods of the menu to run (default all; none: only the KL-strength grid below)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every RL/DPO run (SFT and RM: 0)")
    p.add_argument("--ppo-kl", type=float, nargs="*", default=[], help="PPO --kl-coef values (grid)")
    p.add_argument("--grpo-kl", type=float, nargs="*", default=[], help="RLOO --kl-coef values (grid)")
    p.add_argument("--dpo-beta", type=float, nargs="*", default=[], help="DPO --beta values (grid)")
    p.add_argument("--online-dpo-beta", type=float, nargs="*", default=[], help="online DPO --beta values (grid)")
    p.add_argument("--online-dpo-rounds", type=int, default=3, help="rounds of each online DPO run (>= 2)")
    p.add_argument("--best-of", type=int, nargs="*", default=[4, 16, 64], help="best-of-n rows")
    for kind in ("sft", "rm", "ppo", "grpo", "dpo", "eval"):
        p.add_argument(f"--{kind}-flags", default="", help=f"extra flags for every {kind} stage (one string)")
    p.add_argument("--extra-policies", nargs="*", default=[], help="finished runs on the same SFT/RM to evaluate too")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    a = p.parse_args(argv)
    for name, vals in (("--ppo-kl", a.ppo_kl), ("--grpo-kl", a.grpo_kl), ("--dpo-beta", a.dpo_beta),
                       ("--online-dpo-beta", a.online_dpo_beta)):
        if any(v < 0 for v in vals) or ("dpo" in name and any(v <= 0 for v in vals)):
            pipeline.fail(f"{name}: values must be {'> 0' if 'dpo' in name else '>= 0'}")
    if a.online_dpo_rounds < 2:
        pipeline.fail(f"--online-dpo-rounds {a.online_dpo_rounds}: must be >= 2 (round 1 is offline DPO)")
    if any(n < 1 for n in a.best_of):
        pipeline.fail("--best-of: every n must be >= 1")
    flags = {k: shlex.split(getattr(a, f"{k}_flags")) for k in ("sft", "rm", "ppo", "grpo", "dpo", "eval")}
    root = Path(a.out).resolve()
    if any(s < 0 for s in a.seeds) or len(set(a.seeds)) < len(a.seeds):
        pipeline.fail("--seeds: distinct seeds >= 0")
    plan, policies = plan_runs(root, a.ppo_kl, a.grpo_kl, a.dpo_beta, a.best_of, flags, a.extra_policies,
                               a.online_dpo_beta, a.online_dpo_rounds, a.methods, a.seeds)
    for _, script, argv, *_ in plan:  # a mistyped flag or value: one line before any work
        pipeline.check_flags([(None, script, [str(x) for x in argv])], [])
    t0 = time.time()
    timings = run_plan(plan, a.force, a.dry_run)
    if a.dry_run:
        return timings
    rep = summarise(json.loads((root / "eval" / "report.json").read_text()), policies)
    rep["timings"], rep["seconds"] = timings, round(time.time() - t0, 1)
    rep["grid"] = {"ppo_kl": a.ppo_kl, "grpo_kl": a.grpo_kl, "dpo_beta": a.dpo_beta,
                   "online_dpo_beta": a.online_dpo_beta, "online_dpo_rounds": a.online_dpo_rounds, "best_of": a.best_of,
                   "flags": flags, "methods": {m: METHODS[m] for m in a.methods}, "seeds": a.seeds}
    write_report(root, rep, write_plot, write_markdown, "sweep")
    return timings


if __name__ == "__main__":
    main()
