"""The frame sizes of a HotSpot JVM's compiled code, read from outside.

Compiled Java methods (C1, C2), native-method wrappers and runtime stubs
keep no frame pointer unless the JVM runs with -XX:+PreserveFramePointer,
but each has a fixed frame size (CodeBlob::_frame_size, in words): at any
call in it, its caller's frame starts that far above its stack pointer.
The frame walk (bpf/jvm.bpf.c) steps such a frame by its size; this module
lists them from the code cache: each CodeHeap (CodeCache::_heaps) is a run
of HeapBlocks, a block's first segment marked 0 in the heap's segment map,
and a used block holds one CodeBlob. Everything is read at the offsets
libjvm.so exports (memtrace.jvm.vmstructs), and is the target's data,
changing while we read: each length is bounded, and a blob that does not
hold together is left out (its frames then end the walk, as before)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from memtrace.jvm.vmstructs import Reader, VMStructs, u64

MAX_HEAPS = 4  # JDK 17: non-nmethods, profiled, non-profiled (one when not segmented); bpf/memtrace.h
MAX_CODE_BYTES = 1 << 30  # committed code cache read, at most (JDK 17 reserves 240 MiB)
MAX_FRAME_WORDS = 1 << 16  # a larger "frame size" is not one (bpf/memtrace.h)
WINDOW = 1 << 20  # the code heap is read this much at a time

FIELDS = {
    "heaps_len": ("GrowableArrayBase", "_len"),
    "heaps_data": ("GrowableArray<int>", "_data"),
    "memory": ("CodeHeap", "_memory"),
    "segmap": ("CodeHeap", "_segmap"),
    "log2_segment": ("CodeHeap", "_log2_segment_size"),
    "low_boundary": ("VirtualSpace", "_low_boundary"),
    "high": ("VirtualSpace", "_high"),
    "high_boundary": ("VirtualSpace", "_high_boundary"),
    "block_header_at": ("HeapBlock", "_header"),
    "block_length": ("HeapBlock::Header", "_length"),
    "block_used": ("HeapBlock::Header", "_used"),
    "blob_size": ("CodeBlob", "_size"),
    "frame_size": ("CodeBlob", "_frame_size"),
    "data_offset": ("CodeBlob", "_data_offset"),
    "content_begin": ("CodeBlob", "_content_begin"),
}


class Layout:
    """The offsets the code cache reader needs, from one JVM's tables."""

    def __init__(self, structs: VMStructs) -> None:
        missing = [f"{t}::{f}" for t, f in FIELDS.values() if (t, f) not in structs.offsets]
        heaps = structs.addresses.get(("CodeCache", "_heaps"))
        if heaps is None:
            missing.append("CodeCache::_heaps")
        if "HeapBlock" not in structs.sizes:
            missing.append("HeapBlock")
        if missing:
            raise ValueError("this JVM's VMStructs lack " + ", ".join(missing))
        for name, key in FIELDS.items():
            setattr(self, name, structs.offsets[key])
        self.heaps = heaps
        self.block_header = structs.sizes["HeapBlock"]  # the CodeBlob follows it
        self.blob_fields = max(self.blob_size + 4, self.frame_size + 4, self.data_offset + 4,
                               self.content_begin + 8)
        self.used_at = self.block_header_at + self.block_used
        self.length_at = self.block_header_at + self.block_length
        if self.length_at + 8 > self.block_header or self.used_at >= self.block_header:
            raise ValueError("this JVM's HeapBlock is not a header of its length and used flag")

    def walk_fields(self) -> dict[str, int]:
        """What the walk reads of a block and its blob (jvm_code_head's
        fields)."""
        return {"block_header": self.block_header, "used_at": self.used_at,
                "frame_size_at": self.frame_size, "data_offset_at": self.data_offset,
                "content_begin_at": self.content_begin}


@dataclass(frozen=True)
class CodeHeap:
    """Where the walk finds code newer than the ranges (bpf/jvm.bpf.c)."""

    lo: int  # reserved: [low_boundary, high_boundary)
    hi: int
    segmap: int
    log2_segment: int


@dataclass(frozen=True)
class CompiledCode:
    """Code with fixed-size frames, sorted by start: (start, size,
    frame_bytes) each, within [lo, hi); and the code heaps."""

    ranges: tuple[tuple[int, int, int], ...]
    lo: int
    hi: int
    heaps: tuple[CodeHeap, ...]


class _Window:
    """Reads of one code heap, which go up through it: served from a
    window of WINDOW bytes read at once (a read per block is a syscall
    each, for thousands of blocks), and parsed in place."""

    def __init__(self, read: Reader, lo: int, hi: int) -> None:
        self.read, self.lo, self.hi = read, lo, hi
        self.start, self.data = 0, b""

    def at(self, address: int, size: int) -> Optional[tuple[bytes, int]]:
        """(buffer, offset) where the `size` bytes at `address` are."""
        if not (self.lo <= address and address + size <= self.hi):
            return None
        if not (self.start <= address and address + size <= self.start + len(self.data)):
            length = min(max(WINDOW, size), self.hi - address)
            self.data = self.read(address, length) or b""
            self.start = address
            if len(self.data) < size:
                return None
        return self.data, address - self.start


def read_compiled_code(read: Reader, layout: Layout,
                       interpreter: Optional[tuple[int, int]] = None) -> Optional[CompiledCode]:
    """The code blobs with a frame size in every code heap; None when the
    code cache cannot be read (not set up yet)."""
    array = u64(read, layout.heaps)
    if not array:
        return None
    raw = read(array + layout.heaps_len, 4)
    data = u64(read, array + layout.heaps_data)
    if raw is None or not data:
        return None
    count = struct.unpack("<i", raw)[0]
    if not 0 < count <= MAX_HEAPS:
        return None
    ranges: list[tuple[int, int, int]] = []
    heaps: list[CodeHeap] = []
    budget = MAX_CODE_BYTES
    for i in range(count):
        heap = u64(read, data + 8 * i)
        if heap:
            budget -= _read_heap(read, layout, heap, budget, ranges, heaps)
    if interpreter is not None:  # its frames are walked by their frame pointer
        ranges = [r for r in ranges
                  if r[0] + r[1] <= interpreter[0] or r[0] >= interpreter[1]]
    ranges.sort()
    # Overlaps mean a block changed under our reads: keep neither.
    kept = [r for k, r in enumerate(ranges)
            if (k == 0 or ranges[k - 1][0] + ranges[k - 1][1] <= r[0])
            and (k + 1 == len(ranges) or r[0] + r[1] <= ranges[k + 1][0])]
    if not kept:
        return CompiledCode((), 0, 0, tuple(heaps))
    return CompiledCode(tuple(kept), kept[0][0], kept[-1][0] + kept[-1][1], tuple(heaps))


def _read_heap(read: Reader, layout: Layout, heap: int, budget: int,
               out: list[tuple[int, int, int]], heaps: list[CodeHeap]) -> int:
    """Appends one CodeHeap's blobs to out, and the heap to heaps; the
    bytes of code read."""
    low = u64(read, heap + layout.memory + layout.low_boundary)
    high = u64(read, heap + layout.memory + layout.high)
    reserved = u64(read, heap + layout.memory + layout.high_boundary)
    segmap_low = u64(read, heap + layout.segmap + layout.low_boundary)
    raw = read(heap + layout.log2_segment, 4)
    if not low or not high or not reserved or not segmap_low or raw is None:
        return 0
    log2 = struct.unpack("<i", raw)[0]
    if not 4 <= log2 <= 16 or not low < high <= reserved or high - low > budget:
        return 0
    heaps.append(CodeHeap(low, reserved, segmap_low, log2))
    segments = (high - low) >> log2
    segmap = read(segmap_low, segments)
    if segmap is None:
        return 0
    code = _Window(read, low, high)
    at = 0
    while at < segments:
        if segmap[at] != 0:  # not a block's first segment: past the heap's end
            break
        block = low + (at << log2)
        whole = code.at(block, layout.block_header + layout.blob_fields)
        found = whole or code.at(block, layout.block_header)  # a last block may be smaller
        if found is None:
            break
        data, offset = found
        length = struct.unpack_from("<Q", data, offset + layout.length_at)[0]
        if not 0 < length <= segments - at:
            break
        if whole and data[offset + layout.used_at]:
            blob = _blob(data, offset + layout.block_header, layout, block + layout.block_header,
                         length << log2)
            if blob is not None:
                out.append(blob)
        at += length
    return high - low


def _blob(data: bytes, offset: int, layout: Layout, blob: int,
          room: int) -> Optional[tuple[int, int, int]]:
    """(start, size, frame_bytes) of the code of the CodeBlob at `blob`
    (its fields in data at offset), None when it has no frame size or does
    not fit its block."""
    size = struct.unpack_from("<i", data, offset + layout.blob_size)[0]
    words = struct.unpack_from("<i", data, offset + layout.frame_size)[0]
    if not 0 < words < MAX_FRAME_WORDS:
        return None  # most blobs of the non-method heap: buffers, adapters, the interpreter
    data_offset = struct.unpack_from("<i", data, offset + layout.data_offset)[0]
    content = struct.unpack_from("<Q", data, offset + layout.content_begin)[0]
    if not 0 < data_offset <= size <= room:
        return None
    end = blob + data_offset  # the content (constants, instructions, stubs) ends where data begins
    if not blob < content < end:
        return None
    return content, end - content, words * 8
