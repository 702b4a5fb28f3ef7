"""Function names of a Go program from its .gopclntab, the table Go's own
runtime reads to name its frames (runtime/symtab.go). Go binaries are
shipped stripped (Debian's prometheus has no .symtab), and Go code has no
.eh_frame, so without this table its frames had no name and no function
start: `[prometheus]`.

Layout of Go 1.18 and later (magic 0xfffffff0; 0xfffffff1 since 1.20, the
same fields): a header (pcHeader), then at pclnOffset the function table,
nfunc + 1 pairs of 32-bit (entry offset from textStart, offset of the
function's _func record), the last pair's entry being the end of the text;
a _func record begins with its entry offset and the offset of its name in
the name table (funcnameOffset). Earlier layouts are left alone.
"""

from __future__ import annotations

import struct

MAGICS = (0xFFFFFFF0, 0xFFFFFFF1)
MAX_FUNCTIONS = 1 << 20  # more than any real program: a damaged table is left alone
MAX_NAME = 4096


def go_functions(table: bytes, text_addr: int, little: bool = True) -> list[tuple[str, int, int]]:
    """(name, start, end) of each function in .gopclntab's bytes; empty for
    a layout not read here or a table that does not hold together.
    text_addr: the .text section's address, where a position-independent
    program's header leaves textStart 0 for the loader to relocate."""
    end = "<" if little else ">"
    if len(table) < 72:
        return []
    magic, = struct.unpack_from(end + "I", table, 0)
    pad1, pad2, _min_lc, ptr_size = table[4:8]
    if magic not in MAGICS or pad1 or pad2 or ptr_size != 8:
        return []
    nfunc, _nfiles, text_start, names_at, _cu, _files, _pc, functab_at = \
        struct.unpack_from(end + "QQQQQQQQ", table, 8)
    if not 0 < nfunc <= MAX_FUNCTIONS or functab_at + 8 * (nfunc + 1) > len(table) \
            or names_at >= len(table):
        return []
    text_start = text_start or text_addr
    pairs = list(struct.iter_unpack(end + "II", table[functab_at:functab_at + 8 * (nfunc + 1)]))
    out = []
    for (entry, record), (next_entry, _) in zip(pairs, pairs[1:]):
        at = functab_at + record
        if at + 8 > len(table) or next_entry < entry:
            return []
        record_entry, name_off = struct.unpack_from(end + "Ii", table, at)
        if record_entry != entry or name_off < 0:
            return []
        start = names_at + name_off
        stop = table.find(b"\0", start, start + MAX_NAME)
        if stop < 0:
            return []
        out.append((table[start:stop].decode(errors="replace"), text_start + entry, text_start + next_entry))
    return out
