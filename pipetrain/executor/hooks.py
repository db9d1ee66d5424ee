"""Test hooks of the executor, switched on by environment variables (off, None, when unset).

* ``PIPETRAIN_FAULT=rank:step:action:raise|kill|stop``: :func:`fault_hook` fails (or, ``stop``, hangs)
  that rank mid-step; action ``save``: in the checkpoint of that step, after the rank wrote its files
  and before the checkpoint is complete.
* ``PIPETRAIN_INJECT_GRAD_SCALE=stage:factor``: :func:`grad_scale_hook` scales that stage's
  gradients after every backward (a deliberately broken pipeline, for validation tests).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["fault_hook", "grad_scale_hook"]


def fault_hook(rank: int) -> Callable[[int, int | str], None] | None:
    """Test hook: ``PIPETRAIN_FAULT=rank:step:action:raise|kill`` fails that rank mid-step."""
    spec = os.environ.get("PIPETRAIN_FAULT", "")
    if not spec:
        return None
    r, st, act, mode = spec.split(":")
    if int(r) != rank or int(os.environ.get("PIPETRAIN_RESTART", "0")) > 0:  # once, not again after a restart
        return None

    def hook(step: int, n_action: int | str) -> None:
        if step == int(st) and str(n_action) == act:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "stop":  # hangs: the process stays, makes no progress
                os.kill(os.getpid(), signal.SIGSTOP)
                return
            raise RuntimeError(f"injected fault at step {step}, action {n_action}")

    return hook


def grad_scale_hook() -> Callable[[int, dict[int, Any]], None] | None:
    """Validation test hook: ``PIPETRAIN_INJECT_GRAD_SCALE=stage:factor`` multiplies that stage's
    gradients by ``factor`` after every backward (a deliberately broken pipeline)."""
    spec = os.environ.get("PIPETRAIN_INJECT_GRAD_SCALE", "")
    if not spec:
        return None
    stage_text, _, factor_text = spec.partition(":")
    stage, factor = int(stage_text), float(factor_text)

    def hook(step: int, modules: dict[int, Any]) -> None:
        if stage in modules:
            for p in modules[stage].parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    return hook
