"""Changes to a list section whose items have a stable identity.

Arenas and address-space regions are lists of hundreds of items of which a
few change per interval; writing the list whole each time would cost more
than all the stacks. Such a section is written as a delta from the
previous snapshot's list:

    {"id": [identity fields], "put": {key: item}, "upd": {key: {field: value}},
     "del": [key], "order": [key, ...]}

where a key is the JSON of the item's identity values. "order" is present
only when the list's order is not the old order (deleted items removed, new
ones appended). The writer checks that applying the delta rebuilds the list
exactly and otherwise writes the list whole.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

# section -> identity fields of its items
KEYED_SECTIONS: dict[str, tuple[str, ...]] = {
    "arenas": ("id",),
    "regions": ("start",),
}


def _key(item: dict[str, Any], ident: Sequence[str]) -> str:
    return json.dumps([item.get(f) for f in ident], separators=(",", ":"))


def _index(items: list[Any], ident: Sequence[str]) -> Optional[tuple[list[str], dict[str, dict]]]:
    if not all(isinstance(i, dict) for i in items):
        return None
    keys = [_key(i, ident) for i in items]
    by_key = dict(zip(keys, items))
    if len(by_key) != len(keys):
        return None  # two items share an identity: no delta for this list
    return keys, by_key


def list_delta(old: Any, new: Any, ident: Sequence[str]) -> Optional[dict[str, Any]]:
    """The delta from `old` to `new`, or None when only the whole list will do."""
    if not isinstance(old, list) or not isinstance(new, list):
        return None
    old_index, new_index = _index(old, ident), _index(new, ident)
    if old_index is None or new_index is None:
        return None
    old_keys, old_by = old_index
    new_keys, new_by = new_index
    delta: dict[str, Any] = {"id": list(ident)}
    put, upd = {}, {}
    for key in new_keys:
        item, prev = new_by[key], old_by.get(key)
        if prev is None or any(f not in item for f in prev):
            put[key] = item
        else:
            changed = {f: v for f, v in item.items() if f not in prev or prev[f] != v}
            if changed:
                upd[key] = changed
    gone = [k for k in old_keys if k not in new_by]
    if put:
        delta["put"] = put
    if upd:
        delta["upd"] = upd
    if gone:
        delta["del"] = gone
    kept = [k for k in old_keys if k in new_by]
    natural = kept + [k for k in new_keys if k not in old_by]
    if natural != new_keys:
        delta["order"] = new_keys
    if apply_list_delta(old, delta) != new:
        return None
    return delta


def apply_list_delta(old: Any, delta: dict[str, Any]) -> list[Any]:
    if not isinstance(old, list) or not isinstance(delta, dict):
        raise ValueError("a list delta applies to a list")
    ident = delta["id"]
    index = _index(old, ident)
    if index is None:
        raise ValueError("list delta on items without a unique identity")
    order, by_key = index
    by_key = dict(by_key)
    for key in delta.get("del", ()):
        by_key.pop(key, None)
    order = [k for k in order if k in by_key]
    for key, item in delta.get("put", {}).items():
        if key not in by_key:
            order.append(key)
        by_key[key] = item
    for key, part in delta.get("upd", {}).items():
        by_key[key] = {**by_key[key], **part}
    if "order" in delta:
        order = delta["order"]
    return [by_key[k] for k in order]
