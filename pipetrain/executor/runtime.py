"""The program interpreter: run one training step of one pipeline rank.

The rank executes its lowered operations (:func:`pipetrain.program.lower`, the object the
simulator consumed) literally, in order: ``post:sRECV_Xk`` issues an ``irecv`` into a slot of the
stage's persistent buffer pool; ``sRECV_Xk`` waits (with a timeout) for that receive; ``F``, ``B``
and ``W`` compute; ``sSEND_Xk`` issues a non-blocking ``isend`` of the tensor the preceding compute
produced. Where the receives are posted (prefetch as the pools allow) is the program's decision,
not this module's. An input slot stays owned by its micro-batch until its backward has run (its W,
when the backward is split), so the pool size bounds the activations in flight. Adjacent stages on
one rank (interleaved with p=1) hand tensors over in memory (no SEND/RECV between them).

The first step records the communication as issued (``comm_log``, the strings of
:meth:`pipetrain.program.Program.comm_order`), which telemetry writes with that step.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipetrain.errors import RunError, ScheduleError
from pipetrain.executor.comm import BufferPool, tag_of
from pipetrain.executor.splitbw import backward_input, backward_weight
from pipetrain.executor.stage import StageModule
from pipetrain.executor.telemetry import Telemetry
from pipetrain.executor.wgrad import SplitLinears, WeightGradQueue
from pipetrain.program import POST, Op

__all__ = ["StageRuntime", "PipelineRuntime", "SavedBytes"]


@dataclass(eq=False)
class StageRuntime:
    index: int
    module: nn.Module
    is_first: bool
    is_last: bool
    prev_rank: int | None  # global rank of stage index-1 (None if first or same rank)
    next_rank: int | None
    in_pool: BufferPool
    grad_pool: BufferPool | None
    recompute: bool = False
    prev_local: bool = False
    next_local: bool = False
    out_dtype: torch.dtype | None = None  # boundary dtype of this stage's output (plan)
    # one 2-rank group per boundary and direction: each carries one stream of messages, posted
    # in micro-batch order on both ends (NCCL matches point-to-point messages by order, not tag)
    recv_act_group: Any = None  # activations arriving from stage index-1
    recv_grad_group: Any = None  # gradients arriving from stage index+1
    send_act_group: Any = None
    send_grad_group: Any = None
    #: told before each backward of this stage whether it is the step's last one (ZeRO: when FSDP2
    #: reduce-scatters and reshards, :func:`pipetrain.executor.parallel.before_backward`)
    before_backward: Callable[[bool], None] | None = None
    #: which actions telemetry tallies collectives in (:meth:`Telemetry.collectives`): "every" F and B
    #: (tensor parallelism), "edges": the step's first F and last B (ZeRO: FSDP2's all-gather and
    #: reduce-scatter), "" none (the dispatch mode costs time per op)
    collectives: str = ""
    #: the last stage's loss context, entered around its loss and its backward: ``loss_parallel``
    #: under tensor parallelism (:func:`pipetrain.executor.parallel.loss_context`), else None
    loss_context: Callable[[], Any] | None = None


class SavedBytes:
    """Bytes autograd saves for backward, via saved-tensor hooks (storages counted once per micro-batch)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()
        self.exclude: set[int] = set()  # storages never counted (the parameters: not activations)
        #: storages of the parameters a stage computes with now: FSDP2 all-gathers them in its
        #: pre-forward hook (bf16 copies under bf16-mixed), so they are known only then (:meth:`use_params`)
        self.live: set[int] = set()
        self.per_mb: dict[Any, int] = {}

    def begin(self) -> None:
        self._seen = set()
        self._acc = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # a DTensor (tensor parallelism) is a wrapper whose own storage has no data pointer: what
        # this rank holds is its local tensor. ``_local_tensor``, not ``to_local()``, which is an
        # autograd op and must not run inside a pack hook.
        lt = getattr(t, "_local_tensor", t)
        try:
            st = lt.untyped_storage()
            key = st.data_ptr()
            if key not in self._seen and key not in self.exclude and key not in self.live and t.device.type != "meta":
                self._seen.add(key)
                self._acc += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def use_params(self, module: nn.Module) -> None:
        """Not count ``module``'s parameters as they are now (a forward pre-hook after FSDP2's)."""
        from pipetrain.executor.parallel import local

        self.live = {local(p).untyped_storage().data_ptr() for p in module.parameters()}

    def add_input(self, x: torch.Tensor) -> None:
        self.pack(x)

    def add_bytes(self, n: int) -> None:
        self._acc += n

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def end(self, key: Any) -> None:
        self.per_mb[key] = self._acc
        self.current += self._acc
        self.peak = max(self.peak, self.current)

    def free(self, key: Any) -> None:
        self.current -= self.per_mb.pop(key, 0)

    def hold(self, key: Any, nbytes: int) -> None:
        """Replace ``key``'s count by ``nbytes`` (what a micro-batch keeps from its B to its W)."""
        self.free(key)
        self.per_mb[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)


@dataclass(eq=False)
class PipelineRuntime:
    """Runs the lowered operations of one pipeline rank for one step; see module docstring."""

    stages: dict[int, StageRuntime]
    ops: tuple[Op, ...]  # this rank's program
    num_stages: int
    num_microbatches: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss_scale: float
    telemetry: Telemetry
    timeout: datetime.timedelta
    autocast_dtype: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    saved: SavedBytes = field(default_factory=SavedBytes)
    fault: Callable[[int, int], None] | None = None
    #: told (step, operation) before each operation: the worker's heartbeat (hang detection)
    progress: Callable[[int, str], None] | None = None

    def __post_init__(self) -> None:
        self.order = tuple(op.action for op in self.ops if op.verb != POST and op.action.is_compute)
        self.split = any(a.kind == "W" for a in self.order)
        if self.split and any(st.recompute for st in self.stages.values()):
            raise ScheduleError("this schedule splits the backward into input- and weight-gradient passes (zb-h1, zbv, "
                                "dualpipev), which does not combine with activation recomputation: turn recompute off, or "
                                "use 1f1b, gpipe or interleaved")
        #: stages whose W is their linear layers' deferred weight gradients (:mod:`pipetrain.executor.wgrad`);
        #: stages with convolutions split the autograd graph instead (:mod:`pipetrain.executor.splitbw`)
        self._linears = {s: SplitLinears(st.module) for s, st in self.stages.items() if self.split and _linear_split(st.module)}
        self.in_flight_peak = {s: 0 for s in self.stages}
        # activation accounting: saved-tensor hooks count a stage's saved bytes per micro-batch in
        # the first steps; shapes are static, so later steps reuse the count and run without the
        # hooks (they cost a Python call per saved tensor; figures: benchmarks/RESULTS.md)
        self._saved_bytes: dict[int, int] = {}
        self._measure_saved_until = -1  # set by the first run_step: its step number
        self.comm_log: list[str] = []
        # per step (run_step resets them): posted receives (kind, stage, mb) -> (work, slot, t0, buffer); sends in flight
        self._recv: dict[tuple[int, int, int], tuple[Any, int, int, torch.Tensor]] = {}
        self._sends: list[tuple[Any, torch.Tensor, int, int, int]] = []

    # ----------------------------------------------------------------- receives
    def _post(self, a: Any) -> None:
        """Issue the receive of RECV action ``a`` into a free slot of its stage's pool."""
        st = self.stages[a.stage]
        kind = 0 if a.kind == "RECV_F" else 1
        pool = st.in_pool if kind == 0 else st.grad_pool
        i = pool.acquire() if pool is not None else None
        if pool is None or i is None:
            raise RunError(f"stage {a.stage} needs a free {'activation' if kind == 0 else 'gradient'} buffer for micro-batch "
                           f"{a.microbatch} but all {len(pool) if pool else 0} are in flight: the plan's buffers for stage "
                           f"{a.stage} are fewer than the schedule keeps in flight; re-plan with more buffers")
        buf = pool.buffers[i]
        src, group = (st.prev_rank, st.recv_act_group) if kind == 0 else (st.next_rank, st.recv_grad_group)
        w = dist.irecv(buf, src, group=group, tag=tag_of(kind, a.stage, a.microbatch, self.num_stages, self.num_microbatches))
        self._recv[(kind, a.stage, a.microbatch)] = (w, i, self.telemetry.now(), buf)

    def _wait_recv(self, kind: int, s: int, mb: int) -> tuple[int, torch.Tensor]:
        key = (kind, s, mb)
        if key not in self._recv:
            raise RunError(f"stage {s} waits for the {'activation' if kind == 0 else 'gradient'} of micro-batch {mb}, "
                           "which was never posted: the lowered program is inconsistent")
        w, i, t0, buf = self._recv.pop(key)
        if not w.wait(self.timeout):
            raise RunError(f"timed out after {self.timeout.total_seconds():.0f}s receiving {'activation' if kind == 0 else 'gradient'} "
                           f"of micro-batch {mb} for stage {s}")
        self.telemetry.add("RECV", s, mb, t0, self.telemetry.now(), buf.numel() * buf.element_size())
        return i, buf

    def _send(self, t: torch.Tensor, dst: int, kind: int, to_stage: int, mb: int, from_stage: int) -> None:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        st = self.stages[from_stage]
        group = st.send_act_group if kind == 0 else st.send_grad_group
        w = dist.isend(t, dst, group=group, tag=tag_of(kind, to_stage, mb, self.num_stages, self.num_microbatches))
        self._sends.append((w, t, from_stage, mb, self.telemetry.now()))

    def _poll_sends(self, block: bool = False) -> None:
        keep = []
        for item in self._sends:
            w, t, s, mb, t0 = item
            if block:
                if not w.wait(self.timeout):
                    raise RunError(f"timed out after {self.timeout.total_seconds():.0f}s sending micro-batch {mb} from stage {s}")
            elif not w.is_completed():
                keep.append(item)
                continue
            self.telemetry.add("SEND", s, mb, t0, self.telemetry.now(), t.numel() * t.element_size())
        self._sends = keep

    # ----------------------------------------------------------------- step
    def run_step(self, step: int, inputs: list[torch.Tensor] | None, targets: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Run this rank's actions for one step; return the last stage's per-micro-batch losses (unscaled)."""
        tel = self.telemetry
        self._recv = {}
        self._sends = []
        got: dict[tuple[int, int, int], tuple[int, torch.Tensor]] = {}  # waited receives: (kind, stage, mb) -> slot, buffer
        to_send: dict[tuple[int, int, int], torch.Tensor] = {}  # computed, not yet sent: (kind, stage, mb) -> tensor
        log = self.comm_log if self._measure_saved_until < 0 else None
        local: dict[tuple[int, int, int], torch.Tensor] = {}
        ctx: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int, Any]] = {}
        in_flight = {s: 0 for s in self.stages}
        backwards = {s: 0 for s in self.stages}  # backwards run so far this step, per stage
        forwards = {s: 0 for s in self.stages}
        self.in_flight_peak = {s: 0 for s in self.stages}
        losses: list[torch.Tensor] = []
        hooks = torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)
        if self._measure_saved_until < 0:
            self._measure_saved_until = step
        n_action = -1
        progress = self.progress
        for op in self.ops:
            a = op.action
            if progress is not None:
                progress(step, str(op))
            st = self.stages[a.stage]
            s, mb = a.stage, a.microbatch
            if op.verb == POST:
                self._post(a)
                if log is not None:
                    log.append(str(op))
                continue
            if not a.is_compute:
                if a.kind in ("RECV_F", "RECV_B"):
                    kind = 0 if a.kind == "RECV_F" else 1
                    got[(kind, s, mb)] = self._wait_recv(kind, s, mb)
                elif a.kind == "SEND_F":
                    self._send(to_send.pop((0, s, mb)), _peer(st.next_rank, a), 0, s + 1, mb, s)
                else:
                    self._send(to_send.pop((1, s, mb)), _peer(st.prev_rank, a), 1, s - 1, mb, s)
                if log is not None:
                    log.append(str(a))
                continue
            n_action += 1
            if self.fault is not None:
                self.fault(step, n_action)
            if a.kind == "F":
                if st.is_first:
                    i = st.in_pool.acquire()
                    if i is None:
                        raise RunError(f"stage {s} has {len(st.in_pool)} input buffers, all in flight, at F of micro-batch {mb}: "
                                       "the plan's buffers are fewer than the schedule keeps in flight")
                    buf = st.in_pool.buffers[i]
                    assert inputs is not None
                    buf.copy_(inputs[mb])
                    x = buf
                elif st.prev_local:
                    i = -1
                    x = local.pop((0, s, mb)).detach().requires_grad_(True)
                else:
                    i, buf = got.pop((0, s, mb))
                    x = buf.detach().requires_grad_(buf.is_floating_point())
                t0 = tel.mark()
                self.saved.begin()
                wq = WeightGradQueue() if s in self._linears else None
                known = self._saved_bytes.get(s) if step > self._measure_saved_until else None
                comm = st.collectives == "every" or (st.collectives == "edges" and forwards[s] == 0)
                forwards[s] += 1
                with (hooks if known is None else nullcontext()), (self._linears[s].capture(wq) if wq is not None else nullcontext()), \
                        tel.collectives(comm) as tally:
                    if self.autocast_dtype is not None:
                        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                            out = self._forward(st, x)
                    else:
                        out = self._forward(st, x)
                    if st.is_last:
                        assert targets is not None
                        with st.loss_context() if st.loss_context is not None else nullcontext():
                            out = self.loss_fn(out.float(), targets[mb])
                    elif st.out_dtype is not None and out.dtype != st.out_dtype:
                        out = out.to(st.out_dtype)
                if known is not None:  # shapes are static: the bytes measured in the first step
                    self.saved.add_bytes(known)
                elif st.recompute:  # checkpoint keeps the stage input alive until backward
                    self.saved.add_input(x)
                self.saved.end((s, mb))
                if known is None:
                    self._saved_bytes[s] = self.saved.per_mb[(s, mb)]
                tel.add_span("F", s, mb, t0, tel.mark(), tally)
                ctx[(s, mb)] = (x, out, i, wq)
                in_flight[s] += 1
                if in_flight[s] > self.in_flight_peak[s]:
                    self.in_flight_peak[s] = in_flight[s]
                if st.is_last:
                    losses.append(_local(out.detach()))  # a replicated DTensor under loss_parallel
                elif st.next_local:
                    local[(0, s + 1, mb)] = out
                else:
                    to_send[(0, s, mb)] = out
            elif a.kind in ("B", "I"):  # B: the full backward; I: the input gradient, W later
                x, out, i, wq = ctx.pop((s, mb))
                gi = -1
                if st.is_last:
                    g = None
                elif st.next_local:
                    g = local.pop((1, s, mb))
                else:
                    gi, g = got.pop((1, s, mb))
                if st.before_backward is not None:
                    st.before_backward(backwards[s] == self.num_microbatches - 1)
                comm = st.collectives == "every" or (st.collectives == "edges" and backwards[s] == self.num_microbatches - 1)
                backwards[s] += 1
                loss_ctx = st.loss_context() if st.is_last and st.loss_context is not None else nullcontext()
                with tel.collectives(comm) as tally, loss_ctx:  # the span ends inside: the mode's exit is not the action's
                    t0 = tel.mark()
                    split_state = None
                    if st.is_last:
                        out = out * self.loss_scale
                    if wq is not None:
                        gx = self._linears[s].backward_input(out, g, x, wq)
                        if a.kind == "I":
                            split_state = wq
                            # I freed the autograd graph: until W the micro-batch holds the queued inputs and gradients
                            self.saved.hold((s, mb), wq.nbytes())
                        else:  # a full B on a stage whose forward deferred its linear layers: their weight gradients now
                            wq.run()
                    elif a.kind == "I":
                        gx, split_state = backward_input(out, g, x, no_alias=(g,) if g is not None else ())
                    else:
                        if st.is_last:
                            out.backward()
                        else:
                            torch.autograd.backward(out, g)
                        gx = x.grad
                    t1 = tel.mark()
                tel.add_span("B", s, mb, t0, t1, tally)
                if gi >= 0:
                    assert st.grad_pool is not None
                    st.grad_pool.release(gi)
                if not st.is_first:
                    if gx is None:
                        raise RunError(f"stage {s}: its input got no gradient in backward (the stage does not use its input)")
                    x.grad = None
                    if st.prev_local:
                        local[(1, s - 1, mb)] = gx
                    else:
                        to_send[(1, s, mb)] = gx
                if split_state is not None:
                    ctx[(s, mb)] = (x, out, i, split_state)  # W still needs the graph and the input buffer
                    in_flight[s] -= 1  # in flight = F done, B not (the schedule's count); memory is freed at W
                else:
                    del out
                    if i >= 0:
                        st.in_pool.release(i)
                    self.saved.free((s, mb))
                    in_flight[s] -= 1
            elif a.kind == "W":
                x, out, i, split_state = ctx.pop((s, mb))
                t0 = tel.mark()
                if isinstance(split_state, WeightGradQueue):
                    split_state.run()
                else:
                    backward_weight(split_state)
                tel.add_span("W", s, mb, t0, tel.mark())
                del out, split_state
                if i >= 0:
                    st.in_pool.release(i)
                self.saved.free((s, mb))
            else:  # pragma: no cover - rejected in __post_init__
                raise ScheduleError(f"unexpected action {a}")
            if self._sends:
                self._poll_sends()
        self._poll_sends(block=True)
        if self._recv or got or to_send:
            raise RunError(f"step {step}: communication left over: posted {sorted(self._recv)}, received {sorted(got)}, "
                           f"unsent {sorted(to_send)}: the lowered program is inconsistent")
        return losses

    def _forward(self, st: StageRuntime, x: torch.Tensor) -> torch.Tensor:
        if st.recompute and torch.is_grad_enabled():
            if isinstance(st.module, StageModule):  # layer by layer (StageModule.forward)
                return st.module(x, recompute=True)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(st.module, x, use_reentrant=False)
        return st.module(x)


def _local(t: torch.Tensor) -> torch.Tensor:
    from pipetrain.executor.parallel import local

    return local(t)


def _peer(rank: int | None, a: Any) -> int:
    """The global rank action ``a`` sends to (None: its neighbour stage is on this rank, a malformed program)."""
    if rank is None:
        raise ScheduleError(f"{a}: the receiving stage is on this rank; a send crosses ranks")
    return rank


def _linear_split(module: nn.Module) -> bool:
    """Whether W of ``module`` can be its linear layers' weight gradients: it has linear layers and
    no convolution (whose weight gradients the generic split defers too)."""
    kinds = {type(m) for m in module.modules()}
    return nn.Linear in kinds and not kinds & {nn.Conv1d, nn.Conv2d, nn.Conv3d}
