"""Pipeline schedules as torch-free data: pipeline rank -> ordered actions.

This module is the one definition of every schedule. The simulator and the executor both
consume a :class:`Schedule`, so what is simulated is exactly what is run.

An :class:`Action` prints and parses as ``"{stage}{kind}{microbatch}"``, e.g. ``"2F0"``
(stage 2, forward, micro-batch 0), ``"1B3"``, ``"0W5"``, ``"1SEND_F3"``, ``"2RECV_B0"``.
``B`` is the full backward, except in schedules that also emit ``W`` (zero-bubble), where
``B`` computes only the input gradient and ``W`` the weight gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipetrain.errors import ScheduleError

__all__ = ["COMPUTE_KINDS", "COMM_KINDS", "ACTION_KINDS", "Action", "Schedule"]

COMPUTE_KINDS = ("F", "B", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
ACTION_KINDS = COMPUTE_KINDS + COMM_KINDS

_ACTION_RE = re.compile(r"^\s*(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|W)(\d+)\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One step of one rank: ``kind`` on (virtual) ``stage`` for ``microbatch``."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ScheduleError(f"action kind {self.kind!r} is unknown; one of {', '.join(ACTION_KINDS)}")
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self.stage}{self.kind}{self.microbatch}: stage and micro-batch must be >= 0")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @classmethod
    def parse(cls, text: str) -> "Action":
        m = _ACTION_RE.match(text)
        if m is None:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '2F0', '1B3', '0SEND_F1'")
        return cls(stage=int(m.group(1)), kind=m.group(2), microbatch=int(m.group(3)))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A complete schedule: for each pipeline rank, its ordered actions.

    ``stage_to_rank[s]`` is the pipeline rank that runs (virtual) stage ``s``. ``actions[r]``
    holds compute actions and, where the generator emits them, the SEND/RECV actions in the
    order rank ``r`` issues them.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    split_backward: bool = False
    chunks: int = field(default=1)

    def rank_actions(self, rank: int) -> tuple[Action, ...]:
        return self.actions[rank]

    def compute_order(self, rank: int) -> tuple[Action, ...]:
        return tuple(a for a in self.actions[rank] if a.is_compute)
