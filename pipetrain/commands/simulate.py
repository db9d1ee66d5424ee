"""Simulate one training step of a schedule from per-stage times, or of a plan file.

``pipetrain simulate --stages P --microbatches M --schedule 1f1b|gpipe|interleaved|zb-h1
[--chunks V] --t-fwd MS --t-bwd MS [--t-wgrad MS] [--t-comm MS] [--microbatch-size N]
[--buffers N] [--evaluator simpy|fast] [--json PATH|-] [--trace PATH] [--grid]``

Times are milliseconds per micro-batch for one pipeline rank's share of the model (with
``--chunks V`` each virtual stage takes 1/V of it). ``--t-bwd`` is the full backward, or only
the input-gradient part when ``--t-wgrad`` is given. ``--t-comm`` is the latency of each
stage-to-stage transfer. Prints step time, bubble and samples/s per device; ``--json`` writes the
full result (``step_time_s`` at the top level), ``--trace`` a Chrome trace for Perfetto.

``pipetrain simulate PLAN.json [--evaluator ...] [--json ...] [--trace ...]`` simulates a saved
plan on its topology (the planner traces the model on the meta device to rebuild the costs).

``pipetrain simulate --torch-schedule NAME|CSV (--plan PLAN.json | per-stage flags)
[--recv-mode post|in-order] [--defer-pp-recv]`` simulates torch's own schedule (a class of
``torch.distributed.pipelining``, e.g. ``ScheduleInterleaved1F1B``, or a CSV as its
``_PipelineScheduleRuntime._load_csv`` reads it) on the same costs, and prints it beside its compute
order and the plan's own schedule (:mod:`pipetrain.torchsched`). ``--recv-mode in-order`` is an NCCL
stream (a posted receive holds back the rank's later sends), ``post`` gloo.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from pipetrain.errors import ConfigError

if TYPE_CHECKING:
    from pipetrain.program.spec import SimInput
    from pipetrain.simulator import SimResult
    from pipetrain.torchsched import Comparison

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", nargs="?", metavar="PLAN.json", default=None,
                        help="a plan file from `pipetrain plan` (instead of the per-stage flags)")
    parser.add_argument("--plan", dest="plan_file", metavar="PLAN.json", default=None, help="the plan file, as a flag")
    parser.add_argument("--torch-schedule", metavar="NAME|CSV", default=None,
                        help="also simulate torch's schedule: Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleLoopedBFS, "
                             "ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV, or a CSV file as torch's "
                             "_load_csv reads it; printed beside the plan's (or --schedule's) own schedule")
    parser.add_argument("--recv-mode", default="post", metavar="post|in-order|blocking",
                        help="post (gloo, pipetrain's runtime: a posted receive blocks nothing, sends are asynchronous; default), "
                             "in-order (an NCCL stream: a posted receive holds back the rank's later sends until its data is "
                             "there) or blocking (Megatron's p2p: each send holds its rank until its data arrived)")
    parser.add_argument("--defer-pp-recv", action="store_true",
                        help="torch's program with defer_pp_recv=True: each receive posted just before the compute that reads it")
    parser.add_argument("--stages", "-p", type=int, default=None, help="pipeline stages (ranks), P >= 1")
    parser.add_argument("--microbatches", "-m", type=int, default=None, help="micro-batches per step, M >= 1")
    parser.add_argument("--schedule", default="1f1b", help="gpipe | 1f1b (default) | interleaved | zb-h1")
    parser.add_argument("--chunks", type=int, default=1, help="model chunks per rank for --schedule interleaved (V)")
    parser.add_argument("--t-fwd", type=float, default=None, metavar="MS", help="forward time per micro-batch per rank, ms")
    parser.add_argument("--t-bwd", type=float, default=None, metavar="MS", help="backward (input-grad part if --t-wgrad) time, ms")
    parser.add_argument("--t-wgrad", type=float, default=0.0, metavar="MS", help="weight-gradient time, ms (default 0)")
    parser.add_argument("--t-comm", type=float, default=0.0, metavar="MS", help="stage-to-stage transfer latency, ms (default 0)")
    parser.add_argument("--microbatch-size", type=int, default=1, metavar="N", help="samples per micro-batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=1, metavar="N", help="tokens per sample, for tokens/s (default 1)")
    parser.add_argument("--buffers", type=int, default=None, metavar="N",
                        help="activation buffers per stage (default: as many as the schedule wants)")
    parser.add_argument("--evaluator", default="simpy", help="simpy (default: contention, buffers) or fast (longest path)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the full result as JSON to PATH ('-': stdout only)")
    parser.add_argument("--trace", metavar="PATH", default=None, help="write a Chrome trace (Perfetto) to PATH")
    parser.add_argument("--grid", action="store_true", help="also print the schedule as a step x rank grid")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="with a PLAN.json: cost model, link and CPU co-run speeds from `pipetrain calibrate`, "
                             "simulated as the executor runs the plan (default: analytic)")


def _simulate_plan(args: argparse.Namespace) -> SimInput:
    """A plan file: the planner rebuilds its SimInput (traces the model on the meta device)."""
    given = [f for f, v in (("--stages", args.stages), ("--microbatches", args.microbatches), ("--t-fwd", args.t_fwd),
                            ("--t-bwd", args.t_bwd), ("--buffers", args.buffers)) if v is not None]
    if given:
        raise ConfigError(f"give either a PLAN.json or per-stage flags, not both ({', '.join(given)} with {args.plan})")
    from pipetrain.plan import Plan
    from pipetrain.planner.explain import plan_sim_input

    if getattr(args, "calibration", None):
        from pipetrain.calibration.measured import calibrated_for, load_calibration
        from pipetrain.validation.fidelity import executor_sim_input

        plan = Plan.load(args.plan)
        topo, cost = calibrated_for(plan.topology, args.calibration, world_size=plan.world_size)
        # as the executor runs it, the same input `pipetrain run` compares its measurement with
        return executor_sim_input(plan, calibration=load_calibration(args.calibration), cost=cost, topology=topo)[0]
    return plan_sim_input(Plan.load(args.plan))


def _check_flags(args: argparse.Namespace) -> None:
    if getattr(args, "calibration", None):
        raise ConfigError("--calibration needs a PLAN.json (the per-stage flags are times already)")
    missing = [f for f, v in (("--stages", args.stages), ("--microbatches", args.microbatches),
                              ("--t-fwd", args.t_fwd), ("--t-bwd", args.t_bwd)) if v is None]
    if missing:
        raise ConfigError(f"simulate needs {', '.join(missing)} (or a PLAN.json)")
    if args.stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {args.stages}")
    if args.microbatches < 1:
        raise ConfigError(f"--microbatches must be >= 1, got {args.microbatches}")
    for flag, v in (("--t-fwd", args.t_fwd), ("--t-bwd", args.t_bwd), ("--t-wgrad", args.t_wgrad), ("--t-comm", args.t_comm)):
        if not v >= 0:
            raise ConfigError(f"{flag} must be a time >= 0 ms, got {v}")
    if args.microbatch_size < 1 or args.seq_len < 1:
        raise ConfigError("--microbatch-size and --seq-len must be >= 1")
    if args.buffers is not None and args.buffers < 1:
        raise ConfigError(f"--buffers must be >= 1, got {args.buffers}")
    if args.chunks < 1:
        raise ConfigError(f"--chunks must be >= 1, got {args.chunks}")


def _from_flags(args: argparse.Namespace) -> SimInput:
    from pipetrain.simulator import uniform

    _check_flags(args)
    ms = 1e-3
    return uniform(args.stages, args.microbatches, args.schedule, chunks=args.chunks, t_fwd_s=args.t_fwd * ms,
                   t_bwd_s=args.t_bwd * ms, t_wgrad_s=args.t_wgrad * ms, t_comm_s=args.t_comm * ms,
                   buffers=args.buffers, micro_batch_size=args.microbatch_size, seq_len=args.seq_len)


def run(args: argparse.Namespace) -> int:
    from pipetrain.simulator import fast_evaluate, simulate

    if args.evaluator not in ("simpy", "fast"):
        raise ConfigError(f"--evaluator {args.evaluator!r} is unknown; choose simpy or fast")
    if args.plan_file is not None:
        if args.plan is not None:
            raise ConfigError(f"give the plan once: {args.plan} and --plan {args.plan_file}")
        args.plan = args.plan_file
    if args.torch_schedule is not None:
        return _run_torch(args)
    if args.defer_pp_recv:
        raise ConfigError("--defer-pp-recv applies to torch's program: add --torch-schedule NAME "
                          "(pipetrain's own schedules post their receives as its runtime does)")
    from pipetrain.program import RECV_MODES

    if args.recv_mode not in RECV_MODES:
        raise ConfigError(f"--recv-mode {args.recv_mode!r} is unknown; choose one of {', '.join(RECV_MODES)}")
    if args.recv_mode != "post" and args.evaluator != "simpy":
        raise ConfigError(f"--recv-mode {args.recv_mode} needs the simpy engine: drop --evaluator fast")
    if args.plan is not None:
        inp = _simulate_plan(args)
    else:
        inp = _from_flags(args)
    if args.recv_mode != "post":  # a what-if of the same program: sends that block (Megatron), or an NCCL stream
        inp = replace(inp, recv_mode=args.recv_mode)
    result = simulate(inp) if args.evaluator == "simpy" else fast_evaluate(inp, events=args.trace is not None or args.json is not None)
    if args.trace:
        result.write_chrome_trace(args.trace)
    if args.json == "-":
        sys.stdout.write(result.to_json() + "\n")
        return 0
    if args.json:
        result.to_json(args.json)
    _print(result, inp)
    if args.grid:
        from pipetrain.schedules import format_grid

        print(format_grid(inp.schedule, max_steps=None))
    return 0


def _torch_chunks(args: argparse.Namespace, plan_chunks: int, plan_schedule: str) -> int:
    """Stages per rank for torch's interleaved classes: --chunks, else the plan's interleaving, else 2."""
    if args.chunks > 1:
        return int(args.chunks)
    return plan_chunks if plan_schedule == "interleaved" and plan_chunks > 1 else 2


def _run_torch(args: argparse.Namespace) -> int:
    """``--torch-schedule``: torch's program, its compute order and the own schedule on the same costs."""
    from pipetrain.program import RECV_MODES
    from pipetrain.torchsched import compare, flag_inputs, import_torch_schedule, plan_inputs

    if args.evaluator != "simpy":
        raise ConfigError("--torch-schedule needs the simpy engine (the fast evaluator ignores where receives are posted): "
                          "drop --evaluator fast")
    if args.recv_mode not in RECV_MODES:
        raise ConfigError(f"--recv-mode {args.recv_mode!r} is unknown; choose one of {', '.join(RECV_MODES)}")
    if getattr(args, "calibration", None):
        raise ConfigError("--torch-schedule prices with the plan's analytic cost model; drop --calibration")
    if args.buffers is not None:
        raise ConfigError("--buffers shapes pipetrain's own schedules; torch keeps a receive buffer per micro-batch: drop --buffers")
    if args.plan is not None:
        given = [f for f, v in (("--stages", args.stages), ("--microbatches", args.microbatches), ("--t-fwd", args.t_fwd),
                                ("--t-bwd", args.t_bwd)) if v is not None]
        if given:
            raise ConfigError(f"give either a plan or per-stage flags, not both ({', '.join(given)} with {args.plan})")
        from pipetrain.plan import Plan
        from pipetrain.planner.trace import trace_graph
        from pipetrain.topology import resolve_topology

        plan = Plan.load(args.plan)
        imported = import_torch_schedule(args.torch_schedule, plan.pp, plan.num_microbatches,
                                         chunks=_torch_chunks(args, plan.chunks, plan.schedule), defer_pp_recv=args.defer_pp_recv)
        graph = trace_graph(plan.model, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len, dtype=plan.dtype)
        ideal, own, notes = plan_inputs(plan, imported, graph=graph, topology=resolve_topology(plan.topology, world_size=plan.world_size))
        own_name = plan.schedule
    else:
        _check_flags(args)
        imported = import_torch_schedule(args.torch_schedule, args.stages, args.microbatches, chunks=_torch_chunks(args, 1, ""),
                                         defer_pp_recv=args.defer_pp_recv)
        ms = 1e-3
        own_chunks = args.chunks if args.schedule == "interleaved" else 1  # --chunks also sizes torch's interleaving
        ideal, own = flag_inputs(imported, args.schedule, t_fwd_s=args.t_fwd * ms, t_bwd_s=args.t_bwd * ms, t_wgrad_s=args.t_wgrad * ms,
                                 t_comm_s=args.t_comm * ms, chunks=own_chunks, micro_batch_size=args.microbatch_size, seq_len=args.seq_len)
        notes = ["REDUCE_GRAD dropped: dp=1 has nothing to reduce"]
        own_name = args.schedule
    cmp = compare(imported, ideal, own, recv_mode=args.recv_mode, own_name=own_name, notes=notes)
    if args.trace:
        cmp.torch.write_chrome_trace(args.trace)
    if args.json:
        import json

        text = json.dumps(cmp.to_dict(), indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
            return 0
        from pathlib import Path

        Path(args.json).write_text(text + "\n", encoding="utf-8")
    from pipetrain.torchsched import torch_input

    _print(cmp.torch, torch_input(ideal, imported, args.recv_mode))
    _print_comparison(cmp)
    if args.grid:
        from pipetrain.schedules import format_grid

        print(format_grid(imported.lowered, max_steps=None))
    return 0


def _print_comparison(cmp: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipetrain.torchsched import rank_peak_memory_bytes

    table = Table(title="torch's schedule against the plan's own, same costs")
    for col in ("schedule", "run as", "step ms", "bubble %", "peak MiB/rank", "samples/s"):
        table.add_column(col, justify="left" if col in ("schedule", "run as") else "right", no_wrap=col == "schedule")
    for name, how, res, sched in cmp.rows():
        table.add_row(name, how, f"{res.step_time_s * 1e3:.4g}", f"{res.bubble_fraction * 100:.1f}",
                      f"{max(rank_peak_memory_bytes(res, sched), default=0.0) / 2**20:.4g}", f"{res.samples_per_s:.4g}")
    console = Console()
    console.width = max(console.width, 112)  # one line per row, also in a log
    console.print(table)
    dropped = ", ".join(f"{n} {k}" for k, n in cmp.imported.dropped)
    for note in (*cmp.notes, f"dropped from torch's program: {dropped}" if dropped else ""):
        if note:
            console.print(f"note: {note}", highlight=False)


def _print(result: SimResult, inp: SimInput) -> None:
    from rich.console import Console
    from rich.table import Table

    sched = inp.schedule
    head = Table(title=f"{sched.name}: {sched.num_ranks} stages" + (f" x {sched.chunks} chunks" if sched.chunks > 1 else "")
                 + f", {sched.num_microbatches} micro-batches ({result.evaluator})", show_header=False)
    head.add_column("metric")
    head.add_column("value", justify="right")
    head.add_row("step time", f"{result.step_time_s * 1e3:.4g} ms")
    if result.sampled_steps > 1:
        lo, hi = result.step_time_quartiles_s
        head.add_row("sampled steps (latency distribution)", f"median of {result.sampled_steps}; quartiles {lo * 1e3:.4g} - {hi * 1e3:.4g} ms")
    head.add_row("bubble", f"{result.bubble_fraction * 100:.1f} %")
    head.add_row("samples/s per device", f"{result.samples_per_s_per_device:.4g}")
    head.add_row("samples/s", f"{result.samples_per_s:.4g}")
    head.add_row("tokens/s", f"{result.tokens_per_s:.4g}")
    if result.tflops_per_device is not None:
        head.add_row("model TFLOP/s per device", f"{result.tflops_per_device:.4g}")
    if result.mfu is not None:
        head.add_row("MFU", f"{result.mfu * 100:.1f} %")
    show_mem = any(result.peak_memory_bytes_per_stage)
    per = Table(title="per stage")
    for col in ("stage", "rank", "busy ms", "bubble %", "peak in flight") + (("peak memory MiB",) if show_mem else ()):
        per.add_column(col, justify="right")
    for s in range(sched.num_stages):
        mem = (f"{result.peak_memory_bytes_per_stage[s] / 2**20:.4g}",) if show_mem else ()
        per.add_row(str(s), str(sched.stage_to_rank[s]), f"{result.busy_s_per_stage[s] * 1e3:.4g}",
                    f"{result.bubble_fraction_per_stage[s] * 100:.1f}", str(result.peak_in_flight_per_stage[s]), *mem)
    console = Console()
    console.print(head)
    console.print(per)
