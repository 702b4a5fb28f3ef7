"""The unwind rows the BPF walk reads, from hand-made .eh_frame sections:
ehframe.unwind_rows runs the CFA programs, collect/unwind places the rows
where a mapping puts the code."""

from __future__ import annotations

import struct

from memtrace.collect.unwind import _layout_of, _place
from memtrace.symbols.ehframe import (RULE_END, RULE_NONE, RULE_RBP, RULE_RSP, keeps_frame_pointers,
                              unwind_rows)
from memtrace.symbols.elf import Segment, UnwindInfo, unpack_step

SECTION_VADDR = 0x2000


def cie(initial: bytes) -> bytes:
    """A CIE with augmentation "zR" (FDE addresses pc-relative sdata4),
    code alignment 1, data alignment -8, return address in register 16."""
    body = struct.pack("<I", 0) + b"\x01zR\x00" + b"\x01" + b"\x78" + b"\x10" + b"\x01\x1b" + initial
    body += b"\x00" * (-(len(body) + 4) % 8)
    return struct.pack("<I", len(body)) + body


def fde(at: int, cie_at: int, start: int, size: int, program: bytes) -> bytes:
    """An FDE at section offset `at` for [start, start + size)."""
    pc_field = SECTION_VADDR + at + 8
    body = struct.pack("<I", at + 4 - cie_at) + struct.pack("<ii", start - pc_field, size)
    body += b"\x00" + program
    body += b"\x00" * (-(len(body) + 4) % 8)
    return struct.pack("<I", len(body)) + body


# def_cfa(rsp, 8); offset(ra, cfa-8)
INITIAL = b"\x0c\x07\x08\x90\x01"


def section(*functions: tuple[int, int, bytes]) -> bytes:
    data = cie(INITIAL)
    for start, size, program in functions:
        data += fde(len(data), 0, start, size, program)
    return data + struct.pack("<I", 0)


def test_a_frame_pointer_function_moves_its_cfa_to_rbp():
    # push %rbp (+1); mov %rsp,%rbp (+3); ...; leave at +24
    program = (b"\x41" + b"\x0e\x10" + b"\x86\x02"  # advance 1; cfa rsp+16; rbp at cfa-16
               + b"\x43" + b"\x0d\x06"               # advance 3; cfa register rbp
               + b"\x54" + b"\x0c\x07\x08")          # advance 20; cfa rsp+8
    rows = unwind_rows(section((0x1000, 40, program)), SECTION_VADDR)
    assert rows == [
        (0x1000, RULE_RSP, 8, 0),
        (0x1001, RULE_RSP, 16, 2),
        (0x1004, RULE_RBP, 16, 2),
        (0x1018, RULE_RSP, 8, 2),
        (0x1028, RULE_NONE, 0, 0),
    ]
    assert keeps_frame_pointers(rows)


def test_pushes_without_a_frame_pointer_and_state_kept_across_an_epilogue():
    program = (b"\x42" + b"\x0e\x10"       # advance 2; push %r12: cfa rsp+16
               + b"\x41" + b"\x0e\x18" + b"\x86\x03"  # push %rbp: cfa rsp+24, rbp at cfa-24
               + b"\x44" + b"\x0e\xe0\x01"  # sub $0xc0: cfa rsp+224
               + b"\x0a"                   # remember_state
               + b"\x50" + b"\x0e\x08"     # advance 16; epilogue: cfa rsp+8
               + b"\x41" + b"\x0b")        # advance 1; restore_state: the body again
    rows = unwind_rows(section((0x3000, 64, program), (0x3040, 8, b"")), SECTION_VADDR)
    assert rows == [
        (0x3000, RULE_RSP, 8, 0),
        (0x3002, RULE_RSP, 16, 0),
        (0x3003, RULE_RSP, 24, 3),
        (0x3007, RULE_RSP, 224, 3),
        (0x3017, RULE_RSP, 8, 3),
        (0x3018, RULE_RSP, 224, 3),
        (0x3040, RULE_RSP, 8, 0),  # the next function starts where this one ends
        (0x3048, RULE_NONE, 0, 0),
    ]
    assert not keeps_frame_pointers(rows)


def test_an_undefined_return_address_ends_the_stack():
    rows = unwind_rows(section((0x500, 16, b"\x41\x07\x10")), SECTION_VADDR)  # undefined(ra)
    assert rows[:2] == [(0x500, RULE_RSP, 8, 0), (0x501, RULE_END, 0, 0)]


def test_a_corrupt_record_ends_reading_without_an_error():
    data = section((0x1000, 8, b""))[:-4] + b"\xff\xff\xff\x7f" + b"\x00" * 8
    assert unwind_rows(data, SECTION_VADDR)[0] == (0x1000, RULE_RSP, 8, 0)


def test_rows_are_placed_where_the_mapping_puts_the_code():
    rows = [(0x1000, RULE_RSP, 8, 0), (0x1800, RULE_RSP, 16, 0), (0x2400, RULE_NONE, 0, 0),
            (0x9000, RULE_RSP, 8, 0)]
    # text at file offset 0x1000 = vaddr 0x1000, mapped from file offset 0x1800
    info = UnwindInfo.of_rows([Segment(0x1000, 0x1000, 0x8000)], rows, False)
    offsets, steps = _place(info, 0x7F0000000000, 0x7F0000001000, 0x1800)
    assert [(x, *unpack_step(s)) for x, s in zip(offsets, steps)] == [
        (0, RULE_RSP, 16, 0), (0xC00, RULE_NONE, 0, 0)]


def test_a_table_is_laid_out_as_the_walk_reads_it():
    rows = [(0x1000, RULE_RSP, 8, 0), (0x1800, RULE_RBP, 16, 2), (0x3010, RULE_NONE, 0, 0)]
    info = UnwindInfo.of_rows([Segment(0x1000, 0x1000, 0x8000)], rows, False)
    layout = _layout_of(info, 0x3000, 0x1000)
    assert layout.count == 3
    assert layout.rows == struct.pack("<" + "IHBB" * 3, 0, 8, RULE_RSP, 0, 0x800, 16, RULE_RBP, 2,
                                      0x2010, 0, RULE_NONE, 0)
    # the row holding at the start of each page (and at the end)
    assert layout.first_rows == [0, 1, 1, 2]
    assert _layout_of(info, 0x3000, 0x1000) is layout  # laid out once
