"""pipetrain: plan, simulate, run and validate pipeline-parallel training of PyTorch models.

Importing the package (and its ``plan``, ``schedules``, ``simulator`` and ``planner``
graph modules) does not import torch; only tracing and the executor need it.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
