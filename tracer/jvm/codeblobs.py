"""What a HotSpot JVM runs at a pc of its code heaps, read from the heap
itself, as the JVM's serviceability agent does: the segment map leads back
to the block's start (memtrace.jvm.codecache), the block holds one
CodeBlob, whose `_name` says what it is ("nmethod" for a JIT-compiled
method, "native nmethod" for a native method's wrapper, "StubRoutines (1)",
"Interpreter"... for the rest), and an nmethod's `_method` is the Method*
it was compiled from (named by memtrace.jvm.methods).

This names the frames of code the JIT compiled and freed between two of
the JVM's perf maps (C1's code replaced by C2's): the stack is read within
a second of its first allocation, while its code is nearly always still
there. The text is the perf map's: the method, or the blob's name, and the
offset from the blob's first instruction. Everything read is the target's
data: a block not in use, a pc outside the blob's code, a name that is no
short printable string, are not named."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from memtrace.jvm import codecache
from memtrace.jvm.vmstructs import Reader, VMStructs, c_string

# An nmethod's Method*: CompiledMethod's up to JDK 22, nmethod's since.
METHOD_FIELDS = (("CompiledMethod", "_method"), ("nmethod", "_method"))
NMETHOD_NAMES = frozenset({"nmethod", "native nmethod"})
MAX_BLOB_NAME = 128
SEGMAP_WINDOW = 4096  # segment marks read back from a pc's: a blob spans fewer


class Layout:
    """The offsets of a CodeBlob's fields, from one JVM's tables."""

    def __init__(self, structs: VMStructs, heaps: codecache.Layout) -> None:
        missing = []
        self.heaps = heaps
        self.name_at = structs.offsets.get(("CodeBlob", "_name"))
        if self.name_at is None:
            missing.append("CodeBlob::_name")
        self.method_at = next((structs.offsets[f] for f in METHOD_FIELDS if f in structs.offsets),
                              None)
        if self.method_at is None:
            missing.append("nmethod::_method")
        # The code's first instruction: a pointer up to JDK 22, an offset since.
        self.code_begin_at = structs.offsets.get(("CodeBlob", "_code_begin"))
        self.code_offset_at = structs.offsets.get(("CodeBlob", "_code_offset"))
        if self.code_begin_at is None and self.code_offset_at is None:
            missing.append("CodeBlob::_code_begin")
        if missing:
            raise ValueError("this JVM's VMStructs lack " + ", ".join(missing))
        fields = [self.name_at, self.method_at, heaps.data_offset,
                  self.code_begin_at if self.code_begin_at is not None else self.code_offset_at]
        self.span = heaps.block_header + max(fields) + 8  # block header and blob, in one read


@dataclass(frozen=True)
class Blob:
    start: int  # the CodeBlob's address
    name: str  # CodeBlob::_name
    method: int  # an nmethod's Method*; 0 for another blob
    code_begin: int  # its first instruction, where the perf map's offsets start

    @property
    def is_nmethod(self) -> bool:
        return self.name in NMETHOD_NAMES


def block_start(read: Reader, heap: codecache.CodeHeap, pc: int) -> Optional[int]:
    """The start of the heap block holding pc: the segment map holds, per
    segment, how many segments back its block's first one is (0: this one;
    0xFF: free), in hops of at most 0xFE."""
    segment = (pc - heap.lo) >> heap.log2_segment
    first = max(0, segment - SEGMAP_WINDOW + 1)
    marks = read(heap.segmap + first, segment - first + 1)
    if marks is None:
        return None
    at = segment
    while marks[at - first]:
        hop = marks[at - first]
        if hop == 0xFF or at - hop < first:
            return None
        at -= hop
    return heap.lo + (at << heap.log2_segment)


def blob_at(read: Reader, heaps, layout: Layout, pc: int) -> Optional[Blob]:
    """The code blob whose code holds pc, or None (no heap there, a free
    block, or what is there does not hold together)."""
    heap = next((h for h in heaps if h.lo <= pc < h.hi), None)
    if heap is None:
        return None
    block = block_start(read, heap, pc)
    raw = read(block, layout.span) if block is not None else None
    if raw is None or not raw[layout.heaps.used_at]:
        return None
    at = layout.heaps.block_header
    start = block + at
    data_offset = struct.unpack_from("<i", raw, at + layout.heaps.data_offset)[0]
    if layout.code_begin_at is not None:
        code_begin = struct.unpack_from("<Q", raw, at + layout.code_begin_at)[0]
    else:
        code_begin = start + struct.unpack_from("<i", raw, at + layout.code_offset_at)[0]
    if not 0 < data_offset < 1 << 30 or not start < code_begin <= pc < start + data_offset:
        return None
    name_ptr = struct.unpack_from("<Q", raw, at + layout.name_at)[0]
    name = c_string(read, name_ptr, MAX_BLOB_NAME)
    if not name or not name.isascii() or not name.isprintable():
        return None
    method = struct.unpack_from("<Q", raw, at + layout.method_at)[0] if name in NMETHOD_NAMES else 0
    return Blob(start, name, method, code_begin)

