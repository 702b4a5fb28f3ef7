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
from dataclasses import dataclass, field
from typing import Optional

from memtrace.jvm import codecache
from memtrace.jvm.vmstructs import Reader, VMStructs, c_string

# An nmethod's Method*: CompiledMethod's up to JDK 22, nmethod's since.
METHOD_FIELDS = (("CompiledMethod", "_method"), ("nmethod", "_method"))
NMETHOD_NAMES = frozenset({"nmethod", "native nmethod"})
MAX_BLOB_NAME = 128
SEGMAP_WINDOWS = (128, 4096)  # segment marks read back from a pc's: a blob spans fewer


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
    # Its block, and the header's words read there: the same words at the
    # same block later mean the same blob (still_there).
    block: int = field(default=0, compare=False)
    header: tuple = field(default=(), compare=False)

    @property
    def is_nmethod(self) -> bool:
        return self.name in NMETHOD_NAMES


def block_start(read: Reader, heap: codecache.CodeHeap, pc: int) -> Optional[int]:
    """The start of the heap block holding pc: the segment map holds, per
    segment, how many segments back its block's first one is (0: this one;
    0xFF: free), in hops of at most 0xFE."""
    segment = (pc - heap.lo) >> heap.log2_segment
    for window in SEGMAP_WINDOWS:  # most blobs end within the first
        first = max(0, segment - window + 1)
        marks = read(heap.segmap + first, segment - first + 1)
        if marks is None:
            return None
        at = segment
        while marks[at - first] and marks[at - first] != 0xFF and at - marks[at - first] >= first:
            at -= marks[at - first]
        if not marks[at - first]:
            break
        if marks[at - first] == 0xFF or first == 0:
            return None
    else:
        return None
    return heap.lo + (at << heap.log2_segment)


def _header(read: Reader, layout: Layout, block: int) -> Optional[tuple[int, int, int, int]]:
    """(data offset, code begin, name pointer, method word) of the blob in
    a block in use; None for a free block."""
    raw = read(block, layout.span)
    if raw is None or not raw[layout.heaps.used_at]:
        return None
    at = layout.heaps.block_header
    data_offset = struct.unpack_from("<i", raw, at + layout.heaps.data_offset)[0]
    if layout.code_begin_at is not None:
        code_begin = struct.unpack_from("<Q", raw, at + layout.code_begin_at)[0]
    else:
        code_begin = block + at + struct.unpack_from("<i", raw, at + layout.code_offset_at)[0]
    name = struct.unpack_from("<Q", raw, at + layout.name_at)[0]
    method = struct.unpack_from("<Q", raw, at + layout.method_at)[0]
    return data_offset, code_begin, name, method


def blob_at(read: Reader, heaps, layout: Layout, pc: int) -> Optional[Blob]:
    """The code blob whose code holds pc, or None (no heap there, a free
    block, or what is there does not hold together)."""
    block = _block_of(read, heaps, pc)
    header = _header(read, layout, block) if block is not None else None
    if header is None:
        return None
    data_offset, code_begin, name_ptr, method = header
    start = block + layout.heaps.block_header
    if not 0 < data_offset < 1 << 30 or not start < code_begin <= pc < start + data_offset:
        return None
    name = c_string(read, name_ptr, MAX_BLOB_NAME)
    if not name or not name.isascii() or not name.isprintable():
        return None
    return Blob(start, name, method if name in NMETHOD_NAMES else 0, code_begin, block, header)


def still_there(read: Reader, heaps, layout: Layout, blob: Blob, pc: int) -> bool:
    """Whether pc is still in the blob found there before: the same block
    (the segment map), whose header holds the same words (a block freed
    and given to new code holds another blob's). The blob's name and
    Method* need not be read again."""
    return _block_of(read, heaps, pc) == blob.block and _header(read, layout, blob.block) == blob.header


def _block_of(read: Reader, heaps, pc: int) -> Optional[int]:
    heap = next((h for h in heaps if h.lo <= pc < h.hi), None)
    return block_start(read, heap, pc) if heap is not None else None
