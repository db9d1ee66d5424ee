"""pipetrain.executor: run a Plan as a real torch.distributed pipeline (torchrun; gloo on CPU, NCCL on CUDA).

- ``launch``: ``pipetrain run`` starts pp*dp*tp workers through PyTorch's elastic launcher and names a
  failed rank; ``python -m pipetrain.executor`` is the torchrun entry point (multi-node: ``torchrun
  --nnodes K ... -m pipetrain.executor plan.json``).
- ``worker`` / ``trainer``: one rank: stages built on meta, only its own blocks materialized,
  persistent buffers, groups, optimizer, checkpoints.
- ``runtime``: the interpreter of the lowered program (:func:`pipetrain.program.lower`): receive
  posts, waits, compute and sends, literally in the program's order;
  ``splitbw`` / ``wgrad``: the B/W split of zero-bubble schedules; ``comm``: groups, rank layout and
  persistent receive buffers; ``optim``: DP and tied-weight all-reduce, global-norm clipping;
  ``parallel``: the device mesh, tensor parallelism (``parallelize_module``) and ZeRO-1/2/3 (FSDP2);
  ``data``: deterministic, sharded sample order; ``telemetry`` / ``result``: per-rank JSONL events
  and RUN_DIR/result.json; ``checkpoint``: sharded DCP checkpoints, atomic per step, resumable under another plan; ``monitor``: the live view;
  ``stage``: stage modules on the meta device; ``plans``: a runnable plan without the planner.

Nothing here probes the machine (:mod:`pipetrain.calibration`) or validates a run
(:mod:`pipetrain.validation`).
"""

from __future__ import annotations

__all__: list[str] = []
