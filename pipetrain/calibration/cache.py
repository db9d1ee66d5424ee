"""A calibration kept per machine, so that ``pipetrain demo`` measures this machine once.

A calibration is valid for the machine and the software that measured it: the CPU model (or
GPU) and the threads per rank (:func:`pipetrain.calibration.profile.local_device_name`), the
number of cores (the co-run speed and the wake-up latency depend on how many cores the ranks
share), the torch version (its kernels set the block times) and what was calibrated (topology,
model shapes, dtype, the calibration file's version and what it measures). :class:`CalibrationKey` holds exactly
those; the host name is left out on purpose, so that identical machines (CI runners, a cluster's
nodes) share a cache directory. The file lives under the profile cache
(:func:`pipetrain.calibration.profile.default_cache_dir`, ``PIPETRAIN_PROFILE_CACHE``).

:func:`cached_calibration` returns the cached calibration or measures and stores a new one; an
unreadable file (truncated, another version, hand-edited) is treated as absent and overwritten,
since the cache is only ever a shortcut for a measurement it can redo.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipetrain.calibration.measured import CALIBRATION_FILE_VERSION, Calibration, load_calibration
from pipetrain.errors import ConfigError, PipetrainError

__all__ = ["CalibrationKey", "CachedCalibration", "calibration_key", "cache_path", "load_cached", "cached_calibration"]


@dataclass(frozen=True, kw_only=True)
class CalibrationKey:
    """What a cached calibration is valid for (module docstring)."""

    device: str
    cores: int
    torch_version: str
    topology: str
    shapes: tuple[tuple[str, int, int], ...]  # (model, micro-batch size, sequence length)
    dtype: str
    schema_version: int = CALIBRATION_FILE_VERSION
    #: what the calibration measures within its file version: a calibration cached before a change
    #: of what it measures is not reused (2: the two-rank pipeline's own actions and messages)
    measures: int = 2

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ConfigError(f"CalibrationKey.cores must be >= 1, got {self.cores}")
        if not self.shapes:
            raise ConfigError("CalibrationKey.shapes needs at least one (model, micro-batch size, seq len)")

    def file_name(self) -> str:
        """Readable enough to tell files apart by eye; the digest covers every field, so two keys never share a file."""
        shapes = "+".join(f"{m}-mbs{b}-seq{s}" for m, b, s in self.shapes)
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:12]
        raw = f"calibration_{self.topology}_{shapes}_{self.dtype}_{self.cores}cores_torch{self.torch_version}_{digest}"
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", raw) + ".json"


@dataclass(frozen=True, kw_only=True)
class CachedCalibration:
    calibration: Calibration
    path: Path
    reused: bool
    #: why a new calibration was measured ("" when reused)
    why_new: str = ""


def calibration_key(topology: str, shapes: Sequence[tuple[str, int, int]], *, dtype: str = "fp32", threads: int = 1,
                    device: str = "cpu", torch_version: str | None = None, cores: int | None = None) -> CalibrationKey:
    """The key of this machine for ``shapes`` on ``topology`` (torch version and cores read here unless given)."""
    import os

    from pipetrain.calibration.profile import local_device_name

    if torch_version is None:
        import torch

        torch_version = str(torch.__version__)
    return CalibrationKey(device=local_device_name(device, threads), cores=cores if cores is not None else (os.cpu_count() or 1),
                          torch_version=torch_version, topology=topology, shapes=tuple((m, int(b), int(s)) for m, b, s in shapes),
                          dtype=dtype)


def cache_path(key: CalibrationKey, cache_dir: str | Path | None = None) -> Path:
    from pipetrain.calibration.profile import default_cache_dir

    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / key.file_name()


def load_cached(path: str | Path) -> tuple[Calibration | None, str]:
    """(calibration, "") from ``path``, or (None, why not): missing or unreadable files are not errors here."""
    p = Path(path)
    if not p.is_file():
        return None, "no cached calibration"
    try:
        return load_calibration(p), ""
    except (PipetrainError, OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"cached calibration {p.name} unreadable ({exc}); measuring again"


def cached_calibration(key: CalibrationKey, measure: Callable[[], Calibration], *, cache_dir: str | Path | None = None,
                       refresh: bool = False) -> CachedCalibration:
    """The cached calibration for ``key``, else ``measure()`` saved to the cache (``refresh`` always measures)."""
    path = cache_path(key, cache_dir)
    if refresh:
        why = "recalibration asked for"
    else:
        cal, why = load_cached(path)
        if cal is not None:
            return CachedCalibration(calibration=cal, path=path, reused=True)
    cal = measure()
    cal.save(path)  # atomic: a demo killed mid-write leaves the old file or none, never half of one
    return CachedCalibration(calibration=cal, path=path, reused=False, why_new=why)
