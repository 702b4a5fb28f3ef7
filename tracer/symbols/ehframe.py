"""Where every function of an ELF file starts, from its .eh_frame.

The call-frame information is kept even in stripped files (exceptions and
unwinders need it), and it has one FDE per function, static ones included:
its initial location is the function's start and its range the length.
So a frame in a stripped library can still be named as a function,
`function at 0x...`, rather than as an address somewhere in the file.
Its CFA programs, run (unwind_rows), say how to unwind each frame: the
rows the BPF stack walk reads."""

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


def _augmentation_encoding(data: bytes, pos: int, augmentation: bytes, end: str, vaddr: int) -> int:
    """The encoding of FDE addresses that a CIE's augmentation data (at
    `pos`, after its length) declares."""
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


def _parse_cie(data: bytes, cie: int, end: str, vaddr: int):
    """(fde encoding, has augmentation data, code align, data align, return
    address register, initial instructions) of the CIE at `cie`, or None
    when the record there is not a CIE."""
    length, = struct.unpack_from(end + "I", data, cie)
    body = cie + 4
    if length == 0xFFFFFFFF:
        length, = struct.unpack_from(end + "Q", data, cie + 4)
        body = cie + 12
    stop = min(body + length, len(data))
    if struct.unpack_from(end + "I", data, body)[0] != 0:
        return None
    pos = body + 4
    version = data[pos]
    aug_end = data.index(b"\0", pos + 1, stop)
    augmentation = data[pos + 1 : aug_end]
    pos = aug_end + 1
    if b"eh" in augmentation:
        pos += 8
    code_align, pos = _leb(data, pos, False)
    data_align, pos = _leb(data, pos, True)
    if version == 1:
        ra_reg, pos = data[pos], pos + 1
    else:
        ra_reg, pos = _leb(data, pos, False)
    enc = _ABSPTR
    has_data = augmentation.startswith(b"z")
    if has_data:
        aug_len, pos = _leb(data, pos, False)
        enc = _augmentation_encoding(data, pos, augmentation, end, vaddr)
        pos += aug_len
    return enc, has_data, code_align, data_align, ra_reg, data[pos:stop]


def function_ranges(data: bytes, section_vaddr: int, little_endian: bool = True) -> list[tuple[int, int]]:
    """(start, end) of every function an .eh_frame section (its bytes, and
    the virtual address they load at) describes, in section order. Reading
    stops at the first record that does not parse."""
    end = "<" if little_endian else ">"
    ranges: list[tuple[int, int]] = []
    encodings: dict[int, Optional[int]] = {}
    for body, stop, cie_pointer in _records(data, end):
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
    return ranges


def _records(data: bytes, end: str):
    """(body, stop, CIE pointer) of each record of an .eh_frame section, in
    order, up to its terminator or the first length that cannot be."""
    pos = 0
    for _ in range(MAX_RECORDS):
        if pos + 4 > len(data):
            return
        length, = struct.unpack_from(end + "I", data, pos)
        if length == 0:
            return
        body = pos + 4
        if length == 0xFFFFFFFF:
            if pos + 12 > len(data):
                return
            length, = struct.unpack_from(end + "Q", data, pos + 4)
            body = pos + 12
        stop = body + length
        if stop > len(data) or length < 4:
            return
        cie_pointer, = struct.unpack_from(end + "I", data, body)
        yield body, stop, cie_pointer
        pos = stop


def _cie_encoding(data: bytes, cie: int, end: str, vaddr: int) -> Optional[int]:
    try:
        parsed = _parse_cie(data, cie, end, vaddr)
    except (ValueError, IndexError, struct.error):
        return None
    return parsed[0] if parsed is not None else None


# ---------------------------------------------------------------- unwind rules
#
# What the BPF walk needs at a return address, reduced from the CFA programs:
# where the canonical frame address (CFA) is, from rsp or rbp, and where the
# caller's rbp was saved. The return address is at CFA-8 on x86-64.

RULE_NONE = 0  # no CFI here (a gap between functions): the frame-pointer step
RULE_RSP = 1  # CFA = rsp + offset
RULE_RBP = 2  # CFA = rbp + offset
RULE_END = 3  # the return address is undefined: the outermost frame
RULE_UNKNOWN = 4  # another register or an expression: the frame-pointer step

_RBP, _RSP, _RA = 6, 7, 16  # DWARF register numbers on x86-64
MAX_CFA_OFFSET = 0xFFFF  # the row's field; a larger frame is RULE_UNKNOWN
MAX_RBP_SLOT = 0xFF


def _cie_of(data: bytes, cie: int, end: str, vaddr: int):
    """(fde encoding, has augmentation data, code align, data align, initial
    instructions) of the CIE at `cie`, or None (not a CIE, or its return
    address is not x86-64's)."""
    parsed = _parse_cie(data, cie, end, vaddr)
    if parsed is None or parsed[4] != _RA:
        return None
    enc, has_data, code_align, data_align, _, instructions = parsed
    return enc, has_data, code_align, data_align, instructions


def _run_cfa(program: bytes, loc: int, state: list, initial: list, rows: list,
             code_align: int, data_align: int, stack: list) -> None:
    """Run a CFA program from `loc`, appending (address, rule, cfa offset,
    rbp slot) to `rows` at every advance. state: [rule, offset, rbp_slot]."""
    pos, n = 0, len(program)
    while pos < n:
        op = program[pos]
        pos += 1
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:  # advance_loc
            rows.append((loc, *state))
            loc += low * code_align
            continue
        if high == 0x80:  # offset(reg)
            off, pos = _leb(program, pos, False)
            if low == _RBP:
                state[2] = -off * data_align // 8
            continue
        if high == 0xC0:  # restore(reg)
            if low == _RBP:
                state[2] = initial[2]
            continue
        if op == 0x00:  # nop
            continue
        if op in (0x02, 0x03, 0x04):  # advance_loc1/2/4
            size = {0x02: 1, 0x03: 2, 0x04: 4}[op]
            delta = int.from_bytes(program[pos : pos + size], "little")
            pos += size
            rows.append((loc, *state))
            loc += delta * code_align
        elif op == 0x01:  # set_loc: not produced for .eh_frame by compilers
            raise ValueError("set_loc")
        elif op in (0x05, 0x11):  # offset_extended(_sf)
            reg, pos = _leb(program, pos, False)
            off, pos = _leb(program, pos, op == 0x11)
            if reg == _RBP:
                state[2] = -off * data_align // 8
        elif op in (0x06, 0x08):  # restore_extended, same_value
            reg, pos = _leb(program, pos, False)
            if reg == _RBP:
                state[2] = initial[2] if op == 0x06 else 0
        elif op == 0x07:  # undefined
            reg, pos = _leb(program, pos, False)
            if reg == _RA:
                state[0] = RULE_END
        elif op == 0x09:  # register
            reg, pos = _leb(program, pos, False)
            _, pos = _leb(program, pos, False)
            if reg == _RBP:
                state[2] = 0  # kept in another register: not followed
        elif op == 0x0A:  # remember_state
            stack.append(list(state))
        elif op == 0x0B:  # restore_state
            if stack:
                state[:] = stack.pop()
        elif op in (0x0C, 0x12):  # def_cfa(_sf)
            reg, pos = _leb(program, pos, False)
            off, pos = _leb(program, pos, op == 0x12)
            if op == 0x12:
                off *= data_align
            state[0] = {_RSP: RULE_RSP, _RBP: RULE_RBP}.get(reg, RULE_UNKNOWN) if state[0] != RULE_END else RULE_END
            state[1] = off
        elif op == 0x0D:  # def_cfa_register
            reg, pos = _leb(program, pos, False)
            if state[0] != RULE_END:
                state[0] = {_RSP: RULE_RSP, _RBP: RULE_RBP}.get(reg, RULE_UNKNOWN)
        elif op in (0x0E, 0x13):  # def_cfa_offset(_sf)
            off, pos = _leb(program, pos, op == 0x13)
            state[1] = off * data_align if op == 0x13 else off
        elif op == 0x0F:  # def_cfa_expression
            size, pos = _leb(program, pos, False)
            pos += size
            if state[0] != RULE_END:
                state[0] = RULE_UNKNOWN
        elif op in (0x10, 0x16):  # expression, val_expression
            reg, pos = _leb(program, pos, False)
            size, pos = _leb(program, pos, False)
            pos += size
            if reg == _RBP:
                state[2] = 0
        elif op == 0x14:  # val_offset
            _, pos = _leb(program, pos, False)
            _, pos = _leb(program, pos, False)
        elif op == 0x15:  # val_offset_sf
            _, pos = _leb(program, pos, False)
            _, pos = _leb(program, pos, True)
        elif op == 0x2E:  # GNU_args_size
            _, pos = _leb(program, pos, False)
        elif op == 0x2F:  # GNU_negative_offset_extended
            reg, pos = _leb(program, pos, False)
            off, pos = _leb(program, pos, False)
            if reg == _RBP:
                state[2] = off * data_align // 8
        else:
            raise ValueError(f"CFA opcode 0x{op:x}")
    rows.append((loc, *state))


def unwind_rows(data: bytes, section_vaddr: int, little_endian: bool = True) -> list[tuple[int, int, int, int]]:
    """(address, rule, cfa offset, rbp slot) rows of an .eh_frame section,
    sorted by address: each holds from its address to the next row's. The
    rbp slot n means the caller's rbp is saved at CFA - 8n (0: rbp is not
    saved, it still holds the caller's). A function's end starts a
    RULE_NONE row unless another function starts there."""
    if not little_endian:
        return []
    end = "<"
    cies: dict[int, object] = {}
    by_function: list[list] = []
    for body, stop, cie_pointer in _records(data, end):
        if not cie_pointer:
            continue
        try:
            cie_at = body - cie_pointer
            if cie_at not in cies:
                try:
                    cies[cie_at] = _cie_of(data, cie_at, end, section_vaddr)
                except (ValueError, IndexError, struct.error):
                    cies[cie_at] = None
            cie = cies[cie_at]
            if cie is None:
                continue
            enc, has_aug, code_align, data_align, initial_program = cie
            at = body + 4
            start, at = _encoded(data, at, enc, end, section_vaddr + at)
            size, at = _encoded(data, at, enc & 0x0F, end, 0)
            if not start or not size:
                continue
            if has_aug:
                aug_len, at = _leb(data, at, False)
                at += aug_len
            state = [RULE_UNKNOWN, 0, 0]
            rows: list = []
            _run_cfa(initial_program, start, state, state, [], code_align, data_align, [])
            initial = list(state)
            _run_cfa(data[at:stop], start, state, initial, rows, code_align, data_align, [])
            fn = []
            for row in rows:
                if row[0] >= start + size:
                    break
                if fn and fn[-1][0] == row[0]:
                    fn[-1] = row
                else:
                    fn.append(row)
            by_function.append((start, start + size, fn))
        except (ValueError, IndexError, struct.error):
            continue
    by_function.sort(key=lambda f: f[0])
    out: list[tuple[int, int, int, int]] = []
    for i, (start, stop, fn) in enumerate(by_function):
        for loc, rule, off, slot in fn:
            if rule in (RULE_RSP, RULE_RBP) and not 0 < off <= MAX_CFA_OFFSET:
                rule, off = RULE_UNKNOWN, 0
            if not 0 <= slot <= MAX_RBP_SLOT:
                slot = 0
            row = (loc, rule, off if rule in (RULE_RSP, RULE_RBP) else 0, slot)
            if out and out[-1][0] >= loc:
                out[-1] = row  # overlapping FDEs: the later start wins
            elif not out or out[-1][1:] != row[1:]:
                out.append(row)
        following = by_function[i + 1][0] if i + 1 < len(by_function) else None
        if following is None or following > stop:
            out.append((stop, RULE_NONE, 0, 0))
    return out


def keeps_frame_pointers(rows: list[tuple[int, int, int, int]]) -> bool:
    """Whether the code these rows describe was built with frame pointers:
    nearly every frame that grows past its return address is then found
    from rbp, and a frame-pointer walk through it is exact (and cheaper
    than a table search)."""
    grown = on_rbp = 0
    for _, rule, off, _ in rows:
        if rule == RULE_RBP:
            on_rbp += 1
        elif rule == RULE_RSP and off > 16:
            grown += 1
    return on_rbp > 0 and grown <= on_rbp // 20
