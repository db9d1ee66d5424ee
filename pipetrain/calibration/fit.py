"""Calibrated cost grade: the analytic roofline with its factors fitted to measured profiles.

:func:`fit_calibration` takes (layer graph, block profile) pairs measured on one device type,
and/or :class:`StageObservation` s (a stage's measured F and B times from a real pipeline run),
and fits, with ``scipy.optimize.least_squares`` (bounded trust-region reflective), the
factors of :class:`~pipetrain.costs.AnalyticParams`:

* a compute efficiency per node kind ("transformer", "embedding", "head", ...), or one for
  all kinds with ``per_kind=False``;
* a backward efficiency scale, a memory-bandwidth efficiency;
* a fixed per-node overhead for forward and for backward (launches, Python dispatch), per
  node kind with ``per_kind`` (a transformer block dispatches far more ops than an embedding).

The residuals are ``log(predicted / measured)`` of every distinctly measured block's forward
and backward, so a block of 50 us weighs as much as one of 50 ms. The fit is stored as JSON
(:class:`CalibrationFit`) with the mean absolute relative error before and after, and
:class:`CalibratedCostModel` answers the :class:`~pipetrain.costs.CostModel`
interface with it (the analytic defaults for device types it has no fit for). torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain.calibration.profile import BlockProfile
from pipetrain.costs import AnalyticCostModel, AnalyticParams, analytic_node_times
from pipetrain.errors import ConfigError
from pipetrain.graph import LayerGraph
from pipetrain.serde import from_dict, parse_json, read_text_or_error, to_dict, write_text_atomic
from pipetrain.topology import DeviceType

__all__ = ["CALIBRATION_SCHEMA_VERSION", "CalibrationFit", "StageObservation", "CalibratedCostModel", "fit_calibration", "relative_errors",
           "mean_abs_relative_error", "resolve_cost_model"]

CALIBRATION_SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CalibrationFit:
    """Fitted analytic factors for one device type and dtype, and how well they fit."""

    device_type: str
    dtype: str
    efficiency_by_kind: dict[str, float]
    default_efficiency: float
    bwd_efficiency_scale: float
    memory_efficiency: float
    overhead_fwd_s: float
    overhead_bwd_s: float
    error_before: float  # mean |pred - measured| / measured of the uncalibrated analytic model
    error_after: float
    num_samples: int
    sources: tuple[str, ...] = ()
    overhead_fwd_by_kind: dict[str, float] = field(default_factory=dict)
    overhead_bwd_by_kind: dict[str, float] = field(default_factory=dict)
    schema_version: int = CALIBRATION_SCHEMA_VERSION

    @property
    def params(self) -> AnalyticParams:
        return AnalyticParams(efficiency_by_kind=dict(self.efficiency_by_kind), default_efficiency=self.default_efficiency,
                              bwd_efficiency_scale=self.bwd_efficiency_scale, memory_efficiency=self.memory_efficiency,
                              overhead_fwd_s=self.overhead_fwd_s, overhead_bwd_s=self.overhead_bwd_s,
                              overhead_fwd_by_kind=dict(self.overhead_fwd_by_kind), overhead_bwd_by_kind=dict(self.overhead_bwd_by_kind))

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CalibrationFit:
        data = parse_json(text, what="calibration file")
        fit = from_dict(cls, data, where="calibration")
        if fit.schema_version != CALIBRATION_SCHEMA_VERSION:
            raise ConfigError(f"calibration schema_version {fit.schema_version} is not supported; re-run the calibration")
        _ = fit.params  # validates the factors
        return fit

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CalibrationFit:
        return cls.from_json(read_text_or_error(path, what="calibration", hint="write one with `pipetrain calibrate`"))


@dataclass(frozen=True, kw_only=True)
class StageObservation:
    """Measured seconds per micro-batch of blocks ``[start, end)`` of ``graph`` (e.g. a run's F/B events)."""

    graph: LayerGraph
    start: int
    end: int
    fwd_s: float
    bwd_s: float

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.graph.num_nodes:
            raise ConfigError(f"observed stage [{self.start}, {self.end}) is not within the graph's {self.graph.num_nodes} nodes")
        if not (self.fwd_s > 0 and self.bwd_s > 0):
            raise ConfigError(f"observed stage [{self.start}, {self.end}): times must be > 0, got {self.fwd_s}, {self.bwd_s}")


def _check_pair(graph: LayerGraph, prof: BlockProfile) -> None:
    if graph.model != prof.model or graph.num_nodes != len(prof.blocks):
        raise ConfigError(f"profile of {prof.model!r} ({len(prof.blocks)} blocks) does not match graph {graph.model!r} ({graph.num_nodes} nodes)")
    if (graph.micro_batch_size, graph.seq_len, graph.dtype) != (prof.micro_batch_size, prof.seq_len, prof.dtype):
        raise ConfigError(f"profile shape (mbs {prof.micro_batch_size}, seq {prof.seq_len}, {prof.dtype}) differs from the graph's "
                          f"(mbs {graph.micro_batch_size}, seq {graph.seq_len}, {graph.dtype}): trace the graph at the profile's shape")


def relative_errors(samples: Sequence[tuple[LayerGraph, BlockProfile]], device_type: DeviceType,
                    params: AnalyticParams | None = None, observations: Sequence[StageObservation] = ()) -> list[float]:
    """(pred - measured) / measured for every distinctly measured block's forward and backward,
    then for every observed stage's forward and backward (``params`` default: the device type's own)."""
    if params is None:
        params = AnalyticParams()
    out: list[float] = []
    for graph, prof in samples:
        _check_pair(graph, prof)
        t = analytic_node_times(graph, device_type, params)
        for i, b in enumerate(prof.blocks):
            if b.measured_as >= 0:
                continue
            for pred, meas in ((t.fwd_s[i], b.fwd_s), (t.bwd_s[i], b.bwd_s)):
                if meas > 0:
                    out.append((pred - meas) / meas)
    times: dict[int, Any] = {}
    for ob in observations:
        nt = times.get(id(ob.graph))
        if nt is None:
            nt = times[id(ob.graph)] = analytic_node_times(ob.graph, device_type, params)
        out.append((sum(nt.fwd_s[ob.start:ob.end]) - ob.fwd_s) / ob.fwd_s)
        out.append((sum(nt.bwd_s[ob.start:ob.end]) - ob.bwd_s) / ob.bwd_s)
    return out


def mean_abs_relative_error(errors: Sequence[float]) -> float:
    return sum(abs(e) for e in errors) / len(errors) if errors else 0.0


def fit_calibration(samples: Sequence[tuple[LayerGraph, BlockProfile]], device_type: DeviceType, *, per_kind: bool = True,
                    observations: Sequence[StageObservation] = ()) -> CalibrationFit:
    """Fit the analytic factors to profiles and/or stage observations on ``device_type``."""
    import numpy as np
    from scipy.optimize import least_squares

    samples, observations = list(samples), list(observations)
    if not samples and not observations:
        raise ConfigError("calibration needs at least one (graph, profile) pair or stage observation")
    graphs = [g for g, _ in samples] + [o.graph for o in observations]
    dtypes = {g.dtype for g in graphs}
    if len(dtypes) != 1:
        raise ConfigError(f"calibrate one dtype at a time, got {sorted(dtypes)}")
    for g, p in samples:
        _check_pair(g, p)
    kinds = sorted({n.kind for g in graphs for n in g.nodes if n.fwd_flops > 0 or n.bwd_flops > 0}) if per_kind else []
    all_kinds = sorted({n.kind for g in graphs for n in g.nodes}) if per_kind else []
    nk, na = len(kinds), len(all_kinds)
    # x = [log eff per kind (nk), log default eff, log bwd scale, log memory eff,
    #      fwd overhead us (default, then per kind: na), bwd overhead us (default, then per kind)]
    i_ov = nk + 3

    def params_of(x: Any) -> AnalyticParams:
        effs = np.exp(x[:nk]) if nk else []
        ofw = x[i_ov:i_ov + 1 + na] * 1e-6
        obw = x[i_ov + 1 + na:i_ov + 2 + 2 * na] * 1e-6
        return AnalyticParams(efficiency_by_kind=dict(zip(kinds, map(float, effs))), default_efficiency=float(math.exp(x[nk])),
                              bwd_efficiency_scale=float(math.exp(x[nk + 1])), memory_efficiency=float(math.exp(x[nk + 2])),
                              overhead_fwd_s=float(ofw[0]), overhead_bwd_s=float(obw[0]),
                              overhead_fwd_by_kind=dict(zip(all_kinds, map(float, ofw[1:]))),
                              overhead_bwd_by_kind=dict(zip(all_kinds, map(float, obw[1:]))))

    def residuals(x: Any) -> Any:
        errs = relative_errors(samples, device_type, params_of(x), observations)
        return np.log1p(np.clip(np.asarray(errs), -1 + 1e-12, None))

    before = relative_errors(samples, device_type, observations=observations)
    # Efficiencies may exceed 1 (up to 8): a nominal peak (this machine's CPU) can be low.
    # Overheads are in microseconds (0 .. 1 s), so finite-difference steps suit their scale.
    le, he = math.log(1e-5), math.log(8.0)
    nov = 2 * (1 + na)
    x0 = np.array([math.log(device_type.efficiency)] * (nk + 1) + [0.0, math.log(device_type.memory_efficiency)] + [1.0] * nov)
    lo = np.array([le] * (nk + 1) + [math.log(0.1), le] + [0.0] * nov)
    hi = np.array([he] * (nk + 1) + [math.log(10.0), he] + [1e6] * nov)
    best = None
    for start in (x0, np.clip(x0 + np.array([-2.0] * (nk + 1) + [0.0, -1.0] + [50.0] * nov), lo, hi)):
        res = least_squares(residuals, start, bounds=(lo, hi), x_scale=np.array([1.0] * (nk + 3) + [100.0] * nov),
                            diff_step=1e-4, max_nfev=600)
        if best is None or res.cost < best.cost:
            best = res
    assert best is not None
    fitted = params_of(best.x)
    after = relative_errors(samples, device_type, fitted, observations)
    if mean_abs_relative_error(after) > mean_abs_relative_error(before):
        # least squares on log ratios can trade a few large errors for many small ones and end
        # worse on the mean absolute error it reports (seen with noisy profiles on a loaded
        # machine): then the uncalibrated analytic model is the better fit, and is kept
        fitted = AnalyticParams(efficiency_by_kind={}, default_efficiency=device_type.efficiency,
                                memory_efficiency=device_type.memory_efficiency)
        after = relative_errors(samples, device_type, fitted, observations)
    return CalibrationFit(device_type=device_type.name, dtype=dtypes.pop(), efficiency_by_kind=dict(fitted.efficiency_by_kind),
                          default_efficiency=float(fitted.default_efficiency or device_type.efficiency),
                          bwd_efficiency_scale=fitted.bwd_efficiency_scale, memory_efficiency=float(fitted.memory_efficiency or 0.8),
                          overhead_fwd_s=fitted.overhead_fwd_s, overhead_bwd_s=fitted.overhead_bwd_s,
                          overhead_fwd_by_kind=dict(fitted.overhead_fwd_by_kind), overhead_bwd_by_kind=dict(fitted.overhead_bwd_by_kind),
                          error_before=mean_abs_relative_error(before), error_after=mean_abs_relative_error(after),
                          num_samples=len(after),
                          sources=tuple(prof.key for _, prof in samples) + tuple(f"{o.graph.model}[{o.start},{o.end})" for o in observations))


class CalibratedCostModel(AnalyticCostModel):
    """The analytic model with fitted factors per device type (analytic defaults elsewhere)."""

    name = "calibrated"

    def __init__(self, fits: CalibrationFit | Sequence[CalibrationFit]) -> None:
        fits = [fits] if isinstance(fits, CalibrationFit) else list(fits)
        names = [f.device_type for f in fits]
        if len(set(names)) != len(names):
            raise ConfigError(f"two calibration fits for one device type: {names}")
        super().__init__(params_by_device={f.device_type: f.params for f in fits})
        self.fits = tuple(fits)

    @classmethod
    def load(cls, *paths: str | Path) -> CalibratedCostModel:
        return cls([CalibrationFit.load(p) for p in paths])


def resolve_cost_model(spec: str = "analytic", *, graph: LayerGraph | None = None, device: str = "cpu", threads: int | None = None,
                       cache_dir: str | Path | None = None) -> AnalyticCostModel | Any:
    """A cost model from a CLI-style name.

    ``analytic``; ``profiled`` (profiles ``graph``'s model at its shape on ``device``, or reads
    the cache; needs torch); ``calibrated:FIT.json[,FIT2.json]`` (fits from :class:`CalibrationFit`).
    """
    kind, _, arg = spec.partition(":")
    if kind == "analytic" and not arg:
        return AnalyticCostModel()
    if kind == "profiled" and not arg:
        if graph is None:
            raise ConfigError("cost model 'profiled' needs the layer graph (model and micro-batch shape) to profile")
        from pipetrain.calibration.profile import ProfiledCostModel, load_or_profile

        return ProfiledCostModel(load_or_profile(graph.model, micro_batch_size=graph.micro_batch_size, seq_len=graph.seq_len,
                                                 dtype=graph.dtype, device=device, threads=threads, cache_dir=cache_dir))
    if kind == "calibrated" and arg:
        return CalibratedCostModel.load(*arg.split(","))
    raise ConfigError(f"cost model {spec!r} is unknown; choose analytic, profiled or calibrated:FIT.json")
