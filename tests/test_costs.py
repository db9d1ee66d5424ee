"""Analytic cost model: roofline numbers by hand, stage sums, W split, recompute, p2p,
all-reduce and optimizer step; calibration on synthetic data recovers known factors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipetrain.costs import (
    AnalyticCostModel,
    AnalyticParams,
    CostModel,
    StageCost,
    node_input_bytes,
    optimizer_step_time_s,
    p2p_time_s,
    ring_allreduce_time_s,
    roofline_time_s,
)
from pipetrain.errors import ConfigError
from pipetrain.topology import DeviceType, Link, topology_preset
from test_memory import chain  # tests/ is on sys.path (rootdir conftest, no __init__)

DEV = DeviceType(name="toy", kind="gpu", peak_flops_fp32=1e9, peak_flops_bf16=4e9, peak_flops_fp16=4e9,
                 memory_bytes=1e9, memory_bandwidth_bytes_per_s=1e6, efficiency=0.5, memory_efficiency=0.5)


def test_roofline_picks_the_slower_side() -> None:
    assert roofline_time_s(1e9, 0, 1e9, 0.5, 1e6, 0.5) == pytest.approx(2.0)  # compute bound
    assert roofline_time_s(1, 1e6, 1e9, 0.5, 1e6, 0.5) == pytest.approx(2.0)  # memory bound
    assert roofline_time_s(1e9, 3e6, 1e9, 1.0, 1e6, 1.0) == pytest.approx(3.0)


def test_analytic_stage_by_hand() -> None:
    g = chain(4)  # embed, b0, b1, head; outputs 512 B, input ids 128 B
    assert node_input_bytes(g) == (128, 512, 512, 512)
    m = AnalyticCostModel()
    c = m.stage_costs(g, 1, 2, DEV)
    # b0: fwd 1e6 flops / (1e9*0.5) = 2e-3 s; bytes 400 + 512 + 512 + 3000 = 4424 / (1e6*0.5) = 8.848e-3 s
    assert c.t_fwd_s == pytest.approx(8.848e-3)
    # bwd: 2e6 / 5e8 = 4e-3; bytes 2*400 + 3000 + 512 + 512 = 4824 / 5e5 = 9.648e-3
    assert c.t_bwd_s == pytest.approx(9.648e-3)
    assert c.t_wgrad_s == pytest.approx(9.648e-3 / 2)  # wgrad_flops / bwd_flops = 1/2
    assert c.t_recompute_s == 0 and c.t_bwd_input_s == pytest.approx(9.648e-3 / 2)
    rc = m.stage_costs(g, 1, 3, DEV, recompute=True)
    whole = m.stage_costs(g, 1, 3, DEV)
    assert rc.t_recompute_s == pytest.approx(whole.t_fwd_s) and rc.t_total_s == pytest.approx(whole.t_total_s + whole.t_fwd_s)
    parts = [m.stage_costs(g, i, i + 1, DEV) for i in range(4)]
    assert m.stage_costs(g, 0, 4, DEV).t_fwd_s == pytest.approx(sum(p.t_fwd_s for p in parts))


def test_dtype_selects_the_peak() -> None:
    fast = DeviceType(name="fast", kind="gpu", peak_flops_fp32=1e9, peak_flops_bf16=4e9, peak_flops_fp16=4e9,
                      memory_bytes=1e9, memory_bandwidth_bytes_per_s=1e15)
    f32 = AnalyticCostModel().stage_costs(chain(4), 1, 3, fast)
    b16 = AnalyticCostModel().stage_costs(chain(4, dtype="bf16"), 1, 3, fast)
    assert f32.t_fwd_s / b16.t_fwd_s == pytest.approx(4.0, rel=1e-6)


def test_h100_preset_predicts_faster_than_a100() -> None:
    g = chain(6, dtype="bf16")
    a = topology_preset("dgx-a100-80g:1").device_type_of(0)
    h = topology_preset("dgx-h100:1").device_type_of(0)
    m = AnalyticCostModel()
    assert m.stage_costs(g, 1, 5, h).t_fwd_s < m.stage_costs(g, 1, 5, a).t_fwd_s


def test_params_override_and_overheads() -> None:
    g = chain(4)
    p = AnalyticParams(efficiency_by_kind={"block": 1.0}, memory_efficiency=1.0, overhead_fwd_s=1e-3, overhead_bwd_s=2e-3,
                       bwd_efficiency_scale=0.5)
    c = AnalyticCostModel(p).stage_costs(g, 1, 2, DEV)
    assert c.t_fwd_s == pytest.approx(max(1e6 / 1e9, 4424 / 1e6) + 1e-3)
    assert c.t_bwd_s == pytest.approx(max(2e6 / 0.5e9, 4824 / 1e6) + 2e-3)
    by_dev = AnalyticCostModel(params_by_device={"toy": p})
    assert by_dev.stage_costs(g, 1, 2, DEV) == c
    other = DeviceType(name="other", kind="gpu", peak_flops_fp32=1e9, peak_flops_bf16=4e9, peak_flops_fp16=4e9,
                       memory_bytes=1e9, memory_bandwidth_bytes_per_s=1e6, efficiency=0.5, memory_efficiency=0.5)
    assert by_dev.stage_costs(g, 1, 2, other).t_fwd_s == pytest.approx(8.848e-3)  # defaults elsewhere


def test_links_and_collectives() -> None:
    nv = Link(kind="nvswitch", bandwidth_bytes_per_s=450e9, latency_s=3e-6)
    assert p2p_time_s(450e6, nv) == pytest.approx(3e-6 + 1e-3)
    assert p2p_time_s(0, nv) == 0.0
    assert ring_allreduce_time_s(8e9, 8, nv) == pytest.approx(2 * 7 / 8 * 8e9 / 450e9 + 14 * 3e-6)
    assert ring_allreduce_time_s(8e9, 1, nv) == 0.0
    h = topology_preset("dgx-h100:1").device_type_of(0)
    # 1e9 params * 28 B / (3.35e12 * 0.8)
    assert optimizer_step_time_s(10**9, h) == pytest.approx(28e9 / (3.35e12 * 0.8))
    assert optimizer_step_time_s(10**9, h, optimizer="sgd") == pytest.approx(12e9 / (3.35e12 * 0.8))
    with pytest.raises(ConfigError):
        p2p_time_s(-1, nv)
    with pytest.raises(ConfigError):
        optimizer_step_time_s(1, h, optimizer="lion")


def test_interface_and_validation() -> None:
    assert isinstance(AnalyticCostModel(), CostModel)
    with pytest.raises(ConfigError, match="W is part of B"):
        StageCost(t_fwd_s=1, t_bwd_s=1, t_wgrad_s=2)
    with pytest.raises(ConfigError, match="not within"):
        AnalyticCostModel().stage_costs(chain(4), 2, 7, DEV)
    with pytest.raises(ConfigError):
        AnalyticParams(efficiency_by_kind={"block": 0.0})


def test_calibration_recovers_known_factors_on_synthetic_profiles(tmp_path: Path) -> None:
    from pipetrain.calibration.fit import CalibratedCostModel, CalibrationFit, fit_calibration
    from pipetrain.calibration.profile import BlockProfile, BlockTiming
    from pipetrain.costs import analytic_node_times

    g = chain(6)
    dev = DeviceType(name="toy", kind="cpu", peak_flops_fp32=1e9, peak_flops_bf16=1e9, peak_flops_fp16=1e9,
                     memory_bytes=1e9, memory_bandwidth_bytes_per_s=1e8, efficiency=0.5)
    truth = AnalyticParams(efficiency_by_kind={"block": 0.2, "head": 0.05}, default_efficiency=0.3, bwd_efficiency_scale=0.7,
                           memory_efficiency=0.4, overhead_fwd_s=2e-4, overhead_bwd_s=3e-4)
    t = analytic_node_times(g, dev, truth)
    prof = BlockProfile(model=g.model, micro_batch_size=2, seq_len=8, dtype="fp32", device="toy", device_kind="cpu", warmup=0, repeats=1,
                        blocks=tuple(BlockTiming(name=n.name, kind=n.kind, fwd_s=f, bwd_s=b) for n, f, b in zip(g.nodes, t.fwd_s, t.bwd_s)))
    fit = fit_calibration([(g, prof)], dev)
    assert fit.error_before > 0.5 and fit.error_after < 0.02 and fit.num_samples == 12
    back = CalibrationFit.load(fit.save(tmp_path / "fit.json"))
    assert back == fit
    model = CalibratedCostModel(back)
    c = model.stage_costs(g, 1, 5, dev)
    assert c.t_fwd_s == pytest.approx(sum(t.fwd_s[1:5]), rel=0.03)
    assert c.t_bwd_s == pytest.approx(sum(t.bwd_s[1:5]), rel=0.03)
    with pytest.raises(ConfigError, match="calibration"):
        CalibrationFit.from_json(json.dumps({**json.loads(fit.to_json()), "efficency": 1}))


def test_calibration_from_observed_stages_alone() -> None:
    from pipetrain.calibration.fit import StageObservation, fit_calibration
    from pipetrain.costs import analytic_node_times

    g = chain(8)
    dev = DeviceType(name="toy", kind="gpu", peak_flops_fp32=1e9, peak_flops_bf16=1e9, peak_flops_fp16=1e9,
                     memory_bytes=1e9, memory_bandwidth_bytes_per_s=1e8)
    truth = AnalyticParams(default_efficiency=0.1, memory_efficiency=0.3, overhead_fwd_s=1e-4, overhead_bwd_s=1e-4)
    t = analytic_node_times(g, dev, truth)
    obs = [StageObservation(graph=g, start=a, end=b, fwd_s=sum(t.fwd_s[a:b]), bwd_s=sum(t.bwd_s[a:b]))
           for a, b in [(0, 2), (2, 4), (4, 6), (6, 8), (1, 7), (3, 5)]]
    fit = fit_calibration([], dev, observations=obs, per_kind=False)
    assert fit.error_before > 0.3 and fit.error_after < 0.02
    assert fit.sources[0] == "synthetic[0,2)"
    with pytest.raises(ConfigError, match="not within"):
        StageObservation(graph=g, start=3, end=9, fwd_s=1, bwd_s=1)
    with pytest.raises(ConfigError, match="at least one"):
        fit_calibration([], dev)


def test_resolve_cost_model(tmp_path: Path) -> None:
    from pipetrain.calibration.fit import CalibratedCostModel, CalibrationFit, resolve_cost_model

    assert isinstance(resolve_cost_model("analytic"), AnalyticCostModel)
    fit = CalibrationFit(device_type="toy", dtype="fp32", efficiency_by_kind={"block": 0.9}, default_efficiency=0.5,
                         bwd_efficiency_scale=1.0, memory_efficiency=0.9, overhead_fwd_s=0.0, overhead_bwd_s=0.0,
                         error_before=1.0, error_after=0.1, num_samples=2)
    path = fit.save(tmp_path / "toy.json")
    cal = resolve_cost_model(f"calibrated:{path}")
    assert isinstance(cal, CalibratedCostModel) and cal.fits == (fit,)
    assert cal.stage_costs(chain(4), 1, 2, DEV).t_fwd_s == pytest.approx(max(1e6 / 0.9e9, 4424 / 0.9e6))
    for bad in ("roofline", "calibrated", "profiled"):
        with pytest.raises(ConfigError):
            resolve_cost_model(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_cost_model(f"calibrated:{tmp_path / 'nope.json'}")


def test_per_kind_overheads() -> None:
    g = chain(4)
    p = AnalyticParams(overhead_fwd_s=1.0, overhead_fwd_by_kind={"block": 2.0}, overhead_bwd_by_kind={"head": 3.0})
    base = AnalyticCostModel()
    m = AnalyticCostModel(p)
    assert m.stage_costs(g, 1, 2, DEV).t_fwd_s == pytest.approx(base.stage_costs(g, 1, 2, DEV).t_fwd_s + 2.0)
    assert m.stage_costs(g, 0, 1, DEV).t_fwd_s == pytest.approx(base.stage_costs(g, 0, 1, DEV).t_fwd_s + 1.0)
    assert m.stage_costs(g, 3, 4, DEV).t_bwd_s == pytest.approx(base.stage_costs(g, 3, 4, DEV).t_bwd_s + 3.0)
    with pytest.raises(ConfigError, match="overheads"):
        AnalyticParams(overhead_bwd_by_kind={"head": -1.0})
