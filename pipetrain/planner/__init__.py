"""pipetrain.planner: models on the meta device, their layer graphs, and the search for a plan.

- :mod:`.zoo` and :mod:`.trace`: models built on the meta device and traced into a
  :class:`~pipetrain.graph.LayerGraph` (torch);
- :mod:`.job`: what the user asks for (a :class:`~.job.Job`, from YAML or flags);
- :mod:`.grid`, :mod:`.partition`, :mod:`.build`, :mod:`.search`: candidate points, the exact
  min-max stage split under memory caps, and the search over them (torch-free);
- :mod:`.explain`: the chosen point as a :class:`~pipetrain.plan.Plan` that explains itself.

The cost and memory models, the topology and the lowering live in the base and
:mod:`pipetrain.program`; everything here except tracing imports without torch.
"""

from __future__ import annotations

__all__: list[str] = []
