"""Strict JSON <-> frozen dataclass conversion shared by every contract type.

``from_dict`` rejects unknown and missing keys and wrong types with a :class:`ConfigError`
(or the error class given) naming the dotted path of the bad field, so a typo in a plan or
config file is one clear line, never a ``TypeError`` traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipetrain.errors import ConfigError, PipetrainError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["to_dict", "from_dict", "write_text_atomic", "read_text_or_error", "parse_json", "median_merge"]

T = TypeVar("T", bound="DataclassInstance")


def to_dict(obj: Any) -> Any:
    """Recursively turn dataclasses, tuples and lists into JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any, where: str, err: type[PipetrainError]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: PipetrainError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, err)
            except PipetrainError as exc:
                last = exc
        raise last or err(f"{where}: unexpected value {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, error=err)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise err(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]", err) for i, v in enumerate(value))
        if len(args) != len(value):
            raise err(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]", err) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise err(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, where, err): _convert(vt, v, f"{where}.{k}", err) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise err(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise err(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise err(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise err(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, *, where: str = "", error: type[PipetrainError] = ConfigError) -> T:
    """Build dataclass ``cls`` from ``data``; errors name the field path (``where``)."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise error(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{label}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{label}: missing key {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], path, error)
    try:
        return cls(**kwargs)
    except PipetrainError:
        raise
    except (TypeError, ValueError) as exc:
        raise error(f"{label}: {exc}") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)
    return p


def read_text_or_error(path: str | Path, *, what: str, hint: str, error: type[PipetrainError] = ConfigError) -> str:
    """The file's text, or ``error("<what> file 'P' does not exist: <hint>")``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file {str(p)!r} does not exist: {hint}")
    return p.read_text(encoding="utf-8")


def parse_json(text: str, *, what: str, error: type[PipetrainError] = ConfigError) -> Any:
    """``json.loads`` whose failure is ``error("<what> is not valid JSON: ...")``, one line."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None


def median_merge(items: list[Any], where: str = "value", *, last: tuple[str, ...] = ()) -> Any:
    """Several measurements of the same thing merged field by field: floats (and ints that differ)
    become their median, equal values stay, tuples/lists/dicts of the same shape merge element by
    element, dataclasses of one type field by field (the fields named in ``last`` take the last
    item's value). Strings or shapes that differ raise a ConfigError naming the dotted path: the
    measurements were not of the same thing."""
    import statistics

    first = items[0]
    if all(v == first for v in items):
        return first
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        if any(type(v) is not type(first) for v in items):
            raise ConfigError(f"cannot merge {where}: different kinds of record")
        vals = {f.name: (getattr(items[-1], f.name) if f.name in last else
                         median_merge([getattr(v, f.name) for v in items], f"{where}.{f.name}", last=last))
                for f in dataclasses.fields(first)}
        return dataclasses.replace(first, **vals)
    if isinstance(first, (tuple, list)):
        if any(not isinstance(v, (tuple, list)) or len(v) != len(first) for v in items):
            raise ConfigError(f"cannot merge {where}: lengths differ ({[len(v) for v in items]})")
        out = [median_merge([v[i] for v in items], f"{where}[{i}]", last=last) for i in range(len(first))]
        return type(first)(out)
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in items):
            raise ConfigError(f"cannot merge {where}: keys differ")
        return {k: median_merge([v[k] for v in items], f"{where}.{k}", last=last) for k in first}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        med = statistics.median(items)
        return int(med) if all(isinstance(v, int) for v in items) else float(med)
    raise ConfigError(f"cannot merge {where}: values differ ({', '.join(repr(v) for v in items[:3])})")
