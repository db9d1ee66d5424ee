"""SimResult: one simulated training step — events plus the summaries a report compares.

Events are kept as plain tuples while simulating (fast) and turned into
:class:`pipetrain.events.Event` objects the first time :attr:`SimResult.events` is read.

:meth:`SimResult.to_dict` / :meth:`SimResult.from_dict` round-trip a result through JSON;
:class:`SimulationRecord` is the file a run or the planner leaves for the reports
(``simulation.json``: the result plus where it was simulated and with which cost model), so a
report shows a simulation without simulating again.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError, PipetrainError
from pipetrain.events import Event, write_chrome_trace
from pipetrain.program.spec import SimInput
from pipetrain.simulator.ops import EventTuple

__all__ = ["SimResult", "build_result", "busy_s_per_stage", "SIMULATION_FILE", "SimulationRecord", "save_simulation", "load_simulation"]

#: the file name a run directory (``pipetrain run``) or a what-if report directory keeps its simulation under
SIMULATION_FILE = "simulation.json"
_FORMAT = "pipetrain.simulation/1"


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """Summary of one step. Per-stage tuples are indexed by (virtual) stage, per-rank by pipeline rank.

    ``pipeline_time_s`` ends with the last F/B/W; ``step_time_s`` also covers the data-parallel
    all-reduce and optimizer step. ``bubble_fraction_per_rank[r]`` is the idle share of rank ``r``
    during ``pipeline_time_s``; ``bubble_fraction`` their mean; a stage's bubble is its rank's.
    ``tflops_per_device`` and ``mfu`` are ``None`` when the input gave no FLOPs or peak.
    ``memory_timeline_per_stage[s]`` is ``((time_s, bytes), ...)`` at every change (simpy only;
    empty from the fast evaluator). Where links' latencies are distributions, it is the median of
    ``sampled_steps`` sampled steps (its own events and timeline), ``step_time_quartiles_s`` their spread.
    """

    evaluator: str
    schedule: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    dp_width: int
    micro_batch_size: int
    step_time_s: float
    pipeline_time_s: float
    samples_per_s: float
    tokens_per_s: float
    tflops_per_device: float | None
    mfu: float | None
    bubble_fraction: float
    bubble_fraction_per_rank: tuple[float, ...]
    bubble_fraction_per_stage: tuple[float, ...]
    busy_s_per_rank: tuple[float, ...]
    busy_s_per_stage: tuple[float, ...]
    peak_in_flight_per_stage: tuple[int, ...]
    peak_memory_bytes_per_stage: tuple[float, ...]
    memory_timeline_per_stage: tuple[tuple[tuple[float, float], ...], ...] = ()
    num_compute_actions: int = 0
    #: steps simulated, each with its messages' latencies drawn from their links' distributions
    #: (:func:`pipetrain.simulator.simulate`); the result is the median one's. 1: one deterministic step
    sampled_steps: int = 1
    #: the sampled steps' step time at the first and third quartile (empty: one deterministic step)
    step_time_quartiles_s: tuple[float, ...] = ()
    raw_events: tuple[EventTuple, ...] = field(default=(), repr=False, compare=False)

    @property
    def samples_per_s_per_device(self) -> float:
        return self.samples_per_s / (self.num_ranks * self.dp_width)

    @cached_property
    def events(self) -> tuple[Event, ...]:
        """All events (F, B, W, SEND, RECV, ALLREDUCE, OPT), ordered by start time then rank."""
        evs = sorted(self.raw_events, key=lambda e: (e[4], e[1], e[5]))
        return tuple(Event(stage=s, rank=r, kind=k, microbatch=mb, start_s=a, end_s=b, bytes=n)
                     for s, r, k, mb, a, b, n in evs)

    def to_dict(self, *, events: bool = True, timeline: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("raw_events", "memory_timeline_per_stage")}
        d["samples_per_s_per_device"] = self.samples_per_s_per_device
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        if timeline:
            d["memory_timeline_per_stage"] = [[list(p) for p in tl] for tl in self.memory_timeline_per_stage]
        if events:
            d["events"] = [e.to_dict() for e in self.events]
        return d

    @classmethod
    def from_dict(cls, d: Any, *, error: type[PipetrainError] = ConfigError) -> SimResult:
        """The inverse of :meth:`to_dict` (with ``events=True``; without them ``raw_events`` stays empty)."""
        try:
            kw: dict[str, Any] = {}
            for name, f in cls.__dataclass_fields__.items():
                if name in ("raw_events", "memory_timeline_per_stage"):
                    continue  # rebuilt below from their JSON shapes
                if name not in d and (f.default is not MISSING or f.default_factory is not MISSING):
                    continue  # an older file without a defaulted field: keep the default
                v = d[name]
                kw[name] = tuple(v) if isinstance(v, list) else v
            kw["memory_timeline_per_stage"] = tuple(tuple((float(t), float(b)) for t, b in tl)
                                                    for tl in d.get("memory_timeline_per_stage", ()))
            kw["raw_events"] = tuple((int(e["stage"]), int(e["rank"]), str(e["kind"]), int(e["microbatch"]), float(e["start_s"]),
                                      float(e["end_s"]), int(e.get("bytes", 0))) for e in d.get("events", ()))
            return cls(**kw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise error(f"simulation result is malformed ({type(exc).__name__}: {exc})") from None

    def to_json(self, path: str | Path | None = None, **kw: bool) -> str:
        text = json.dumps(self.to_dict(**kw), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def write_chrome_trace(self, path: str | Path) -> Path:
        return write_chrome_trace(self.events, path, process_name=f"pipetrain simulate ({self.schedule}, {self.evaluator})")


def busy_s_per_stage(inp: SimInput) -> list[float]:
    """Compute time of each stage in one step: every micro-batch's F and backward (B, or I + W: the same)."""
    return [(spec.duration_s("F") + spec.duration_s("B")) * inp.schedule.num_microbatches for spec in inp.stages]


def build_result(inp: SimInput, *, evaluator: str, step_time_s: float, pipeline_time_s: float,
                 busy_s_per_stage: list[float], peak_in_flight: tuple[int, ...] | list[int],
                 peak_pending_wgrad: tuple[int, ...] = (),
                 timeline: tuple[tuple[tuple[float, float], ...], ...] = (), num_compute: int = 0,
                 raw_events: tuple[EventTuple, ...] = ()) -> SimResult:
    """Derive throughput, MFU, bubbles and memory peaks from the raw timings."""
    sched = inp.schedule
    busy_rank = [0.0] * sched.num_ranks
    for s, b in enumerate(busy_s_per_stage):
        busy_rank[sched.stage_to_rank[s]] += b
    span = pipeline_time_s if pipeline_time_s > 0 else 1.0
    bubble_rank = tuple(max(0.0, 1.0 - b / span) for b in busy_rank)
    step = step_time_s if step_time_s > 0 else 1.0
    samples = inp.samples_per_step / step
    flops = inp.model_flops_per_sample * inp.samples_per_step
    tflops = flops / step / inp.num_devices / 1e12 if flops > 0 else None
    mfu = tflops * 1e12 / inp.peak_flops_per_device if tflops is not None and inp.peak_flops_per_device > 0 else None
    if timeline:
        peak_mem = tuple(max(b for _t, b in tl) for tl in timeline)
    else:  # exact without a W stash; with one, an upper bound (both peaks counted at once)
        pend = peak_pending_wgrad or (0,) * sched.num_stages
        peak_mem = tuple(spec.static_bytes + spec.activation_bytes * n + spec.wgrad_stash_bytes * w
                         for spec, n, w in zip(inp.stages, peak_in_flight, pend))
    return SimResult(
        evaluator=evaluator, schedule=sched.name, num_ranks=sched.num_ranks, num_stages=sched.num_stages,
        num_microbatches=sched.num_microbatches, dp_width=inp.data_parallel.width,
        micro_batch_size=inp.micro_batch_size, step_time_s=step_time_s, pipeline_time_s=pipeline_time_s,
        samples_per_s=samples, tokens_per_s=samples * inp.seq_len, tflops_per_device=tflops, mfu=mfu,
        bubble_fraction=sum(bubble_rank) / len(bubble_rank), bubble_fraction_per_rank=bubble_rank,
        bubble_fraction_per_stage=tuple(bubble_rank[r] for r in sched.stage_to_rank),
        busy_s_per_rank=tuple(busy_rank), busy_s_per_stage=tuple(busy_s_per_stage),
        peak_in_flight_per_stage=tuple(peak_in_flight), peak_memory_bytes_per_stage=peak_mem,
        memory_timeline_per_stage=timeline, num_compute_actions=num_compute, raw_events=raw_events)


@dataclass(frozen=True, kw_only=True)
class SimulationRecord:
    """A simulation kept for the reports: the result, the topology it ran on and the cost model's source."""

    result: SimResult
    topology: str
    cost_source: str
    #: who simulated it and why (e.g. "pipetrain run: the plan as the executor runs it")
    origin: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "topology": self.topology, "cost_source": self.cost_source, "origin": self.origin,
                "result": self.result.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, *, error: type[PipetrainError] = ConfigError) -> SimulationRecord:
        if not isinstance(d, dict) or d.get("format") != _FORMAT or not isinstance(d.get("result"), dict):
            raise error(f"not a {_FORMAT} record")
        return cls(result=SimResult.from_dict(d["result"], error=error), topology=str(d.get("topology", "")),
                   cost_source=str(d.get("cost_source", "")), origin=str(d.get("origin", "")))


def save_simulation(path: str | Path, record: SimulationRecord) -> Path:
    """Write ``record`` as JSON (atomically: a report never reads half a file)."""
    from pipetrain.serde import write_text_atomic

    return write_text_atomic(path, json.dumps(record.to_dict()) + "\n")


def load_simulation(path: str | Path, *, error: type[PipetrainError] = ConfigError) -> SimulationRecord | None:
    """The record at ``path``; None when there is no such file, ``error`` (saying how to fix it) when it is corrupt."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return SimulationRecord.from_dict(d, error=error)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, PipetrainError) as exc:
        raise error(f"{p} is corrupt ({exc}): delete it and re-run the command that wrote it (`pipetrain run` for a run "
                    f"directory, `pipetrain plan --report` for a what-if report)") from None
