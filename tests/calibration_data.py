"""A hand-made calibration for tests that price with one: a fit, the adamw step, a gloo link and
the block profiles given, with any other Calibration field set by keyword. The numbers are
inputs the tests compute their expectations from, not measurements."""

from __future__ import annotations

from typing import Any

from pipetrain.calibration.fit import CalibrationFit
from pipetrain.calibration.measured import Calibration, OptimizerCost, P2PCost
from pipetrain.calibration.profile import BlockProfile, BlockTiming

__all__ = ["make_calibration", "block_profile"]


def block_profile(model: str, micro_batch_size: int, seq_len: int, blocks: tuple[tuple[str, str, float, float], ...]) -> BlockProfile:
    """A profile of ``blocks``: (name, kind, forward s, backward s) each, fp32 on one CPU thread."""
    return BlockProfile(model=model, micro_batch_size=micro_batch_size, seq_len=seq_len, dtype="fp32", device="cpu:test:1thr",
                        device_kind="cpu", warmup=0, repeats=1,
                        blocks=tuple(BlockTiming(name=n, kind=k, fwd_s=f, bwd_s=b) for n, k, f, b in blocks))


def make_calibration(profiles: tuple[BlockProfile, ...], *, topology: str = "local-cpu:2", cores: int = 2, latency_s: float = 1e-4,
                     **fields: Any) -> Calibration:
    fit = CalibrationFit(device_type="local-cpu", dtype="fp32", efficiency_by_kind={}, default_efficiency=0.3,
                         bwd_efficiency_scale=1.0, memory_efficiency=0.8, overhead_fwd_s=0.0, overhead_bwd_s=0.0,
                         error_before=0.5, error_after=0.1, num_samples=2)
    return Calibration(topology=topology, device_type="local-cpu", device="cpu:test:1thr", device_kind="cpu", threads=1, cores=cores,
                       p2p=P2PCost(backend="gloo", latency_s=latency_s, bandwidth_bytes_per_s=1e9),
                       optimizers=(OptimizerCost(optimizer="adamw", fixed_s=1e-3, per_param_s=1e-8),), fit=fit, profiles=profiles,
                       **fields)
