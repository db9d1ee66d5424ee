"""pipetrain.reports: figures and self-contained HTML from the files a plan or a run wrote.

Never trains, searches or simulates; imports no torch and no executor.

- :mod:`.report`: ``pipetrain report RUN_DIR`` (plan, simulated vs measured timelines, breakdown,
  step time, memory, convergence, parameter consistency, landscape, predictions);
- :mod:`.plan_report`: ``pipetrain plan --report DIR`` (the what-if report, memory per GPU);
- :mod:`.sweep`: ``pipetrain sweep --report DIR``;
- :mod:`.rundir`: torch-free readers of a run directory's files;
- :mod:`.figures`, :mod:`.charts`, :mod:`.landscape`, :mod:`.predictions`: the figures and sections;
- :mod:`.html` (jinja2 with autoescape, ``templates/``), :mod:`.units`, :mod:`.browser` (headless check).
"""

from __future__ import annotations

__all__: list[str] = []
