"""The per-machine calibration cache: keys, reuse, a corrupt file measured again instead of a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration_data import block_profile, make_calibration  # (tests/)
from pipetrain.calibration.cache import CalibrationKey, cache_path, cached_calibration, calibration_key
from pipetrain.calibration.measured import Calibration, load_calibration
from pipetrain.errors import ConfigError

pytest.importorskip("torch")  # local_device_name asks torch for its threads

SHAPES = (("tiny-gpt", 1, 32),)


def _cal(latency_s: float = 1e-4) -> Calibration:
    return make_calibration((block_profile("tiny-gpt", 1, 32, (("b0", "linear", 1e-3, 2e-3),)),), latency_s=latency_s)


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
