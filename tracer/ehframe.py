"""Where every function of an ELF file starts, from its .eh_frame.

The call-frame information is kept even in stripped files (exceptions and
unwinders need it), and it has one FDE per function, static ones included:
its initial location is the function's start and its range the length.
So a frame in a stripped library can still be named as a function,
`function at 0x...`, rather than as an address somewhere in the file."""

from __future__ import annotations

import struct
from typing import Optional

# DW_EH_PE_*: the low nibble is the format, the high one how to apply it.
_ABSPTR, _ULEB, _UDATA2, _UDATA4, _UDATA8 = 0x00, 0x01, 0x02, 0x03, 0x04
_SLEB, _SDATA2, _SDATA4, _SDATA8 = 0x09, 0x0A, 0x0B, 0x0C
_PCREL, _OMIT = 0x10, 0xFF
_FIXED = {_ABSPTR: "Q", _UDATA2: "H", _UDATA4: "I", _UDATA8: "Q",
          _SDATA2: "h", _SDATA4: "i", _SDATA8: "q"}

# A corrupt section is not read for ever: no real file has this many.
MAX_RECORDS = 2_000_000


def _leb(data: bytes, pos: int, signed: bool) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if signed and byte & 0x40:
        value -= 1 << shift
    return value, pos


def _encoded(data: bytes, pos: int, enc: int, end: str, field_vaddr: int) -> tuple[int, int]:
    """(value, position after it) of a pointer in encoding `enc`."""
    fmt = enc & 0x0F
    if fmt in (_ULEB, _SLEB):
        value, after = _leb(data, pos, fmt == _SLEB)
    else:
        code = _FIXED.get(fmt)
        if code is None:
            raise ValueError(f"pointer encoding 0x{enc:x}")
        value, = struct.unpack_from(end + code, data, pos)
        after = pos + struct.calcsize(code)
    if enc & 0x70 == _PCREL:
        value += field_vaddr
    elif enc & 0x70:
        raise ValueError(f"pointer application 0x{enc:x}")  # datarel etc.: not in .eh_frame
    return value & 0xFFFFFFFFFFFFFFFF, after


def _fde_encoding(data: bytes, pos: int, stop: int, end: str, vaddr: int) -> int:
    """The encoding of FDE addresses a CIE (its body at `pos`) declares."""
    version = data[pos]
    aug_end = data.index(b"\0", pos + 1, stop)
    augmentation = data[pos + 1 : aug_end]
    pos = aug_end + 1
    if b"eh" in augmentation:
        pos += 8
    _, pos = _leb(data, pos, False)  # code alignment
    _, pos = _leb(data, pos, True)  # data alignment
    pos = pos + 1 if version == 1 else _leb(data, pos, False)[1]  # return register
    if not augmentation.startswith(b"z"):
        return _ABSPTR
    _, pos = _leb(data, pos, False)  # augmentation data length
    for letter in augmentation[1:].decode("latin-1"):
        if letter == "R":
            return data[pos]
        if letter == "L":
            pos += 1
        elif letter == "P":
            _, pos = _encoded(data, pos + 1, data[pos] & 0x7F, end, vaddr + pos + 1)
        elif letter not in "SBG":
            break  # unknown: what follows cannot be placed
    return _ABSPTR


def function_ranges(data: bytes, section_vaddr: int, little_endian: bool = True) -> list[tuple[int, int]]:
    """(start, end) of every function an .eh_frame section (its bytes, and
    the virtual address they load at) describes, in section order. Reading
    stops at the first record that does not parse."""
    end = "<" if little_endian else ">"
    ranges: list[tuple[int, int]] = []
    encodings: dict[int, Optional[int]] = {}
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos + 4 > len(data):
            break
        length, = struct.unpack_from(end + "I", data, pos)
        if length == 0:
            break  # the terminator
        body = pos + 4
        if length == 0xFFFFFFFF:
            if pos + 12 > len(data):
                break
            length, = struct.unpack_from(end + "Q", data, pos + 4)
            body = pos + 12
        stop = body + length
        if stop > len(data) or length < 4:
            break
        cie_pointer, = struct.unpack_from(end + "I", data, body)
        try:
            if cie_pointer:
                cie = body - cie_pointer
                if cie not in encodings:
                    encodings[cie] = _cie_encoding(data, cie, end, section_vaddr)
                enc = encodings[cie]
                if enc is not None and enc != _OMIT:
                    at = body + 4
                    start, at = _encoded(data, at, enc, end, section_vaddr + at)
                    size, _ = _encoded(data, at, enc & 0x0F, end, 0)
                    if start and size:
                        ranges.append((start, start + size))
        except (ValueError, IndexError, struct.error):
            pass  # this record only: its length still leads to the next
        pos = stop
    return ranges


def _cie_encoding(data: bytes, cie: int, end: str, vaddr: int) -> Optional[int]:
    try:
        length, = struct.unpack_from(end + "I", data, cie)
        body = cie + (12 if length == 0xFFFFFFFF else 4)
        if length == 0xFFFFFFFF:
            length, = struct.unpack_from(end + "Q", data, cie + 4)
        if struct.unpack_from(end + "I", data, body)[0] != 0:
            return None  # not a CIE
        return _fde_encoding(data, body + 4, min(body + length, len(data)), end, vaddr)
    except (ValueError, IndexError, struct.error):
        return None
