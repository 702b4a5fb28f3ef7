"""Snapshot JSON back into a `Snapshot`: the inverse of `Snapshot.to_json()`.

`snapshot_from_json(s.to_json())` rebuilds every field to_json emits, so
`snapshot_from_json(d).to_json() == d`. Fields to_json leaves out come back
as their defaults (`interval_s`, a missing `peak_rss_bytes`); derived values
(`live_bytes`, `dropped_count`, `truncated_stack_count`) are recomputed, not
read. A top-level section this module has no decoder for, but which names a
field of `Snapshot` (`os`, `arenas`, `regions`, `trim`, `gap`, `hints`...),
is decoded from its `asdict()` form by the field's type, and so is a stack or
thread field added later; a section written that way needs no change here.
Properties that to_json adds beside the fields (an arena's
`retained_bytes`) are derived, so they are skipped.

Only JSON goes in: nothing read is ever evaluated or unpickled.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Mapping, Union

from memtrace.errors import MemtraceError
from memtrace.model.notes import Note
from memtrace.model.snapshot import (
    Counters,
    DropStats,
    HeapTotals,
    ProcessStats,
    Rates,
    Snapshot,
    StackStats,
    ThreadStats,
)

# Keys of snapshot JSON that are recomputed from others, never read.
DERIVED_KEYS = frozenset({"truncated_stack_count"})


class SnapshotFormatError(MemtraceError):
    """Snapshot JSON that does not have the shape to_json gives it."""


def counters_from_json(d: Mapping[str, Any]) -> Counters:
    return Counters(
        alloc_bytes=d["alloc_bytes"],
        free_bytes=d["free_bytes"],
        alloc_count=d["alloc_count"],
        free_count=d["free_count"],
    )


def thread_from_json(d: Mapping[str, Any]) -> ThreadStats:
    return ThreadStats(
        tid=d["tid"], name=d["name"], counters=counters_from_json(d), alive=d["alive"], **_extra_fields(ThreadStats, d)
    )


def stack_from_json(d: Mapping[str, Any]) -> StackStats:
    return StackStats(
        frames=tuple(d["frames"]),
        tids=tuple(d["tids"]),
        counters=counters_from_json(d),
        truncated=d["truncated"],
        live_delta_bytes=d["live_delta_bytes"],
        **_extra_fields(StackStats, d),
    )


# Fields of ThreadStats/StackStats that the functions above spell out; any
# other field (retained_bytes, and later ones) is read by name.
_SPELLED_OUT = frozenset({"tid", "name", "alive", "frames", "tids", "truncated", "live_delta_bytes", "counters"})


def _extra_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    hints = _type_hints(cls)
    return {
        f.name: _from_plain(hints[f.name], d[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.name not in _SPELLED_OUT and f.name in d
    }


def _heap_from_json(d: Mapping[str, Any]) -> HeapTotals:
    return HeapTotals(
        counters=counters_from_json(d),
        untracked_free_count=d["untracked_free_count"],
        trim_calls=d["trim_calls"],
        trim_released_calls=d["trim_released_calls"],
        drops=DropStats(**d["drops"]),
        peak_live_bytes=d.get("peak_live_bytes", 0),
        live_allocator_bytes=d.get("live_allocator_bytes", 0),
        peak_live_elapsed_s=d.get("peak_live_elapsed_s"),
        live_before_trace_bytes=d.get("live_before_trace_bytes"),
    )


def _process_from_json(d: Mapping[str, Any]) -> ProcessStats:
    return ProcessStats(**d)


def _notes_from_json(d: Any) -> tuple[Note, ...]:
    return tuple(Note.from_json(n) for n in d)


# Top-level keys with a shape of their own; each returns Snapshot kwargs.
_SECTIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "pid": lambda v: {"pid": v},
    "comm": lambda v: {"comm": v},
    "elapsed_s": lambda v: {"elapsed_s": v},
    "target_alive": lambda v: {"target_alive": v},
    "exit_status": lambda v: {"exit_status": v},
    "memory_read_elapsed_s": lambda v: {"memory_read_elapsed_s": v},
    "process": lambda v: {"process": _process_from_json(v)},
    # Rates travel inside the heap section.
    "heap": lambda v: {"heap": _heap_from_json(v), "rates": Rates(**v["rates"])},
    "threads": lambda v: {"threads": tuple(thread_from_json(t) for t in v)},
    "stacks": lambda v: {"stacks": tuple(stack_from_json(s) for s in v)},
    "notes": lambda v: {"notes": _notes_from_json(v)},
    "hints": lambda v: {"hints": _notes_from_json(v)},
}


def section_kwargs(name: str, value: Any) -> dict[str, Any]:
    """Snapshot constructor arguments for one top-level JSON key. Unknown keys
    that are not Snapshot fields give {} (a newer writer's extra section)."""
    if name in DERIVED_KEYS:
        return {}
    decode = _SECTIONS.get(name)
    try:
        if decode is not None:
            return decode(value)
        hints = _snapshot_hints()
        if name in hints:
            return {name: _from_plain(hints[name], value)}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotFormatError(f"snapshot section {name!r} is malformed ({type(e).__name__}: {e})") from None
    return {}


def snapshot_from_json(d: Mapping[str, Any]) -> Snapshot:
    if not isinstance(d, Mapping):
        raise SnapshotFormatError("snapshot JSON is not an object")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        kwargs.update(section_kwargs(name, value))
    try:
        return Snapshot(**kwargs)
    except TypeError as e:
        raise SnapshotFormatError(f"snapshot JSON is incomplete ({e})") from None


# ---------------------------------------------------------------- generic


_hints_cache: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = _hints_cache[cls] = typing.get_type_hints(cls)
    return hints


def _snapshot_hints() -> dict[str, Any]:
    return _type_hints(Snapshot)


def to_plain(value: Any) -> Any:
    """A field value in the JSON form `_from_plain` reads back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def field_from_plain(cls: type, name: str, value: Any) -> Any:
    """A value of field `name` of dataclass `cls`, from its JSON form."""
    return _from_plain(_type_hints(cls)[name], value)


def _from_plain(tp: Any, value: Any) -> Any:
    """Rebuild a value of type `tp` from its dataclasses.asdict() form."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        inner = [a for a in args if a is not type(None)]
        return _from_plain(inner[0], value) if len(inner) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: _from_plain(hints[k], v) for k, v in value.items() if k in names})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v) for v in value)
        if args:
            return tuple(_from_plain(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin in (dict, Mapping) and len(args) == 2:
        return {k: _from_plain(args[1], v) for k, v in value.items()}
    return value
