"""RunResult: what a distributed run measured, as JSON (``RUN_DIR/result.json``).

Built by global rank 0 from every rank's telemetry at the end of the run. Losses come from
the last stage (mean over the global batch); a step's time is the slowest rank's. Events stay
in ``telemetry/rank*.jsonl`` (Event schema); here they are summarized per rank, stage and kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import RunError
from pipetrain.plan import Plan
from pipetrain.serde import from_dict, to_dict

__all__ = ["EventTotal", "RunResult", "build_result", "load_result"]


@dataclass(frozen=True, kw_only=True)
class EventTotal:
    rank: int
    stage: int
    kind: str
    count: int
    total_s: float
    bytes: int


@dataclass(frozen=True, kw_only=True)
class RunResult:
    model: str
    pp: int
    dp: int
    schedule: str
    num_microbatches: int
    global_batch: int
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    step_times_s: tuple[float, ...]
    grad_norms: tuple[float, ...]
    peak_tensor_bytes: tuple[int, ...]  # per global rank
    peak_rss_bytes: tuple[int, ...]
    peak_activation_bytes: tuple[int, ...]
    events: tuple[EventTotal, ...]
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if not (len(self.steps) == len(self.losses) == len(self.step_times_s)):
            raise RunError("RunResult: steps, losses and step times must have equal lengths")

    @property
    def median_step_time_s(self) -> float:
        xs = sorted(self.step_times_s[1:] or self.step_times_s)
        return xs[len(xs) // 2]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Any) -> RunResult:
        return from_dict(cls, d, error=RunError)


def build_result(plan: Plan, per_rank: dict[int, dict[str, Any]]) -> RunResult:
    last_ranks = [r for r, v in per_rank.items() if v["steps"] and v["steps"][0].get("loss") is not None]
    if not last_ranks:
        raise RunError("no rank recorded a loss: the run did not complete a step")
    ref = per_rank[min(last_ranks)]["steps"]
    steps = tuple(int(s["step"]) for s in ref)
    times = []
    for k in range(len(steps)):
        times.append(max(v["steps"][k]["step_time_s"] for v in per_rank.values() if len(v["steps"]) > k))
    ranks = sorted(per_rank)
    norms = _global_norms(per_rank, plan, len(steps)) or tuple(float(s["grad_norm"]) for s in ref)

    def peak(r: int, key: str) -> int:
        return max((int(s["memory"][key]) for s in per_rank[r]["steps"]), default=0)

    events = []
    for r in ranks:
        for key, (count, total, nbytes) in sorted(per_rank[r]["events"].items()):
            stage, kind = key.split(":")
            events.append(EventTotal(rank=r, stage=int(stage), kind=kind, count=int(count), total_s=float(total), bytes=int(nbytes)))
    backend = str(per_rank[ranks[0]]["meta"].get("backend", "gloo"))
    return RunResult(model=plan.model, pp=plan.pp, dp=plan.dp, schedule=plan.schedule, num_microbatches=plan.num_microbatches,
                     global_batch=plan.global_batch, steps=steps, losses=tuple(float(s["loss"]) for s in ref),
                     step_times_s=tuple(times), grad_norms=norms,
                     peak_tensor_bytes=tuple(peak(r, "tensor_bytes") for r in ranks),
                     peak_rss_bytes=tuple(peak(r, "rss_bytes") for r in ranks),
                     peak_activation_bytes=tuple(peak(r, "activation_bytes_peak") for r in ranks),
                     events=tuple(events), backend=backend)


def _global_norms(per_rank: dict[int, dict[str, Any]], plan: Plan, n: int) -> tuple[float, ...]:
    """Global gradient norm per step from replica 0's per-stage norms (tied copies count at their owner).

    On a device mesh (tp or ZeRO) every rank's step record already holds the global norm: none here."""
    if plan.tp > 1 or plan.zero > 0:
        return ()
    out = []
    for k in range(n):
        sq = 0.0
        for r in range(plan.pp):
            recs = per_rank.get(r, {}).get("steps", [])
            if len(recs) <= k or "stage_grad_norms" not in recs[k]:
                return ()
            sq += sum(float(v) ** 2 for v in recs[k]["stage_grad_norms"].values())
        out.append(sq ** 0.5)
    return tuple(out)


def load_result(run_dir: str | Path) -> RunResult:
    p = Path(run_dir) / "result.json"
    if not p.is_file():
        raise RunError(f"{p} does not exist: the run did not finish")
    return RunResult.from_dict(json.loads(p.read_text()))
