"""The Plan: the contract between planner, simulator, executor and reports.

A plan says how one model is pipelined on one topology: pipeline depth ``pp`` and
data-parallel width ``dp``, micro-batch size and count, the schedule, the stage boundaries
(as block ranges of the layer graph), the placement of stages on pipeline ranks and devices,
activation buffers and recomputation per stage, and the metrics the planner predicted.

Everything here is a frozen, keyword-only dataclass validated in ``__post_init__``; bad
values raise :class:`~pipetrain.errors.PlanError` naming the field. ``Plan.to_json`` /
``Plan.from_json`` round-trip exactly and carry :data:`SCHEMA_VERSION`; a plan carries the
fingerprint of the layer graph it was made for, so it refuses to run another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import PlanError
from pipetrain.schedules import SCHEDULE_NAMES, V_SCHEDULES
from pipetrain.serde import from_dict, parse_json, read_text_or_error, to_dict, write_text_atomic
from pipetrain.sharding import PRECISIONS as _ALL_PRECISIONS
from pipetrain.sharding import ZERO_STAGES as _ZERO_STAGES
from pipetrain.sharding import precision_for_dtype

__all__ = [
    "SCHEMA_VERSION",
    "SCHEDULES",
    "DTYPES",
    "OPTIMIZERS",
    "PRECISIONS",
    "precision_for_dtype",
    "RECOMPUTE_MODES",
    "ZERO_STAGES",
    "TensorSpec",
    "StagePlan",
    "PredictedMetrics",
    "Alternative",
    "Plan",
]

#: 2 added the 3D fields (``tp``, ``sequence_parallel``, ``zero``, ``recompute``, ``precision``,
#: ``idle_gpus``); a version-1 file is read as a plan with tp=1, zero=0 and its dtype's precision.
SCHEMA_VERSION = 2
#: Schedule names, as accepted by :mod:`pipetrain.schedules` and the CLI.
SCHEDULES = SCHEDULE_NAMES  # one list: pipetrain.schedules
#: Training precisions: fp32, or bf16/fp16 autocast with fp32 master weights.
DTYPES = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
#: How weights, gradients and optimizer state are kept (:func:`pipetrain.sharding.param_state_bytes`):
#: ``bf16-mixed`` bf16 weights with fp32 gradients and master copy (Megatron, torchtitan);
#: ``amp-autocast`` fp32 weights cast per use under autocast (pipetrain's CPU executor); ``fp32``.
PRECISIONS = tuple(p for p in _ALL_PRECISIONS if p != "fp16-mixed")  # fp16 needs a loss scaler the executor lacks
#: Activation recomputation granularity (Korthikanti et al. 2023): the attention core only, or
#: whole layers (``StagePlan.recompute_layers`` of them per stage).
RECOMPUTE_MODES = ("none", "selective", "full")
#: ZeRO stages over the data-parallel group (Rajbhandari et al. 2020): 1 optimizer state,
#: 2 and gradients, 3 and parameters.
ZERO_STAGES = _ZERO_STAGES


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(msg)


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """Shape and dtype of one tensor crossing a stage boundary (dtype as torch names it)."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        _need(all(isinstance(d, int) and d >= 0 for d in self.shape), f"TensorSpec.shape must be non-negative ints, got {self.shape}")
        _need(bool(self.dtype), "TensorSpec.dtype must not be empty")


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline stage: blocks ``[block_start, block_end)`` of the layer graph.

    With interleaved schedules a pipeline rank hosts several (virtual) stages; stage ``index``
    runs on pipeline rank ``rank``.
    """

    index: int
    block_start: int
    block_end: int
    rank: int
    device: str
    buffers: int
    recompute: bool = False
    #: with ``recompute``: how many of the stage's blocks recompute (Megatron's
    #: ``--recompute-num-layers``); 0 means all of them.
    recompute_layers: int = 0
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    predicted_peak_memory_bytes: float = 0.0
    memory_cap_bytes: float = 0.0

    def __post_init__(self) -> None:
        _need(self.index >= 0, f"stage.index must be >= 0, got {self.index}")
        _need(0 <= self.block_start < self.block_end, f"stage {self.index}: block range [{self.block_start}, {self.block_end}) is empty or negative")
        _need(self.rank >= 0, f"stage {self.index}: rank must be >= 0, got {self.rank}")
        _need(self.buffers >= 1, f"stage {self.index}: buffers must be >= 1, got {self.buffers}")
        _need(0 <= self.recompute_layers <= self.block_end - self.block_start,
              f"stage {self.index}: recompute_layers must be in [0, {self.block_end - self.block_start}], got {self.recompute_layers}")
        _need(self.predicted_peak_memory_bytes >= 0 and self.memory_cap_bytes >= 0, f"stage {self.index}: memory figures must be >= 0")

    @property
    def num_blocks(self) -> int:
        return self.block_end - self.block_start

    @property
    def on_gpu(self) -> bool:
        """Whether the executor runs this stage on CUDA: a planner device id of a GPU
        (``"node0/gpu3"``, from :class:`~pipetrain.topology.Topology`) or a torch
        device string (``"cuda"``, ``"cuda:1"``)."""
        leaf = self.device.rsplit("/", 1)[-1]
        return self.device.startswith("cuda") or (leaf.startswith("gpu") and leaf[3:].isdigit())


@dataclass(frozen=True, kw_only=True)
class PredictedMetrics:
    """What the planner (via the simulator) predicts for one training step."""

    step_time_s: float
    samples_per_s: float
    tokens_per_s: float
    mfu: float
    bubble_fraction: float
    peak_memory_bytes: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _need(self.step_time_s > 0, f"predicted.step_time_s must be > 0, got {self.step_time_s}")
        _need(0.0 <= self.bubble_fraction <= 1.0, f"predicted.bubble_fraction must be in [0, 1], got {self.bubble_fraction}")


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """A candidate the planner considered and rejected, and why."""

    description: str
    step_time_s: float | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete, runnable pipeline plan (see module docstring)."""

    model: str
    graph_fingerprint: str
    topology: str
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    seq_len: int
    schedule: str
    stages: tuple[StagePlan, ...]
    chunks: int = 1
    dtype: str = "fp32"
    optimizer: str = "adamw"
    seed: int = 0
    predicted: PredictedMetrics | None = None
    alternatives: tuple[Alternative, ...] = ()
    simulation_only: bool = False
    tp: int = 1
    sequence_parallel: bool = False
    zero: int = 0
    recompute: str = "none"
    precision: str = ""  # "" -> precision_for_dtype(dtype)
    idle_gpus: int = 0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _need(self.schema_version == SCHEMA_VERSION,
              f"plan schema_version {self.schema_version} is not supported (this pipetrain reads {SCHEMA_VERSION}): re-run `pipetrain plan`")
        _need(self.pp >= 1, f"pp must be >= 1, got {self.pp}")
        _need(self.dp >= 1, f"dp must be >= 1, got {self.dp}")
        _need(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _need(self.num_microbatches >= 1, f"num_microbatches must be >= 1, got {self.num_microbatches}")
        _need(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        _need(self.chunks >= 1, f"chunks must be >= 1, got {self.chunks}")
        _need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        _need(self.dtype in DTYPES, f"dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        _need(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if not self.precision:
            object.__setattr__(self, "precision", precision_for_dtype(self.dtype))
        _need(self.precision in PRECISIONS, f"precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        _need((self.precision == "fp32") == (self.dtype == "fp32"),
              f"precision {self.precision} needs a {'32' if self.precision == 'fp32' else '16'}-bit compute dtype, got dtype {self.dtype}")
        _need(self.tp >= 1, f"tp must be >= 1, got {self.tp}")
        _need(self.tp > 1 or not self.sequence_parallel, "sequence_parallel needs tp > 1")
        _need(self.zero in ZERO_STAGES, f"zero must be one of {ZERO_STAGES}, got {self.zero!r}")
        _need(self.recompute in RECOMPUTE_MODES, f"recompute {self.recompute!r} is unknown; choose one of {', '.join(RECOMPUTE_MODES)}")
        _need(self.idle_gpus >= 0, f"idle_gpus must be >= 0, got {self.idle_gpus}")
        # The stages say which recompute, the plan how much of a layer: a stage flag alone (plans
        # from before schema 2, the what-if page's per-stage toggle) means whole layers.
        if self.recompute == "none" and any(st.recompute for st in self.stages):
            object.__setattr__(self, "recompute", "full")
        elif self.recompute != "none" and not any(st.recompute for st in self.stages):
            object.__setattr__(self, "recompute", "none")
        if self.schedule in V_SCHEDULES:
            _need(self.chunks == 2, f"schedule {self.schedule} runs two chunks per rank in a V: chunks must be 2, got {self.chunks}")
        else:
            _need(self.chunks == 1 or self.schedule == "interleaved", f"chunks={self.chunks} needs schedule 'interleaved', not {self.schedule!r}")
        _need(len(self.stages) == self.pp * self.chunks, f"plan has {len(self.stages)} stages but pp*chunks = {self.pp * self.chunks}")
        expected_start = 0
        for i, st in enumerate(self.stages):
            _need(st.index == i, f"stages[{i}].index is {st.index}; stages must be listed in order")
            _need(st.block_start == expected_start,
                  f"stage {i} starts at block {st.block_start} but the previous stage ends at {expected_start}: stages must be contiguous from block 0")
            _need(st.rank < self.pp, f"stage {i}: rank {st.rank} >= pp {self.pp}")
            expected_start = st.block_end

    # ----- derived -----------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_blocks(self) -> int:
        return self.stages[-1].block_end

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Cut positions: the first block of every stage after the first."""
        return tuple(st.block_start for st in self.stages[1:])

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def stages_of_rank(self, rank: int) -> tuple[StagePlan, ...]:
        return tuple(st for st in self.stages if st.rank == rank)

    def check_graph(self, fingerprint: str, model: str | None = None) -> None:
        """Refuse a layer graph other than the one this plan was made for."""
        if fingerprint != self.graph_fingerprint:
            other = f" ({model})" if model else ""
            raise PlanError(
                f"plan was made for model {self.model!r} (graph {self.graph_fingerprint[:12]}) but the model given{other} "
                f"has graph {fingerprint[:12]}: re-run `pipetrain plan` for this model, micro-batch size and seq-len"
            )

    # ----- JSON --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if isinstance(data, dict) and data.get("schema_version") == 1:
            # version 1: no 3D fields; a stage's recompute meant the whole stage, the plan's "full"
            data = {**data, "schema_version": SCHEMA_VERSION}
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {data.get('schema_version')!r} is not supported "
                            f"(this pipetrain reads {SCHEMA_VERSION}): re-run `pipetrain plan`")
        return from_dict(cls, data, error=PlanError)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(parse_json(text, what="plan file", error=PlanError))

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(read_text_or_error(path, what="plan", hint=f"create one with `pipetrain plan ... -o {Path(path).name}`",
                                                error=PlanError))
