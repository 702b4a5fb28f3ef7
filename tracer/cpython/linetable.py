"""The line of an instruction, from a CPython 3.11 code object's location
table (co_linetable, as Objects/locations.md describes it).

The table is a run of entries, each for a span of code units. An entry's
first byte has its top bit set; bits 3-6 are its kind, bits 0-2 its span
less one. The kinds: 0-9 the same line as before (one byte of columns
follows), 10-12 the line moves by kind - 10 (two bytes of columns), 13 a
signed varint line delta and no columns, 14 a signed delta then three
varints (end line, columns), 15 no location. Varints are 6 bits a byte,
least significant first, 0x40 meaning another byte follows."""

from __future__ import annotations

from typing import Optional


def _varint(table: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = table[at]
        at += 1
        value |= (byte & 0x3F) << shift
        shift += 6
        if not byte & 0x40:
            return value, at


def _signed_varint(table: bytes, at: int) -> tuple[int, int]:
    value, at = _varint(table, at)
    return (-(value >> 1) if value & 1 else value >> 1), at


def line_of(table: bytes, first_line: int, index: int) -> Optional[int]:
    """The line of the code unit at `index` (instructions and their inline
    caches alike); None where the table gives it no line or does not reach
    it, or is not one."""
    line, unit, at = first_line, 0, 0
    try:
        while at < len(table):
            head = table[at]
            if not head & 0x80:
                return None  # not the start of an entry
            kind, span = (head >> 3) & 0xF, (head & 7) + 1
            at += 1
            located = True
            if kind == 15:
                located = False
            elif kind == 14:
                delta, at = _signed_varint(table, at)
                line += delta
                for _ in range(3):
                    _, at = _varint(table, at)
            elif kind == 13:
                delta, at = _signed_varint(table, at)
                line += delta
            elif kind >= 10:
                line += kind - 10
                at += 2
            else:
                at += 1
            if unit <= index < unit + span:
                return line if located else None
            unit += span
    except IndexError:
        return None
    return None
