"""Our executor vs torch.distributed.pipelining, each schedule against torch's same schedule: same model, split, m, data and init.

    python benchmarks/vs_torch_pipelining.py [--p 2 4] [--m 4 8] [--pairs 10] [--warmup 2]
        [--schedule 1f1b gpipe interleaved zbv dualpipev] [--their-set-to-none true|false] [--json FILE]

Pairs (ours -> theirs, :data:`THEIRS`): 1f1b -> Schedule1F1B, gpipe -> ScheduleGPipe, interleaved
(2 chunks) -> ScheduleInterleaved1F1B, zbv -> ScheduleZBVZeroBubble, dualpipev -> ScheduleDualPipeV
(needs m >= 2p; skipped below), zb-h1 -> Schedule1F1B (torch has no ZB-H1: not a same-schedule
pair). Both sides of a pair use the plan's split and stage -> rank map (the V for zbv/dualpipev).

For each (p, m) one torchrun launch of p gloo ranks (1 thread each) builds all pipelines from
the same seed: ours, once per ``--schedule`` (pipetrain's Trainer: persistent buffers, prefetched
irecv, the schedule's compute order; zb-h1 with the linear layers' weight gradients deferred to
W, :mod:`pipetrain.executor.wgrad`) and theirs (PipelineStage + Schedule1F1B, scale_grads=True),
each with its own copy of the weights and its own SGD. Every step runs each pipeline once on the
same data (global batch 64, m micro-batches), in an order that rotates from step to step
(A B C, B C A, C A B, ...); a step's time is the slowest rank's, measured from a common barrier.
A last row per (p, m), ``best:``, pits the schedule ``pipetrain plan`` picks for this job on this
CPU (pp and m pinned; run too if not asked for) against torch's fastest schedule there, step by
step (each step's ours over the fastest of theirs in that step).
Reported per schedule of ours: the median over steps of (ours / theirs) after ``--warmup``
steps (their first step infers shapes) with its 95% bootstrap interval, the medians of each
side, the ratios of CPU time per step (all threads / main thread), the page faults per step of each
side (minor: first touches of fresh allocations, all ranks), the time all ranks spend blocked on
point-to-point work per step (each side's own wait calls timed), and the largest relative loss
difference between the two trajectories. Our telemetry is on (in-memory events, one JSONL record per step), as in a
normal run. The machine is shared: the load average before/after is printed; distrust a run
whose load exceeded the rank count.

Model: ``resmlp`` (8 pre-LN residual MLP blocks, d=256, hidden 1024, + linear head), fp32, SGD
lr 0.05, no clipping. Split (``--split``): ``layers`` (default, the setup of the
comparison recorded in benchmarks/RESULTS.md): the 8 MLP blocks split equally, the head on the last
stage; ``blocks``: the 9 blocks split as evenly as they go (5 | 4 at p=2: the first stage is the
bottleneck and the schedule matters less).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GLOBAL_BATCH = 64
MODEL = "resmlp"
#: torch's schedule class for each of ours
THEIRS = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved": "ScheduleInterleaved1F1B",
          "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV", "zb-h1": "Schedule1F1B"}
CHUNKS = {"interleaved": 2, "zbv": 2, "dualpipev": 2}


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def split_boundaries(split: str, n_stages: int) -> list[int] | None:
    """Stage cuts of resmlp's 9 blocks (8 MLP blocks + head) into ``n_stages``: see the module docstring."""
    if split == "blocks":
        return None
    return [k * 8 // n_stages for k in range(1, n_stages)]


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", timeout=timeout)
    rank, p, m = dist.get_rank(), dist.get_world_size(), a.m

    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as torch_schedules

    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.optim import OptimConfig, make_optimizer
    from pipetrain.executor.plans import simple_plan
    from pipetrain.executor.stage import build_meta, load_spec, materialize_blocks, stage_modules
    from pipetrain.executor.trainer import Trainer

    spec = load_spec(MODEL)
    ours = {}
    plans = {}
    for name in a.schedule:
        chunks = CHUNKS.get(name, 1)
        plan = simple_plan(MODEL, pp=p, m=m, mbs=GLOBAL_BATCH // m, seq_len=1, schedule=name, optimizer="sgd",
                           boundaries=split_boundaries(a.split, p * chunks), chunks=chunks)
        plans[name] = plan
        run_dir = Path(a.run_dir) / name
        cfg = RunConfig(plan_path="(benchmark)", run_dir=str(run_dir), steps=10**6, lr=0.05, clip_norm=0.0, timeout_s=120)
        ours[name] = Trainer(cfg, plan, spec, build_meta(spec), torch.device("cpu"), timeout, rank, run_dir)

    def torch_side(name: str):  # type: ignore[no-untyped-def]
        """torch's same schedule on the same plan: its stages of this rank, the same split and placement."""
        plan = plans[name]
        mine = plan.stages_of_rank(rank)
        model = build_meta(spec)
        for st in mine:
            materialize_blocks(model, range(st.block_start, st.block_end), "cpu", plan.seed)
        mods = stage_modules(model, list(mine))
        stages = [PipelineStage(mods[st.index], st.index, plan.num_stages, torch.device("cpu")) for st in mine]
        cls = getattr(torch_schedules, THEIRS[name])
        sched = cls(stages if CHUNKS.get(name, 1) > 1 else stages[0], n_microbatches=m, loss_fn=spec.loss, scale_grads=True)
        params = [q for mod in mods.values() for q in mod.parameters()]
        opt = make_optimizer(params, OptimConfig(name="sgd", lr=0.05, clip_norm=0.0))
        first_here, last_here = 0 in mods, plan.num_stages - 1 in mods

        def step_fn(step: int) -> float | None:
            inputs, targets = ours[name].batches(step)  # this plan's placement decides which rank needs what
            opt.zero_grad(set_to_none=a.their_set_to_none == "true")
            losses: list[torch.Tensor] = []
            args = (torch.cat(inputs),) if first_here else ()
            kw = {"target": torch.cat(targets), "losses": losses, "return_outputs": False} if last_here else {}
            sched.step(*args, **kw)
            opt.step()
            return float(torch.stack(losses).mean()) if losses else None

        return step_fn

    import resource

    from pipetrain.executor.runtime import PipelineRuntime

    # seconds spent blocked on point-to-point work, each side's own wait calls timed: ours waiting for
    # a receive (and for sends at the end of a step), theirs in _wait_batch_p2p (receives and sends)
    waited = [0.0]

    def timing(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kw):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                waited[0] += time.perf_counter() - t
        return wrapper

    PipelineRuntime._wait_recv = timing(PipelineRuntime._wait_recv)  # type: ignore[method-assign]
    _poll = PipelineRuntime._poll_sends
    PipelineRuntime._poll_sends = lambda self, block=False: timing(_poll)(self, block) if block else _poll(self, block)  # type: ignore[method-assign]
    torch_schedules._wait_batch_p2p = timing(torch_schedules._wait_batch_p2p)

    def timed(fn, step: int) -> tuple[float, float | None, float, float, float, float]:  # type: ignore[no-untyped-def]
        """(slowest rank's wall time, loss, CPU time of all ranks' processes, of their main threads,
        page faults of all ranks' processes: minor, as a fresh allocation's first touch costs,
        seconds all ranks spent blocked on point-to-point work)."""
        dist.barrier()
        f0, w0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, waited[0]
        c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        loss = fn(step)
        t1, c1, m1 = time.perf_counter(), time.process_time(), time.thread_time()
        f1, w1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, waited[0]
        dt = torch.tensor([t1 - t0], dtype=torch.float64)
        cpu = torch.tensor([c1 - c0, m1 - m0, loss or 0.0, loss is not None, f1 - f0, w1 - w0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)  # the loss comes from whichever rank holds the last stage
        return float(dt), float(cpu[2] / cpu[3]) if cpu[3] else None, float(cpu[0]), float(cpu[1]), float(cpu[4]), float(cpu[5])

    sides = [*((name, tr.train_step) for name, tr in ours.items()), *((f"theirs-{name}", torch_side(name)) for name in ours)]
    rows = []
    for k in range(a.warmup + a.pairs):
        row: dict[str, Any] = {"step": k}
        for j in range(len(sides)):  # the order rotates every step: no side always runs right after another
            name, fn = sides[(k + j) % len(sides)]
            row[f"{name}_s"], row[f"{name}_loss"], row[f"{name}_cpu_s"], row[f"{name}_main_s"], row[f"{name}_faults"], row[f"{name}_wait_s"] = timed(fn, k)
        rows.append(row)
    if rank == 0:
        (Path(a.run_dir) / "bench.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def bootstrap_median_ci(xs: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``xs`` (Efron & Tibshirani 1993, ch. 13)."""
    import numpy as np

    arr = np.asarray(xs, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(arr, size=(resamples, arr.size), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def planner_choice(p: int, m: int) -> str:
    """The schedule `pipetrain plan` picks for this benchmark's job on this CPU at pp=p, m micro-batches."""
    from pipetrain.planner.explain import plan_job
    from pipetrain.planner.job import job_from_mapping

    job = job_from_mapping({"model": MODEL, "topology": f"local-cpu:{p}", "global_batch": GLOBAL_BATCH, "seq_len": 1,
                            "dtype": "fp32", "optimizer": "sgd", "pp": p, "microbatches": m}, source="benchmark")
    return plan_job(job).plan.schedule


def launch(p: int, m: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    from pipetrain.executor.launch import free_port

    chosen = planner_choice(p, m)
    names = [n for n in dict.fromkeys([*a.schedule, chosen]) if not (n == "dualpipev" and m < 2 * p)]  # torch refuses DualPipeV below m = 2p

    with tempfile.TemporaryDirectory(prefix="pipetrain-bench-") as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, "--bench-worker", "--bench-m", str(m),
               "--bench-pairs", str(a.pairs), "--bench-warmup", str(a.warmup), "--bench-dir", d, "--schedule", *names, "--split", a.split,
               "--their-set-to-none", a.their_set_to_none]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        load0 = _loadavg()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        load1 = _loadavg()
        if r.returncode != 0:
            raise SystemExit(f"p={p} m={m} failed:\n{r.stderr[-3000:]}")
        rows = json.loads((Path(d) / "bench.json").read_text())
    kept = rows[a.warmup:]
    out = []
    for name in names:
        th = f"theirs-{name}"
        ratios = [x[f"{name}_s"] / x[f"{th}_s"] for x in kept]
        lo, hi = bootstrap_median_ci(ratios)
        loss_rel = max(abs(x[f"{name}_loss"] - x[f"{th}_loss"]) / abs(x[f"{th}_loss"]) for x in rows)
        out.append({"p": p, "m": m, "schedule": name, "theirs_schedule": THEIRS[name], "ratio_median": statistics.median(ratios), "ratio_ci95": [lo, hi],
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios), "ours_ms": statistics.median(x[f"{name}_s"] for x in kept) * 1e3,
                    "theirs_ms": statistics.median(x[f"{th}_s"] for x in kept) * 1e3, "loss_rel_max": loss_rel,
                    "cpu_ratio": statistics.median(x[f"{name}_cpu_s"] / x[f"{th}_cpu_s"] for x in kept),
                    "main_ratio": statistics.median(x[f"{name}_main_s"] / x[f"{th}_main_s"] for x in kept),
                    "ours_faults": statistics.median(x[f"{name}_faults"] for x in kept),
                    "theirs_faults": statistics.median(x[f"{th}_faults"] for x in kept),
                    "ours_wait_ms": statistics.median(x[f"{name}_wait_s"] for x in kept) * 1e3,
                    "theirs_wait_ms": statistics.median(x[f"{th}_wait_s"] for x in kept) * 1e3,
                    "pairs": len(kept), "load_before": load0, "load_after": load1})
    # best of each side: ours as the planner chooses against torch's fastest schedule here, step by step
    theirs = [n for n in names if THEIRS[n] != "Schedule1F1B" or n == "1f1b"]  # each torch class once
    fastest = min(theirs, key=lambda n: statistics.median(x[f"theirs-{n}_s"] for x in kept))
    best = [x[f"{chosen}_s"] / min(x[f"theirs-{n}_s"] for n in theirs) for x in kept]
    lo, hi = bootstrap_median_ci(best)
    out.append({"p": p, "m": m, "schedule": f"best:{chosen}", "theirs_schedule": f"fastest:{THEIRS[fastest]}",
                "ratio_median": statistics.median(best), "ratio_ci95": [lo, hi], "ratio_min": min(best), "ratio_max": max(best),
                "ours_ms": statistics.median(x[f"{chosen}_s"] for x in kept) * 1e3,
                "theirs_ms": statistics.median(min(x[f"theirs-{n}_s"] for n in theirs) for x in kept) * 1e3,
                "loss_rel_max": float("nan"), "cpu_ratio": float("nan"), "main_ratio": float("nan"), "ours_faults": float("nan"),
                "theirs_faults": float("nan"), "ours_wait_ms": float("nan"), "theirs_wait_ms": float("nan"), "pairs": len(kept),
                "load_before": load0, "load_after": load1})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    # worker side (names torchrun's option parser cannot mistake for its own abbreviations)
    ap.add_argument("--bench-worker", action="store_true", dest="worker", help=argparse.SUPPRESS)
    ap.add_argument("--bench-m", type=int, default=0, dest="wm", help=argparse.SUPPRESS)
    ap.add_argument("--bench-pairs", type=int, default=0, dest="wpairs", help=argparse.SUPPRESS)
    ap.add_argument("--bench-warmup", type=int, default=0, dest="wwarmup", help=argparse.SUPPRESS)
    ap.add_argument("--schedule", nargs="+", default=["1f1b", "gpipe", "interleaved", "zbv", "dualpipev"], choices=list(THEIRS),
                    help="our schedules, each timed in the same rotation against torch's same schedule (THEIRS); "
                         "zb-h1 has no torch equivalent and is timed against Schedule1F1B")
    ap.add_argument("--split", default="layers", choices=["layers", "blocks"],
                    help="layers: the 8 MLP blocks split equally, head on the last stage; blocks: the 9 blocks split evenly")
    ap.add_argument("--their-set-to-none", default="true", choices=["true", "false"],
                    help="theirs: opt.zero_grad(set_to_none=...) before each step (torch's default: true; ours zeroes in "
                         "place on CPU, which saves the page faults of re-allocating the gradients)")
    ap.add_argument("--bench-dir", default="", dest="run_dir", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    a = ap.parse_args()
    if a.worker:
        a.m, a.pairs, a.warmup = a.wm, a.wpairs, a.wwarmup
        worker(a)
        return
    print(f"command: python benchmarks/vs_torch_pipelining.py --p {' '.join(map(str, a.p))} --m {' '.join(map(str, a.m))} "
          f"--pairs {a.pairs} --warmup {a.warmup} --schedule {' '.join(a.schedule)} --split {a.split} --their-set-to-none {a.their_set_to_none}")
    print(f"ours: pipetrain executor running {', '.join(a.schedule)}; theirs: torch.distributed.pipelining's same schedule "
          f"({', '.join(THEIRS[n] for n in a.schedule)})")
    print(f"model {MODEL}, global batch {GLOBAL_BATCH}, fp32, gloo, 1 thread per rank, A/B alternating per step, "
          f"split {a.split} (p=2: {split_boundaries(a.split, 2) or [5]})")
    print(f"{'p':>2} {'m':>2} {'ours':>11} | {'ours ms':>8} {'theirs ms':>9} | {'median ours/theirs':>18} {'95% CI':>14} | "
          f"{'loss rel diff':>13} | CPU ratio all/main | page faults ours/theirs | p2p wait ms ours/theirs | load before/after")
    out = []
    for p in a.p:
        for m in a.m:
            if m < p:
                print(f"{p:>2} {m:>2} | skipped: torch's schedules need m >= p")
                continue
            for r in launch(p, m, a):
                out.append(r)
                print(f"{p:>2} {m:>2} {r['schedule']:>11} | {r['ours_ms']:8.1f} {r['theirs_ms']:9.1f} | {r['ratio_median']:18.3f} "
                      f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {r['loss_rel_max']:13.2e} | "
                      f"{r['cpu_ratio']:8.3f}/{r['main_ratio']:.3f}  | {r['ours_faults']:8.0f}/{r['theirs_faults']:.0f}  | "
                      f"{r['ours_wait_ms']:8.1f}/{r['theirs_wait_ms']:.1f}  | "
                      f"{r['load_before']:.1f}/{r['load_after']:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    for name in a.schedule:
        mine = [r for r in out if r["schedule"] == name]
        if not mine:
            continue
        met = sum(r["ratio_median"] <= 0.95 for r in mine)
        print(f"target median ours/theirs <= 0.95 with ours running {name}: met in {met} of {len(mine)} configurations"
              + ("" if met == len(mine) else " (not met everywhere)"))
    busy = [r for r in out if max(r["load_before"], r["load_after"]) > r["p"] and r["schedule"] == a.schedule[0]]
    if busy:
        print(f"warning: load average exceeded the rank count during {len(busy)} configuration(s): the machine was shared, "
              "ratios are noisy; rerun when it is quiet")


if __name__ == "__main__":
    main()
