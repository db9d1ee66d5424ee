"""Per-stage numbers from one step's events, the same way for simulated and measured timelines.

Pure functions over :class:`~pipetrain.events.Event` lists (no runtime), used by the live
monitor and the report, so both say the same thing:

* **compute** of a stage: the summed durations of its F/B/W events;
* **span**: the pipeline time of the step, first F/B/W start to last F/B/W end over all ranks;
* **busy / bubble**: a stage's compute over the span; its bubble is its rank's idle share of
  the span (the simulator's definition: a stage's bubble is its rank's);
* **p2p latency** of a transfer: from the sender posting the send to the receiver observing
  the receive complete (one host's aligned clock), matched by (stage, micro-batch, direction);
  activations go s -> s+1 first, gradients s+1 -> s later. It is an upper bound on wire time:
  it includes any wait for the receiver to ask;
* **wire time** of a transfer: when both ends are engaged and the bytes are moving, from the later
  of send start and receive post to the earlier of send end and receive completion. A RECV's span
  runs from its post to its completion, so most of it is the receiver waiting for the sender to
  compute; and a send that finished before the receiver posted (its buffer was busy) left its
  bytes waiting, not the receiver. Neither is the wire. A simulated SEND spans its transfer
  exactly; a measured one ends when the sender observed it done, so the receive's end bounds it;
* a stage's idle time (inside the span, its rank not computing) splits into **collective** (its
  rank in an ALLREDUCE), **transfer** (a transfer to this stage on the wire, see above) and
  **bubble** (the rest: waiting for a peer to compute). ``comm_s`` is transfer + collective. So
  compute + transfer + collective + bubble add up to the span on a rank that hosts one stage.

The telemetry readers (:func:`read_telemetry`, :func:`read_rank_file`) live here too: they are
plain JSONL parsing of ``RUN_DIR/telemetry/rank*.jsonl`` (written by
:mod:`pipetrain.executor.telemetry`), so reports and validation read a run without importing the
runtime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.events import Event

__all__ = ["COMPUTE_KINDS", "StageBreakdown", "Transfer", "events_from_records", "events_of_step",
           "match_transfers", "stage_breakdown", "percentile", "pick_step", "read_telemetry", "read_rank_file"]

COMPUTE_KINDS = ("F", "B", "W")


@dataclass(frozen=True, kw_only=True)
class Transfer:
    src_stage: int
    dst_stage: int
    step: int
    microbatch: int
    latency_s: float
    bytes: int
    end_s: float = 0.0  # receive completed
    #: when the bytes were on the wire (module docstring); wire_end_s <= wire_start_s: no wire time seen
    wire_start_s: float = 0.0
    wire_end_s: float = 0.0

    @property
    def wire_s(self) -> float:
        return max(0.0, self.wire_end_s - self.wire_start_s)


@dataclass(frozen=True, kw_only=True)
class StageBreakdown:
    stage: int
    rank: int
    compute_s: float
    transfer_s: float  # idle while a transfer to this stage was on the wire
    collective_s: float  # idle while its rank was in an ALLREDUCE
    bubble_s: float  # idle waiting for a peer to compute
    span_s: float
    busy_fraction: float
    bubble_fraction: float  # the rank's whole idle share of the span (the simulator's bubble)

    @property
    def comm_s(self) -> float:
        return self.transfer_s + self.collective_s


def events_from_records(records: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Telemetry records (``type == "event"``) to Events; other records are skipped."""
    out = []
    for r in records:
        if r.get("type", "event") == "event" and "kind" in r:
            out.append(Event.from_dict(dict(r)))
    return out


def events_of_step(events: Iterable[Event], step: int) -> list[Event]:
    return [e for e in events if e.step == step]


def pick_step(step_times_s: Sequence[float]) -> int:
    """The step whose time is the median of steps after the first (warm-up): a typical step."""
    if not step_times_s:
        return 0
    idx = list(range(1, len(step_times_s))) or [0]
    idx.sort(key=lambda i: step_times_s[i])
    return idx[len(idx) // 2]


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100]; None for no data."""
    if not xs:
        return None
    ys = sorted(xs)
    pos = (len(ys) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def match_transfers(events: Iterable[Event], num_stages: int) -> list[Transfer]:
    """Pair SEND and RECV events into transfers (see module docstring)."""
    sends: dict[tuple[int, int, int], list[Event]] = {}
    recvs: dict[tuple[int, int, int], list[Event]] = {}
    for e in events:
        if e.kind == "SEND":
            sends.setdefault((e.step, e.stage, e.microbatch), []).append(e)
        elif e.kind == "RECV":
            recvs.setdefault((e.step, e.stage, e.microbatch), []).append(e)
    last = num_stages - 1

    def split(evs: list[Event], stage: int, first_dir: str) -> dict[str, Event]:
        evs = sorted(evs, key=lambda x: x.start_s)
        out: dict[str, Event] = {}
        # activations flow forward first; gradients flow back later
        has_fwd = stage < last if first_dir == "send" else stage > 0
        has_bwd = stage > 0 if first_dir == "send" else stage < last
        if has_fwd and evs:
            out["fwd"] = evs[0]
        if has_bwd and len(evs) > (1 if has_fwd else 0):
            out["bwd"] = evs[1 if has_fwd else 0]
        return out

    send_by = {k: split(v, k[1], "send") for k, v in sends.items()}
    recv_by = {k: split(v, k[1], "recv") for k, v in recvs.items()}
    out = []
    for (step, s, mb), d in send_by.items():
        for direction, dst in (("fwd", s + 1), ("bwd", s - 1)):
            se = d.get(direction)
            re = recv_by.get((step, dst, mb), {}).get(direction)
            if se is None or re is None:
                continue
            out.append(Transfer(src_stage=s, dst_stage=dst, step=step, microbatch=mb,
                                latency_s=max(0.0, re.end_s - se.start_s), bytes=max(se.bytes, re.bytes),
                                end_s=re.end_s, wire_start_s=max(se.start_s, re.start_s),
                                wire_end_s=min(se.end_s, re.end_s)))
    out.sort(key=lambda t: (t.step, t.dst_stage, t.microbatch, t.src_stage))
    return out


def stage_breakdown(events: Sequence[Event], num_stages: int, stage_to_rank: Sequence[int]) -> list[StageBreakdown]:
    """Compute / transfer / collective / bubble per stage for ONE step's events (see module docstring)."""
    comp = [e for e in events if e.kind in COMPUTE_KINDS]
    if not comp:
        return [StageBreakdown(stage=s, rank=stage_to_rank[s], compute_s=0.0, transfer_s=0.0, collective_s=0.0, bubble_s=0.0,
                               span_s=0.0, busy_fraction=0.0, bubble_fraction=0.0) for s in range(num_stages)]
    t0 = min(e.start_s for e in comp)
    span = max(e.end_s for e in comp) - t0
    span = span if span > 0 else 1e-12
    busy_stage = [0.0] * num_stages
    for e in comp:
        if 0 <= e.stage < num_stages:
            busy_stage[e.stage] += e.duration_s
    busy_rank: dict[int, float] = {}
    for s, b in enumerate(busy_stage):
        busy_rank[stage_to_rank[s]] = busy_rank.get(stage_to_rank[s], 0.0) + b
    t_end = t0 + span
    comp_by_rank: dict[int, list[tuple[float, float]]] = {}
    for e in comp:
        comp_by_rank.setdefault(e.rank, []).append((e.start_s, e.end_s))
    coll_by_rank: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.kind == "ALLREDUCE":
            coll_by_rank.setdefault(e.rank, []).append((e.start_s, e.end_s))
    wire: dict[int, list[tuple[float, float]]] = {}
    for t in match_transfers(events, num_stages):
        if t.wire_s > 0:
            wire.setdefault(t.dst_stage, []).append((t.wire_start_s, t.wire_end_s))
    out = []
    for s in range(num_stages):
        r = stage_to_rank[s]
        idle = max(0.0, span - busy_rank[r])
        idle_iv = _complement(_union(comp_by_rank.get(r, [])), t0, t_end)
        coll_iv = _union(coll_by_rank.get(r, []))
        coll = min(idle, _overlap(idle_iv, coll_iv))
        # the wire counts only while the rank is neither computing nor in a collective: each instant is one thing
        free_iv = _subtract(idle_iv, coll_iv)
        xfer = min(idle - coll, _overlap(free_iv, _union(wire.get(s, []))))
        out.append(StageBreakdown(stage=s, rank=r, compute_s=busy_stage[s], transfer_s=xfer, collective_s=coll,
                                  bubble_s=max(0.0, idle - coll - xfer), span_s=span, busy_fraction=busy_stage[s] / span,
                                  bubble_fraction=idle / span))
    return out


def _subtract(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``xs`` minus ``ys``, both sorted disjoint interval lists."""
    out: list[tuple[float, float]] = []
    for a, b in xs:
        cur = a
        for c, d in ys:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _complement(iv: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    out, cur = [], lo
    for a, b in iv:
        if a > cur:
            out.append((cur, min(a, hi)))
        cur = max(cur, b)
    if cur < hi:
        out.append((cur, hi))
    return [(a, b) for a, b in out if b > a]


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted disjoint interval lists."""
    i = j = 0
    tot = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            tot += b - a
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return tot


# ----- reading RUN_DIR/telemetry ----------------------------------------------------------------
def read_telemetry(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """All records of every rank: ``{rank: [record, ...]}`` (a torn last line is skipped)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for p in sorted((Path(run_dir) / "telemetry").glob("rank*.jsonl")):
        rank = int(p.stem[4:])
        recs = []
        for line in p.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        out[rank] = recs
    return out


def read_rank_file(run_dir: str | Path, rank: int) -> dict[str, Any]:
    """One rank's telemetry, compacted: meta, step records, and per (stage, kind) event totals."""
    p = Path(run_dir) / "telemetry" / f"rank{rank}.jsonl"
    meta: dict[str, Any] = {}
    steps: dict[int, dict[str, Any]] = {}
    summary: dict[str, list[float]] = {}
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        t = rec.get("type")
        if t == "meta":
            meta = rec
        elif t == "step":
            steps[int(rec["step"])] = rec  # a resumed run overwrites the steps it re-ran
        elif t == "event":
            key = f"{rec['stage']}:{rec['kind']}"
            acc = summary.setdefault(key, [0, 0.0, 0])
            acc[0] += 1
            acc[1] += rec["end_s"] - rec["start_s"]
            acc[2] += rec.get("bytes", 0)
    return {"meta": meta, "steps": [steps[k] for k in sorted(steps)], "events": summary}
