"""Change records: one snapshot's entity updates, packed for the file.

Per kind (stacks, threads) a snapshot stores one zlib-compressed JSON list of
records, sorted by entity id:

    [id_gap]                                   the entity left the snapshot
    [id_gap, d_alloc_b, d_free_b, d_alloc_n, d_free_n]
    [id_gap, d_alloc_b, d_free_b, d_alloc_n, d_free_n, {attributes}]

`id_gap` is the id minus the previous record's id (the first counts from 0);
the counters are differences from the entity's counters in the previous
snapshot (zero if it was absent): small numbers that compress well. The
attribute object holds only what differs from what the reader would assume:

    stacks:  "t" tids (always for an entity new to the snapshot),
             "d" live_delta_bytes when it is not live minus previous live,
             or, with zero counter changes, when it is not 0
             "x" truncated when it changed (absent for a new entity: false)
    threads: "n" name (always for a new entity), "a" alive when it changed
             (absent for a new entity: true)
    both:    any other dataclass field by its own name (`retained_bytes`,
             and fields added later) when it differs from the previous
             value, or from the field's default for a new entity

Both sides hold the previous snapshot's entities, so the reader rebuilds
exactly what the writer had. One thing is implied (format 2 on): a stack
without a record keeps its counters, so it did not grow: its
live_delta_bytes becomes 0. The writer leaves out the record that would
only say so, which was every changed stack's second record, half of a busy
recording.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from operator import attrgetter
from typing import Any, Callable, Iterable, Mapping, Optional

from memtrace.model.snapshot import Counters, StackStats, ThreadStats
from memtrace.record.codec import field_from_plain, to_plain

_ZLIB_LEVEL = 6


def _pack(records: list[list[Any]]) -> Optional[bytes]:
    if not records:
        return None
    return zlib.compress(json.dumps(records, separators=(",", ":")).encode(), _ZLIB_LEVEL)


def _unpack(data: bytes) -> list[list[Any]]:
    records = json.loads(zlib.decompress(data).decode())
    if not isinstance(records, list) or not all(isinstance(r, list) and r for r in records):
        raise ValueError("change records are not a list of lists")
    return records


def _counter_delta(new: Counters, old: Optional[Counters]) -> list[int]:
    if old is None:
        return [new.alloc_bytes, new.free_bytes, new.alloc_count, new.free_count]
    return [
        new.alloc_bytes - old.alloc_bytes,
        new.free_bytes - old.free_bytes,
        new.alloc_count - old.alloc_count,
        new.free_count - old.free_count,
    ]


def _counters_from(body: list[Any], old: Optional[Counters]) -> Counters:
    a, b, c, d = body[0], body[1], body[2], body[3]
    # JSON could hold strings or floats here; ints are all we accept.
    if type(a) is not int or type(b) is not int or type(c) is not int or type(d) is not int:
        raise ValueError("malformed counters in a change record")
    if old is None:
        return Counters(a, b, c, d)
    return Counters(old.alloc_bytes + a, old.free_bytes + b, old.alloc_count + c, old.free_count + d)


def _other_fields(cls: type, spelled_out: frozenset[str]) -> tuple[tuple[str, Any], ...]:
    """(name, default) of the fields the records carry by name."""
    out = []
    for f in dataclasses.fields(cls):
        if f.init and f.name not in spelled_out:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out.append((f.name, default))
    return tuple(out)


_STACK_OTHER = _other_fields(StackStats, frozenset({"frames", "tids", "counters", "truncated", "live_delta_bytes"}))
_THREAD_OTHER = _other_fields(ThreadStats, frozenset({"tid", "name", "counters", "alive"}))
# StackStats' own order: the fields after live_delta_bytes, positionally.
_STACK_OTHER_NAMES = tuple(name for name, _ in _STACK_OTHER)
assert [f.name for f in dataclasses.fields(StackStats)][5:] == list(_STACK_OTHER_NAMES)


def _put_others(attrs: dict[str, Any], others: tuple, new: Any, old: Any) -> None:
    for name, default in others:
        value = getattr(new, name)
        if value != (getattr(old, name) if old is not None else default):
            attrs[name] = to_plain(value)


def _get_others(cls: type, others: tuple, attrs: dict[str, Any], old: Any) -> dict[str, Any]:
    out = {}
    for name, default in others:
        if name in attrs:
            out[name] = field_from_plain(cls, name, attrs[name])
        else:
            out[name] = getattr(old, name) if old is not None else default
    return out


def _encode(before: Mapping[int, Any], after: Mapping[int, Any], record: Callable[[Any, Any], list]) -> Optional[bytes]:
    changed: list[tuple[int, Optional[list]]] = []
    for eid, new in after.items():
        old = before.get(eid)
        if old is not new and old != new:
            changed.append((eid, record(new, old)))
    changed += [(eid, None) for eid in before.keys() - after.keys()]
    changed.sort(key=lambda item: item[0])
    records, last = [], 0
    for eid, body in changed:
        records.append([eid - last] + (body or []))
        last = eid
    return _pack(records)


def _decode(data: bytes, entities: dict[int, Any], build: Callable[[int, list, Any], Any]) -> set[int]:
    # In place: each id appears once per snapshot, so the old value read
    # here is still the previous snapshot's. Returns the ids with a record.
    eid = 0
    touched = set()
    for rec in _unpack(data):
        eid += rec[0]
        touched.add(eid)
        if len(rec) == 1:
            entities.pop(eid, None)
        else:
            entities[eid] = build(eid, rec[1:], entities.get(eid))
    return touched


def _attributes(body: list) -> dict[str, Any]:
    attrs = body[4] if len(body) > 4 else {}
    if not isinstance(attrs, dict):
        raise ValueError("malformed attributes in a change record")
    return attrs


# ---------------------------------------------------------------- stacks


# The fields carried by name, read in one C call.
_STACK_OTHER_VALUES = attrgetter(*_STACK_OTHER_NAMES) if _STACK_OTHER_NAMES else (lambda st: None)


def _stack_record(new: StackStats, old: Optional[StackStats]) -> list:
    if old is None:
        attrs: dict[str, Any] = {"t": list(new.tids)}
        if new.live_delta_bytes != new.counters.live_bytes:
            attrs["d"] = new.live_delta_bytes
        if new.truncated:
            attrs["x"] = new.truncated
        _put_others(attrs, _STACK_OTHER, new, None)
        return _counter_delta(new.counters, None) + [attrs]
    # A stack that was there: most records, most of them counters only.
    n, o = new.counters, old.counters
    body = [n.alloc_bytes - o.alloc_bytes, n.free_bytes - o.free_bytes,
            n.alloc_count - o.alloc_count, n.free_count - o.free_count]
    attrs = {}
    if old.tids != new.tids:
        attrs["t"] = list(new.tids)
    if new.live_delta_bytes != body[0] - body[1]:
        attrs["d"] = new.live_delta_bytes
    if new.truncated != old.truncated:
        attrs["x"] = new.truncated
    if _STACK_OTHER_VALUES(new) != _STACK_OTHER_VALUES(old):
        _put_others(attrs, _STACK_OTHER, new, old)
    if attrs:
        body.append(attrs)
    return body


def _still(old: StackStats) -> StackStats:
    """What a stack without a record becomes: the same, not growing."""
    return old if not old.live_delta_bytes else dataclasses.replace(old, live_delta_bytes=0)


# Every field but the growth, read in one C call.
_BUT_GROWTH = attrgetter(*(f.name for f in dataclasses.fields(StackStats) if f.name != "live_delta_bytes"))


def same_but_growth(a: StackStats, b: StackStats) -> bool:
    return _BUT_GROWTH(a) == _BUT_GROWTH(b)


def encode_stacks(before: Mapping[int, StackStats], after: Mapping[int, StackStats]) -> Optional[bytes]:
    """The records that turn `before` (previous snapshot, by entity id) into
    `after`; None when nothing changed."""
    return encode_stack_changes([(eid, new, before.get(eid)) for eid, new in after.items()]
                                + [(eid, None, old) for eid, old in before.items() if eid not in after])


def encode_stack_changes(changed: Iterable[tuple[int, Optional[StackStats], Optional[StackStats]]]) -> Optional[bytes]:
    """encode_stacks from (entity id, the stack now or None: it went, the
    previous one or None: it is new) of the entities that may have
    changed, without building the implied stacks (the previous ones, not
    growing) that encode_stacks compares with: a stack that does not grow
    and is otherwise the same needs no record."""
    out: list[tuple[int, Optional[list]]] = []
    for eid, new, old in changed:
        if new is None:
            if old is not None:
                out.append((eid, None))
        elif old is None or new.live_delta_bytes or _BUT_GROWTH(new) != _BUT_GROWTH(old):
            out.append((eid, _stack_record(new, old)))
    out.sort(key=_first)
    records, last = [], 0
    for eid, body in out:
        records.append([eid - last] + body if body is not None else [eid - last])
        last = eid
    return _pack(records)


def _first(item: tuple):
    return item[0]


def settle_stacks(entities: dict[int, StackStats], moved: set[int], touched: set[int]) -> set[int]:
    """After a snapshot's records: the stacks that grew last time and have
    no record now grow no more. Returns the stacks that grew this time."""
    for eid in moved - touched:
        old = entities.get(eid)
        if old is not None and old.live_delta_bytes:
            entities[eid] = _still(old)
    return {eid for eid in touched if eid in entities and entities[eid].live_delta_bytes}


def decode_stacks(
    data: bytes, entities: dict[int, StackStats], frames_of: Callable[[int], tuple[str, ...]]
) -> set[int]:
    """Apply one snapshot's records to the previous snapshot's entities;
    returns the ids that had a record (see settle_stacks)."""

    def build(eid: int, body: list, old: Optional[StackStats]) -> StackStats:
        if old is not None and len(body) == 4:
            # Only the counters moved: most records of a busy process.
            a, b, c, d = body
            if type(a) is not int or type(b) is not int or type(c) is not int or type(d) is not int:
                raise ValueError("malformed counters in a change record")
            o = old.counters
            counters = Counters(o.alloc_bytes + a, o.free_bytes + b, o.alloc_count + c, o.free_count + d)
            return StackStats(old.frames, old.tids, counters, old.truncated,
                              counters.live_bytes - old.counters.live_bytes,
                              *[getattr(old, name) for name in _STACK_OTHER_NAMES])
        attrs = _attributes(body)
        counters = _counters_from(body, old.counters if old else None)
        if "t" in attrs:
            tids = tuple(attrs["t"])
        elif old is not None:
            tids = old.tids
        else:
            raise ValueError(f"stack {eid} appears without its threads")
        delta = attrs.get("d")
        if delta is None:
            delta = counters.live_bytes - (old.counters.live_bytes if old else 0)
        truncated = bool(attrs.get("x", old.truncated if old else False))
        others = _get_others(StackStats, _STACK_OTHER, attrs, old)
        return StackStats(old.frames if old is not None else frames_of(eid), tids, counters, truncated, delta,
                          **others)

    return _decode(data, entities, build)


# ---------------------------------------------------------------- threads


def _thread_record(new: ThreadStats, old: Optional[ThreadStats]) -> list:
    attrs: dict[str, Any] = {}
    if old is None or old.name != new.name:
        attrs["n"] = new.name
    if new.alive != (old.alive if old else True):
        attrs["a"] = new.alive
    _put_others(attrs, _THREAD_OTHER, new, old)
    return _counter_delta(new.counters, old.counters if old else None) + ([attrs] if attrs else [])


def encode_threads(before: Mapping[int, ThreadStats], after: Mapping[int, ThreadStats]) -> Optional[bytes]:
    return _encode(before, after, _thread_record)


def decode_threads(data: bytes, entities: dict[int, ThreadStats], tid_of: Callable[[int], int]) -> None:
    def build(eid: int, body: list, old: Optional[ThreadStats]) -> ThreadStats:
        attrs = _attributes(body)
        counters = _counters_from(body, old.counters if old else None)
        if "n" in attrs:
            name = attrs["n"]
        elif old is not None:
            name = old.name
        else:
            raise ValueError(f"thread {eid} appears without its name")
        alive = bool(attrs.get("a", old.alive if old else True))
        others = _get_others(ThreadStats, _THREAD_OTHER, attrs, old)
        return ThreadStats(tid_of(eid), name, counters, alive, **others)

    _decode(data, entities, build)
