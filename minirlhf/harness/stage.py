"""The one seam between a training script and the harness: a Stage is one run of one stage of the pipeline.

    st = Stage("train_sft.py", a, inputs={"--data": a.data})  # device, dtype, seed; the staging folder, locked
    extra = st.resume(model=model, optimizer=opt, generators=[gen])  # what a resume checkpoint holds
    for step in st.steps(a.steps, "sft"):                     # from the resumed step on, with a progress bar
        ...
        st.optimize(opt, loss, model, step=step)              # backward, clip, NaN watch, optimizer step
        st.log(row, step)                                     # metrics.jsonl, after the NaN checks
        st.save(step, last=..., tokens_seen=tokens_seen)      # every --save-interval steps: resume.pt
    st.save_model(model, tok, kind="policy", stage="sft")
    st.finish(metrics)                                        # metrics.json, then the run appears at --out-dir

Everything a run writes goes to its staging folder `st.dir` (runs.Run). Under torchrun the same calls work on every
rank (rank 0 owns the files; statistics are the global batch's); in one process every distributed helper is the
identity, so no training loop branches on torchrun.
"""
import math
import time

import torch

from minirlhf.harness import dist
from minirlhf.harness.checkpoint import save_run
from minirlhf.harness.cli import MetricsLog, Progress, resolve_device, resolve_dtype, set_head_precision, set_seed
from minirlhf.harness.files import write_json
from minirlhf.harness.runs import FiniteCheck, NonFiniteError, Run, rng_state, set_rng_state


class Stage:
    def __init__(self, script: str, args, inputs: dict, unit: str = "step"):
        """Device (cuda:LOCAL_RANK under torchrun), dtype and seed from the args; then the output location is checked
        (writable, free, no input of the run: `inputs` = {flag: path}) and its staging folder created or resumed."""
        self.script, self.args, self.unit = script, args, unit
        self.device = dist.setup(resolve_device(args.device))
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.head_precision = set_head_precision(args.head_precision, self.device, self.dtype)
        set_seed(args.seed)
        self.run = Run(args.out_dir, args, resume=args.resume, inputs=inputs)
        self.dir = self.run.dir
        self.saved = self.run.load_resume()  # the last resume checkpoint's contents, None on a fresh start
        self.finite = FiniteCheck(script, unit=unit)
        self.objects, self.generators, self.start, self.t0, self.metrics_log = {}, [], 0, time.time(), None
        self.checked = None  # the last step check() passed

    def resume(self, generators=(), **objects) -> dict:
        """Name, once, what a resume checkpoint holds: modules and optimizers (their state_dict), plain objects such as
        a KL controller (their attributes) and the loop's torch Generators (with the global RNG streams). On --resume
        they are restored and save()'s extras returned ({} on a fresh start). Opens metrics.jsonl (continued)."""
        self.objects, self.generators = objects, list(generators)
        s = self.saved
        self.metrics_log = MetricsLog(self.dir / "metrics.jsonl", keep_rows=s["log_rows"] if s else None)
        if s is None:
            return {}
        for name, obj in objects.items():
            obj.load_state_dict(s[name]) if hasattr(obj, "load_state_dict") else vars(obj).update(s[name])
        set_rng_state(s["rng_ranks"][dist.rank()] if "rng_ranks" in s else s["rng"], self.generators)
        self.start, self.t0 = s["step"], self.t0 - s["elapsed_s"]
        return s["extra"]

    def steps(self, total: int, desc: str, start: int = None) -> Progress:
        """range(start, total) with a progress bar (a plain line per log() call off a terminal); start = the resumed
        step unless given."""
        return Progress(range(self.start if start is None else start, total), desc=desc, total=total)

    def elapsed(self) -> float:
        """Seconds of this run, across resumptions."""
        return time.time() - self.t0

    def optimize(self, optimizer, loss, *models, step: int) -> list:
        """One optimizer step: backward, each model's gradient norm clipped to --grad-clip (0 = no clip) and watched
        for NaN/inf with the loss, then the step. Returns the norms before clipping (tensors: no host sync)."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
        norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), limit) for m in models]
        self.finite.watch(step, loss=loss, **{f"grad_norm{'_' + str(i) if i else ''}": n for i, n in enumerate(norms)})
        optimizer.step()
        return norms

    def log(self, row: dict, step: int, *models):
        """Write one metrics.jsonl line, after the NaN checks (check; not twice when the step was checked already)."""
        if self.checked != step:
            self.check(row, step, *models)
        self.metrics_log.write(row)

    def check(self, row: dict, step: int, *models):
        """A watched value (optimize) that was ever non-finite, a non-finite number in the row, or non-finite weights
        of `models` stop the run here, naming the step, before anything is logged or saved."""
        self.finite.check(*models)  # one host transfer for the watched values and the weights together
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"{self.script}: {', '.join(bad)} became non-finite (NaN/inf) at {self.unit} {step}; "
                                 f"stopped without saving (lower --lr)")
        self.checked = step

    def save(self, step: int, last: bool, **extra):
        """After `step`, every --save-interval steps but the last: a resume checkpoint (see checkpoint)."""
        every = self.args.save_interval
        if every and (step + 1) % every == 0 and not last:
            self.checkpoint(step + 1, **extra)

    def checkpoint(self, next_step: int, **extra):
        """resume.pt in the staging folder: the objects named in resume(), every RNG stream (each rank's), the log
        position and `extra` (plain numbers, tensors, lists); never with non-finite weights."""
        rng = rng_state(self.generators)
        state = {"step": next_step, "unit": self.unit, "extra": extra, "rng": rng, "log_rows": self.metrics_log.rows,
                 "elapsed_s": self.elapsed(),
                 **{k: o.state_dict() if hasattr(o, "state_dict") else vars(o) for k, o in self.objects.items()}}
        if dist.enabled():
            state["rng_ranks"] = dist.all_gather_objects([rng])
        models = [o for o in self.objects.values() if isinstance(o, torch.nn.Module)]
        self.run.save_resume(state, self.finite, models)

    def save_model(self, model, tok, others=(), **config):
        """The trained model as model.pt + config.json + tokenizer.json (rank 0; checkpoint.save_run), once the ranks
        are known to hold the same weights (also those of the `others` trained beside it) and they are finite."""
        self.metrics_log.close()
        self.finite.check(model, *others)
        dist.assert_identical(model, *others)
        save_run(self.dir, model, tok, self.args, **config)

    def finish(self, metrics: dict, summary: bool = False):
        """metrics.json, written last, then the staging folder becomes --out-dir; prints what it holds (and with
        summary=True every metric on one line). Returns that path."""
        write_json(self.dir / "metrics.json", metrics)
        self.run.finish()
        if summary:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if self.run.out.is_dir():  # (rank 0's)
            print(f"wrote {self.run.out}/: {', '.join(sorted(p.name for p in self.run.out.iterdir()))}")
        return self.run.out


class Stats:
    """Statistics of an update kept on the device (an .item() each would stall a GPU many times per minibatch):
    add() them per minibatch; host() moves them all in one transfer and returns each one's mean over the minibatches
    or, for the `maxima`, its maximum. Under torchrun they are the global batch's: means (maxima) over ranks."""

    def __init__(self, maxima=()):
        self.values, self.maxima = {}, set(maxima)

    def add(self, **values):
        for k, v in values.items():
            self.values.setdefault(k, []).append(v.detach().float())

    def host(self) -> dict:
        keys = [k for k, vs in self.values.items() for _ in vs]
        flat = torch.stack([v for vs in self.values.values() for v in vs])
        host = torch.cat([dist.mean_over_ranks(flat), dist.all_reduce_max(flat)]).tolist()  # the one transfer
        means, maxima = host[:len(keys)], host[len(keys):]
        cols = {}
        for k, mean, top in zip(keys, means, maxima):
            cols.setdefault(k, []).append(top if k in self.maxima else mean)
        return {k: max(v) if k in self.maxima else sum(v) / len(v) for k, v in cols.items()}
