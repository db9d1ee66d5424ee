"""pipetrain.ui: ``pipetrain ui``, the interactive what-if page for one plan (and its run).

- :mod:`.whatif`: the plan's knobs and one evaluation per edit (the one lowering, the simulator,
  the memory model), with the reason when an edit is infeasible;
- :mod:`.server`: the standard library's HTTP server, JSON endpoints, the page's static files,
  and the rule that it touches only the directories it was given;
- :mod:`.svg`: the timeline and loss curves as SVG; :mod:`.rundash`: a run directory's measured
  side (losses against single-device training, the per-stage error table).

Imports no torch and no executor: the layer graph comes from the caller (``commands/ui.py``
traces the model once, or a graph JSON from ``pipetrain graph MODEL --json PATH``).
"""

from __future__ import annotations

from pipetrain.ui.server import STATIC_DIR, UiApp, UiServer, start_server
from pipetrain.ui.whatif import SIMPY_MAX_ACTIONS, Evaluation, Knobs, WhatIf, format_step_time, plan_topology

__all__ = ["SIMPY_MAX_ACTIONS", "STATIC_DIR", "Evaluation", "Knobs", "UiApp", "UiServer", "WhatIf", "format_step_time",
           "plan_topology", "start_server"]
