"""Data parallelism under torchrun: the process group, one device per rank, collectives, "rank 0 only".

    torchrun --standalone --nproc_per_node 2 train_sft.py ...        # one node, 2 processes (GPUs or CPU)

setup() reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE, joins the process group (NCCL on CUDA, gloo on the CPU)
and returns this rank's device. Without torchrun world size is 1 and every helper below is the identity, so a
one-process run computes exactly what it would without this module. Every rank draws the same global batch and
trains on its shard(); losses are normalised by the global count (global_mean) because DDP averages gradients;
sampling is sharded by batch and gathered in order; only rank 0 writes. What is guaranteed: docs/multi-gpu.md.
"""
import atexit
import builtins
import datetime
import os
import sys

import torch
import torch.distributed as tdist

_rank, _local_rank, _world = 0, 0, 1
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MINIRLHF_DIST_TIMEOUT_MIN", "30")))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return _rank


def world_size() -> int:
    return _world


def is_main() -> bool:
    return _rank == 0


def enabled() -> bool:
    return _world > 1


def setup(device: str) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1 and return this rank's device: 'cuda' (or 'cuda:N')
    becomes cuda:LOCAL_RANK, anything else is kept. Idempotent; without torchrun returns `device` unchanged."""
    global _rank, _local_rank, _world
    if env_world_size() <= 1:
        return device
    _rank, _local_rank, _world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), env_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{_local_rank}"
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
        atexit.register(teardown)
    if not is_main():  # one voice: the other ranks print nothing on stdout (errors on stderr still show)
        _print = builtins.print

        def print_(*args, **kw):
            if kw.get("file") not in (None, sys.stdout):
                _print(*args, **kw)
        builtins.print = print_
    return device


def teardown():
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier():
    if enabled():
        tdist.barrier()


# ----------------------------------------------------------------------------------------------- sharding
def shard_range(n: int) -> range:
    """This rank's contiguous slice of n items: ranks get sizes differing by at most 1, in rank order, so the
    shards concatenated in rank order are the items in their original order."""
    lo, hi = n * _rank // _world, n * (_rank + 1) // _world
    return range(lo, hi)


def shard(items):
    """This rank's contiguous shard of a list or tensor (see shard_range)."""
    r = shard_range(len(items))
    return items[r.start:r.stop]


# ----------------------------------------------------------------------------------------------- collectives
def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """op over ranks (a new tensor; `t` itself is left alone). World size 1: `t` as it is."""
    if not enabled():
        return t
    t = t.detach().clone()
    tdist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t):
    """Sum over ranks of a tensor (a new one; `t` itself is left alone) or a number. World size 1: `t` as it is."""
    if not enabled() or isinstance(t, torch.Tensor):
        return _all_reduce(t, tdist.ReduceOp.SUM)
    return _all_reduce(torch.tensor(t, dtype=torch.float64), tdist.ReduceOp.SUM).item()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank number (e.g. the logged loss). World size 1: `t` as it is."""
    return all_reduce_sum(t) / _world if enabled() else t


def global_mean(loss: torch.Tensor, count) -> torch.Tensor:
    """A loss that is a mean over this rank's `count` items (tokens, pairs) -> its share of the global batch's mean:
    loss * count * world / (global count). DDP averages the ranks' gradients, so the shares add up to the global mean
    also when the ranks hold different numbers of items. World size 1: `loss` as it is."""
    if not enabled():
        return loss
    count = torch.as_tensor(count, dtype=torch.float32, device=loss.device)
    return loss * (count * _world / all_reduce_sum(count).clamp(min=1))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, as all_reduce_sum."""
    return _all_reduce(t, tdist.ReduceOp.MAX)


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list of picklable items, in rank order (a rank's shard() order)."""
    if not enabled():
        return list(items)
    got = [None] * _world
    tdist.all_gather_object(got, list(items))
    return [x for part in got for x in part]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (shapes may differ in dim 0), in rank order, on t's device."""
    if not enabled():
        return t
    parts = all_gather_objects([t.detach().cpu()])
    return torch.cat(parts).to(t.device)


def sharded(fn, items: list) -> list:
    """fn (a list -> a list of as many results) on this rank's shard of items; every rank gets all the results, in
    the order of items. World size 1: fn(items)."""
    return all_gather_objects(fn(shard(items)))


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. a resume state read from rank 0's disk)."""
    if not enabled():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------- models
def wrap(model: torch.nn.Module, device: str):
    """DistributedDataParallel around `model` under torchrun (the gradients are averaged over ranks in the
    backward); the model itself otherwise. Call it on the model that is trained, after moving it to `device`."""
    if not enabled():
        return model
    return _DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped model's attributes (model.config, model.lm_head.weight: scoring.py reads
    them), so the training code can pass the wrapper wherever it passed the model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def assert_identical(*models):
    """Raise unless every rank holds the same weights (the scripts check once, before rank 0 saves)."""
    if not check_identical(*models):
        raise RuntimeError(f"rank {_rank}: the ranks' weights differ at the end of training (a bug: DDP keeps them "
                           f"equal); nothing was saved")


def check_identical(*models) -> bool:
    """Do all ranks hold the same weights? (a debugging aid and a test check; one all-reduce per model)."""
    if not enabled():
        return True
    ok = True
    for m in models:
        flat = torch.cat([p.detach().float().flatten() for p in m.state_dict().values() if p.is_floating_point()])
        ok &= bool(torch.equal(all_reduce_max(flat), flat) and torch.equal(-all_reduce_max(-flat), flat))
    return ok
