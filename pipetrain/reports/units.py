"""Numbers with units for figure titles, axis labels and report text (pure, no matplotlib).

Three significant figures and the largest unit that keeps the number >= 1, so a 92.8-second step
does not print as ``9.283e+04 ms`` and a 35.6 GiB stage not as ``36423.62 MiB``.
"""

from __future__ import annotations

import math

__all__ = ["format_seconds", "format_bytes", "format_flops", "seconds_unit"]

_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"))
_BYTE_UNITS = ((2.0**50, "PiB"), (2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"))
_FLOP_UNITS = ((1e18, "EFLOP/s"), (1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s"), (1e3, "kFLOP/s"))


def _sig(x: float) -> str:
    """Three significant figures without exponent or trailing zeros ("92.8", "512", "1.5")."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    s = f"{x:.{digits}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def seconds_unit(x: float) -> tuple[float, str]:
    """(scale, name) of the time unit for values around ``x`` seconds: ``x / scale`` is >= 1 where possible."""
    ax = abs(x)
    for scale, name in _TIME_UNITS:
        if ax >= scale:
            return scale, name
    return _TIME_UNITS[-1]


def format_seconds(x: float | None) -> str:
    """``92.8 s``, ``12.3 ms``, ``45 us``; "-" for None or NaN. Minutes stay seconds: steps compare across rows."""
    if x is None or math.isnan(x):
        return "-"
    if x == 0:
        return "0 s"
    scale, name = seconds_unit(x)
    return f"{_sig(x / scale)} {name}"


def format_bytes(x: float | None) -> str:
    """``35.6 GiB``, ``512 MiB``, ``100 B`` (binary units, as device memory is sold and capped)."""
    if x is None or math.isnan(x):
        return "-"
    for scale, name in _BYTE_UNITS:
        if abs(x) >= scale:
            return f"{_sig(x / scale)} {name}"
    return f"{_sig(x)} B"


def format_flops(x: float | None) -> str:
    """``312 TFLOP/s`` (decimal units, as accelerator datasheets state peak throughput)."""
    if x is None or math.isnan(x):
        return "-"
    for scale, name in _FLOP_UNITS:
        if abs(x) >= scale:
            return f"{_sig(x / scale)} {name}"
    return f"{_sig(x)} FLOP/s"
