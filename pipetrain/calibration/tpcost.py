"""What a tensor-parallel stage's compute costs in the executor, over the one-rank block profile.

A block profile times the whole blocks on one process. Split over ``tp`` ranks with DTensor
(:func:`pipetrain.executor.parallel.parallelize_stage`) each rank computes ``1/tp`` of the GEMMs,
but every op on a DTensor also goes through DTensor's dispatch (sharding propagation in Python),
which on small models and CPUs costs more than the GEMMs it saves: the FLOP share alone does not
predict it. :func:`measure_tensor_parallel` runs the real executor on ``tp`` ranks (``pp = dp =
1``) and takes, over the measured steps and the ranks, the median forward and backward span of a
micro-batch less the tensor-parallel collectives inside it (the telemetry's ``tp_comm_s``: the
calibrated collectives price those apart); over the
profile's ``sum(F)`` and ``sum(B)`` these are ``fwd_factor`` and ``bwd_factor``, which
:class:`~pipetrain.calibration.measured.MeasuredCostModel` applies to the profiled block times of
a ``tp`` view of that model and shape. The collectives inside F and B, as the run's telemetry
timed them (``tp_comm_fwd_s``, ``tp_comm_bwd_s``, means per micro-batch), price a tp stage's
collectives per layer: a probe's isolated collectives (:mod:`pipetrain.calibration.collprobe`)
time a pattern a tp layer does not have (a peer that arrives at once), and misprice the in-run
ones, too high on a quiet machine and too low on a loaded one (benchmarks/RESULTS.md). The run's ranks share the machine's cores as
a plan's tp ranks do. Nothing in it is fitted to a pipeline.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError

__all__ = ["TensorParallelCost", "measure_tensor_parallel"]


@dataclass(frozen=True, kw_only=True)
class TensorParallelCost:
    """Per micro-batch on one of ``tp`` ranks: the executor's F and B compute (collectives left out)
    over the one-rank profile's, for one model and shape."""

    model: str
    micro_batch_size: int
    seq_len: int
    tp: int
    fwd_factor: float
    bwd_factor: float
    measured_fwd_s: float
    measured_bwd_s: float
    measured_tp_comm_s: float  # per micro-batch, F and B: what the run's collectives took (for comparison)
    steps: int
    # per micro-batch, the means of the run's collectives inside F and inside B (the whole model, pp=1):
    # what the simulator charges per layer (MeasuredCostModel.tp_comm_per_layer_s). Means, not
    # medians: a step sums them, heavy tail included. 0: not measured (older files)
    tp_comm_fwd_s: float = 0.0
    tp_comm_bwd_s: float = 0.0

    def __post_init__(self) -> None:
        if self.tp < 2:
            raise ConfigError(f"a tensor-parallel cost needs tp >= 2, got {self.tp}")
        if not (self.fwd_factor > 0 and self.bwd_factor > 0):
            raise ConfigError(f"tensor-parallel cost of {self.model}: factors must be > 0, got {self.fwd_factor}, {self.bwd_factor}")


def measure_tensor_parallel(profile: Any, tp: int, *, num_microbatches: int = 4, steps: int = 8, warmup: int = 2, threads: int = 1,
                            timeout_s: float = 180.0) -> TensorParallelCost:
    """An executor run of ``profile``'s model and shape on ``tp`` ranks (module docstring)."""
    from pipetrain.executor.config import RunConfig
    from pipetrain.executor.launch import launch
    from pipetrain.executor.plans import simple_plan
    from pipetrain.executor.telemetry import read_telemetry

    if steps <= warmup or tp < 2 or num_microbatches < 1:
        raise ConfigError(f"tensor-parallel cost needs tp >= 2, m >= 1 and more steps ({steps}) than warm-up steps ({warmup})")
    p = profile
    plan = simple_plan(p.model, pp=1, m=num_microbatches, mbs=p.micro_batch_size, seq_len=p.seq_len, dtype=p.dtype, tp=tp)
    fwd: list[float] = []
    bwd: list[float] = []
    comm: dict[str, list[float]] = {"F": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="pipetrain-tpcost-") as tmp:
        plan_path = plan.save(Path(tmp) / "plan.json")
        launch(RunConfig(plan_path=str(plan_path), run_dir=str(Path(tmp) / "run"), steps=steps, threads=threads, timeout_s=timeout_s))
        for recs in read_telemetry(Path(tmp) / "run").values():
            for r in recs:
                if r.get("type") != "event" or r["kind"] not in ("F", "B") or int(r["step"]) < warmup:
                    continue
                c = float(r.get("tp_comm_s") or 0.0)
                (fwd if r["kind"] == "F" else bwd).append(max(0.0, r["end_s"] - r["start_s"] - c))
                comm[r["kind"]].append(c)
    if not fwd or not bwd:
        raise ConfigError(f"tensor-parallel cost of {p.model}: the run left no F/B telemetry after {warmup} warm-up steps")
    f_s, b_s = statistics.median(fwd), statistics.median(bwd)
    prof_f = sum(b.fwd_s for b in p.blocks)
    prof_b = sum(b.bwd_s for b in p.blocks)
    return TensorParallelCost(model=p.model, micro_batch_size=p.micro_batch_size, seq_len=p.seq_len, tp=tp,
                              fwd_factor=max(f_s / prof_f, 1e-3), bwd_factor=max(b_s / prof_b, 1e-3), measured_fwd_s=f_s,
                              measured_bwd_s=b_s, measured_tp_comm_s=statistics.median(comm["F"]) + statistics.median(comm["B"]), steps=steps,
                              tp_comm_fwd_s=statistics.fmean(comm["F"]), tp_comm_bwd_s=statistics.fmean(comm["B"]))
