"""overopt.py's bookkeeping: which RM is trained on what, which PPO run reads which RM, skipping finished stages, and
the best-of-n / PPO curves and fits it reports."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
        assert argv[argv.index("--max-pairs") + 1] == str(n)
    for name in ("rm-1000", "rm-4000", "rm-all"):
        argv = stage[f"ppo-{name}"]
        assert argv[argv.index("--reward") + 1] == str(tmp_path / name) and argv[argv.index("--kl-coef") + 1] == "0.01"
        assert runs[name] == (tmp_path / name, tmp_path / f"ppo-{name}")
    # an existing SFT run: no SFT stage, and everything reads that one
    plan2, sft2, _ = overopt.plan_runs(tmp_path, tmp_path / "mine", [0], 0.0, 50, FLAGS)
    assert [p[0] for p in plan2] == ["rm-all", "ppo-rm-all"] and sft2 == (tmp_path / "mine").resolve()
    # finished stages are skipped; a stage downstream of an unfinished one runs
    fake_finished(plan, {"sft", "rm-all", "rm-1000"})
    done = dict(sweep.run_plan(plan, dry_run=True))
    assert [n for n, t in done.items() if t == "skipped"] == ["sft", "rm-all", "rm-1000"]


def test_best_of_n_curve_picks_the_rm_best_and_fits_recover_a_known_curve():
    gold = [[0.0, 1.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0]]
    rm = [[0.0, 2.0, 1.0, 3.0], [1.0, 0.0, 0.0, 4.0]]
    pts = overopt.bon_curve(gold, rm, [1, 2, 4])
    assert [p["gold"] for p in pts] == [2.5, 3.0, 2.5]  # n=2 picks (1.0, 5.0); n=4 picks (3.0, 2.0)
    assert [p["rm"] for p in pts] == [0.5, 1.5, 3.5]
    assert pts[0]["kl"] == 0.0 and pts[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    # gold gain exactly d(1 - 0.5 d): the fit recovers it and the measured peak is the best point
    fake = [{"kl": k, "gold": 0.2 + math.sqrt(k) * (1 - 0.5 * math.sqrt(k))} for k in (0.1, 0.5, 1.0, 2.0, 4.0)]
    f = overopt.fit_curve(fake, 0.2, "bon")
    assert f["alpha"] == pytest.approx(1.0) and f["beta"] == pytest.approx(0.5) and f["peak_kl"] == pytest.approx(1.0)
    assert f["measured_peak"]["kl"] == 1.0


def test_ppo_curve_averages_windows_of_iterations(tmp_path):
    rows = [{"iter": i, "kl": 0.1 * i, "gold_mean": float(i), "rm_score_mean": 2.0 * i} for i in range(7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pts = overopt.ppo_curve(tmp_path / "metrics.jsonl", 3)
    assert [p["iter"] for p in pts] == [2, 5] and [p["gold"] for p in pts] == [1.0, 4.0]
    assert pts[1]["kl"] == pytest.approx(0.4) and pts[1]["rm"] == pytest.approx(8.0)
