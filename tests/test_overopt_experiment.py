"""overopt.py's bookkeeping: which RM is trained on what, which PPO run reads which RM, skipping finished stages, and
the best-of-n / PPO curves and fits it reports."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]  # the stage scripts and the experiments

import overopt  # noqa: E402
import sweep  # noqa: E402
from tests.test_sweep import fake_finished  # noqa: E402

FLAGS = {"sft": [], "rm": [], "ppo": []}


def test_plan_collects_once_and_subsamples_for_the_smaller_rms(tmp_path):
    plan, sft, runs = overopt.plan_runs(tmp_path, None, [4000, 1000, 0], 0.01, 50, FLAGS)
    names = [p[0] for p in plan]
    assert names == ["sft", "rm-all", "rm-1000", "ppo-rm-1000", "rm-4000", "ppo-rm-4000", "ppo-rm-all"]
    stage = {p[0]: [str(x) for x in p[2]] for p in plan}
    assert "--prefs" not in stage["rm-all"]  # the one collection
    for n in (1000, 4000):
        argv = stage[f"rm-{n}"]
        assert argv[argv.index("--prefs") + 1] == str(tmp_path / "rm-all" / "prefs.jsonl")
        assert argv[argv.index("--max-pairs") + 1] == str(n) and argv[argv.index("--min-steps") + 1] == "100"
    for name in ("rm-1000", "rm-4000", "rm-all"):
        argv = stage[f"ppo-{name}"]
        assert argv[argv.index("--reward") + 1] == str(tmp_path / name) and argv[argv.index("--kl-coef") + 1] == "0.01"
        assert argv[argv.index("--eval-interval") + 1] == "5" and argv[argv.index("--eval-prompts") + 1] == "512"
        assert runs[name] == (tmp_path / name, tmp_path / f"ppo-{name}")
    # an existing SFT run: no SFT stage, and everything reads that one
    plan2, sft2, _ = overopt.plan_runs(tmp_path, tmp_path / "mine", [0], 0.0, 50, FLAGS)
    assert [p[0] for p in plan2] == ["rm-all", "ppo-rm-all"] and sft2 == (tmp_path / "mine").resolve()
    # finished stages are skipped; a stage downstream of an unfinished one runs
    fake_finished(plan, {"sft", "rm-all", "rm-1000"})
    done = dict(sweep.run_plan(plan, dry_run=True))
    assert [n for n, t in done.items() if t == "skipped"] == ["sft", "rm-all", "rm-1000"]


def test_best_of_n_curve_picks_the_rm_best_and_fits_recover_a_known_curve():
    gold = [[0.0, 1.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0]]  # prompt means 1.5 and 3.5
    rm = [[0.0, 2.0, 1.0, 3.0], [1.0, 0.0, 0.0, 4.0]]  # prompt means 1.5 and 1.25
    pts = overopt.bon_curve(gold, rm, [1, 2, 4])
    # n=1 picks (0.0, 5.0), n=2 picks (1.0, 5.0), n=4 picks (3.0, 2.0): gains over each prompt's mean gold
    assert [p["gain"] for p in pts] == pytest.approx([0.0, 0.5, 0.0])
    assert pts[1]["gain_sem"] == pytest.approx(abs(-0.5 - 1.5) / 2)  # s.e. of the per-prompt gains (-0.5, 1.5)
    assert [p["rm_gain"] for p in pts] == pytest.approx([(-1.5 - 0.25) / 2, (0.5 - 0.25) / 2, (1.5 + 2.75) / 2])
    assert pts[0]["kl"] == 0.0 and pts[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    # gold gain exactly d(1 - 0.5 d): the fit recovers it and the measured peak is the best point
    fake = [{"kl": k, "gain": math.sqrt(k) * (1 - 0.5 * math.sqrt(k)), "gain_sem": 0.01}
            for k in (0.1, 0.5, 1.0, 2.0, 4.0)]
    f = overopt.fit_curve(fake, "bon")
    assert f["alpha"] == pytest.approx(1.0) and f["beta"] == pytest.approx(0.5) and f["peak_kl"] == pytest.approx(1.0)
    assert f["measured_peak"]["kl"] == 1.0 and f["measured_peak"]["gain"] == pytest.approx(0.5)


def test_ppo_curve_reads_the_held_out_evaluations(tmp_path):
    rows = [{"iter": i, "kl": 0.1 * i, "gold_mean": float(i)} for i in range(7)]
    for i in (2, 5, 6):  # train_ppo.py --eval-interval 3 over 7 iterations
        rows[i].update(eval_kl_mean=0.5 * i, eval_kl_sem=0.1, eval_gold_gain=0.2 * i, eval_gold_gain_sem=0.05,
                       eval_score_mean=1.0 * i, eval_ref_score_mean=0.5)
    rows[2]["eval_kl_mean"] = -0.01  # the per-sample estimator can dip below 0 near the start: clamped
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pts = overopt.ppo_curve(tmp_path / "metrics.jsonl")
    assert [p["iter"] for p in pts] == [2, 5, 6] and [p["kl"] for p in pts] == [0.0, 2.5, 3.0]
    assert [p["gain"] for p in pts] == pytest.approx([0.4, 1.0, 1.2])
    assert [p["rm_gain"] for p in pts] == pytest.approx([1.5, 4.5, 5.5]) and pts[0]["gain_sem"] == 0.05


def test_a_tiny_experiment_end_to_end_writes_the_report(tmp_path):
    # the whole command on tiny models: two RMs (20 pairs and all), weak-KL PPO evaluated along the way on held-out
    # prompts, best-of-n up to 4; report.json / report.md / report.png with every RM's curves and fits
    from tests.test_runs import RM, SFT, run_script
    run_script("train_sft.py", "--out-dir", tmp_path / "sft", *SFT, "--steps", "200")
    ppo = ("--batch-size 8 --minibatches 2 --epochs 2 --n-eval 8 --device cpu")
    overopt.main(["--out", str(tmp_path / "exp"), "--sft", str(tmp_path / "sft"), "--rm-pairs", "20", "0",
                  "--ppo-iterations", "4", "--eval-interval", "2", "--eval-prompts", "6", "--bon-max", "4",
                  "--bon-prompts", "5", "--max-new-tokens", "8", "--device", "cpu", "--rm-flags", " ".join(RM + ["--n-prompts", "80", "--k", "4"]),
                  "--ppo-flags", ppo + " --max-new-tokens 8"])
    exp = tmp_path / "exp"
    rep = json.loads((exp / "report.json").read_text())
    assert list(rep["rms"]) == ["rm-20", "rm-all"]
    for name, r in rep["rms"].items():
        assert [p["n"] for p in r["bon"]] == [1, 2, 4]
        rm_gains = [p["rm_gain"] for p in r["bon"]]
        assert rm_gains == sorted(rm_gains)  # the best of more samples scores at least as high under that RM
        assert [p["iter"] for p in r["ppo"]] == [1, 3]  # evaluated after iterations 2 and 4
        assert r["bayes_accuracy"] and r["test_accuracy"] is not None
        assert {"alpha", "beta", "rmse", "measured_peak"} <= set(r["bon_fit"])
        # how the RM prices each part of the gold reward (also for rm-20, trained on a --prefs file of the task)
        assert set(r["part_weights"]["weights"]) == set(rep["gold_weights"]) and r["part_weights"]["scale"]
        assert set(r["bon"][-1]["parts"]) == set(r["ppo"][-1]["parts"]) == set(rep["sft_parts"])
    assert 0 < rep["rms"]["rm-20"]["n_train_pairs"] <= 20 < rep["rms"]["rm-all"]["n_train_pairs"]
    # the small RM trains for --rm-min-steps (100) steps, not the handful that 2 epochs of 20 pairs would give
    assert json.loads((exp / "rm-20" / "metrics.json").read_text())["steps"] == 100
    md = (exp / "report.md").read_text()
    assert "Stages:" in md and "- rm-all prices: sentiment +1.00 (gold +1.00)" in md and "- SFT responses:" in md
    if rep["plot"]:
        assert (exp / "report.png").stat().st_size > 10_000
