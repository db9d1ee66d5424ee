"""Search the best pipeline plan for a job under memory caps and explain it.

``pipetrain plan CONFIG.yaml -o plan.json`` or with flags
``pipetrain plan --model llama2-70b --topology dgx-h100:8 --global-batch 1024 --seq-len 4096``.
Every knob (``--pp --dp --microbatches --microbatch-size --schedule --chunks --buffers
--recompute --boundaries``) can be pinned by a flag or in the YAML; flags win over the file.
Prints the stage table, the predicted metrics and the top alternatives; ``-o plan.json`` writes
the plan and, beside it, ``plan.landscape.json``: the search's step time over (m, p), which
``pipetrain report`` shows for runs of that plan (reports never search). ``--report DIR`` writes
the search's simulation of the plan (``simulation.json``), the landscape (``landscape.json``) and
the memory model's components per GPU (``memory.json``) and the throughput against micro-batch
count and size around the plan (``neighbourhood.json``) into DIR and the what-if report from them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["add_arguments", "run", "add_job_arguments", "job_from_args", "graph_source", "print_plan", "planner_landscape",
           "gpu_memory", "write_planner_files"]

#: flag dest -> job key
_FLAG_KEYS = {"model": "model", "topology": "topology", "global_batch": "global_batch", "seq_len": "seq_len", "dtype": "dtype",
              "optimizer": "optimizer", "max_memory": "max_memory", "schedule": "schedule", "pp": "pp", "dp": "dp",
              "microbatches": "microbatches", "microbatch_size": "microbatch_size", "chunks": "chunks", "buffers": "buffers",
              "recompute": "recompute", "boundaries": "boundaries", "seed": "seed", "tp": "tp", "zero": "zero",
              "sequence_parallel": "sequence_parallel", "precision": "precision", "memory_reserve": "memory_reserve"}


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job flags shared by ``plan`` and ``sweep``."""
    parser.add_argument("config", nargs="?", help="job YAML (see examples/*.yaml); flags override its keys")
    g = parser.add_argument_group("job")
    g.add_argument("--model", help="model preset (e.g. gpt2-xl, llama2-70b, tiny-gpt), hf:NAME_OR_PATH (a Hugging Face config) or package.module:factory")
    g.add_argument("--topology", help="topology preset (dgx-h100:8, local-cpu:2, mixed-a100-h100) or a YAML path")
    g.add_argument("--global-batch", type=int, help="samples per optimizer step, over all replicas")
    g.add_argument("--seq-len", type=int, help="tokens per sample")
    g.add_argument("--precision", help="bf16-mixed (bf16 weights, fp32 master and gradients: Megatron's and torchtitan's) | "
                   "amp-autocast (fp32 weights cast per use: pipetrain's CPU executor) | fp32; default bf16-mixed on GPUs, "
                   "amp-autocast on CPU")
    g.add_argument("--dtype", help="deprecated: use --precision (bf16/fp16 mean amp-autocast, fp32 means fp32)")
    g.add_argument("--optimizer", help="adamw | sgd (default adamw)")
    g.add_argument("--max-memory", help="per-device memory cap: bytes ('70GiB', '75e9') or a share ('90%%')")
    g.add_argument("--memory-reserve", help="memory left free per device for the CUDA context, NCCL and fragmentation "
                   "(default on GPUs: 2 GiB + 5%%; 0 on CPU)")
    g.add_argument("--graph", help="plan from a layer-graph JSON (pipetrain graph --json) instead of tracing; fixes the micro-batch size")
    k = parser.add_argument_group("pinned knobs (left out: searched)")
    k.add_argument("--pp", type=int, help="pipeline depth")
    k.add_argument("--dp", type=int, help="data-parallel width")
    k.add_argument("--tp", type=int, help="tensor-parallel width, inside a node (Megatron-style)")
    k.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="with tp > 1, split the norm and dropout regions along the sequence")
    k.add_argument("--zero", type=int, help="ZeRO stage over dp (0-3): 1 optimizer state (Megatron's "
                   "distributed optimizer), 2 and gradients, 3 and weights")
    k.add_argument("--microbatches", type=int, help="micro-batches per step (m)")
    k.add_argument("--microbatch-size", type=int, help="samples per micro-batch")
    k.add_argument("--schedule", help="gpipe | 1f1b | interleaved | zb-h1 | zbv | dualpipev (zero bubble: chosen unasked on GPUs only)")
    k.add_argument("--chunks", type=int, help="virtual stages per rank (interleaved)")
    k.add_argument("--buffers", help="activation buffers: one number, or one per stage ('2,2,1,1')")
    k.add_argument("--recompute", help="none | selective (every layer's attention core) | full (every layer of every stage), "
                                      "or per stage true/false ('1,1,0,0'); unpinned, the planner recomputes where memory "
                                      "needs it: the fewest whole layers per stage, or the attention cores")
    k.add_argument("--boundaries", help="first block of every stage after the first ('12,24,36')")
    k.add_argument("--seed", type=int, help="seed recorded in the plan")
    parser.add_argument("--simulation-only", action="store_true", default=None,
                        help="allow schedules the executor cannot run (what-if)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("-o", "--output", help="write the plan JSON here")
    parser.add_argument("--json", action="store_true", help="print the plan JSON instead of the tables")
    parser.add_argument("--top-k", type=int, default=3, help="candidates confirmed in the simpy simulator (default 3)")
    parser.add_argument("--no-pin-cost", action="store_true", help="skip the unpinned search that prices the pins")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="cost model and link measured by `pipetrain calibrate` (default: analytic)")
    parser.add_argument("--report", metavar="DIR", default=None,
                        help="also write a what-if report to DIR (report.html, PNGs, summary.json, Chrome trace)")


def job_from_args(args: argparse.Namespace):  # -> Job
    from pipetrain.planner.job import job_from_mapping, load_job

    overrides: dict[str, Any] = {key: getattr(args, dest) for dest, key in _FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    # fp32 says all there is to say; bf16/fp16 left how weights are kept unsaid
    if overrides.get("dtype") not in (None, "fp32") and "precision" not in overrides:
        import sys

        from pipetrain.sharding import precision_for_dtype

        print(f"warning: --dtype is deprecated; --dtype {overrides['dtype']} means --precision "
              f"{precision_for_dtype(str(overrides['dtype']))}", file=sys.stderr)
    if getattr(args, "simulation_only", None):
        overrides["simulation_only"] = True
    if args.config:
        return load_job(args.config, overrides)
    if getattr(args, "graph", None) and "model" not in overrides:
        overrides["model"] = "from-graph"
    return job_from_mapping(overrides, source="flags")


def graph_source(args: argparse.Namespace, job):  # -> (graph_for | None, job)
    """With ``--graph FILE``: a graph_for that serves that graph (its micro-batch size is pinned)."""
    if not getattr(args, "graph", None):
        return None, job
    from dataclasses import replace

    from pipetrain.graph import LayerGraph

    g = LayerGraph.load(args.graph)
    if job.microbatch_size not in (None, g.micro_batch_size):
        raise ConfigError(f"--graph was traced at micro-batch size {g.micro_batch_size}, not {job.microbatch_size}")
    job = replace(job, model=g.model if job.model == "from-graph" else job.model, microbatch_size=g.micro_batch_size,
                  seq_len=g.seq_len, dtype=g.dtype)

    def graph_for(b: int):
        return g

    return graph_for, job


def _gib(x: float) -> str:
    from pipetrain.planner.partition import format_bytes

    return format_bytes(x)


def print_plan(outcome, console=None) -> None:  # outcome: PlanOutcome
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    plan, res = outcome.plan, outcome.result
    graph = res.graph()
    best = res.best
    sched = f"interleaved (v={plan.chunks})" if plan.schedule == "interleaved" else plan.schedule
    tp = f"tp={plan.tp}{' (sequence parallel)' if plan.sequence_parallel else ''} x " if plan.tp > 1 else ""
    zero = f", ZeRO-{plan.zero}" if plan.zero else ""
    rec = f", recompute {plan.recompute}" if plan.recompute != "none" else ""
    idle = f", {plan.idle_gpus} GPU(s) idle" if plan.idle_gpus else ""
    console.print(f"[bold]{plan.model}[/] on [bold]{plan.topology}[/]: {tp}pp={plan.pp} x dp={plan.dp}{zero}{idle}, "
                  f"micro-batch {plan.micro_batch_size} x m={plan.num_microbatches} (global batch {plan.global_batch}), {sched}, "
                  f"{plan.precision}, {plan.optimizer}{rec}" + ("  [yellow](simulation only)[/]" if plan.simulation_only else ""))
    if plan.tp > 1 and res.topology is not None:
        per_node = min(sum(1 for d in res.topology.devices if d.node == n) for n in {d.node for d in res.topology.devices})
        if plan.tp > per_node:
            console.print(f"[yellow]warning: tp={plan.tp} spans nodes of {per_node} GPUs: its per-layer collectives cross the "
                          "inter-node network (priced so); pin tp to at most a node's GPUs[/]")
    job = res.job
    if job is not None:
        pins = ", ".join(f"{k}={','.join(str(x).lower() for x in v) if isinstance(v, tuple) else v}" for k, v in job.pinned.items())
        console.print(f"pinned: {pins or 'nothing'}; chosen by the planner: everything else")
    t = Table(title="stages", show_lines=False)
    for col in ("stage", "rank", "device", "blocks", "first .. last", "F+B ms", "recompute", "buffers", "peak", "cap"):
        t.add_column(col, justify="right" if col not in ("device", "first .. last") else "left", no_wrap=True)
    for st, tm in zip(plan.stages, best.split.stage_times_s):
        names = f"{graph.nodes[st.block_start].name} .. {graph.nodes[st.block_end - 1].name}"
        t.add_row(str(st.index), str(st.rank), st.device, f"{st.block_start}-{st.block_end - 1}", names, f"{tm * 1e3:.2f}",
                  _recompute_cell(plan, st), str(st.buffers), _gib(st.predicted_peak_memory_bytes), _gib(st.memory_cap_bytes))
    console.print(t)
    m = Table(title="memory per GPU (all its virtual stages)")
    for col in ("rank", "stages", "weights", "gradients", "optimizer", "activations", "buffers", "total", "cap", "reserve"):
        m.add_column(col, justify="right", no_wrap=True)
    for g in gpu_memory(plan, graph, res.topology):
        m.add_row(str(g.rank), ",".join(map(str, g.stages)), _gib(g.weights_bytes), _gib(g.gradients_bytes), _gib(g.optimizer_bytes),
                  _gib(g.activations_bytes), _gib(g.buffers_bytes), _gib(g.total_bytes), _gib(g.cap_bytes), _gib(g.reserve_bytes))
    console.print(m)
    p = plan.predicted
    if p is not None:
        used = plan.world_size
        console.print(f"predicted (simpy): step {p.step_time_s:.4g} s, {p.samples_per_s:.4g} samples/s, {p.tokens_per_s:.4g} tokens/s "
                      f"({p.tokens_per_s / used:.4g} per GPU on {used} GPUs), MFU {p.mfu * 100:.1f}%, bubble {p.bubble_fraction * 100:.1f}%, "
                      f"peak {_gib(max(p.peak_memory_bytes))} per stage (fast evaluator: {best.fast.step_time_s:.4g} s)")
    a = Table(title="alternatives")
    a.add_column("candidate")
    a.add_column("step s", justify="right")
    a.add_column("why it lost")
    for alt in plan.alternatives:
        a.add_row(alt.description, "-" if alt.step_time_s is None else f"{alt.step_time_s:.4g}", alt.reason)
    console.print(a)
    if outcome.pin_cost_fraction is not None:
        console.print(f"pins cost {outcome.pin_cost_fraction * 100:+.1f}% step time against the unpinned optimum "
                      f"({outcome.unpinned.best.candidate.describe()})")
    console.print(f"searched {len(res.screened)} screened, {res.pruned} pruned, {len(res.infeasible)} infeasible point(s) "
                  f"in {res.elapsed_s:.2f} s")


def _progress(text: str):  # -> context manager
    """A rich spinner on a terminal (planning takes seconds); nothing in logs and pipes."""
    import contextlib

    from rich.console import Console

    console = Console(stderr=True)
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


def planner_landscape(outcome):  # (PlanOutcome) -> Landscape
    """The landscape of the search already done: the unpinned one when the pins were priced (every knob free)."""
    from pipetrain.reports.landscape import landscape_from_search

    job = outcome.result.job
    where = f" over {job.topology}, global batch {job.global_batch}" if job is not None else ""
    if outcome.unpinned is not None:
        return landscape_from_search(outcome.unpinned, plan=outcome.plan, source=f"Planner search{where} with every knob free.")
    return landscape_from_search(outcome.result, plan=outcome.plan, source=f"Planner search{where} under your pinned knobs.")


def _recompute_cell(plan, st) -> str:  # (Plan, StagePlan) -> str
    """What a stage recomputes: "no", "selective" (every layer's attention core), "full" (every
    layer), or "full 3/5" (its first 3 of 5 layers)."""
    if not st.recompute:
        return "no"
    if plan.recompute == "selective":
        return "selective"
    n = st.block_end - st.block_start
    return f"full {st.recompute_layers}/{n}" if 0 < st.recompute_layers < n else "full"


def gpu_memory(plan, graph, topology=None):  # (Plan, LayerGraph, Topology | None) -> list[GpuMemory]
    """The memory model's components per pipeline rank, its virtual stages summed (interleaved plans hold
    several): what the plan table and the report's stacked memory chart show. One tensor-parallel
    rank's view of the model (``plan.tp``), the plan's precision and ZeRO stage. In-flight counts are
    the schedule's (:func:`pipetrain.program.plan_stage_memory`), so the total is the peak the planner
    checked; the reserve is the device type's default (``topology``, when given)."""
    from pipetrain.hardware import default_memory_reserve_bytes
    from pipetrain.memory import tied_extra_params
    from pipetrain.program import plan_stage_memory
    from pipetrain.program.shard import shard_graph
    from pipetrain.reports.plan_report import GpuMemory
    from pipetrain.schedules import make_schedule
    from pipetrain.sharding import model_state_bytes

    graph = shard_graph(graph, plan.tp, sequence_parallel=plan.sequence_parallel)
    buffers = [st.buffers for st in plan.stages]
    mems = plan_stage_memory(plan, graph, make_schedule(plan.schedule, plan.pp, plan.num_microbatches, plan.chunks, buffers=buffers))
    acc: dict[int, dict] = {}
    for st, mem in zip(plan.stages, mems):
        # a tied copy has its own weights, gradient and state
        tied = model_state_bytes(tied_extra_params(graph, st.block_start, st.block_end), zero=plan.zero, dp=plan.dp,
                                 precision=plan.precision, optimizer=plan.optimizer)
        reserve = 0.0
        if topology is not None:
            dev = next((d for d in topology.devices if d.id == st.device), None)
            reserve = default_memory_reserve_bytes(dev.type) if dev is not None else 0.0
        a = acc.setdefault(st.rank, {"device": st.device, "stages": [], "weights_bytes": 0.0, "gradients_bytes": 0.0,
                                     "optimizer_bytes": 0.0, "activations_bytes": 0.0, "buffers_bytes": 0.0,
                                     "cap_bytes": 0.0, "reserve_bytes": reserve})
        a["stages"].append(st.index)
        a["weights_bytes"] += mem.weights_bytes + tied.weights_bytes
        a["gradients_bytes"] += mem.grads_bytes + tied.grads_bytes
        a["optimizer_bytes"] += mem.optimizer_bytes + tied.optimizer_bytes
        a["activations_bytes"] += mem.activation_bytes + mem.recompute_working_bytes
        a["buffers_bytes"] += mem.buffer_bytes
        a["cap_bytes"] += float(st.memory_cap_bytes)  # a rank's cap is split over its virtual stages
    return [GpuMemory(rank=r, **{**a, "stages": tuple(a["stages"])}) for r, a in sorted(acc.items())]


def write_planner_files(outcome, out_dir, *, cost_source: str) -> None:  # (PlanOutcome, path, ...) -> None
    """What the what-if report reads: the simpy simulation of the chosen plan that the search ran
    (``simulation.json``), the landscape (``landscape.json``), the memory per GPU (``memory.json``) and the
    throughput around the plan as its micro-batching changes (``neighbourhood.json``)."""
    from pathlib import Path

    from pipetrain.reports.landscape import LANDSCAPE_FILE, write_landscape
    from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, save_simulation

    plan, res = outcome.plan, outcome.result
    sim = res.best.sim
    if sim is None:  # the search confirms its best in simpy; should it not have, simulate the plan as the planner prices it
        from pipetrain.planner.explain import plan_sim_input
        from pipetrain.simulator import simulate

        sim = simulate(plan_sim_input(plan, graph=res.graph(), topology=res.topology))
    out = Path(out_dir)
    save_simulation(out / SIMULATION_FILE, SimulationRecord(result=sim, topology=plan.topology, cost_source=cost_source,
                                                            origin="pipetrain plan: the planner's simpy confirmation of this plan"))
    write_landscape(out / LANDSCAPE_FILE, planner_landscape(outcome))
    from pipetrain.reports.plan_report import MEMORY_FILE, write_gpu_memory

    write_gpu_memory(out / MEMORY_FILE, gpu_memory(plan, res.graph(), res.topology))
    from dataclasses import asdict

    from pipetrain.planner.neighbourhood import neighbourhood
    from pipetrain.reports.neighbourhood import NEIGHBOURHOOD_FILE, write_neighbourhood

    write_neighbourhood(out / NEIGHBOURHOOD_FILE, plan=plan, points=[asdict(p) for p in neighbourhood(res)])


def run(args: argparse.Namespace) -> int:
    from pipetrain.planner.explain import plan_job

    job = job_from_args(args)
    graph_for, job = graph_source(args, job)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    extra: dict[str, Any] = {}
    if getattr(args, "calibration", None):
        from pipetrain.calibration.measured import calibrated_for

        extra = dict(zip(("topology", "cost"), calibrated_for(job.topology, args.calibration)))
    with _progress(f"planning {job.model} on {job.topology}"):
        outcome = plan_job(job, graph_for=graph_for, top_k=args.top_k, price_pins=not args.no_pin_cost, **extra)
    if args.output:
        from pipetrain.reports.landscape import sidecar_path, write_landscape

        path = outcome.plan.save(args.output)
        # `pipetrain report` of a run of this plan shows the landscape from here: reports never search
        land_path = write_landscape(sidecar_path(path), planner_landscape(outcome))
    if args.json:
        print(json.dumps(outcome.plan.to_dict(), indent=2))
    else:
        print_plan(outcome)
        if args.output:
            print(f"wrote {path} (and the planner's landscape, {land_path.name})")
    if getattr(args, "report", None):
        from pipetrain.reports.plan_report import write_plan_report

        write_planner_files(outcome, args.report, cost_source=f"calibration {args.calibration}" if getattr(args, "calibration", None)
                            else "the planner's analytic cost model")
        rep = write_plan_report(outcome.plan, args.report)
        print(f"report: {rep.html}")
    return 0
