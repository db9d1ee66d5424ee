"""pipetrain.executor: run a Plan as a real torch.distributed pipeline (torchrun; gloo on CPU, NCCL on CUDA).

- ``launch``: ``pipetrain run`` starts pp*dp workers through PyTorch's elastic launcher and names a
  failed rank; ``python -m pipetrain.executor`` is the torchrun entry point (multi-node: ``torchrun
  --nnodes K ... -m pipetrain.executor plan.json``).
- ``worker`` / ``trainer``: one rank: stages built on meta, only its own blocks materialized,
  persistent buffers, groups, optimizer, checkpoints.
- ``runtime``: the interpreter of the schedule's compute order (isend/irecv with prefetch);
  ``splitbw``: the B/W split of zero-bubble schedules; ``optim``: DP and tied-weight all-reduce,
  global-norm clipping; ``data``: deterministic, sharded sample order; ``telemetry`` / ``result``:
  per-rank JSONL events and RUN_DIR/result.json; ``reference``: the single-process reference run.
"""

from __future__ import annotations

__all__: list[str] = []
