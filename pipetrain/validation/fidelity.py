"""Simulated vs measured: simulate the plan a run used and compare it with the run's telemetry.

:func:`simulate_plan` builds the simulator's input for a Plan exactly as the executor runs it
(the plan's stages, buffers and schedule; the data-parallel all-reduce after the last backward,
not overlapped; the compute groups of the topology's shared cores) with a cost model from a
calibration (:mod:`pipetrain.calibration.measured`) or, without one, from this machine's cached
block profile; the simulator input comes from the one lowering
(:func:`pipetrain.program.lower` with ``as_executed=True``). What the run measured is
:mod:`pipetrain.validation.measure`'s. :func:`compare` puts them side by side (:class:`Fidelity`); :func:`run_fidelity` does all three
for a finished run. :func:`mape` and :func:`spearman` summarize a grid of them.

Errors are signed ``(simulated - measured) / measured``; bubble errors are differences in
percentage points (a bubble near 0 has no meaningful relative error).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan
from pipetrain.validation.measure import Measured, measure_run

__all__ = ["StageFidelity", "Fidelity", "simulate_plan", "executor_sim_input", "plan_topology", "cost_for_plan",
           "compare", "run_fidelity", "mape", "spearman", "fidelity_lines", "fidelity_table_head", "fidelity_table_rows",
           "FIDELITY_FILE", "PREDICTIONS_FILE", "load_run_calibration", "report_run_fidelity", "describe_plan"]



@dataclass(frozen=True, kw_only=True)
class StageFidelity:
    stage: int
    rank: int
    sim_busy_s: float
    meas_busy_s: float
    sim_bubble: float
    meas_bubble: float
    sim_activation_bytes: float
    meas_activation_bytes: float
    sim_in_flight: int
    meas_in_flight: int
    meas_quiet_busy_s: float = 0.0
    #: the rank shares cores with other ranks (a compute group): its actions are time-sliced, in the
    #: simulation as on the machine, so busy on both sides is the wall time of the actions, waiting
    #: for a core included (see :func:`compare`)
    shared: bool = False
    #: seconds per step of the tensor-parallel collectives inside the stage's F/B (part of busy on both sides)
    sim_tp_comm_s: float = 0.0
    meas_tp_comm_s: float = 0.0
    #: seconds per step of ZeRO's collectives: simulated as the stage's data-parallel collective after
    #: its backward pass, measured as FSDP2's all-gather and reduce-scatter (left out of busy on both sides)
    sim_zero_comm_s: float = 0.0
    meas_zero_comm_s: float = 0.0

    @property
    def quiet_busy_error(self) -> float:
        return _rel(self.sim_busy_s, self.meas_quiet_busy_s)

    @property
    def busy_error(self) -> float:
        return _rel(self.sim_busy_s, self.meas_busy_s)

    @property
    def tp_comm_error(self) -> float:
        return _rel(self.sim_tp_comm_s, self.meas_tp_comm_s)

    @property
    def zero_comm_error(self) -> float:
        return _rel(self.sim_zero_comm_s, self.meas_zero_comm_s)

    @property
    def bubble_error_pp(self) -> float:
        return (self.sim_bubble - self.meas_bubble) * 100.0

    @property
    def activation_error(self) -> float:
        return _rel(self.sim_activation_bytes, self.meas_activation_bytes)


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """One run: simulated vs measured step, pipeline span, bubble, and per stage."""

    label: str
    cost_source: str
    sim_step_s: float
    meas_step_s: float
    sim_pipeline_s: float
    meas_pipeline_s: float
    sim_bubble: float
    meas_bubble: float
    stages: tuple[StageFidelity, ...]
    steps_measured: int
    meas_step_iqr_s: tuple[float, float] = (0.0, 0.0)
    #: the simulation's own quartiles where it sampled steps (a link's latency distribution; empty: one step)
    sim_step_iqr_s: tuple[float, ...] = ()
    #: the run used tensor parallelism / ZeRO: the per-stage collective columns apply
    has_tp: bool = False
    has_zero: bool = False

    @property
    def step_error(self) -> float:
        return _rel(self.sim_step_s, self.meas_step_s)

    @property
    def quiet_step_error(self) -> float:
        """Against the lower quartile of the measured steps: on a shared machine, the least disturbed ones."""
        return _rel(self.sim_step_s, self.meas_step_iqr_s[0])

    @property
    def pipeline_error(self) -> float:
        return _rel(self.sim_pipeline_s, self.meas_pipeline_s)

    @property
    def max_busy_error(self) -> float:
        return max((abs(s.busy_error) for s in self.stages), default=0.0)

    @property
    def max_activation_error(self) -> float:
        return max((abs(s.activation_error) for s in self.stages), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "cost_source": self.cost_source, "sim_step_s": self.sim_step_s, "meas_step_s": self.meas_step_s,
                "step_error": self.step_error, "sim_pipeline_s": self.sim_pipeline_s, "meas_pipeline_s": self.meas_pipeline_s,
                "sim_bubble": self.sim_bubble, "meas_bubble": self.meas_bubble, "steps_measured": self.steps_measured,
                "meas_step_iqr_s": list(self.meas_step_iqr_s), "sim_step_iqr_s": list(self.sim_step_iqr_s),
                "quiet_step_error": self.quiet_step_error,
                "stages": [{"stage": s.stage, "rank": s.rank, "sim_busy_s": s.sim_busy_s, "meas_busy_s": s.meas_busy_s,
                            "busy_error": s.busy_error, "sim_bubble": s.sim_bubble, "meas_bubble": s.meas_bubble,
                            "sim_activation_bytes": s.sim_activation_bytes, "meas_activation_bytes": s.meas_activation_bytes,
                            "activation_error": s.activation_error, "sim_in_flight": s.sim_in_flight,
                            "meas_in_flight": s.meas_in_flight, "meas_quiet_busy_s": s.meas_quiet_busy_s,
                            "quiet_busy_error": s.quiet_busy_error, "shared": s.shared,
                            **({"sim_tp_comm_s": s.sim_tp_comm_s, "meas_tp_comm_s": s.meas_tp_comm_s, "tp_comm_error": s.tp_comm_error}
                               if self.has_tp else {}),
                            **({"sim_zero_comm_s": s.sim_zero_comm_s, "meas_zero_comm_s": s.meas_zero_comm_s,
                                "zero_comm_error": s.zero_comm_error} if self.has_zero else {})} for s in self.stages]}


def _rel(sim: float, meas: float) -> float:
    return (sim - meas) / meas if meas > 0 else (0.0 if sim == 0 else math.inf)


# ----- simulate -----------------------------------------------------------------------------------
def plan_topology(plan: Plan, calibration: Any = None) -> Any:
    """The plan's topology (``local``: ``local-cpu:pp*dp``), with the calibrated link when given."""
    from pipetrain.calibration.measured import calibrated_topology
    from pipetrain.topology import resolve_topology

    topo = resolve_topology(plan.topology, world_size=plan.world_size)
    return calibrated_topology(topo, calibration) if calibration is not None else topo


def cost_for_plan(plan: Plan, graph: Any, calibration: Any = None, *, threads: int = 1) -> tuple[Any, str]:
    """(cost model, what it is): the calibration's (profiling the plan's shape now if it lacks it), else the cached profile."""
    from dataclasses import replace

    from pipetrain.calibration.measured import MeasuredCostModel
    from pipetrain.calibration.profile import ProfiledCostModel, load_or_profile

    def profile() -> Any:
        return load_or_profile(plan.model, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len, dtype=plan.dtype,
                               device="cuda" if plan.stages[0].on_gpu else "cpu", threads=threads)

    if calibration is not None:
        if calibration.profile_for(graph) is None:
            calibration = replace(calibration, profiles=calibration.profiles + (profile(),))
            return MeasuredCostModel(calibration), "calibration + block profile of this shape"
        return MeasuredCostModel(calibration), "calibration"
    return ProfiledCostModel(profile()), "block profile (no calibration: analytic optimizer step and link)"


def simulate_plan(plan: Plan, *, calibration: Any = None, cost: Any = None, topology: Any = None,
                  graph: Any = None) -> tuple[Any, Any, str]:
    """(SimInput, SimResult, cost source) of one step of ``plan`` as the executor runs it."""
    from pipetrain.simulator import simulate

    inp, source = executor_sim_input(plan, calibration=calibration, cost=cost, topology=topology, graph=graph)
    return inp, simulate(inp), source


def executor_sim_input(plan: Plan, *, calibration: Any = None, cost: Any = None, topology: Any = None,
                       graph: Any = None) -> tuple[Any, str]:
    """(SimInput, cost source) of one step of ``plan`` as the executor runs it: the one lowering
    (:func:`pipetrain.program.lower`) with ``as_executed=True``."""
    from pipetrain.planner.trace import trace_graph
    from pipetrain.program import lower

    if graph is None:
        graph = trace_graph(plan.model, micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len, dtype=plan.dtype)
    plan.check_graph(graph.fingerprint, graph.model)
    topo = topology if topology is not None else plan_topology(plan, calibration)
    source = "given cost model"
    if cost is None:
        cost, source = cost_for_plan(plan, graph, calibration)
    prog = lower(plan, topo, cost, graph=graph, as_executed=True)
    assert prog.sim_input is not None
    return prog.sim_input, source


# ----- compare -------------------------------------------------------------------------------------
def compare(plan: Plan, inp: Any, sim: Any, meas: Measured, *, label: str = "", cost_source: str = "") -> Fidelity:
    """Side by side; activation bytes per stage: simulated per-micro-batch bytes x simulated peak in flight,
    measured the rank's peak saved-for-backward bytes (replica 0; with several stages on a rank, the
    rank's peak is compared with the sum of its stages' simulated peaks)."""
    # busy = wall time of the stage's F/B/W, as the telemetry measures it: on time-sliced cores an
    # action's span includes its waits for a core (the simulated spans stretch the same way)
    spans = [0.0] * len(plan.stages)
    for e in sim.raw_events:
        if e[2] in ("F", "B", "W"):
            spans[e[0]] += e[5] - e[4]
    sim_busy = spans if sim.raw_events else list(sim.busy_s_per_stage)
    # ZeRO: the stage's data-parallel collective (the simulator's ALLREDUCE of its gradient bytes; tied
    # weights' all-reduces carry other sizes)
    sim_zero = [0.0] * len(plan.stages)
    for e in sim.raw_events if plan.zero > 0 else ():
        if e[2] == "ALLREDUCE" and e[6] == int(inp.stages[e[0]].grad_bytes):
            sim_zero[e[0]] += e[5] - e[4]
    m = inp.schedule.num_microbatches
    stages = []
    for st in plan.stages:
        s, r = st.index, st.rank
        mine = [x.index for x in plan.stages if x.rank == r]
        sim_act_rank = sum(inp.stages[i].activation_bytes * sim.peak_in_flight_per_stage[i] for i in mine)
        share = (inp.stages[s].activation_bytes * sim.peak_in_flight_per_stage[s] / sim_act_rank) if sim_act_rank > 0 else 1.0 / len(mine)
        stages.append(StageFidelity(
            stage=s, rank=r, sim_busy_s=sim_busy[s], meas_busy_s=meas.busy_s_per_stage[s],
            sim_bubble=sim.bubble_fraction_per_stage[s], meas_bubble=meas.bubble_fraction_per_stage[s],
            sim_activation_bytes=inp.stages[s].activation_bytes * sim.peak_in_flight_per_stage[s],
            meas_activation_bytes=meas.peak_activation_bytes_per_rank[r] * share,
            sim_in_flight=int(sim.peak_in_flight_per_stage[s]), meas_in_flight=int(meas.peak_in_flight_per_stage[s]),
            meas_quiet_busy_s=meas.quiet_busy_s_per_stage[s] if meas.quiet_busy_s_per_stage else meas.busy_s_per_stage[s],
            shared=any(r in g.ranks and g.capacity < len(g.ranks) for g in inp.compute_groups),
            sim_tp_comm_s=inp.stages[s].t_tp_comm_s * m,
            meas_tp_comm_s=meas.tp_comm_s_per_stage[s] if meas.tp_comm_s_per_stage else 0.0,
            sim_zero_comm_s=sim_zero[s], meas_zero_comm_s=meas.zero_comm_s_per_stage[s] if meas.zero_comm_s_per_stage else 0.0))
    return Fidelity(has_tp=plan.tp > 1, has_zero=plan.zero > 0,
                    label=label or describe_plan(plan), cost_source=cost_source, sim_step_s=sim.step_time_s, meas_step_s=meas.step_time_s,
                    sim_pipeline_s=sim.pipeline_time_s, meas_pipeline_s=meas.pipeline_time_s, sim_bubble=sim.bubble_fraction,
                    meas_bubble=meas.bubble_fraction, stages=tuple(stages), steps_measured=len(meas.steps),
                    meas_step_iqr_s=meas.step_time_iqr_s, sim_step_iqr_s=sim.step_time_quartiles_s)


def describe_plan(plan: Plan) -> str:
    return (f"{plan.model} " + (f"t{plan.tp}" if plan.tp > 1 else "") + f"p{plan.pp}" + (f"d{plan.dp}" if plan.dp > 1 else "")
            + (f"z{plan.zero}" if plan.zero else "") + f" m{plan.num_microbatches} {plan.schedule}")


def run_fidelity(run_dir: str | Path, plan: Plan, *, calibration: Any = None, warmup_steps: int = 1, label: str = "") -> Fidelity:
    """Simulate ``plan`` and compare it with the finished run in ``run_dir``."""
    meas = measure_run(run_dir, plan, warmup_steps=warmup_steps)
    inp, sim, source = simulate_plan(plan, calibration=calibration)
    return compare(plan, inp, sim, meas, label=label, cost_source=source)


# ----- summaries -----------------------------------------------------------------------------------
def mape(errors: Sequence[float]) -> float:
    """Mean absolute (relative) error."""
    return sum(abs(e) for e in errors) / len(errors) if errors else 0.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties): Pearson correlation of the ranks."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")

    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else 0.0


def fidelity_table_head(f: Fidelity) -> tuple[str, ...]:
    """The header of :func:`fidelity_table_rows`."""
    head: tuple[str, ...] = ("stage", "rank", "busy sim ms", "meas ms", "err", "bubble sim %", "meas %", "diff pp", "act sim MiB", "meas MiB",
                             "err")
    if f.has_tp:
        head += ("tp comm sim ms", "meas ms", "err")
    if f.has_zero:
        head += ("zero comm sim ms", "meas ms", "err")
    return head


def fidelity_table_rows(f: Fidelity) -> list[tuple[str, ...]]:
    """Per-stage rows (stage, rank, busy sim/meas/err, bubble sim/meas/diff, act sim/meas/err, and with tensor
    parallelism or ZeRO their collectives' seconds per step sim/meas/err) for tables."""
    rows: list[tuple[str, ...]] = []
    for s in f.stages:
        row: tuple[str, ...] = (
            str(s.stage), f"{s.rank}{'*' if s.shared else ''}", f"{s.sim_busy_s * 1e3:.2f}", f"{s.meas_busy_s * 1e3:.2f}",
            f"{s.busy_error * 100:+.1f}%",
            f"{s.sim_bubble * 100:.1f}", f"{s.meas_bubble * 100:.1f}", f"{s.bubble_error_pp:+.1f}",
            f"{s.sim_activation_bytes / 2**20:.2f}", f"{s.meas_activation_bytes / 2**20:.2f}", f"{s.activation_error * 100:+.1f}%")
        if f.has_tp:
            row += (f"{s.sim_tp_comm_s * 1e3:.2f}", f"{s.meas_tp_comm_s * 1e3:.2f}", f"{s.tp_comm_error * 100:+.1f}%")
        if f.has_zero:
            row += (f"{s.sim_zero_comm_s * 1e3:.2f}", f"{s.meas_zero_comm_s * 1e3:.2f}", f"{s.zero_comm_error * 100:+.1f}%")
        rows.append(row)
    return rows


def _ms_pair(xs: Sequence[float]) -> str:
    return " - ".join(f"{x * 1e3:.2f}" for x in xs) + " ms"


def fidelity_lines(f: Fidelity) -> list[str]:
    """Plain-text summary (for the terminal after ``pipetrain run``)."""
    head = fidelity_table_head(f)
    rows = [head] + fidelity_table_rows(f)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = [f"simulated vs measured ({f.cost_source}; median of {f.steps_measured} steps):",
           f"  step      sim {f.sim_step_s * 1e3:.2f} ms  measured {f.meas_step_s * 1e3:.2f} ms  error {f.step_error * 100:+.1f}%",
           *([f"  step quartiles  sim {_ms_pair(f.sim_step_iqr_s)} (sampled message latencies)  measured {_ms_pair(f.meas_step_iqr_s)}"]
             if f.sim_step_iqr_s else []),
           f"  pipeline  sim {f.sim_pipeline_s * 1e3:.2f} ms  measured {f.meas_pipeline_s * 1e3:.2f} ms  error {f.pipeline_error * 100:+.1f}%",
           f"  bubble    sim {f.sim_bubble * 100:.1f}%  measured {f.meas_bubble * 100:.1f}%"]
    for r in rows:
        out.append("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if any(s.shared for s in f.stages):
        out.append("  * the rank shares cores with other ranks: busy (simulated and measured) includes its waits for a core")
    if f.has_tp:
        out.append("  tp comm: per step, the tensor-parallel collectives inside the stage's F and B (part of busy on both sides)")
    if f.has_zero:
        out.append("  zero comm: per step, ZeRO's all-gather and reduce-scatter (measured inside the first F and last B; "
                   "left out of busy on both sides)")
    return out


# ----- the `pipetrain run` hook ---------------------------------------------------------------------
FIDELITY_FILE = "fidelity.json"


def load_run_calibration(path: str | None) -> Any:
    """The calibration named by ``pipetrain run --calibration`` (checked before the run starts), or None."""
    if not path:
        return None
    from pipetrain.calibration.measured import load_calibration

    return load_calibration(path)


def report_run_fidelity(run_dir: str | Path, plan: Plan, calibration: Any = None, *, echo: Any = print,
                        analytic: tuple[float, str] | None = None, notes: Sequence[str] = ()) -> Fidelity | None:
    """After ``pipetrain run``: simulate the plan as executed, write it to RUN_DIR/simulation.json (what
    ``pipetrain report`` shows: the report never simulates), compare with the run, print per stage and
    write RUN_DIR/fidelity.json.

    ``analytic`` (step seconds, cost source), a prediction made without this simulation's cost model
    (``pipetrain demo``: the analytic roofline's), also writes RUN_DIR/predictions.json: both predictions
    beside the measured median step, with ``notes`` (how the calibration was obtained, what the pins
    cost), for the report's predictions section.

    A run whose telemetry cannot be compared (``--no-telemetry``, a single step) prints why and
    returns None: the run itself succeeded. Files an earlier run left in RUN_DIR are removed first,
    so the files always describe this run.
    """
    import json

    from pipetrain.errors import PipetrainError
    from pipetrain.simulator.result import SIMULATION_FILE

    rd = Path(run_dir)
    for name in (SIMULATION_FILE, FIDELITY_FILE, PREDICTIONS_FILE):
        (rd / name).unlink(missing_ok=True)
    try:
        if not any((rd / "telemetry").glob("rank*.jsonl")):
            raise RunError("no telemetry (run without --no-telemetry to compare with the simulator)")
        inp, sim, source = simulate_plan(plan, calibration=calibration)
        _save_run_simulation(rd, plan, sim, source, calibrated=calibration is not None)
        meas = measure_run(rd, plan, warmup_steps=1)
        f = compare(plan, inp, sim, meas, cost_source=source)
    except PipetrainError as exc:
        echo(f"simulated vs measured: not compared: {exc}")
        return None
    for line in fidelity_lines(f):
        echo(line)
    out = rd / FIDELITY_FILE
    out.write_text(json.dumps(f.to_dict(), indent=1))
    echo(f"wrote {out} and {rd / SIMULATION_FILE}")
    if analytic is not None:
        _save_predictions(rd, f, analytic=analytic, calibrated=calibration is not None, notes=notes)
    return f


PREDICTIONS_FILE = "predictions.json"  # read by pipetrain.reports.predictions (which may not import this module)


def _save_predictions(run_dir: Path, f: Fidelity, *, analytic: tuple[float, str], calibrated: bool, notes: Sequence[str]) -> Path:
    """RUN_DIR/predictions.json: each prediction's step time and signed error against the measured median step."""
    import json

    from pipetrain.serde import write_text_atomic

    step_s, source = analytic
    preds = [{"label": "analytic", "cost_source": source, "step_time_s": step_s, "error": _rel(step_s, f.meas_step_s)},
             {"label": "calibrated" if calibrated else "simulated as executed", "cost_source": f.cost_source,
              "step_time_s": f.sim_step_s, "error": f.step_error}]
    data = {"schema_version": 1, "measured_step_s": f.meas_step_s, "steps_measured": f.steps_measured, "predictions": preds,
            "notes": list(notes)}
    return write_text_atomic(run_dir / PREDICTIONS_FILE, json.dumps(data, indent=1) + "\n")


def _save_run_simulation(run_dir: Path, plan: Plan, sim: Any, cost_source: str, *, calibrated: bool) -> Path:
    """RUN_DIR/simulation.json: the simulated step (summary and every event) for the report."""
    from pipetrain.simulator.result import SIMULATION_FILE, SimulationRecord, save_simulation

    topo = plan.topology if plan.topology not in ("", "local") else f"local-cpu:{plan.world_size}"  # as plan_topology resolves it
    return save_simulation(run_dir / SIMULATION_FILE, SimulationRecord(
        result=sim, topology=topo + (" (calibrated link)" if calibrated else ""), cost_source=cost_source,
        origin="pipetrain run: the plan as the executor runs it"))
