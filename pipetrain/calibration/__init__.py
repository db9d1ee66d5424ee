"""pipetrain.calibration: every probe of the machine, and the cost models built from what they measure.

Nothing here runs a plan: the probes time blocks, messages and optimizer steps in isolation
(or the executor on one rank), and the results become a calibration file that the planner,
``pipetrain simulate --calibration`` and the run's fidelity check read.

- :mod:`.profile`: block profiles (each block's forward and backward timed on this device),
  :class:`~.profile.ProfiledCostModel`;
- :mod:`.fit`: the analytic cost model with its factors fitted to profiles
  (:class:`~.fit.CalibratedCostModel`, :func:`~.fit.resolve_cost_model`);
- :mod:`.commprobe`: point-to-point latency and bandwidth, a blocked receiver's wake-up latency;
- :mod:`.corun`: compute speed while k ranks share a node's cores, the cost of resuming after a wait;
- :mod:`.overhead`: the executor's own per-action and per-message overheads on one rank;
- :mod:`.run`: the calibration run (``pipetrain calibrate``): all of the above, then the fit;
- :mod:`.measured`: the calibration file (:class:`~.measured.Calibration`, versioned JSON) and
  :class:`~.measured.MeasuredCostModel`, the cost model it defines.
"""

from __future__ import annotations

__all__: list[str] = []
