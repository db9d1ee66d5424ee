"""Planning: model zoo on the meta device, layer graphs, topology, cost model and search.

``pipetrain.planner.graph`` and everything that only reads a graph import without torch.
"""

from __future__ import annotations

__all__: list[str] = []
