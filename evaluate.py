"""Stage 5: score every policy against the reference (SFT) and the simulated human's gold reward.

    python evaluate.py                                     # out/sft out/ppo out/dpo vs out/sft -> out/eval
    python evaluate.py --reward out/rm --frontier          # + RM score, + the optimal reward-KL frontier
    python evaluate.py --policies out/sft out/ppo --prompts my_prompts.jsonl   # your prompts: no gold columns

Per policy, one sample per held-out prompt at temperature 1 (seeded): gold reward +- s.e., KL(pi || pi_ref) on
the policy's own samples, win rate vs the reference (paired by prompt, ties half), EOS rate, length, distinct-2,
the RM score with --reward. --frontier adds the best gold any policy can reach at each KL (pi* = pi_ref exp(g/beta)
/ Z, Ziegler et al. 2019) and each policy's share of it; --best-of 4 16 64 adds the reference's best of n samples
under the RM, at the closed-form KL bound log n - (n - 1)/n (Beirami et al. 2024). Writes report.json (its keys:
docs/runs.md), report.md and report.png; the estimators are in minirlhf/evaluation/metrics.py.
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from minirlhf.data import encode_prompt, read_jsonl
from minirlhf.evaluation.metrics import (best_of_n_metrics, estimate_frontier, fraction_of_optimal,
                                         fraction_of_optimal_sem, policy_metrics)
from minirlhf.harness import dist
from minirlhf.harness.checkpoint import CheckpointError, load_policy, load_scalar
from minirlhf.harness.cli import (RunArgs, arg, parse_args, resolve_device, resolve_dtype, run, set_head_precision,
                                  set_seed)
from minirlhf.harness.files import pyplot, save_figure, write_json
from minirlhf.harness.runs import Run
from minirlhf.model import compile_model
from minirlhf.sampling import sample_policy
from minirlhf.tasks import get_task
from minirlhf.utils import UserError, check


@dataclass
class Args(RunArgs):  # RunArgs: --device, --dtype, --head-precision, --seed
    """Evaluate policies against a reference and the gold reward; optionally the optimal reward-KL frontier."""
    policies: list[str] = arg(["out/sft", "out/ppo", "out/dpo"], "policy run directories to evaluate")
    ref: str = arg("out/sft", "reference policy run directory (KL and win rates are measured against it)")
    reward: Optional[str] = arg(None, "reward-model run directory: adds its score (the proxy) beside the gold")
    out_dir: str = arg("out/eval", "where report.json, report.md and report.png go")
    task: str = arg("reviews", "built-in task for held-out prompts and the gold reward")
    prompts: Optional[str] = arg(None, "JSONL of {prompt} records to evaluate on instead (no gold reward)")
    n_prompts: int = arg(256, "held-out prompts, one sample per policy each", ">= 2 (standard errors)")
    max_new_tokens: int = arg(48, "response budget in tokens", "> 0")
    batch_size: int = arg(256, "sequences per forward pass", "> 0")
    n_show: int = arg(3, "sample responses per policy in the report", ">= 0")
    seed: int = arg(0, "sampling seed (every policy draws from the same random stream)")
    compile: bool = arg(False, "torch.compile the scoring forward passes (sampling stays eager)")
    # the optimal frontier
    frontier: bool = arg(False, "estimate the optimal reward-KL frontier (needs the gold reward)")
    frontier_prompts: int = arg(32, "prompts for the frontier (the first of the evaluation prompts)", "> 0")
    frontier_samples: int = arg(1024, "reference samples per frontier prompt (the frontier reaches KL < log of it)",
                                ">= 2 (the frontier reweights several samples)")
    betas: list[float] = arg([], "beta sweep for the frontier (empty = 24 values from 5 down to 0.02)", "> 0")
    min_ess: float = arg(10.0, "drop frontier points whose effective sample size per prompt is below this",
                         ">= 1 (an effective sample size)")
    # best-of-n
    best_of: list[int] = arg([], "best-of-n rows (e.g. 4 16 64): the reference's best of n samples under --reward",
                             ">= 1")
    missing_eos_penalty: float = arg(2.0, "best-of-n: a sample without EOS scores -penalty under the RM (as in RL)")


def fmt_pm(mean, sem, digits=3):
    return f"{mean:+.{digits}f} ± {sem:.{digits}f}"


def table_rows(report):
    """Header and rows of the summary table (strings), shared by the console and report.md."""
    pols = report["policies"]
    gold, rm, fr = report["gold"], any("rm_mean" in m for m in pols.values()), bool(report.get("frontier"))
    head = ["policy"] + (["gold ± se"] if gold else []) + ["KL ± se"] + (["win vs ref ± se"] if gold else []) \
        + (["RM score", "RM win"] if rm else []) + ["EOS", "len", "distinct-2"] + (["% of optimal"] if fr else [])
    rows = []
    for name, m in pols.items():
        r = [name]
        if gold:
            r.append(fmt_pm(m["gold_mean"], m["gold_sem"]))
        r.append(f"≤ {m['kl_mean']:.2f}" if m.get("kl_is_bound") else f"{m['kl_mean']:.2f} ± {m['kl_sem']:.2f}")
        if gold:
            r.append(f"{m['win_rate']:.3f} ± {m['win_rate_sem']:.3f}")
        if rm:
            r += [fmt_pm(m["rm_mean"], m["rm_sem"]), f"{m['rm_win_rate']:.3f} ± {m['rm_win_rate_sem']:.3f}"]
        r += [f"{m['eos_rate']:.3f}", f"{m['mean_len']:.1f}", f"{m['distinct_2']:.3f}"]
        if fr:
            f, se = m.get("frac_optimal"), m.get("frac_optimal_sem")
            r.append("-" if f is None else ("≥ " if m["frontier_extrapolated"] else "") + f"{100 * f:.0f}%"
                     + ("" if se is None else f" ± {100 * se:.0f}"))
        rows.append(r)
    return head, rows


def markdown_table(head, rows):
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in [head, *rows]]
    return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])


def write_markdown(report, path):
    head, rows = table_rows(report)
    args = report["args"]
    where = "task " + report["task"] if report["gold"] else args["prompts"]
    md = ["# minirlhf evaluation\n",
          f"{report['n_prompts']} held-out prompts ({where}), "
          f"one sample per prompt per policy at temperature 1, seed {args['seed']}, reference `{report['ref']}`.\n",
          markdown_table(head, rows), "",
          "How to read it:",
          "- **gold**: the simulated human's hidden reward (never trained on); ± is the standard error." if
          report["gold"] else "- no gold reward on user prompts: compare KL, RM score, length.",
          "- **KL**: KL(policy ‖ reference) in nats, sum over response tokens of log π − log π_ref on the policy's "
          "own samples. The reference is 0 by construction.",
          "- **win vs ref**: paired by prompt against a fresh reference sample under the gold reward, ties count "
          "half (0.5 = no better than the reference); ± is the s.e. of the mean per-prompt outcome (1 / 0.5 / 0)."
          if report["gold"] else None,
          "- **RM score / RM win**: the same under the learned reward model (the proxy that PPO optimised); RM up "
          "while gold falls is reward hacking (Gao et al. 2022)." if any("rm_mean" in m for m in
                                                                         report["policies"].values()) else None,
          "- **EOS**: share of responses that stopped within the budget; **distinct-2**: distinct word bigrams / "
          "all bigrams (low = the policy repeats itself).",
          "- **bon-n**: best-of-n, the reference's sample with the highest RM score among n per prompt. Its KL is the "
          "closed form log n − (n − 1)/n (Stiennon et al. 2020), an upper bound on the true KL (Beirami et al. "
          "2024, 2401.01879); its % of optimal is therefore measured at a KL at least as large as its own." if
          any(m.get("kl_is_bound") for m in report["policies"].values()) else None, ""]
    if report.get("frontier_info"):
        fi = report["frontier_info"]
        md += ["## Optimal reward-KL frontier\n",
               f"π* ∝ π_ref · exp(gold/β), estimated by self-normalised importance weighting of "
               f"{fi['samples_per_prompt']} reference samples on each of {fi['n_prompts']} prompts (Ziegler et al. "
               f"2019). Reference gold on these prompts {fi['ref_gold']:+.3f}. With this many samples the estimate "
               f"cannot exceed KL = log {fi['samples_per_prompt']} = {fi['kl_cap']:.2f} nats; points whose worst "
               f"prompt has an ESS < {fi['min_ess']:g} are dropped ({len(report['frontier_dropped'])} of "
               f"{len(report['frontier']) + len(report['frontier_dropped'])}).\n",
               "**% of optimal** = (policy gold − reference gold) / (frontier gold at the policy's KL − frontier "
               "gold at KL 0). Beyond the frontier's largest KL the optimum is bounded by the duality bound "
               "β·log Z_β + β·KL (log Z's Jensen bias added back), so the percentage shown with ≥ is a lower "
               f"bound. ± is its standard error: the policy's paired gain s.e. and the frontier's spread over "
               f"{fi['n_bootstrap']} bootstrap resamples of its {fi['n_prompts']} prompts, in quadrature.\n",
               markdown_table(["beta", "KL", "gold", "ESS (mean / min)"],
                              [[f"{p['beta']:.3g}", f"{p['kl']:.3f}", f"{p['gold']:+.3f}",
                                f"{p['ess']:.1f} / {p['ess_min']:.1f}"] for p in report["frontier"]]), ""]
        for name, m in report["policies"].items():
            if m.get("frac_optimal") is not None:
                md.append(f"- {name}: KL {m['kl_mean']:.2f}, gold gain {m['gold_gain']:+.3f} ± "
                          f"{m['gold_gain_sem']:.3f} (paired s.e.); "
                          f"the optimum at that KL {'is at most' if m['frontier_extrapolated'] else 'is'} "
                          f"{m['frontier_gold'] - fi['ref_gold']:+.3f}")
        md.append("")
    md.append(f"Plot: `{report['plot']}`" if report["plot"] else
              "No plot: matplotlib is not installed (`pip install matplotlib` for report.png); the report is text "
              "only." if report["gold"] else "No plot: it shows gold reward against KL, and these prompts have no "
              "gold reward.")
    md += ["", "## Samples", ""]
    for name, m in report["policies"].items():
        md.append(f"**{name}**")
        for s in m["samples"]:
            extra = "".join(f", {k} {s[k]:+.2f}" for k in ("gold", "rm", "kl") if k in s)
            md.append(f"- `{s['prompt']}` → `{s['response']}`{'' if s['eos'] else ' [no EOS]'} ({extra[2:]})")
        md.append("")
    Path(path).write_text("\n".join(x for x in md if x is not None) + "\n")


def training_path(run_dir, smooth: int = 10):
    """(kl, gold) over training from a run's metrics.jsonl when it logs both (PPO: "kl", "gold_mean"), smoothed
    by a moving average of `smooth` lines (one rollout batch each is noisy). None otherwise."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "kl" in r and "gold_mean" in r]
    if len(rows) < 2:
        return None

    def avg(xs):  # the mean of the last `smooth` values at each point
        return [sum(xs[max(0, i - smooth + 1):i + 1]) / min(i + 1, smooth) for i in range(len(xs))]
    return avg([r["kl"] for r in rows]), avg([r["gold_mean"] for r in rows])


def write_plot(report, path):
    """report.png: gold vs KL, the frontier, each policy with error bars, training paths. False without matplotlib
    or without a gold reward (user prompts: nothing to put on the y axis)."""
    plt = pyplot()
    if plt is None or not report["gold"]:  # the plot is gold vs KL: nothing to draw on user prompts
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if report.get("frontier"):
        fi = report["frontier_info"]
        ax.plot([0.0] + [p["kl"] for p in report["frontier"]], [fi["ref_gold"]] + [p["gold"] for p in
                                                                                   report["frontier"]],
                "k-", lw=1.5, label=f"optimal π* (estimated, KL < {fi['kl_cap']:.1f})")
    bon = [m for m in report["policies"].values() if m.get("kl_is_bound")]
    if bon:  # best-of-n: one curve, at its KL upper bound
        ax.errorbar([m["kl_mean"] for m in bon], [m["gold_mean"] for m in bon], yerr=[m["gold_sem"] for m in bon],
                    fmt="s--", capsize=3, color="0.45", label="best-of-n (RM), KL bound")
        for m in bon:
            ax.annotate(f"n={m['best_of']}", (m["kl_mean"], m["gold_mean"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    for name, m in report["policies"].items():
        if m.get("kl_is_bound") or "gold_mean" not in m:  # best-of-n is drawn above; user prompts have no gold
            continue
        point = ax.errorbar(m["kl_mean"], m["gold_mean"], xerr=m["kl_sem"], yerr=m["gold_sem"], fmt="o",
                            capsize=3, label=name)
        path_ = training_path(m["run_dir"])
        if path_ is not None:  # same colour as the policy's point
            ax.plot(*path_, lw=0.8, alpha=0.6, color=point[0].get_color(), label=f"{name} during training")
    ax.set_xlabel("KL(π ‖ π_ref)  [nats]")
    ax.set_ylabel("gold reward")
    ax.set_title("gold reward vs KL to the reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def load_models(args: Args, device):
    """The reference, each policy (the reference object itself when a policy path is the reference's), the RM."""
    names = report_names(args.policies)
    ref, tok, ref_cfg = load_policy(args.ref, "--ref", device)
    rm = None
    if args.reward:
        rm, _, rm_cfg = load_scalar(args.reward, "--reward", device)
        if rm_cfg["tokenizer_fingerprint"] != ref_cfg["tokenizer_fingerprint"]:
            raise CheckpointError(f"--reward {args.reward} and --ref {args.ref} use different tokenizers")
    policies = {}
    for d, name in zip(args.policies, names):
        if os.path.realpath(d) == os.path.realpath(args.ref):
            model, cfg = ref, ref_cfg
        else:
            model, _, cfg = load_policy(d, "--policies", device)
            if cfg["tokenizer_fingerprint"] != ref_cfg["tokenizer_fingerprint"]:
                raise CheckpointError(f"--policies {d} and --ref {args.ref} use different tokenizers: the KL between "
                                      "them is not defined")
        policies[name] = (d, model.eval())
    return ref.eval(), tok, policies, rm


def check_contexts(args: Args, ref, policies: dict, rm, tok, prompts):
    """The reference (KL) and the RM score every sample of every policy, and the RM the reference's best-of-n
    samples: a context too short for the longest (prompt + response) is refused before any sampling."""
    longest = max(len(encode_prompt(tok, p, 2 ** 62)) for p in prompts) + args.max_new_tokens
    samplers = [(f"--policies {d}", m) for d, m in policies.values()]
    samplers += [("--ref " + args.ref, ref)] if args.best_of else []
    for who, model in samplers:
        need = min(longest, model.config.block_size)  # a sample never outgrows its own policy's context
        for flag, path, scorer in (("--ref", args.ref, ref), ("--reward", args.reward, rm)):
            if scorer is not None and scorer is not model and scorer.config.block_size < need:
                raise CheckpointError(f"{flag} {path} has a context of {scorer.config.block_size} tokens, but "
                                      f"{who}'s samples reach {need} (prompt + --max-new-tokens "
                                      f"{args.max_new_tokens}): it cannot score them")


def report_names(paths) -> list:
    """The report's name of each policy: its folder's name, or the path as given where two folders share a name;
    the same path given twice is refused (one row would silently replace the other)."""
    names = [Path(d).name or str(d) for d in paths]
    names = [str(d) if names.count(n) > 1 else n for d, n in zip(paths, names)]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise UserError(f"--policies: {paths[names.index(n)]} and {paths[i]} would both be reported as {n!r}; "
                            f"name each policy once")
    return names


def report_row(m: dict, samples: list, n_show: int) -> dict:
    """A policy's metrics as report.json keeps them: win_rate(_sem) for win_rate_vs_ref(_sem), n_show samples."""
    if "win_rate_vs_ref" in m:
        m["win_rate"], m["win_rate_sem"] = m.pop("win_rate_vs_ref"), m.pop("win_rate_vs_ref_sem")
    keep = ("prompt", "response", "eos", "length", "kl", "gold", "rm")
    return {**m, "samples": [{k: s[k] for k in keep if k in s} for s in samples[:n_show]]}


def main(argv=None):
    args = parse_args(Args, argv)
    check(bool(args.policies), "--policies: name at least one policy run directory")
    check(not (args.frontier and args.prompts), "--frontier needs the gold reward of a built-in task; it cannot run on "
          "--prompts data")
    check(not (args.best_of and not args.reward), "--best-of needs --reward (the RM picks the best of n samples)")
    device = dist.setup(resolve_device(args.device))  # under torchrun: joins the process group, cuda:LOCAL_RANK
    dtype = resolve_dtype(args.dtype, device)
    set_head_precision(args.head_precision, device, dtype)
    set_seed(args.seed)
    t0 = time.time()
    task = None if args.prompts else get_task(args.task)
    # before any work: is the output location writable, free and no input of the run? (no --resume: nothing to keep)
    run_ = Run(args.out_dir, args, inputs={"--policies": args.policies, "--ref": args.ref, "--reward": args.reward,
                                           "--prompts": args.prompts})
    ref, tok, policies, rm = load_models(args, device)
    if args.prompts:
        recs = read_jsonl(args.prompts, ("prompt",))
        prompts = [r["prompt"] for r in recs][:args.n_prompts]
        if len(prompts) < 2:
            raise UserError(f"--prompts {args.prompts}: needs at least 2 records")
    else:
        prompts = task.sample_prompts("test", args.n_prompts, seed=args.seed)
    check_contexts(args, ref, policies, rm, tok, prompts)
    kw = dict(batch_size=args.batch_size, device=device, dtype=dtype)
    print(f"evaluating {', '.join(policies)} against {args.ref} on {len(prompts)} prompts, device {device} ({dtype})")

    # The reference's paired samples (a different seed from the policies': the SFT row then compares two
    # independent SFT samples, so its win rate is ~0.5 by construction -- a built-in sanity check).
    # Under torchrun the sampling (the costly, token-by-token part) is sharded across the ranks and gathered; the
    # scoring passes then run on every rank over all samples, and rank 0 writes the one report.
    shard = dict(distributed=True)
    ref_samples = sample_policy(ref, tok, prompts, args.max_new_tokens, 1.0, seed=args.seed + 1, **kw, **shard)
    report = {"ref": args.ref, "task": None if task is None else args.task, "gold": task is not None,
              "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "policies": {}}
    # --compile: the scoring passes only (one wrapper per model: a policy given as the reference is the ref object)
    scorer = {id(m): compile_model(m, args.compile) for m in [ref, *(m for _, m in policies.values())]}
    for name, (run_dir, model) in policies.items():
        t = time.time()
        samples = sample_policy(model, tok, prompts, args.max_new_tokens, 1.0, seed=args.seed, **kw, **shard)
        m = policy_metrics(scorer[id(model)], scorer[id(ref)], tok, samples, ref_samples, task, rm, **kw)
        report["policies"][name] = {"run_dir": run_dir, **report_row(m, samples, args.n_show)}
        print(f"  {name}: {time.time() - t:.1f}s")

    if args.best_of:  # max(n) reference samples per prompt, drawn once; each n takes the first n of them
        t = time.time()
        bon = best_of_n_metrics(ref, rm, tok, prompts, sorted(set(args.best_of)), ref_samples, args.max_new_tokens,
                                task, args.missing_eos_penalty, seed=args.seed + 3, device=device, dtype=dtype,
                                batch_size=max(args.batch_size, 512), **shard)
        for n, m in bon.items():
            report["policies"][f"bon-{n}"] = {"run_dir": None, **report_row(m, m["samples"], args.n_show)}
        print(f"  best-of-{max(args.best_of)} samples for {len(prompts)} prompts (bon-{', bon-'.join(map(str, bon))}): "
              f"{time.time() - t:.1f}s")

    if args.frontier:
        t = time.time()
        fr = estimate_frontier(ref, tok, task, prompts[:args.frontier_prompts], args.frontier_samples,
                               args.max_new_tokens, args.betas or None, args.min_ess, seed=args.seed + 2, device=device,
                               dtype=dtype, batch_size=max(args.batch_size, 512), **shard)
        report["frontier"], report["frontier_dropped"] = fr.pop("frontier"), fr.pop("dropped")
        boot = fr.pop("bootstrap")  # the frontier's noise over its prompts, for the shares' error bars
        report["frontier_info"] = {**fr, "n_bootstrap": len(boot)}
        for m in report["policies"].values():
            noise = m["gold_gain_sem"]  # the gain's s.e., paired by prompt (not the unpaired hypot of the two)
            frac, opt, extrapolated = fraction_of_optimal(m["gold_mean"], m["ref_gold_mean"], m["kl_mean"],
                                                          report["frontier"], fr["ref_gold"], noise)
            sem = None if frac is None else fraction_of_optimal_sem(m["gold_mean"], m["ref_gold_mean"],
                                                                    m["kl_mean"], noise, boot)
            m.update(frontier_gold=opt, frontier_extrapolated=extrapolated, frac_optimal=frac, frac_optimal_sem=sem)
        top = max([p["kl"] for p in report["frontier"]], default=0)
        print(f"  frontier: {len(report['frontier'])} points kept, {len(report['frontier_dropped'])} dropped "
              f"(a prompt with ESS < {args.min_ess:g}), KL up to {top:.2f}, {time.time() - t:.1f}s")

    out = run_.dir  # the report is written to the staging folder; run_.finish() moves it to --out-dir
    if not dist.is_main():  # one report, rank 0's
        run_.finish()
        return
    report["plot"] = "report.png" if write_plot(report, out / "report.png") else None
    report["args"] = asdict(args)
    report["seconds"] = time.time() - t0
    write_json(out / "report.json", report)
    write_markdown(report, out / "report.md")
    run_.finish()
    out = run_.out

    print()
    print(markdown_table(*table_rows(report)))
    if report["gold"]:
        print("gold = hidden true reward (± s.e.); KL in nats vs the reference; win = paired gold win rate vs the "
              "reference, ties half")
    if report["plot"] is None and report["gold"]:
        print("(matplotlib not installed: no report.png, text report only)")
    print(f"wrote {out}/report.json, report.md{', report.png' if report['plot'] else ''} "
          f"({report['seconds']:.0f}s)")


if __name__ == "__main__":
    run(main)
