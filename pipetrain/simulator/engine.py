"""The simpy discrete-event simulation of one training step.

One simpy process per pipeline rank executes the rank's action list literally, as the executor
does:

* **compute** (F, B, W) holds the rank for its duration; ranks in a shared
  :class:`~pipetrain.program.spec.ComputeGroup` first request its ``simpy.Resource``;
* **SEND** never blocks the rank: the transfer queues FIFO on its link (one queue per link and
  direction), occupies it for ``bytes / bandwidth`` and lands ``latency`` later;
* **RECV** blocks the rank until the matching transfer has landed; in a time-sliced compute
  group whose cores are all computing when it lands, ``ComputeGroup.wakeup_s`` later (the
  blocked process waits for a core); a rank that waited (for a message or a buffer) needs
  :meth:`ComputeGroup.resume_cost_s` more compute for its next action (cold caches);
* **host work per message** (``SimInput.t_message_host_s``): after posting a SEND and after a
  RECV lands, the rank's compute is held that long (CPU ranks: gloo's posting and copying);
* **receive buffers (back-pressure)**, as the executor keeps them: each rank posts its receives
  where the lowered program does (:func:`pipetrain.program.lower_ops`: into the stage's buffer
  pool, in the order its actions need them, as soon as a slot is free). A transfer starts only
  once its receive is posted, so a stage with few buffers delays its upstream's sends (exposing
  their latency). A stage without remote input (stage 0) is checked at each F: no more than
  ``buffers`` micro-batches in flight.
* **receive modes** (``SimInput.recv_mode``): in ``post`` mode (above; gloo, pipetrain's runtime)
  a posted receive holds nothing back. In ``blocking`` mode (Megatron's p2p: each send and receive
  waited on where it is issued) a SEND holds its rank until its data has arrived. In ``in-order``
  mode (an NCCL stream) each rank's posts and
  sends, to any peer, queue on one stream (the pipeline group's communicator) in the order the
  rank issues them: an operation starts only once the one before it completed. A send starts its
  transfer when it heads its stream (NCCL pushes into the peer's buffers; it needs no posted
  receive) and completes once its bytes are on the wire (``bytes / bandwidth``; the link's latency
  is the receiver's wait); a receive completes when it heads its stream and its data is there, and
  the rank's wait on it returns only then. A receive posted long before its data is sent thus holds
  back the rank's later sends, to any peer: the bubble of front-loaded receives
  (pytorch/pytorch#172668, #188833). Where receives are posted is the program's (``SimInput.ops``:
  an imported program; else pipetrain's own prefetch rule).
* **memory** per stage at every change: activations F -> B; with a split backward, the W stash
  B -> W; plus the static bytes.

Then :func:`~pipetrain.simulator.ops.end_of_step` adds the data-parallel all-reduce and the
optimizer step. A run that cannot finish (a schedule asking for more buffers than the stage has,
or a deadlocking hand-made schedule) raises :class:`~pipetrain.errors.ScheduleError` naming the
stuck ranks. Speed: events are plain tuples, links and messages are plain dicts, and only waits
that really wait create simpy events.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import replace

import simpy
from simpy.events import NORMAL

from pipetrain.errors import ConfigError, ScheduleError
from pipetrain.program.spec import ComputeGroup, SimInput
from pipetrain.simulator.ops import COMPUTE, POST, SEND, EventTuple, Tables, end_of_step, sim_skeleton, tables
from pipetrain.simulator.result import SimResult, build_result, busy_s_per_stage
from pipetrain.simulator.sharing import SharedCores

__all__ = ["simulate", "sampled_steps", "SAMPLED_STEPS", "MIN_SAMPLED_STEPS", "SAMPLED_ACTIONS"]

_UNLIMITED = 1 << 60
#: steps sampled where a latency is a distribution: the median of 63 draws of the demo's step moves
#: by about 1% between seeds (benchmarks/RESULTS.md)
SAMPLED_STEPS = 63
#: fewest steps sampled, whatever the schedule's size
MIN_SAMPLED_STEPS = 9
#: compute actions simulated over all sampled steps, at most (above MIN_SAMPLED_STEPS): a large
#: schedule samples fewer steps, so its simulation stays within a few times one step's
SAMPLED_ACTIONS = 100_000


def _land(env: simpy.Environment, ev: simpy.Event, delay: float, value: float) -> None:
    """Trigger ``ev`` ``delay`` from now with ``value``: a Timeout for an event created earlier.

    (This is what ``simpy.Timeout.__init__`` does; it saves a second event per waiting RECV.)
    """
    ev._ok = True
    ev._value = value
    env.schedule(ev, NORMAL, delay)


def _why(what: tuple[str, int, int] | None, caps: list[int]) -> str:
    if what is None:
        return "nothing"
    why, s, mb = what
    if why == "buffer":
        return f"a free activation buffer of stage {s} (it has {caps[s]}) for {s}F{mb}"
    if why == "recv":
        return f"the data of {s}RECV{mb}"
    if why == "send":
        return f"its receiver to take {s}SEND{mb} (blocking sends)"
    return f"its compute group for stage {s} micro-batch {mb}"


def sampled_steps(inp: SimInput) -> int:
    """How many steps :func:`simulate` samples where a latency is a distribution: :data:`SAMPLED_STEPS`,
    fewer for a large schedule (:data:`SAMPLED_ACTIONS`), at least :data:`MIN_SAMPLED_STEPS`; odd, so
    the median is one of them."""
    n = max(MIN_SAMPLED_STEPS, min(SAMPLED_STEPS, SAMPLED_ACTIONS // max(1, inp.schedule.num_compute_actions)))
    return n if n % 2 else n - 1


def simulate(inp: SimInput, *, steps: int | None = None, seed: int = 0) -> SimResult:
    """Simulate one training step of ``inp`` with simpy; see the module docstring.

    Where a link's latency is a distribution (``Link.latency_jitter``, a calibration's measured
    one), one step with every message at the mean latency is not the typical step: a step is a
    longest path through maxima of message arrivals, and a max of random delays averages more than
    the max of their means (Jensen), so the deterministic step under-predicts a machine whose
    messages now take 0.03 ms and now 1 ms. Then ``steps`` independent steps (default
    :func:`sampled_steps`) are simulated, each message's latency drawn from its link's distribution
    with a ``random.Random(seed)`` (reproducible), and the result is the median step's, with the
    sampled steps' quartiles in ``step_time_quartiles_s``: a measured run's median step is the
    figure it predicts."""
    tab = tables(inp)
    if not any(tab.jitter):
        return _simulate(inp, tab, None)
    n = steps if steps is not None else sampled_steps(inp)
    if n < 1:
        raise ConfigError(f"simulate: steps must be >= 1, got {n}")
    rng = random.Random(seed)
    runs = sorted((_simulate(inp, tab, rng) for _ in range(n)), key=lambda res: res.step_time_s)
    times = [res.step_time_s for res in runs]
    return replace(runs[(n - 1) // 2], sampled_steps=n,
                   step_time_quartiles_s=(_quantile(times, 0.25), _quantile(times, 0.75)))


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between the order statistics (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def _simulate(inp: SimInput, tab: Tables, rng: random.Random | None) -> SimResult:
    """One step; with ``rng``, each message's latency drawn from its link's ``latency_jitter``."""
    sched = inp.schedule
    ops_per_rank = sim_skeleton(inp)
    dur_of, link_of, wire_of, lat_of, bytes_of = tab.dur, tab.link, tab.wire, tab.latency, tab.nbytes
    jitter_of = tab.jitter
    sampled = rng is not None and any(jitter_of)

    def latency(slot: int) -> float:
        j = jitter_of[slot]
        return lat_of[slot] * j[rng.randrange(len(j))] if rng is not None and j else lat_of[slot]
    env = simpy.Environment()
    n_st, n_rk = sched.num_stages, sched.num_ranks
    resource: list[simpy.Resource | SharedCores | None] = [None] * n_rk
    wakeup = [0.0] * n_rk
    group_of: list[ComputeGroup | None] = [None] * n_rk  # time-sliced ranks: the extra compute after a wait
    extra = [0.0] * n_rk  # seconds the rank's next action takes longer (it waited: cold caches)
    for g in inp.compute_groups:
        if g.contends:
            res = SharedCores(env, g.capacity, g.rate) if g.sharing == "time-slice" else simpy.Resource(env, capacity=g.capacity)
            for r in g.ranks:
                resource[r] = res
                if g.sharing == "time-slice":
                    wakeup[r] = g.wakeup_s
                    if g.resume_s > 0 or g.switch_s > 0:
                        group_of[r] = g
    caps = [spec.buffers or _UNLIMITED for spec in inp.stages]
    act_bytes = [spec.activation_bytes for spec in inp.stages]
    wg_bytes = [spec.wgrad_stash_bytes for spec in inp.stages]
    in_flight = [0] * n_st
    peak = [0] * n_st
    buf_wait: list[deque] = [deque() for _ in range(n_st)]
    mem = [spec.static_bytes for spec in inp.stages]
    timeline: list[list[tuple[float, float]]] = [[(0.0, m)] for m in mem]
    grad_start = [0.0] * n_st
    grad_end = [0.0] * n_st
    rank_end = [0.0] * n_rk
    link_free: dict[str, float] = {}
    landed: dict[int, float] = {}
    recv_wait: dict[int, simpy.Event] = {}
    events: list[EventTuple] = []
    waiting_on: list[tuple[str, int, int] | None] = [None] * n_rk
    push = events.append
    timeout = env.timeout

    # receive buffers: a transfer starts only once its receive is posted, and the receives are
    # posted where the lowered program posts them (the executor's prefetch rule, defined once in
    # pipetrain.program.lower): POST ops in each rank's list
    posted: set[int] = set()
    pending: dict[int, tuple[int, int, int, int]] = {}
    # blocking mode (Megatron's send/recv on the critical path): a SEND returns once its data arrived
    blocking = inp.recv_mode == "blocking"
    send_done: dict[int, simpy.Event] = {}

    def transfer(msg: int, r: int, s: int, mb: int, slot: int) -> tuple[float, float]:
        """(off the wire, landed) of ``msg``'s transfer, started now or when its link frees."""
        now = env.now
        name = link_of[slot]
        begin = link_free.get(name, 0.0)
        if begin < now:
            begin = now
        done = begin + wire_of[slot]
        link_free[name] = done
        arrive = done + latency(slot)
        push((s, r, "SEND", mb, begin, arrive, bytes_of[slot]))
        blocked = send_done.pop(msg, None)
        if blocked is not None:  # a blocking sender waited for its receiver's post: it goes on once the data is there
            def release(ev: simpy.Event = blocked) -> None:
                ev.succeed()

            done_at(arrive, release)
        if in_order:  # the receive's completion lands it (stream order)
            return done, arrive
        w = recv_wait.pop(msg, None)
        if w is None:
            landed[msg] = arrive
        else:
            _land(env, w, arrive - now, arrive)
        return done, arrive

    # in-order mode: one FIFO stream per rank (the pipeline group's communicator). A SEND heading
    # its stream starts its transfer (NCCL pushes into the peer's buffers: it needs no posted
    # receive) and completes when its bytes are off the wire; a POST heading its stream completes
    # once its data is there, and only then can the rank's wait on it return. Whatever was issued
    # after an operation waits for it.
    in_order = inp.recv_mode == "in-order"
    streams: dict[int, deque] = {}
    arrived: dict[int, float] = {}
    recv_head: dict[int, int] = {}  # message -> the stream whose head is its POST, waiting for data

    def issue(key: int, entry: tuple) -> None:
        q = streams.setdefault(key, deque())
        q.append(entry)
        if len(q) == 1:
            activate(key)

    def activate(key: int) -> None:
        entry = streams[key][0]
        msg = entry[1]
        if entry[0] == SEND:
            _, _, r, s, mb, slot = entry
            off_wire, arrive = transfer(msg, r, s, mb, slot)
            done_at(off_wire, lambda: complete(key))  # off the wire: the sender's kernel is done
            waiting = recv_head.pop(msg, None)
            if waiting is None:
                arrived[msg] = arrive
            else:
                receive(waiting, msg, arrive)
        else:
            t = arrived.pop(msg, None)
            if t is None:
                recv_head[msg] = key
            else:
                receive(key, msg, max(t, env.now))

    def receive(key: int, msg: int, at: float) -> None:
        def finish() -> None:
            w = recv_wait.pop(msg, None)
            if w is None:
                landed[msg] = at
            else:
                _land(env, w, 0.0, at)
            complete(key)

        done_at(at, finish)

    def done_at(at: float, fn: Callable[[], None]) -> None:
        ev = env.timeout(max(0.0, at - env.now))
        ev.callbacks.append(lambda _ev: fn())

    def complete(key: int) -> None:
        q = streams[key]
        q.popleft()
        if q:
            activate(key)

    host_s = inp.t_message_host_s

    def occupy(res: simpy.Resource | SharedCores | None, seconds: float) -> Generator[simpy.Event, object, None]:
        """Hold the rank's compute for ``seconds`` of host work (not an action: no event, no busy time)."""
        if isinstance(res, SharedCores):
            yield res.run(seconds)
        elif res is not None:
            req = res.request()
            yield req
            yield timeout(seconds)
            res.release(req)
        else:
            yield timeout(seconds)

    def rank_proc(r: int, ops: tuple[tuple, ...]) -> Generator[simpy.Event, object, None]:
        res = resource[r]
        for op in ops:
            code = op[0]
            if code == COMPUTE:
                _, s, kind, mb, slot, acquires, kind_slot, final = op
                dur = dur_of[slot]
                if acquires:
                    t0 = env.now
                    while in_flight[s] >= caps[s]:
                        waiting_on[r] = ("buffer", s, mb)
                        w = env.event()
                        buf_wait[s].append(w)
                        yield w
                    grp = group_of[r]
                    if grp is not None and env.now > t0:
                        extra[r] = max(extra[r], grp.resume_cost_s(env.now - t0))
                    in_flight[s] += 1
                    if in_flight[s] > peak[s]:
                        peak[s] = in_flight[s]
                    if act_bytes[s]:
                        mem[s] += act_bytes[s]
                        timeline[s].append((env.now, mem[s]))
                if extra[r]:  # resumed after a wait: its caches went cold
                    dur += extra[r]
                    extra[r] = 0.0
                if isinstance(res, SharedCores):  # time-sliced: starts now, ends once it got `dur` of core time
                    start = env.now
                    yield res.run(dur)
                    end = env.now
                elif res is not None:
                    waiting_on[r] = ("group", s, mb)
                    req = res.request()
                    yield req
                    start = env.now
                    yield timeout(dur)
                    res.release(req)
                    end = env.now
                else:
                    start = env.now
                    yield timeout(dur)
                    end = start + dur  # what simpy's clock reads now (it schedules at now + delay)
                push((s, r, kind, mb, start, end, 0))
                if kind_slot == 1 or kind_slot == 2:  # B frees the activations; I keeps the W stash
                    in_flight[s] -= 1
                    delta = wg_bytes[s] - act_bytes[s] if kind_slot == 2 else -act_bytes[s]
                    if delta:
                        mem[s] += delta
                        timeline[s].append((end, mem[s]))
                    if buf_wait[s]:
                        buf_wait[s].popleft().succeed()
                elif kind_slot == 3 and wg_bytes[s]:
                    mem[s] -= wg_bytes[s]
                    timeline[s].append((end, mem[s]))
                if final:
                    grad_start[s] = start
                    grad_end[s] = end
            elif code == POST and in_order:
                issue(r, (POST, op[3]))
            elif code == POST:
                msg = op[3]
                posted.add(msg)
                waiting_send = pending.pop(msg, None)
                if waiting_send is not None:
                    transfer(msg, *waiting_send)
            elif code == SEND:
                _, s, mb, msg, slot = op
                if host_s:
                    yield from occupy(res, host_s)
                if in_order:
                    issue(r, (SEND, msg, r, s, mb, slot))
                elif msg in posted:  # transfer(msg, r, s, mb, slot), inlined
                    now = env.now
                    name = link_of[slot]
                    begin = link_free.get(name, 0.0)
                    if begin < now:
                        begin = now
                    done = begin + wire_of[slot]
                    link_free[name] = done
                    arrive = done + (latency(slot) if sampled else lat_of[slot])
                    push((s, r, "SEND", mb, begin, arrive, bytes_of[slot]))
                    waiter = recv_wait.pop(msg, None)
                    if waiter is None:
                        landed[msg] = arrive
                    else:
                        _land(env, waiter, arrive - now, arrive)
                    if blocking:
                        waiting_on[r] = ("send", s, mb)
                        yield timeout(arrive - now)
                else:  # the receiver has no free buffer yet: the transfer starts when it posts one
                    pending[msg] = (r, s, mb, slot)
                    if blocking:
                        waiting_on[r] = ("send", s, mb)
                        w = env.event()
                        send_done[msg] = w
                        yield w
            else:
                _, s, mb, msg, slot = op
                t0 = env.now
                arrive = landed.pop(msg, None)
                if arrive is None:
                    waiting_on[r] = ("recv", s, mb)
                    w = env.event()
                    recv_wait[msg] = w
                    yield w
                elif arrive > t0:
                    yield timeout(arrive - t0)
                if wakeup[r] and env.now > t0 and isinstance(res, SharedCores) and len(res.jobs) >= res.capacity:  # blocked, all cores taken
                    yield timeout(wakeup[r])
                grp = group_of[r]
                if grp is not None and env.now > t0:
                    extra[r] = max(extra[r], grp.resume_cost_s(env.now - t0))
                push((s, r, "RECV", mb, t0, env.now, bytes_of[slot]))
                if host_s:
                    yield from occupy(res, host_s)
        rank_end[r] = env.now
        waiting_on[r] = None

    procs = [env.process(rank_proc(r, ops)) for r, ops in enumerate(ops_per_rank)]
    env.run()
    stuck = [r for r, p in enumerate(procs) if p.is_alive]
    if stuck:
        why = "; ".join(f"rank {r} waits for {_why(waiting_on[r], caps)}" for r in stuck)
        if in_order:
            raise ScheduleError(f"simulation of {sched.name} cannot finish in recv_mode 'in-order': {why}. A receive posted before "
                                "a send to the same peer holds that send back until its data arrives, and the two ranks wait on each "
                                "other: post each receive just before the compute that needs it (torch: defer_pp_recv=True), or "
                                "simulate recv_mode 'post'")
        raise ScheduleError(f"simulation of {sched.name} cannot finish: {why}. A stage with fewer buffers than the schedule keeps in flight "
                            "stalls for ever: build the schedule with those buffers (make_schedule(..., buffers=...)) or raise them")
    pipeline = max(rank_end) if rank_end else 0.0
    step, tail = end_of_step(inp, rank_end, grad_start, grad_end)
    events.extend(tail)
    return build_result(inp, evaluator="simpy", step_time_s=max(step, pipeline), pipeline_time_s=pipeline,
                        busy_s_per_stage=busy_s_per_stage(inp), peak_in_flight=peak,
                        timeline=tuple(tuple(tl) for tl in timeline), num_compute=sum(1 for ops in ops_per_rank for op in ops if op[0] == COMPUTE),
                        raw_events=tuple(events))
