"""pipetrain.validation: does the pipeline train the model, and did the simulator predict the run?

- :mod:`.reference`: the single-device reference run (same model, data, seed and micro-batching);
- :mod:`.compare`: pure comparison of losses, gradient norms and parameters, with tolerances;
- :mod:`.validate`: ``pipetrain validate RUN_DIR`` (writes ``validation.json``);
- :mod:`.measure`: what a run measured (medians over its steps, per stage);
- :mod:`.fidelity`: simulated against measured, per step and per stage (writes ``fidelity.json``).
"""

from __future__ import annotations

__all__: list[str] = []
