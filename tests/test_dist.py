"""Data parallelism under torchrun (minirlhf/dist.py), on the CPU with gloo: 2 processes must train what 1 process
trains on the same global batch, gather sharded samples in order, use global statistics, and write once."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minirlhf.harness import dist
from minirlhf import losses
from tests.inprocess import one_thread, run_main
from test_rm import tiny_sft  # noqa: F401  (a fixture: a rigged 1-layer policy whose samples end with EOS)

ROOT = Path(__file__).resolve().parents[1]
SFT = ["--steps", "4", "--n-train", "200", "--n-val", "8", "--n-samples", "4", "--n-layer", "1", "--n-head", "2",
       "--n-embd", "32", "--vocab-size", "300", "--device", "cpu", "--log-interval", "1", "--eval-interval", "4",
       "--max-new-tokens", "8", "--warmup-steps", "1", "--lr", "1e-2",
       "--batch-size", "7"]  # odd: the ranks' shards hold 3 and 4 sequences, so different numbers of loss tokens


def run(args, nproc: int, tmp: Path, check=True):
    """One process (the world-size-1 path: main() in this process, one thread like each torchrun process) or
    torchrun with nproc processes."""
    if nproc == 1:  # must succeed: run_main raises what a subprocess would have exited non-zero on
        with one_thread():
            return run_main(*args)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))  # rank > 0 scratch folders land in tmp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def max_diff(dir_a: Path, dir_b: Path) -> float:
    a = torch.load(dir_a / "model.pt", weights_only=True)
    b = torch.load(dir_b / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sft):  # noqa: F811
    """SFT, RM and DPO, each with 1 and with 2 processes (the 2-process RM/DPO start from the same SFT run)."""
    t = tmp_path_factory.mktemp("dist")
    out = {}
    for n in (1, 2):
        scratch = t / f"tmp{n}"
        scratch.mkdir()
        out[f"sft{n}"] = run(["train_sft.py", "--out-dir", str(t / f"sft{n}"), *SFT], n, scratch)
        out[f"rm{n}"] = run(["train_rm.py", "--out-dir", str(t / f"rm{n}"), "--policy", str(tiny_sft),
                             "--n-prompts", "12", "--n-test-prompts", "6", "--k", "3", "--n-norm", "12",
                             "--n-eval", "12", "--gen-batch-size", "8", "--max-new-tokens", "8", "--batch-size", "3",
                             "--epochs", "1", "--lr", "1e-2", "--warmup-steps", "1", "--device", "cpu",
                             "--log-interval", "1"], n, scratch)
        out[f"dpo{n}"] = run(["train_dpo.py", "--out-dir", str(t / f"dpo{n}"), "--policy", str(tiny_sft),
                              "--prefs", str(t / "rm1" / "prefs.jsonl"), "--batch-size", "7", "--epochs", "1",
                              "--lr", "1e-2", "--warmup-steps", "1", "--n-eval", "4", "--max-new-tokens", "8",
                              "--log-interval", "1", "--device", "cpu"], n, scratch)
        out[f"scratch{n}"] = scratch
    out["dir"] = t
    return out


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_train_what_one_process_trains(runs, stage):
    t = runs["dir"]
    # float32 reduction order differs (DDP's all-reduce, smaller forwards); Adam then amplifies it a little. A
    # per-rank mean (unequal shards weighted equally) is off by ~1e-3 here (checked by breaking the normalisation).
    assert max_diff(t / f"{stage}1", t / f"{stage}2") < 2e-4
    # the logged numbers are the global batch's
    rows1 = [json.loads(line) for line in (t / f"{stage}1" / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(line) for line in (t / f"{stage}2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows1) == len(rows2)  # one writer: no line twice
    assert rows1[0]["loss"] == pytest.approx(rows2[0]["loss"], abs=1e-5)


def test_sharded_preference_collection_writes_the_one_process_file(runs):
    t = runs["dir"]
    # same prompts, same sampling batches, each batch with its own seed (seed, i): identical, token for token
    assert (t / "rm1" / "prefs.jsonl").read_bytes() == (t / "rm2" / "prefs.jsonl").read_bytes()
    m1, m2 = (json.loads((t / f"rm{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert m1["n_train_pairs"] == m2["n_train_pairs"] and m1["raw_reward_mean"] == pytest.approx(
        m2["raw_reward_mean"], abs=1e-4)


def test_a_step_with_fewer_pairs_than_processes_trains_what_one_process_trains(tmp_path, tiny_sft):  # noqa: F811
    # k = 2 and one prompt per step: each step holds one pair, so rank 0's shard of it is empty (it scores one pair at
    # weight 0, so that its backward still joins DDP's all-reduce)
    args = ["train_rm.py", "--policy", str(tiny_sft), "--n-prompts", "6", "--n-test-prompts", "4", "--k", "2",
            "--n-norm", "8", "--n-eval", "8", "--gen-batch-size", "8", "--max-new-tokens", "8", "--batch-size", "1",
            "--epochs", "1", "--lr", "1e-2", "--warmup-steps", "1", "--device", "cpu", "--log-interval", "1"]
    for n in (1, 2):
        run([*args, "--out-dir", str(tmp_path / f"rm{n}")], n, tmp_path)
    m1, m2 = (json.loads((tmp_path / f"rm{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert m1["steps"] == m2["steps"] == m1["n_train_pairs"] >= 2  # one pair per step
    assert max_diff(tmp_path / "rm1", tmp_path / "rm2") < 2e-4
    rows1, rows2 = ([json.loads(x) for x in (tmp_path / f"rm{n}" / "metrics.jsonl").read_text().splitlines()]
                    for n in (1, 2))
    assert [r["accuracy"] for r in rows1] == [r["accuracy"] for r in rows2]  # the real pair, not the dummy


def test_only_rank_zero_writes_and_prints(runs):
    t = runs["dir"]
    for stage in ("sft", "rm", "dpo"):
        assert not (t / f"{stage}2.partial").exists()
        assert sorted(p.name for p in (t / f"{stage}2").iterdir()) == sorted(p.name for p in (t / f"{stage}1").iterdir())
        assert runs[f"{stage}2"].stdout.count("\nwrote ") + runs[f"{stage}2"].stdout.startswith("wrote ") == 1
    assert not list(runs["scratch2"].glob("minirlhf-rank*"))  # rank 1's scratch folders are gone


def test_a_user_error_under_torchrun_stops_the_job(tmp_path):
    proc = run(["train_sft.py", "--out-dir", str(tmp_path / "sft"), *SFT, "--batch-size", "1"], 2, tmp_path,
               check=False)
    assert proc.returncode != 0
    assert "error: --batch-size 1: must be >= the number of processes (2" in proc.stderr
    assert not (tmp_path / "sft").exists()


def test_a_failure_on_rank_zero_alone_stops_the_others(tmp_path):
    # only rank 0 checks the output location (the others write to scratch): rank 1 goes on into training and would
    # wait in DDP's first collective for ever; torchrun must stop it once rank 0 exits with its one-line error
    (tmp_path / "file").write_text("")
    proc = run(["train_sft.py", "--out-dir", str(tmp_path / "file" / "sft"), *SFT], 2, tmp_path, check=False)
    assert proc.returncode != 0
    assert "error: --out-dir" in proc.stderr and "is a file, not a folder" in proc.stderr


# ----------------------------------------------------------------------------------------------- PPO statistics
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppo_stats_worker(rank, world, port, x, mask, seq_kl, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.setup("cpu")
    rows = dist.shard_range(x.size(0))
    xs, ms = x[rows.start:rows.stop], mask[rows.start:rows.stop]
    R = int(ms.sum(1).max())  # each rank's rollout is only as wide as its longest response
    xs, ms = xs[:, :R], ms[:, :R]
    white = losses.masked_whiten(xs, ms, all_reduce=dist.all_reduce_sum)
    white_keep = losses.masked_whiten(xs, ms, shift_mean=False, all_reduce=dist.all_reduce_sum)
    kl = dist.all_gather_cat(seq_kl[rows.start:rows.stop]).mean()  # what train_ppo feeds the controller
    ctl = losses.AdaptiveKLController(0.05, 1.0, 100)
    ctl.update(kl.item(), x.size(0))
    out[rank] = (rows.start, white, white_keep, kl, ctl.value, losses.masked_var(xs, ms, all_reduce=dist.all_reduce_sum))
    dist.teardown()


def test_ppo_global_whitening_and_kl_equal_one_process():
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    x = torch.randn(B, R, generator=g) * 3 + 1
    lengths = torch.tensor([9, 2, 3, 7, 8, 9])  # rank 0 holds 14 tokens, rank 1 24
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    seq_kl = torch.rand(B, generator=g)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ppo_stats_worker, args=(2, _free_port(), x, mask, seq_kl, out), nprocs=2, join=True)
        out = dict(out)
    ref_white = losses.masked_whiten(x, mask)
    ref_keep = losses.masked_whiten(x, mask, shift_mean=False)
    ctl = losses.AdaptiveKLController(0.05, 1.0, 100)
    ctl.update(seq_kl.mean().item(), B)
    # a per-rank whitening would differ: the two halves have different means
    assert not torch.allclose(losses.masked_whiten(x[:3], mask[:3]), ref_white[:3], atol=1e-3)
    for rank, (start, white, keep, kl, beta, var) in out.items():
        n, w = white.shape
        torch.testing.assert_close(white, ref_white[start:start + n, :w], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keep, ref_keep[start:start + n, :w], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(var, losses.masked_var(x, mask), atol=1e-5, rtol=1e-5)
        assert kl.item() == pytest.approx(seq_kl.mean().item(), abs=1e-6) and beta == pytest.approx(ctl.value)
    assert out[0][4] == out[1][4]  # the same beta on every rank


def test_world_size_one_is_the_plain_path():
    assert not dist.enabled() and dist.world_size() == 1 and dist.is_main()
    x = torch.randn(4, 5)
    m = (torch.rand(4, 5) > 0.3).float()
    # the global-batch statistics are bit for bit the one-process ones (what keeps one-process runs unchanged)
    for f in (losses.masked_whiten, losses.masked_var, losses.masked_mean, losses.explained_variance):
        args = (x, x.flip(0), m) if f is losses.explained_variance else (x, m)
        assert torch.equal(f(*args, all_reduce=dist.all_reduce_sum), f(*args))
    loss = x.sum()
    assert dist.global_mean(loss, 3) is loss and dist.mean_over_ranks(loss) is loss and dist.all_reduce_sum(7) == 7
    assert dist.all_gather_objects([1, 2]) == [1, 2] and dist.broadcast_object("a") == "a"
    assert [list(range(10))[slice(dist.shard_range(10).start, dist.shard_range(10).stop)]] == [list(range(10))]


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 2), (5, 1)])
def test_shards_cover_everything_in_order(n, world, monkeypatch):
    parts = []
    for r in range(world):
        monkeypatch.setattr(dist, "_rank", r)
        monkeypatch.setattr(dist, "_world", world)
        parts += list(dist.shard(list(range(n))))
    assert parts == list(range(n))
