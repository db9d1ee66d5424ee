"""The Event: one timed thing on one rank, shared by simulated and measured results.

``SimResult`` (simulator) and ``RunResult`` (executor) are both lists of events plus
summaries, so reports compare them field by field. :func:`to_chrome_trace` writes any list
of events as Chrome-trace JSON that Perfetto and ``chrome://tracing`` open.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["EVENT_KINDS", "Event", "to_chrome_trace", "write_chrome_trace"]

#: F forward, B backward (full, or input-grad when W is separate), W weight-grad,
#: SEND/RECV point-to-point, ALLREDUCE data-parallel gradient reduction, OPT optimizer step.
EVENT_KINDS = ("F", "B", "W", "SEND", "RECV", "ALLREDUCE", "OPT")


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    stage: int
    rank: int
    kind: str
    microbatch: int
    start_s: float
    end_s: float
    bytes: int = 0
    step: int = 0
    #: measured CPU compute spans: the CPU time of the thread that ran it (None: not measured)
    cpu_s: float | None = None
    #: measured F/B: seconds of tensor-parallel collectives inside the span (None: not measured)
    tp_comm_s: float | None = None
    #: measured F/B: seconds of ZeRO's all-gather / reduce-scatter inside the span (None: not measured)
    zero_comm_s: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ConfigError(f"event kind {self.kind!r} is unknown; one of {', '.join(EVENT_KINDS)}")
        if self.end_s < self.start_s:
            raise ConfigError(f"event {self.kind} on rank {self.rank} ends ({self.end_s}) before it starts ({self.start_s})")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "rank": self.rank, "kind": self.kind, "microbatch": self.microbatch,
            "start_s": self.start_s, "end_s": self.end_s, "bytes": self.bytes, "step": self.step,
            **({"cpu_s": self.cpu_s} if self.cpu_s is not None else {}),
            **({"tp_comm_s": self.tp_comm_s} if self.tp_comm_s is not None else {}),
            **({"zero_comm_s": self.zero_comm_s} if self.zero_comm_s is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(**{k: d[k] for k in ("stage", "rank", "kind", "microbatch", "start_s", "end_s")},
                   bytes=int(d.get("bytes", 0)), step=int(d.get("step", 0)),
                   cpu_s=float(d["cpu_s"]) if d.get("cpu_s") is not None else None,
                   tp_comm_s=float(d["tp_comm_s"]) if d.get("tp_comm_s") is not None else None,
                   zero_comm_s=float(d["zero_comm_s"]) if d.get("zero_comm_s") is not None else None)


_COLORS = {"F": "thread_state_running", "B": "thread_state_iowait", "W": "thread_state_unknown",
           "SEND": "generic_work", "RECV": "generic_work", "ALLREDUCE": "bad", "OPT": "good"}


def to_chrome_trace(events: Iterable[Event], *, process_name: str = "pipetrain") -> dict[str, Any]:
    """Chrome trace-event format: one process, one thread per rank, complete ("X") events in µs."""
    evs = list(events)
    out: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": process_name}}]
    for rank in sorted({e.rank for e in evs}):
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
    for e in evs:
        name = f"{e.stage}{e.kind}{e.microbatch}" if e.microbatch >= 0 else f"{e.stage}{e.kind}"
        out.append({
            "name": name, "cat": e.kind, "ph": "X", "pid": 0, "tid": e.rank,
            "ts": e.start_s * 1e6, "dur": max(e.duration_s * 1e6, 0.0), "cname": _COLORS[e.kind],
            "args": {"stage": e.stage, "microbatch": e.microbatch, "bytes": e.bytes, "step": e.step,
                     **({"cpu_ms": e.cpu_s * 1e3} if e.cpu_s is not None else {}),
                     **({"tp_comm_ms": e.tp_comm_s * 1e3} if e.tp_comm_s else {}),
                     **({"zero_comm_ms": e.zero_comm_s * 1e3} if e.zero_comm_s else {})},
        })
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[Event], path: str | Path, *, process_name: str = "pipetrain") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_chrome_trace(events, process_name=process_name)))
    return p
