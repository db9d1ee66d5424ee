"""The project's own error types.

Every mistake a user can make (bad YAML, unknown model, impossible memory, a plan for another
model, a rank that died) raises a subclass of :class:`PipetrainError` whose message says what
to change. The CLI prints ``error: <message>`` on one line and exits with code 2; a
traceback means a bug in pipetrain, not a user mistake.
"""

from __future__ import annotations

__all__ = [
    "PipetrainError",
    "ConfigError",
    "ModelError",
    "PlanError",
    "InfeasibleError",
    "ScheduleError",
    "RunError",
    "TorchScheduleError",
]


class PipetrainError(Exception):
    """Base class of every error caused by input (exit code 2 at the CLI)."""


class ConfigError(PipetrainError):
    """A config, topology or job file (or flag) is malformed or names an unknown field."""


class ModelError(PipetrainError):
    """An unknown model preset, a bad ``module:factory`` or an impossible model shape."""


class PlanError(PipetrainError):
    """A plan file is malformed, of another schema version, or made for another model."""


class InfeasibleError(PipetrainError):
    """No plan satisfies the constraints (e.g. memory caps); the message names the smallest fix."""


class ScheduleError(PipetrainError):
    """Impossible schedule arguments, or a schedule that fails validation."""


class RunError(PipetrainError):
    """A distributed run failed: a rank raised, died or timed out."""


class TorchScheduleError(PipetrainError):
    """torch's own pipeline schedules cannot be imported: an untested torch version (the import uses
    private APIs of ``torch.distributed.pipelining``), an unknown schedule name, a bad CSV, or
    arguments torch refuses (e.g. DualPipeV with fewer than ``2p`` micro-batches)."""
