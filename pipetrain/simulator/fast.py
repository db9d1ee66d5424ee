"""The fast evaluator: the longest path through the schedule's dependency DAG, no simpy.

Nodes are the compute actions (plus a zero-length node for a RECV not directly followed by a
compute); edges are each rank's program order (weight: the node's duration) and SEND -> RECV
(weight: the link's wire time plus latency). A node ends at
``max(end of the previous node on its rank, end of the sender's node + wire + latency) + duration``:
exactly what the simpy engine computes when nothing contends. It ignores what only the simpy
engine models — shared compute groups, link contention (FIFO queues), buffer back-pressure and
the host work per message (``SimInput.t_message_host_s``), a latency's distribution
(``Link.latency_jitter``: it takes every message at the mean latency), and where receives are posted (it
takes each as posted in time: ``SimInput.ops`` is ignored; ``recv_mode`` ``in-order`` is refused)
— and is meant for the planner's
screening of many candidates; the planner confirms its best ones in the simpy engine.

The DAG's shape depends only on the schedule, so it is compiled once per :class:`Schedule` object
(cached) into flat lists in topological order; an evaluation is then one tight loop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from pipetrain.errors import ConfigError, ScheduleError
from pipetrain.program.spec import SimInput
from pipetrain.schedules import Schedule, peak_in_flight, peak_pending_wgrad
from pipetrain.simulator.ops import EVENT_KIND, EventTuple, Tables, check_comm_counts, drop_when_collected, end_of_step, tables
from pipetrain.simulator.result import SimResult, build_result, busy_s_per_stage

__all__ = ["FastProgram", "compile_schedule", "fast_evaluate", "fast_step_time"]

_KIND = {"F": 0, "B": 1, "I": 2, "W": 3}
#: per action kind: 0 compute, 1 RECV_F, 2 RECV_B, 3 SEND_F, 4 SEND_B
_ROLE = {"F": 0, "B": 0, "I": 0, "W": 0, "RECV_F": 1, "RECV_B": 2, "SEND_F": 3, "SEND_B": 4}
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class FastProgram:
    """A schedule's DAG in topological order. Node ``i`` (1-based; 0 is the time-zero sentinel)."""

    prev: list[int]        # previous node on the same rank (0: none)
    src: list[int]         # sender's node of the RECV folded into this node (0: none)
    dur_key: list[int]     # 4 * stage + kind (F 0, B 1, I 2, W 3); -1 for a zero-length RECV node
    link_key: list[int]    # 2 * boundary + (0 forward, 1 backward) for the folded RECV, -1 none
    rank_last: list[int]   # per rank, its last node (0: empty rank)
    grad_final: list[int]  # per stage, the node of its last gradient action (its last B or W)
    peak_in_flight: tuple[int, ...]
    peak_pending_wgrad: tuple[int, ...]
    num_compute: int
    nodes: list[tuple[int, int, str, int]]  # (stage, rank, kind, microbatch) per node, kind "" for RECV nodes


_CACHE: dict[int, tuple[weakref.ref, FastProgram]] = {}


def compile_schedule(sched: Schedule) -> FastProgram:
    """Compile (and cache per schedule object) the DAG of ``sched``."""
    hit = _CACHE.get(id(sched))
    if hit is not None and hit[0]() is sched:
        return hit[1]
    prog = _compile(sched)
    key = id(sched)
    _CACHE[key] = (weakref.ref(sched, drop_when_collected(_CACHE, key)), prog)
    return prog


def _compile(sched: Schedule) -> FastProgram:
    m = sched.num_microbatches
    # raw nodes per rank: (stage, kind, mb, recv_msg or -1), and sends: msg -> (rank, index of node before).
    # A message is (2 * sending stage + direction) * m + micro-batch. This loop sees every action
    # of a schedule of up to a million, so each kind's role is one dict lookup.
    raw: list[list[tuple[int, str, int, int]]] = []
    send_at: dict[int, tuple[int, int]] = {}
    n_compute = n_send = n_recv = 0
    role = _ROLE
    for r, acts in enumerate(sched.actions):
        nodes: list[tuple[int, str, int, int]] = []
        add = nodes.append
        pending = -1
        for a in acts:
            kind = a.kind
            what = role[kind]
            if what == 0:  # compute
                n_compute += 1
                add((a.stage, kind, a.microbatch, pending))
                pending = -1
            elif what < 3:  # RECV_F (1) / RECV_B (2)
                n_recv += 1
                if pending >= 0:
                    add((a.stage, "", a.microbatch, pending))
                pending = (2 * a.stage - 2 + 5 * (what - 1)) * m + a.microbatch  # from stage s - 1 (fwd) or s + 1 (bwd)
            else:  # SEND_F (3) / SEND_B (4)
                n_send += 1
                if pending >= 0:
                    add((a.stage, "", a.microbatch, pending))
                    pending = -1
                send_at[(2 * a.stage + what - 3) * m + a.microbatch] = (r, len(nodes) - 1)
        if pending >= 0:
            add((sched.num_stages, "", 0, pending))
        raw.append(nodes)
    check_comm_counts(sched, n_send, n_recv)
    # Kahn's algorithm over rank chains: a rank advances until a node's sender is not yet placed.
    gid: list[list[int]] = [[0] * len(n) for n in raw]
    pos = [0] * sched.num_ranks
    waiting: dict[tuple[int, int], list[int]] = {}
    ready = list(range(sched.num_ranks - 1, -1, -1))
    prev: list[int] = [0]
    src: list[int] = [0]
    dur_key: list[int] = [-1]
    link_key: list[int] = [-1]
    out_nodes: list[tuple[int, int, str, int]] = [(-1, -1, "", -1)]
    kind_no, event_kind = _KIND, EVENT_KIND
    while ready:
        r = ready.pop()
        nodes, ids = raw[r], gid[r]
        i = pos[r]
        while i < len(nodes):
            s, kind, mb, msg = nodes[i]
            sender = 0
            if msg >= 0:
                if msg not in send_at:
                    raise ScheduleError(f"rank {r}: a RECV (message {msg}) has no matching SEND; validate the schedule")
                sr, si = send_at[msg]
                if si >= 0:
                    if sr == r and si >= i or gid[sr][si] == 0:
                        waiting.setdefault((sr, si), []).append(r)
                        break
                    sender = gid[sr][si]
            ids[i] = len(prev)
            prev.append(ids[i - 1] if i else 0)
            src.append(sender)
            dur_key.append(4 * s + kind_no[kind] if kind else -1)
            if msg < 0:
                link_key.append(-1)
            else:  # message class 2 * sender stage + direction -> 2 * boundary + direction
                sender_stage, backward = divmod(msg // m, 2)
                link_key.append(2 * (sender_stage - backward) + backward)
            out_nodes.append((s, r, event_kind[kind] if kind else "RECV", mb))
            if (r, i) in waiting:
                ready.extend(waiting.pop((r, i)))
            i += 1
        pos[r] = i
    stuck = [r for r in range(sched.num_ranks) if pos[r] < len(raw[r])]
    if stuck:
        raise ScheduleError(f"schedule {sched.name} deadlocks at ranks {stuck}; run pipetrain.schedules.validate for details")
    grad_final = [0] * sched.num_stages
    for r, nodes in enumerate(raw):
        for i, (s, kind, _mb, _msg) in enumerate(nodes):
            if kind in ("B", "W"):
                grad_final[s] = gid[r][i]
    return FastProgram(prev=prev, src=src, dur_key=dur_key, link_key=link_key,
                       rank_last=[ids[-1] if ids else 0 for ids in gid], grad_final=grad_final,
                       peak_in_flight=peak_in_flight(sched),
                       peak_pending_wgrad=peak_pending_wgrad(sched), num_compute=n_compute, nodes=out_nodes)


def _run(inp: SimInput, prog: FastProgram) -> tuple[list[float], Tables]:
    tab = tables(inp)
    table = tab.dur + [0.0]
    wires = [w for w in tab.wire] + [_NEG_INF]
    lats = [x for x in tab.latency] + [_NEG_INF]
    dur = [table[k] for k in prog.dur_key]
    wire = [wires[k] for k in prog.link_key]
    lat = [lats[k] for k in prog.link_key]
    val = [0.0]
    push = val.append
    it = zip(prog.prev, prog.src, wire, lat, dur)
    next(it)  # the sentinel
    for p, s, w, lt, d in it:
        t = val[p]
        a = val[s] + w + lt
        push((t if t >= a else a) + d)
    return val, tab


def _exact_start(prog: FastProgram, val: list[float], i: int, tab: Tables) -> float:
    t = val[prog.prev[i]]
    k = prog.link_key[i]
    if k >= 0:
        a = val[prog.src[i]] + tab.wire[k] + tab.latency[k]
        t = t if t >= a else a
    return t


def fast_step_time(inp: SimInput) -> float:
    """Step time only (the quickest call, for screening)."""
    return fast_evaluate(inp).step_time_s


def fast_evaluate(inp: SimInput, *, events: bool = False) -> SimResult:
    """Evaluate ``inp`` by longest path; ``events=True`` also returns the F/B/W events."""
    if inp.recv_mode != "post":
        raise ConfigError(f"the fast evaluator cannot order receives on a stream (recv_mode {inp.recv_mode!r}): use the simpy engine")
    sched = inp.schedule
    prog = compile_schedule(sched)
    val, tab = _run(inp, prog)
    rank_end = [val[i] for i in prog.rank_last]
    gs = [_exact_start(prog, val, i, tab) if i else 0.0 for i in prog.grad_final]
    ge = [val[i] for i in prog.grad_final]
    step, tail = end_of_step(inp, rank_end, gs, ge)
    pipeline = max(rank_end) if rank_end else 0.0
    raw: tuple[EventTuple, ...] = ()
    if events:
        evs: list[EventTuple] = []
        for i in range(1, len(val)):
            s, r, kind, mb = prog.nodes[i]
            if kind != "RECV":
                evs.append((s, r, kind, mb, _exact_start(prog, val, i, tab), val[i], 0))
        raw = tuple(evs + tail)
    return build_result(inp, evaluator="fast", step_time_s=max(step, pipeline), pipeline_time_s=pipeline,
                        busy_s_per_stage=busy_s_per_stage(inp), peak_in_flight=prog.peak_in_flight, peak_pending_wgrad=prog.peak_pending_wgrad,
                        num_compute=prog.num_compute, raw_events=raw)
