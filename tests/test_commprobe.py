from __future__ import annotations

import pytest

from pipetrain.executor.commprobe import fit_hockney, probe_p2p


def test_hockney_fit_recovers_known_line() -> None:
    sizes = [4, 4096, 65536, 1 << 20]
    lat, bw = fit_hockney(sizes, [20e-6 + s / 2e9 for s in sizes])
    assert lat == pytest.approx(20e-6, rel=1e-6)
    assert bw == pytest.approx(2e9, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gloo_loopback_probe_is_self_consistent() -> None:
    fit = probe_p2p(backend="gloo", sizes_bytes=(4, 65536, 1 << 20, 4 << 20), repeats=8)
    # loopback gloo: tens of microseconds to a few ms of latency, 0.05-50 GB/s
    assert 1e-7 < fit.latency_s < 5e-3
    assert 5e7 < fit.bandwidth_bytes_per_s < 5e10
    assert len(fit.one_way_s) == 4 and all(t > 0 for t in fit.one_way_s)
