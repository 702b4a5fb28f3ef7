"""memtrace.symbols.gopclntab on tables made here: the Go 1.18+ layout read
as the runtime reads it, and a damaged table left alone, never an error.
Real Go programs are read in tests/integration/test_names.py."""

from __future__ import annotations

import random
import struct

from memtrace.symbols.gopclntab import go_functions


def table(functions: list[tuple[str, int]], text_end: int, text_start: int = 0x401000,
          magic: int = 0xFFFFFFF1) -> bytes:
    """A .gopclntab: header, names, then the function table and records."""
    names = b"".join(name.encode() + b"\0" for name, _ in functions)
    names_at = 72
    functab_at = names_at + len(names)
    n = len(functions)
    records_at = 8 * (n + 1)  # from functab_at
    functab, records, name_off = b"", b"", 0
    for i, (name, entry) in enumerate(functions):
        functab += struct.pack("<II", entry, records_at + 8 * i)
        records += struct.pack("<Ii", entry, name_off)
        name_off += len(name) + 1
    functab += struct.pack("<II", text_end, 0)
    header = struct.pack("<IBBBB", magic, 0, 0, 1, 8) + struct.pack(
        "<QQQQQQQQ", n, 0, text_start, names_at, 0, 0, 0, functab_at)
    return header + names + functab + records


def test_functions_with_their_ranges():
    data = table([("runtime.mallocgc", 0x0), ("main.main", 0x120), ("main.leak", 0x200)], 0x280)
    assert go_functions(data, 0) == [("runtime.mallocgc", 0x401000, 0x401120),
                                     ("main.main", 0x401120, 0x401200),
                                     ("main.leak", 0x401200, 0x401280)]
    # A position-independent program leaves textStart to the loader.
    pie = table([("main.main", 0x10)], 0x40, text_start=0)
    assert go_functions(pie, 0x2000) == [("main.main", 0x2010, 0x2040)]


def test_other_layouts_and_damage_give_nothing():
    good = table([("main.main", 0x0), ("main.leak", 0x40)], 0x80)
    assert go_functions(table([("main.main", 0)], 8, magic=0xFFFFFFFA), 0) == []  # Go 1.16
    assert go_functions(good[:40], 0) == [] and go_functions(b"", 0) == []
    rng = random.Random(7)
    for _ in range(2000):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = bytes(damaged[: rng.randint(0, len(damaged))]) if rng.random() < 0.3 else bytes(damaged)
        for name, start, end in go_functions(cut, 0):
            assert isinstance(name, str) and start <= end
