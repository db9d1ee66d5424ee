"""The per-machine calibration cache: keys, reuse, a corrupt file measured again instead of a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipetrain.calibration.cache import CalibrationKey, cache_path, cached_calibration, calibration_key
from pipetrain.calibration.fit import CalibrationFit
from pipetrain.calibration.measured import Calibration, OptimizerCost, P2PCost, load_calibration
from pipetrain.calibration.profile import BlockProfile, BlockTiming
from pipetrain.errors import ConfigError

pytest.importorskip("torch")  # local_device_name asks torch for its threads

SHAPES = (("tiny-gpt", 1, 32),)


def _cal(latency_s: float = 1e-4) -> Calibration:
    fit = CalibrationFit(device_type="local-cpu", dtype="fp32", efficiency_by_kind={}, default_efficiency=0.3,
                         bwd_efficiency_scale=1.0, memory_efficiency=0.8, overhead_fwd_s=0.0, overhead_bwd_s=0.0,
                         error_before=0.5, error_after=0.1, num_samples=2)
    prof = BlockProfile(model="tiny-gpt", micro_batch_size=1, seq_len=32, dtype="fp32", device="cpu:test:1thr", device_kind="cpu",
                        warmup=0, repeats=1, blocks=(BlockTiming(name="b0", kind="linear", fwd_s=1e-3, bwd_s=2e-3),))
    return Calibration(topology="local-cpu:2", device_type="local-cpu", device="cpu:test:1thr", device_kind="cpu", threads=1, cores=2,
                       p2p=P2PCost(backend="gloo", latency_s=latency_s, bandwidth_bytes_per_s=1e9),
                       optimizers=(OptimizerCost(optimizer="adamw", fixed_s=1e-3, per_param_s=1e-8),), fit=fit, profiles=(prof,))


def _key(**kw: object) -> CalibrationKey:
    return calibration_key("local-cpu:2", SHAPES, torch_version=str(kw.pop("torch_version", "2.5.0")), **kw)  # type: ignore[arg-type]


def test_key_changes_with_torch_version_cores_shape_and_topology(tmp_path: Path) -> None:
    base = cache_path(_key(), tmp_path)
    assert cache_path(_key(), tmp_path) == base  # deterministic: the next demo finds it
    assert cache_path(_key(torch_version="2.6.0"), tmp_path) != base
    assert cache_path(_key(cores=97), tmp_path) != base
    assert cache_path(calibration_key("local-cpu:2", (("tiny-gpt", 2, 32),), torch_version="2.5.0"), tmp_path) != base
    assert cache_path(calibration_key("local-cpu:4", SHAPES, torch_version="2.5.0"), tmp_path) != base
    assert base.parent == tmp_path and "torch2.5.0" in base.name and base.suffix == ".json"


def test_reuse_refresh_and_corrupt_file(tmp_path: Path) -> None:
    calls: list[int] = []

    def measure() -> Calibration:
        calls.append(1)
        return _cal(latency_s=1e-4 * len(calls))

    key = _key()
    first = cached_calibration(key, measure, cache_dir=tmp_path)
    assert not first.reused and first.why_new == "no cached calibration" and len(calls) == 1
    assert load_calibration(first.path).p2p.latency_s == pytest.approx(1e-4)
    again = cached_calibration(key, measure, cache_dir=tmp_path)
    assert again.reused and again.path == first.path and len(calls) == 1
    assert again.calibration.p2p.latency_s == pytest.approx(1e-4)
    forced = cached_calibration(key, measure, cache_dir=tmp_path, refresh=True)
    assert not forced.reused and len(calls) == 2 and load_calibration(forced.path).p2p.latency_s == pytest.approx(2e-4)
    for junk in ("{not json", '{"schema_version": 1}', '{"schema_version": 2, "topology": 3}', "\xff\xfe"):
        first.path.write_text(junk)
        n = len(calls)
        got = cached_calibration(key, measure, cache_dir=tmp_path)
        assert not got.reused and len(calls) == n + 1 and "unreadable" in got.why_new
        assert load_calibration(got.path).p2p.latency_s == pytest.approx(1e-4 * (n + 1))  # rewritten, readable again


def test_key_needs_a_shape() -> None:
    with pytest.raises(ConfigError, match="shapes"):
        calibration_key("local-cpu:2", (), torch_version="2.5.0")
