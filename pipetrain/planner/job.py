"""A training job and its pinned knobs: YAML file or CLI flags -> frozen :class:`Job`.

A job names the model, the topology, the global batch, the sequence length, the precision
and the optimizer. Every planner knob (``pp``, ``dp``, ``microbatches``,
``microbatch_size``, ``schedule``, ``chunks``, ``buffers``, ``recompute``, ``boundaries``)
may be pinned; an unpinned knob (``None``) is searched. Unknown YAML keys are an error that
names the key and the closest known one.

Example (``examples/tiny-gpt-cpu.yaml``)::

    model: tiny-gpt
    topology: local-cpu:2
    global_batch: 16
    seq_len: 64
    dtype: fp32
    pp: 2                 # pinned; everything else is searched
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from pipetrain.errors import ConfigError
from pipetrain.plan import DTYPES, OPTIMIZERS, PRECISIONS, RECOMPUTE_MODES, SCHEDULES, ZERO_STAGES
from pipetrain.schedules import V_SCHEDULES

__all__ = ["Job", "KNOBS", "parse_memory", "load_job", "job_from_mapping"]

#: The knobs a user may pin (``None`` means "search it").
KNOBS = ("pp", "dp", "tp", "sequence_parallel", "zero", "microbatches", "microbatch_size", "schedule", "chunks", "buffers",
         "recompute", "recompute_mode", "boundaries")

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value: Any, *, where: str = "max_memory") -> tuple[float | None, float | None]:
    """``"70GiB"`` / ``"80e9"`` / ``75000000000`` -> (bytes, None); ``"90%"`` -> (None, 0.9)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected bytes such as '70GiB' or a share such as '90%', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{where}: must be > 0, got {value!r}")
        return float(value), None
    text = str(value).strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            frac = float(text[:-1]) / 100.0
        except ValueError:
            raise ConfigError(f"{where}: cannot read {value!r}; use e.g. '90%'") from None
        if not 0 < frac <= 1:
            raise ConfigError(f"{where}: a share of device memory must be in (0%, 100%], got {value!r}")
        return None, frac
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([a-z]*)", text)
    if m is None or m.group(2) not in _UNITS:
        raise ConfigError(f"{where}: cannot read {value!r}; use e.g. '70GiB', '80GB', '75e9' or '90%'")
    b = float(m.group(1)) * _UNITS[m.group(2)]
    if b <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    return b, None


@dataclass(frozen=True, kw_only=True)
class Job:
    """What to train, where, and which knobs are pinned (``None`` = let the planner choose)."""

    model: str
    topology: str
    global_batch: int
    seq_len: int
    dtype: str = "bf16"
    precision: str | None = None  # None: the dtype's (amp-autocast for bf16/fp16, as the executor runs it)
    optimizer: str = "adamw"
    max_memory_bytes: float | None = None  # per-device cap below the device's own memory
    max_memory_fraction: float | None = None  # or a share of each device's memory
    memory_reserve_bytes: float | None = None  # held back per device (CUDA context, NCCL, fragmentation); None: the device's default
    pp: int | None = None
    dp: int | None = None
    tp: int | None = None
    sequence_parallel: bool | None = None
    zero: int | None = None
    recompute_mode: str | None = None  # "selective" | "full": how much of a layer a recomputing stage recomputes
    microbatches: int | None = None
    microbatch_size: int | None = None
    schedule: str | None = None
    chunks: int | None = None
    buffers: tuple[int, ...] | None = None  # one value for every stage, or one per stage
    recompute: tuple[bool, ...] | None = None  # one value for every stage, or one per stage
    boundaries: tuple[int, ...] | None = None  # inner cut positions (first block of stages 1..)
    simulation_only: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(bool(self.model), "model must be given (a preset such as tiny-gpt, hf:NAME_OR_PATH, or package.module:factory)")
        need(bool(self.topology), "topology must be given (a preset such as dgx-h100:8, local-cpu:2, or a YAML path)")
        need(self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}")
        need(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        need(self.dtype in DTYPES, f"dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        need(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        need(self.precision is None or self.precision in PRECISIONS,
             f"precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        need(self.precision is None or (self.precision == "fp32") == (self.dtype == "fp32"),
             f"precision {self.precision} does not go with dtype {self.dtype}: bf16-mixed and amp-autocast compute in bf16, fp32 in fp32")
        need(self.zero is None or self.zero in ZERO_STAGES, f"zero must be one of {', '.join(map(str, ZERO_STAGES))}, got {self.zero}")
        need(self.recompute_mode is None or self.recompute_mode in RECOMPUTE_MODES[1:],
             f"recompute_mode must be selective or full, got {self.recompute_mode!r}")
        need(not (self.sequence_parallel and self.tp == 1), "sequence_parallel needs tp > 1")
        need(self.memory_reserve_bytes is None or self.memory_reserve_bytes >= 0, "memory_reserve must be >= 0")
        for k in ("pp", "dp", "tp", "microbatches", "microbatch_size", "chunks"):
            v = getattr(self, k)
            need(v is None or v >= 1, f"{k} must be >= 1, got {v}")
        need(self.schedule is None or self.schedule in SCHEDULES,
             f"schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        need(self.chunks is None or self.chunks == 1 or self.schedule in (None, "interleaved")
             or self.chunks == 2 and self.schedule in V_SCHEDULES,
             f"chunks={self.chunks} needs schedule 'interleaved', not {self.schedule!r}")
        need(self.buffers is None or (len(self.buffers) >= 1 and all(b >= 1 for b in self.buffers)),
             f"buffers must be >= 1 (one number, or one per stage), got {self.buffers}")
        need(self.recompute is None or len(self.recompute) >= 1, "recompute must be true/false or one per stage")
        if self.boundaries is not None:
            b = self.boundaries
            need(all(x >= 1 for x in b) and all(x < y for x, y in zip(b, b[1:])),
                 f"boundaries {list(b)} must be strictly increasing block indices >= 1")
            need(self.pp is None or self.chunks not in (None, 1) or len(b) == self.pp - 1,
                 f"boundaries {list(b)} give {len(b) + 1} stages but pp={self.pp}")
        for k in ("buffers", "recompute"):
            v = getattr(self, k)
            need(v is None or len(v) == 1 or self.pp is None or self.chunks not in (None, 1) or len(v) == self.pp,
                 f"{k} lists {len(v) if v else 0} values but pp={self.pp}; give one value or one per stage")
        need(self.max_memory_bytes is None or self.max_memory_bytes > 0, "max_memory must be > 0")
        need(self.max_memory_fraction is None or 0 < self.max_memory_fraction <= 1, "max_memory share must be in (0, 1]")
        if self.microbatch_size is not None and self.microbatches is not None and self.dp is not None:
            need(self.microbatch_size * self.microbatches * self.dp == self.global_batch,
                 f"microbatch_size {self.microbatch_size} x microbatches {self.microbatches} x dp {self.dp} = "
                 f"{self.microbatch_size * self.microbatches * self.dp}, not global_batch {self.global_batch}")

    @property
    def pinned(self) -> dict[str, Any]:
        """The knobs the user fixed."""
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}

    def unpinned(self) -> Job:
        """The same job with every knob free (to price what the pins cost)."""
        free: dict[str, Any] = dict.fromkeys(KNOBS)
        return replace(self, **free)

    def schedule_allowed(self, name: str, runnable: tuple[str, ...]) -> bool:
        if self.schedule is not None:
            return name == self.schedule
        return self.simulation_only or name in runnable


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_tuple(value: Any, key: str, conv: type) -> tuple | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else (str(value).split(",") if isinstance(value, str) else [value])
    out: list[bool | int] = []
    for it in items:
        if conv is bool:
            if isinstance(it, bool):
                out.append(it)
            elif str(it).strip().lower() in ("1", "true", "yes", "on", "all"):
                out.append(True)
            elif str(it).strip().lower() in ("0", "false", "no", "off", "none"):
                out.append(False)
            else:
                raise ConfigError(f"{key}: expected true/false (or one per stage), got {it!r}")
        else:
            try:
                if isinstance(it, bool) or (isinstance(it, float) and not it.is_integer()):
                    raise ValueError
                out.append(int(str(it).strip()) if not isinstance(it, (int, float)) else int(it))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer (or a list of them), got {it!r}") from None
    if not out:
        raise ConfigError(f"{key}: needs at least one value")
    return tuple(out)


def job_from_mapping(data: Mapping[str, Any], *, source: str = "config") -> Job:
    """Build a :class:`Job` from YAML-shaped data; unknown keys and bad types are :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    names = [f.name for f in fields(Job) if f.name not in ("max_memory_bytes", "max_memory_fraction", "memory_reserve_bytes",
                                                             "recompute_mode")] + ["max_memory", "memory_reserve"]
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for k in data:
        if k not in names:
            raise ConfigError(f"{source}: unknown key {k!r}{_did_you_mean(k, names)}; known keys: {', '.join(sorted(names))}")
    kw: dict[str, Any] = {}
    for k, v in data.items():
        if v is None:
            continue
        if k == "max_memory":
            kw["max_memory_bytes"], kw["max_memory_fraction"] = parse_memory(v, where=f"{source}: max_memory")
        elif k == "memory_reserve":
            if v in (0, "0"):
                kw["memory_reserve_bytes"] = 0.0
                continue
            reserve, share = parse_memory(v, where=f"{source}: memory_reserve")
            if reserve is None:
                raise ConfigError(f"{source}: memory_reserve takes bytes such as '6GiB', not a share")
            kw["memory_reserve_bytes"] = reserve
        elif k == "recompute" and isinstance(v, str) and v.strip().lower() in RECOMPUTE_MODES:
            mode = v.strip().lower()  # none | selective | full; the old true/false and per-stage lists still read below
            kw["recompute"] = (mode != "none",)
            if mode != "none":
                kw["recompute_mode"] = mode
        elif k in ("buffers", "boundaries"):
            kw[k] = _as_tuple(v, f"{source}: {k}", int)
        elif k == "recompute":
            kw[k] = _as_tuple(v, f"{source}: {k}", bool)
        elif k in ("model", "topology", "dtype", "optimizer", "schedule", "precision"):
            if not isinstance(v, str):
                raise ConfigError(f"{source}: {k} must be a string, got {v!r}")
            kw[k] = v.strip().lower() if k in ("dtype", "optimizer", "schedule", "precision") else v.strip()
        elif k in ("simulation_only", "sequence_parallel"):
            if not isinstance(v, bool):
                raise ConfigError(f"{source}: {k} must be true or false, got {v!r}")
            kw[k] = v
        else:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{source}: {k} must be an integer, got {v!r}")
            kw[k] = v
    if "precision" in kw and "dtype" not in kw:  # the precision says the compute dtype
        kw["dtype"] = "fp32" if kw["precision"] == "fp32" else "bf16"
    for req in ("model", "topology", "global_batch", "seq_len"):
        if req not in kw:
            raise ConfigError(f"{source}: missing key {req!r} (needed: model, topology, global_batch, seq_len)")
    return Job(**kw)


def load_job(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Job:
    """Read a job YAML; ``overrides`` (from CLI flags, ``None`` values ignored) win over the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job config {str(p)!r} does not exist (see examples/*.yaml)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"job config {p.name} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job config {p.name}: expected a mapping of keys, got {type(data).__name__}")
    merged = dict(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            merged[k] = v
    return job_from_mapping(merged, source=p.name)
