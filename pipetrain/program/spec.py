"""What the simulator is told: a schedule plus per-stage costs, links, sharing and data parallelism.

Everything is a frozen, keyword-only dataclass, torch-free, with units in field names. The
planner builds a :class:`SimInput` from a Plan, a Topology and a cost model; a user with
profiled per-stage times builds one with :func:`uniform`.

Time model of one stage (virtual stage with interleaving):

* ``F`` takes ``t_fwd_s``.
* Without a split backward, ``B`` takes ``t_bwd_s + t_wgrad_s`` (input grad plus weight grad;
  leave ``t_wgrad_s`` at 0 and ``t_bwd_s`` is simply the full backward). With recomputation,
  ``t_recompute_s`` is added in front of every B.
* With a split backward (zero-bubble schedules) ``B`` takes ``t_bwd_s`` (+ recompute) and ``W``
  takes ``t_wgrad_s``.

Memory of one stage: ``static_bytes`` (parameters, gradients, optimizer state) plus
``activation_bytes`` for every micro-batch in flight (its F started, its B has not finished), plus,
with a split backward, ``wgrad_stash_bytes`` for every micro-batch between its B and its W (what
the weight gradient still needs).

``buffers`` is the stage's pool of receive buffers, as the executor allocates it: that many
input-activation buffers and as many output-gradient buffers, each taken when the receive is
posted (in the order the stage's actions need them, as soon as one is free) and given back when
the B of its micro-batch has run. A transfer starts only once its receive is posted, so a stage
whose pool is exactly what the schedule keeps in flight cannot prefetch, and exposes its
upstream's transfer latency; ``None`` means enough buffers for everything. A schedule that keeps
more micro-batches in flight than ``buffers`` cannot run: build it with
``make_schedule(..., buffers=...)`` (1F1B and ZB-H1 shorten their warm-up to fit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipetrain.errors import ConfigError
from pipetrain.schedules import Action, Schedule, make_schedule, schedule_chunks
from pipetrain.sharding import CollectiveFit, collective_time_s
from pipetrain.topology import check_latency_jitter

__all__ = [
    "POST", "RUN", "RECV_MODES", "Op", "Link", "StageSpec", "TieSpec", "BoundarySpec", "ComputeGroup", "DataParallelSpec", "SimInput",
    "ring_allreduce_time_s", "uniform",
]


POST, RUN = "post", "run"
#: How a rank's posted receive interacts with its later communication (``SimInput.recv_mode``):
#: ``post`` (gloo, and pipetrain's own runtime): a posted receive waits for its data without holding
#: anything else back; ``in-order`` (an NCCL stream): a rank's point-to-point operations with one peer
#: run one after another in the order they were issued (NCCL puts each pair of ranks' send/recv on one
#: communicator and stream), so a posted receive whose data is not there yet holds back every later
#: send to and receive from that peer until it completes; ``blocking`` (Megatron-LM's
#: ``p2p_communication``, which waits on its send and receive requests where it issues them): as
#: ``post``, and a SEND holds its rank until its data has arrived, on the critical path.
RECV_MODES = ("post", "in-order", "blocking")


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a rank's program: ``run`` an action of the schedule (compute, SEND, or a
    RECV's wait), or ``post`` a RECV (its buffer is taken and the receive is issued)."""

    verb: str
    action: Action

    def __str__(self) -> str:
        return f"post:{self.action}" if self.verb == POST else str(self.action)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _nonneg(owner: str, **values: float) -> None:
    for name, v in values.items():
        _need(isinstance(v, (int, float)) and not math.isnan(v) and v >= 0, f"{owner}: {name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class Link:
    """One direction of a point-to-point connection, or a collective link. Transfers on it queue (FIFO).

    A transfer of ``n`` bytes occupies the link for ``n / bandwidth`` and lands ``latency_s``
    after that (the alpha-beta model). Give the two directions of a full-duplex connection two
    names; give one name to every transfer that shares a wire (e.g. one NIC).
    """

    name: str
    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf
    #: the latency's distribution, multipliers of ``latency_s`` averaging 1 (the topology link's,
    #: :func:`pipetrain.topology.check_latency_jitter`): the simulator draws each message's latency
    #: from them and simulates several steps (:func:`pipetrain.simulator.simulate`); empty: fixed
    latency_jitter: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _nonneg(f"link {self.name}", latency_s=self.latency_s)
        _need(self.bandwidth_bytes_per_s > 0, f"link {self.name}: bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}")
        check_latency_jitter(self.latency_jitter, f"link {self.name}")

    def wire_time_s(self, nbytes: float) -> float:
        return nbytes / self.bandwidth_bytes_per_s if nbytes else 0.0

    def transfer_time_s(self, nbytes: float) -> float:
        """Latency plus serialization: the alpha-beta (Hockney) model."""
        return self.latency_s + self.wire_time_s(nbytes)


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """Costs of one (virtual) stage for one micro-batch; see the module docstring."""

    t_fwd_s: float
    t_bwd_s: float
    t_wgrad_s: float = 0.0
    t_recompute_s: float = 0.0
    recompute: bool = False
    activation_bytes: float = 0.0
    wgrad_stash_bytes: float = 0.0
    static_bytes: float = 0.0
    buffers: int | None = None
    grad_bytes: float = 0.0
    t_optimizer_s: float = 0.0
    #: of the times above, the seconds per micro-batch of the tensor-parallel collectives (forward,
    #: backward and a recompute's forward): already in them, kept apart for the fidelity table
    t_tp_comm_s: float = 0.0

    def __post_init__(self) -> None:
        _nonneg("stage", t_tp_comm_s=self.t_tp_comm_s, t_fwd_s=self.t_fwd_s, t_bwd_s=self.t_bwd_s, t_wgrad_s=self.t_wgrad_s,
                t_recompute_s=self.t_recompute_s, activation_bytes=self.activation_bytes,
                wgrad_stash_bytes=self.wgrad_stash_bytes,
                static_bytes=self.static_bytes, grad_bytes=self.grad_bytes, t_optimizer_s=self.t_optimizer_s)
        _need(self.buffers is None or (isinstance(self.buffers, int) and self.buffers >= 1),
              f"stage buffers must be an integer >= 1 or None (unlimited), got {self.buffers!r}")

    def duration_s(self, kind: str) -> float:
        """Duration of one ``F``, full backward ``B``, input-gradient ``I`` or weight-gradient ``W`` of
        this stage: ``B`` costs ``I + W`` (``t_bwd_s`` is the input-gradient part wherever
        ``t_wgrad_s`` is given)."""
        if kind == "F":
            return self.t_fwd_s
        if kind == "W":
            return self.t_wgrad_s
        extra = self.t_recompute_s if self.recompute else 0.0
        return extra + self.t_bwd_s + (self.t_wgrad_s if kind == "B" else 0.0)


@dataclass(frozen=True, kw_only=True)
class TieSpec:
    """A weight shared by stages on different ranks (GPT-2's embedding and output head): after the
    backward pass its gradient, ``nbytes``, is all-reduced among ``ranks`` on ``link``, as the
    executor does before it clips; no rank of the tie starts its update before the slowest is there."""

    ranks: tuple[int, ...]
    nbytes: float
    link: Link
    #: the all-reduce as a calibration measured it on the backend (empty: the ring on ``link``)
    fits: tuple[CollectiveFit, ...] = ()

    def __post_init__(self) -> None:
        _need(len(self.ranks) >= 2 and len(set(self.ranks)) == len(self.ranks),
              f"a tie spans two or more distinct ranks, got {self.ranks}")
        _nonneg("tie", nbytes=self.nbytes)


@dataclass(frozen=True, kw_only=True)
class BoundarySpec:
    """The cut between stage ``s`` and ``s + 1``: activation bytes forward, gradient bytes back.

    ``link`` carries the forward transfers, ``bwd_link`` the backward ones (default: a link like
    ``link`` named ``link.name + ":bwd"``). A :class:`Link` is one direction of a connection:
    transfers contend exactly when they use links of the same name, from any boundary or rank.
    """

    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0
    link: Link = field(default_factory=lambda: Link(name="p2p"))
    bwd_link: Link | None = None

    def __post_init__(self) -> None:
        _nonneg("boundary", fwd_bytes=self.fwd_bytes, bwd_bytes=self.bwd_bytes)
        if self.bwd_link is None:
            object.__setattr__(self, "bwd_link", Link(name=self.link.name + ":bwd", latency_s=self.link.latency_s,
                                                      bandwidth_bytes_per_s=self.link.bandwidth_bytes_per_s,
                                                      latency_jitter=self.link.latency_jitter))


@dataclass(frozen=True, kw_only=True)
class ComputeGroup:
    """Pipeline ranks that share cores or one GPU: at most ``capacity`` of them compute at once.

    ``sharing``: ``"queue"`` (an action waits, FIFO, until one of the ``capacity`` units is free,
    then runs at full speed) or ``"time-slice"`` (every computing rank progresses at
    ``capacity / k`` of full speed while ``k > capacity`` compute: an OS scheduler's processor
    sharing, :mod:`pipetrain.simulator.sharing`), with ``wakeup_s`` for a blocked receiver.
    """

    ranks: tuple[int, ...]
    capacity: int = 1
    sharing: str = "queue"
    #: time-slice only: a rank blocked on a receive whose message lands while all ``capacity``
    #: units compute resumes this much later (the OS scheduler's wake-up latency: it waits for a
    #: running process's time slice; :func:`pipetrain.calibration.commprobe.probe_wakeup` measures it)
    wakeup_s: float = 0.0
    #: time-slice only: ``speed[k - 1]`` is the share of full speed each computing rank progresses at
    #: while ``k`` of the group compute (measured: :func:`pipetrain.calibration.corun.probe_corun`;
    #: shared caches and memory bandwidth slow ranks even at ``k <= capacity``). Past its end the
    #: group's throughput stays at the last entry's. Empty: ``min(1, capacity / k)``.
    speed: tuple[float, ...] = ()
    #: time-slice only: an action that starts after its rank waited at least ``resume_after_s`` (for
    #: a message or a buffer) needs ``resume_s`` more seconds of compute: while a CPU rank is idle
    #: its core's caches go cold (measured: :func:`pipetrain.calibration.corun.probe_resume`). A fixed
    #: cost, not a factor: a small stage's action pays as much as a large one's. 0: not modelled.
    resume_s: float = 0.0
    resume_after_s: float = 1e-3
    #: time-slice only, with more ranks than ``capacity``: an action that starts after its rank waited
    #: at all needs ``switch_s`` more seconds of compute (its core ran another rank meanwhile, whose
    #: work evicted this one's from the caches; :func:`pipetrain.calibration.corun.probe_resume`).
    #: The larger of the two applies.
    switch_s: float = 0.0

    def __post_init__(self) -> None:
        _need(len(self.ranks) >= 1 and len(set(self.ranks)) == len(self.ranks), f"compute group ranks must be distinct, got {self.ranks}")
        _need(self.capacity >= 1, f"compute group capacity must be >= 1, got {self.capacity}")
        _need(self.sharing in ("queue", "time-slice"), f"compute group sharing must be 'queue' or 'time-slice', got {self.sharing!r}")
        _need(self.wakeup_s >= 0, f"compute group wakeup_s must be >= 0, got {self.wakeup_s}")
        _need(all(0 < v <= 1.5 for v in self.speed), f"compute group speed entries must be in (0, 1.5], got {self.speed}")
        _need(0 <= self.resume_s < 1.0 and 0 <= self.switch_s < 1.0 and self.resume_after_s >= 0,
              f"compute group resume_s and switch_s must be in [0, 1) s and resume_after_s >= 0, got {self.resume_s}, {self.switch_s}, "
              f"{self.resume_after_s}")

    def rate(self, k: int) -> float:
        """Share of full speed each of ``k`` computing ranks progresses at (time-slice sharing)."""
        if k <= 0:
            return 1.0
        if not self.speed:
            return min(1.0, self.capacity / k)
        n = len(self.speed)
        return self.speed[k - 1] if k <= n else self.speed[-1] * n / k

    @property
    def contends(self) -> bool:
        """Whether the group ever slows or holds back a rank (else the engine lets its ranks compute alone)."""
        if self.capacity < len(self.ranks):
            return True
        return self.sharing == "time-slice" and (self.resume_s > 0 or any(self.rate(k) < 1.0 for k in range(1, len(self.ranks) + 1)))

    def resume_cost_s(self, waited_s: float) -> float:
        """Extra compute seconds of a rank's next action after it waited ``waited_s`` (time-slice sharing)."""
        if self.sharing != "time-slice" or waited_s <= 0:
            return 0.0
        cold = self.resume_s if waited_s >= self.resume_after_s else 0.0
        return max(cold, self.switch_s if len(self.ranks) > self.capacity else 0.0)


@dataclass(frozen=True, kw_only=True)
class DataParallelSpec:
    """Data-parallel replicas of the whole pipeline and their gradient all-reduce.

    ``overlap``: a stage's all-reduce starts when its last backward pass (B, or W when split)
    starts, as bucketed reducers do, and cannot end before that pass ends; otherwise it starts
    once the rank has finished all its compute. A rank's all-reduces share its link (FIFO).
    """

    width: int = 1
    link: Link = field(default_factory=lambda: Link(name="dp"))
    overlap: bool = False
    #: the all-reduce as a calibration measured it on the backend (empty: the ring on ``link``)
    fits: tuple[CollectiveFit, ...] = ()

    def __post_init__(self) -> None:
        _need(isinstance(self.width, int) and self.width >= 1, f"data-parallel width must be >= 1, got {self.width}")


def ring_allreduce_time_s(nbytes: float, n: int, link: Link, fits: Sequence[CollectiveFit] = ()) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` replicas: 2(n-1)/n · bytes/bw + 2(n-1) · latency,
    or the measured all-reduce of ``n`` ranks among ``fits``
    (:func:`pipetrain.sharding.collective_time_s`; nothing for one replica or no bytes)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return collective_time_s("all_reduce", nbytes, n, link, fits)


@dataclass(frozen=True, kw_only=True)
class SimInput:
    """Everything one simulated training step needs.

    ``stages`` has one entry per (virtual) stage of ``schedule``; ``boundaries`` one per cut
    (``num_stages - 1``; a cut between stages on the same rank moves nothing). Ranks absent from
    ``compute_groups`` compute alone. ``micro_batch_size`` and ``seq_len`` turn step time into
    samples/s and tokens/s; ``model_flops_per_sample`` (forward + backward) and
    ``peak_flops_per_device`` give TFLOP/s per device and MFU (left at 0: not reported).
    """

    schedule: Schedule
    stages: tuple[StageSpec, ...]
    boundaries: tuple[BoundarySpec, ...] = ()
    compute_groups: tuple[ComputeGroup, ...] = ()
    data_parallel: DataParallelSpec = field(default_factory=DataParallelSpec)
    micro_batch_size: int = 1
    seq_len: int = 1
    model_flops_per_sample: float = 0.0
    peak_flops_per_device: float = 0.0
    #: global gradient-norm clipping: before any optimizer step every rank all-reduces one scalar over
    #: all ranks on this link, so the optimizer steps wait for the slowest rank (None: no such barrier)
    clip_sync_link: Link | None = None
    #: that all-reduce as a calibration measured it (empty: the ring on ``clip_sync_link``); a scalar
    #: all-reduce costs the backend's fixed latency, which on gloo is far above the link's
    clip_sync_fits: tuple[CollectiveFit, ...] = ()
    #: host CPU time a rank spends on each point-to-point message it sends or receives (posting it,
    #: copying, completing it): it holds the rank's compute like an action does, but is not busy
    #: time (calibrated on CPU ranks, where gloo's host work competes with compute; 0: free)
    t_message_host_s: float = 0.0
    #: tied weights whose gradient is all-reduced across ranks each step (before the clip barrier)
    ties: tuple[TieSpec, ...] = ()
    #: each rank's operations with its receive posts where the program issues them (an imported
    #: program, e.g. torch's lowered schedule: :mod:`pipetrain.torchsched`); None: pipetrain's own
    #: lowering, the prefetch rule of :func:`pipetrain.program.lower_ops` under the stages' buffers
    ops: tuple[tuple[Op, ...], ...] | None = None
    #: what a posted receive holds back (:data:`RECV_MODES`); ``post`` is what pipetrain's runtime does
    recv_mode: str = "post"

    def __post_init__(self) -> None:
        n = self.schedule.num_stages
        _need(len(self.stages) == n, f"SimInput needs {n} stage specs for schedule {self.schedule.name}, got {len(self.stages)}")
        if not self.boundaries and n > 1:
            object.__setattr__(self, "boundaries", tuple(BoundarySpec() for _ in range(n - 1)))
        _need(len(self.boundaries) == n - 1, f"SimInput needs {n - 1} boundaries, got {len(self.boundaries)}")
        seen: set[int] = set()
        for g in self.compute_groups:
            _need(all(0 <= r < self.schedule.num_ranks for r in g.ranks), f"compute group {g.ranks} names a rank outside 0..{self.schedule.num_ranks - 1}")
            _need(not seen & set(g.ranks), f"rank(s) {sorted(seen & set(g.ranks))} are in two compute groups")
            seen |= set(g.ranks)
        _need(self.micro_batch_size >= 1 and self.seq_len >= 1, "micro_batch_size and seq_len must be >= 1")
        for t in self.ties:
            _need(all(0 <= r < self.schedule.num_ranks for r in t.ranks), f"tie {t.ranks} names a rank outside 0..{self.schedule.num_ranks - 1}")
        _need(self.recv_mode in RECV_MODES, f"recv_mode must be one of {', '.join(RECV_MODES)}, got {self.recv_mode!r}")
        if self.ops is not None:
            _check_ops(self.schedule, self.ops)
        _nonneg("SimInput", model_flops_per_sample=self.model_flops_per_sample, peak_flops_per_device=self.peak_flops_per_device,
                t_message_host_s=self.t_message_host_s)

    @property
    def num_devices(self) -> int:
        return self.schedule.num_ranks * self.data_parallel.width

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.schedule.num_microbatches * self.data_parallel.width


def _check_ops(schedule: Schedule, ops: tuple[tuple[Op, ...], ...]) -> None:
    """Explicit operations: per rank, the schedule's actions in order, each RECV posted once before its wait."""
    _need(len(ops) == schedule.num_ranks, f"SimInput.ops has {len(ops)} ranks, schedule {schedule.name} has {schedule.num_ranks}")
    for r, (acts, rank_ops) in enumerate(zip(schedule.actions, ops)):
        runs = tuple(op.action for op in rank_ops if op.verb == RUN)
        _need(runs == acts, f"SimInput.ops of rank {r} must run the schedule's actions in its order (rank {r} of {schedule.name})")
        posted: set[Action] = set()
        for op in rank_ops:
            _need(op.verb in (POST, RUN), f"SimInput.ops of rank {r}: verb {op.verb!r} is neither {POST!r} nor {RUN!r}")
            if op.verb == POST:
                _need(op.action.kind in ("RECV_F", "RECV_B") and op.action not in posted,
                      f"SimInput.ops of rank {r}: post:{op.action} must post a RECV of the schedule, once")
                posted.add(op.action)
            elif op.action.kind in ("RECV_F", "RECV_B"):
                _need(op.action in posted, f"SimInput.ops of rank {r}: {op.action} is waited on before it is posted; add post:{op.action} before it")


def uniform(p: int, m: int, schedule: str | Schedule = "1f1b", *, t_fwd_s: float, t_bwd_s: float,
            t_wgrad_s: float = 0.0, t_comm_s: float = 0.0, chunks: int = 1, buffers: int | None = None,
            micro_batch_size: int = 1, seq_len: int = 1, activation_bytes: float = 0.0,
            static_bytes: float = 0.0, comm_bytes: float = 0.0, bandwidth_bytes_per_s: float = math.inf,
            dp: int = 1, grad_bytes: float = 0.0, t_optimizer_s: float = 0.0,
            model_flops_per_sample: float = 0.0, peak_flops_per_device: float = 0.0) -> SimInput:
    """Equal stages: ``p`` ranks, ``m`` micro-batches, times per rank and micro-batch.

    ``t_fwd_s``/``t_bwd_s``/``t_wgrad_s`` are one rank's share of the model; with ``chunks = v``
    (interleaved) each virtual stage takes a ``1/v`` share. Each cut gets its own link with
    latency ``t_comm_s`` (and ``comm_bytes`` at ``bandwidth_bytes_per_s`` if given). ``buffers``
    caps every stage's activation buffers; a named 1F1B or ZB-H1 schedule is shaped to it.
    """
    _nonneg("uniform", t_fwd_s=t_fwd_s, t_bwd_s=t_bwd_s, t_wgrad_s=t_wgrad_s, t_comm_s=t_comm_s)
    if isinstance(schedule, str):
        n_st = p * schedule_chunks(schedule, chunks) if isinstance(p, int) and isinstance(chunks, int) else 0
        caps: Sequence[int] | None = None if buffers is None or n_st < 1 else [buffers] * n_st
        schedule = make_schedule(schedule, p, m, chunks, buffers=caps)
    v = schedule.chunks
    stage = StageSpec(t_fwd_s=t_fwd_s / v, t_bwd_s=t_bwd_s / v, t_wgrad_s=t_wgrad_s / v,
                      activation_bytes=activation_bytes / v, static_bytes=static_bytes / v, buffers=buffers,
                      grad_bytes=grad_bytes / v, t_optimizer_s=t_optimizer_s / v)
    bounds = tuple(BoundarySpec(fwd_bytes=comm_bytes, bwd_bytes=comm_bytes,
                                link=Link(name=f"p2p{s}", latency_s=t_comm_s, bandwidth_bytes_per_s=bandwidth_bytes_per_s))
                   for s in range(schedule.num_stages - 1))
    return SimInput(schedule=schedule, stages=(stage,) * schedule.num_stages, boundaries=bounds,
                    data_parallel=DataParallelSpec(width=dp), micro_batch_size=micro_batch_size, seq_len=seq_len,
                    model_flops_per_sample=model_flops_per_sample, peak_flops_per_device=peak_flops_per_device)
