"""sweep.py's bookkeeping: every run shares the one SFT and RM, finished runs are skipped, a changed grid point
reruns only itself (and the evaluation), and the report rows / shares come from the evaluation's report."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]  # the stage scripts and the experiments

import pipeline  # noqa: E402
import sweep  # noqa: E402

NONE = {k: [] for k in ("sft", "rm", "ppo", "grpo", "dpo", "eval")}


def fake_finished(plan, names):
    """Mark these stages finished with exactly the args the sweep would give them (as a real run leaves them)."""
    for name, script, argv, out_dir, marker, _ in plan:
        if name in names:
            out_dir.mkdir(parents=True, exist_ok=True)
            args = pipeline.runs.args_dict(pipeline.parse_args(
                pipeline.importlib.import_module(Path(script).stem).Args, [str(x) for x in argv]))
            (out_dir / ("report.json" if marker == "report.json" else "config.json")).write_text(
                json.dumps({"args": args}))
            (out_dir / marker).write_text(json.dumps({"args": args}))


def test_runs_share_sft_and_rm_and_finished_runs_are_skipped(tmp_path):
    plan, policies = sweep.plan_runs(tmp_path, [0.05, 0.1], [0.07], [0.1, 0.2], [4, 16], NONE)
    names = [p[0] for p in plan]
    assert names == ["sft", "rm", "ppo-kl0.05", "ppo-kl0.1", "grpo-kl0.07", "dpo-b0.1", "dpo-b0.2", "eval"]
    assert policies["dpo-b0.2"] == ("dpo", 0.2) and policies["ppo-kl0.05"] == ("ppo", 0.05)
    for name, script, argv, out_dir, marker, inputs in plan[2:-1]:  # every trained run reads the one SFT and RM
        argv = [str(x) for x in argv]
        assert inputs == ["sft", "rm"]
        assert str(tmp_path / "sft") in argv and (str(tmp_path / "rm") in argv or
                                                  str(tmp_path / "rm" / "prefs.jsonl") in argv)
    ev = [str(x) for x in plan[-1][2]]
    assert all(str(tmp_path / n) in ev for n in policies) and ev[ev.index("--best-of") + 1:][:2] == ["4", "16"]
    # nothing done yet: everything would run
    assert all(t.startswith("would run") for _, t in sweep.run_plan(plan, dry_run=True))
    # SFT, RM and two runs finished: those are skipped, the rest would run
    fake_finished(plan, {"sft", "rm", "ppo-kl0.05", "dpo-b0.1"})
    done = dict(sweep.run_plan(plan, dry_run=True))
    assert [n for n, t in done.items() if t == "skipped"] == ["sft", "rm", "ppo-kl0.05", "dpo-b0.1"]
    # online DPO runs: the same SFT, RM and preference file, --rounds on top
    plan3, pol3 = sweep.plan_runs(tmp_path, [], [], [0.1], [], NONE, online_beta=[0.5], online_rounds=3)
    assert [p[0] for p in plan3] == ["sft", "rm", "dpo-b0.1", "dpo-online-b0.5", "eval"]
    argv = [str(x) for x in plan3[3][2]]
    assert argv[argv.index("--rounds") + 1] == "3" and argv[argv.index("--beta") + 1] == "0.5"
    assert argv[argv.index("--reward") + 1] == str(tmp_path / "rm") and pol3["dpo-online-b0.5"] == ("dpo-online", 0.5)
    # a changed flag for DPO reruns the DPO runs only
    plan2, _ = sweep.plan_runs(tmp_path, [0.05, 0.1], [0.07], [0.1, 0.2], [4, 16], {**NONE, "dpo": ["--rounds", "2"]})
    done = dict(sweep.run_plan(plan2, dry_run=True))
    assert done["ppo-kl0.05"] == "skipped" and "config changed: rounds" in done["dpo-b0.1"]


def test_summary_rows_and_best_share(tmp_path):
    def pol(gold, kl, frac, **kw):
        return {"gold_mean": gold, "gold_sem": 0.04, "gold_gain": gold + 0.2, "gold_gain_sem": 0.03, "kl_mean": kl,
                "kl_sem": 0.1, "win_rate": 0.8, "ref_gold_mean": -0.2, "frac_optimal": frac,
                "frontier_gold": 1.0, "frontier_extrapolated": False, **kw}
    ev = {"n_prompts": 8, "frontier": [{"kl": 1.0, "gold": 0.5}, {"kl": 3.0, "gold": 1.0}],
          "frontier_info": {"ref_gold": -0.2},
          "policies": {"sft": pol(-0.2, 0.0, None), "ppo-kl0.05": pol(0.8, 3.0, 0.85), "ppo-kl0.1": pol(0.7, 2.0, 0.9),
                       "dpo-b0.1": pol(0.3, 1.5, 0.6, gold_parts={"sentiment": 0.61, "repeated_words": 0.25}),
                       "bon-4": pol(0.3, 0.6, 0.95, best_of=4, kl_is_bound=True)}}
    rep = sweep.summarise(ev, {"ppo-kl0.05": ("ppo", 0.05), "ppo-kl0.1": ("ppo", 0.1), "dpo-b0.1": ("dpo", 0.1)})
    algos = {r["name"]: (r["algo"], r["knob"]) for r in rep["runs"]}
    assert algos == {"sft": ("sft", None), "ppo-kl0.05": ("ppo", 0.05), "ppo-kl0.1": ("ppo", 0.1),
                     "dpo-b0.1": ("dpo", 0.1), "bon-4": ("bon", 4)}
    assert rep["best_share"]["ppo"] == {"name": "ppo-kl0.1", "frac_optimal": 0.9}
    assert rep["best_share"]["bon"]["frac_optimal"] == 0.95 and "sft" not in rep["best_share"]
    rep["plot"] = None
    sweep.write_markdown(rep, tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "| ppo-kl0.1 | ppo | kl-coef 0.1 | +0.700 ± 0.040 | 2.00 ± 0.10 | 0.800 | 90% |" in md
    assert "| bon-4 | bon | n 4 | +0.300 ± 0.040 | ≤0.60 ± 0.10 |" in md
    assert "| run | sentiment | repeated_words |" in md and "| dpo-b0.1 | 0.61 | 0.25 |" in md


def test_menu_over_seeds_plan_and_ranking(tmp_path):
    plan, policies = sweep.plan_runs(tmp_path, [], [], [], [4], NONE, methods=["rloo", "kto"], seeds=[0, 3])
    assert [p[0] for p in plan] == ["sft", "rm", "rloo", "kto", "rloo-s3", "kto-s3", "eval"]
    argv = {p[0]: [str(x) for x in p[2]] for p in plan}
    assert "--seed" not in argv["rloo"] and argv["rloo-s3"][-2:] == ["--seed", "3"]  # seed 0 = the scripts' default
    assert argv["kto-s3"][argv["kto-s3"].index("--loss") + 1] == "kto" and policies["kto-s3"] == ("kto", None)
    assert sweep.split_seed("reinforce++-s12") == ("reinforce++", 12) and sweep.split_seed("dpo-online") == (
        "dpo-online", 0)

    def run(name, frac, kl=3.0):
        return {"name": name, "algo": sweep.split_seed(name)[0], "knob": None, "method": sweep.split_seed(name)[0],
                "seed": sweep.split_seed(name)[1], "gold": frac, "gold_sem": 0.03, "kl": kl, "kl_sem": 0.1,
                "kl_is_bound": False, "win_rate": 0.8, "frac_optimal": frac, "frac_optimal_sem": 0.05,
                "frontier_extrapolated": False}
    rows = [run("a", 0.80), run("a-s1", 0.82), run("a-s2", 0.84),  # mean 0.82, s.e. 0.0115
            run("b", 0.70), run("b-s1", 0.55), run("b-s2", 0.85),  # mean 0.70, s.e. 0.087: a - b within the noise
            run("c", 0.50), run("c-s1", 0.51), run("c-s2", 0.49)]  # mean 0.50, s.e. 0.0058
    got = {m["method"]: m for m in sweep.over_seeds(rows)}
    assert [m["method"] for m in sweep.over_seeds(rows)] == ["a", "b", "c"]
    assert got["a"]["frac_optimal"] == pytest.approx(0.82) and got["a"]["frac_optimal_se"] == pytest.approx(
        0.02 / 3 ** 0.5) and got["a"]["n_seeds"] == 3
    # a - b = 0.12 < 2 * sqrt(0.012^2 + 0.087^2) = 0.175: not beyond the noise; b - c = 0.20 > 2 * 0.087 = 0.174
    assert got["a"]["ahead_of"] == ["c"] and got["b"]["ahead_of"] == ["c"] and got["c"]["ahead_of"] == []
    rep = {"runs": rows, "methods": sweep.over_seeds(rows), "best_share": {}, "frontier": [], "n_prompts": 8,
           "plot": None}
    sweep.write_markdown(rep, tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "| a | 3 | +0.820 ± 0.012 | 3.00 ± 0.00 | 0.800 | 82% ± 1 |" in md and "| c | 3 |" in md
