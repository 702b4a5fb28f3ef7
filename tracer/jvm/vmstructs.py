"""HotSpot's description of its own structures, as libjvm.so exports it
for outside readers (the serviceability agent): the gHotSpotVMStructs
table (type, field, offset or static address a row) and gHotSpotVMTypes
(type, size a row). The layout of a row is itself exported, as the
gHotSpotVM*Offset and *ArrayStride variables, so nothing here assumes a
JDK version.

Everything is read from the target's memory through `read(address,
size)` (bytes or None): the tables are written by the JVM as it starts,
and are data to check, never to trust: every count and string is
bounded."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

Reader = Callable[[int, int], Optional[bytes]]

MAX_ROWS = 20000  # JDK 17 has about 1800 struct rows and 900 types
MAX_NAME = 256

# The exported variables that describe the tables' rows.
STRUCT_LAYOUT = ("TypeName", "FieldName", "IsStatic", "Offset", "Address")
TYPE_LAYOUT = ("TypeName", "Size")
SYMBOLS = (
    "gHotSpotVMStructs", "gHotSpotVMStructEntryArrayStride",
    *(f"gHotSpotVMStructEntry{name}Offset" for name in STRUCT_LAYOUT),
    "gHotSpotVMTypes", "gHotSpotVMTypeEntryArrayStride",
    *(f"gHotSpotVMTypeEntry{name}Offset" for name in TYPE_LAYOUT),
)


@dataclass
class VMStructs:
    offsets: dict[tuple[str, str], int] = field(default_factory=dict)  # instance fields
    addresses: dict[tuple[str, str], int] = field(default_factory=dict)  # static fields
    sizes: dict[str, int] = field(default_factory=dict)


def u64(read: Reader, address: int) -> Optional[int]:
    data = read(address, 8)
    return struct.unpack("<Q", data)[0] if data and len(data) == 8 else None


def c_string(read: Reader, address: int, limit: int = MAX_NAME) -> Optional[str]:
    """A NUL-terminated string of at most `limit` bytes; None when it is
    unreadable or longer."""
    if not address:
        return None
    out = b""
    while len(out) < limit:
        # Not past the page: the next one may be unmapped.
        chunk = read(address + len(out), min(64, 4096 - (address + len(out)) % 4096))
        if not chunk:
            return None
        stop = chunk.find(b"\0")
        if stop >= 0:
            return (out + chunk[:stop]).decode("ascii", errors="replace")
        out += chunk
    return None


def read_vmstructs(read: Reader, symbols: Mapping[str, int]) -> Optional[VMStructs]:
    """The tables of a JVM whose exported variables are at `symbols`
    (name -> address in the target); None when they cannot be read (not
    yet written, or not HotSpot's)."""
    if any(name not in symbols for name in SYMBOLS):
        return None
    values = {name: u64(read, symbols[name]) for name in SYMBOLS}
    if any(v is None for v in values.values()):
        return None
    out = VMStructs()
    struct_offsets = [values[f"gHotSpotVMStructEntry{n}Offset"] for n in STRUCT_LAYOUT]
    for type_name, field_name, is_static, offset, address in _rows(
            read, values["gHotSpotVMStructs"], values["gHotSpotVMStructEntryArrayStride"],
            struct_offsets, ("s", "s", "i", "q", "q")):
        if field_name is None:
            continue
        if is_static:
            out.addresses[(type_name, field_name)] = address
        else:
            out.offsets[(type_name, field_name)] = offset
    type_offsets = [values[f"gHotSpotVMTypeEntry{n}Offset"] for n in TYPE_LAYOUT]
    for type_name, size in _rows(read, values["gHotSpotVMTypes"],
                                 values["gHotSpotVMTypeEntryArrayStride"], type_offsets, ("s", "q")):
        out.sizes[type_name] = size
    return out if out.offsets and out.sizes else None


def _rows(read: Reader, table: int, stride: int, offsets: list[int], kinds: tuple[str, ...]):
    """The rows of one table, each its columns read as `kinds` (s: a
    string pointer, i: a 32-bit int, q: a 64-bit value), until the row
    whose first column (the type name) is NULL."""
    if not table or not 0 < stride <= 1024 or any(not 0 <= o <= stride - 4 for o in offsets):
        return
    for i in range(MAX_ROWS):
        row = read(table + i * stride, stride)
        if row is None or len(row) != stride:
            return
        values = []
        for offset, kind in zip(offsets, kinds):
            if kind == "i":
                values.append(struct.unpack_from("<i", row, offset)[0])
                continue
            if offset > stride - 8:
                return
            raw = struct.unpack_from("<Q", row, offset)[0]
            values.append(raw if kind == "q" else c_string(read, raw) if raw else None)
        if values[0] is None:
            return  # the end mark
        yield tuple(values)
