"""Where a HotSpot JVM's compiled code is, for the frame walk.

Compiled Java methods (C1, C2), native-method wrappers and runtime stubs
keep no frame pointer unless the JVM runs with -XX:+PreserveFramePointer,
but each has a fixed frame size (CodeBlob::_frame_size, in words): at any
call in it, its caller's frame starts that far above its stack pointer.
The walk (bpf/jvm.bpf.c) finds a pc's code blob as the JVM does, in the
code heaps (CodeCache::_heaps): a heap's segment map leads from any segment
back to its block's first, and a used block holds one CodeBlob. This module
reads the heaps' bounds and segment maps, and the offsets of the fields
the walk reads, at the offsets libjvm.so exports (memtrace.jvm.vmstructs).
Everything read is the target's data: each count and bound is checked."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from memtrace.jvm.vmstructs import Reader, VMStructs, u64

MAX_HEAPS = 4  # JDK 17: non-nmethods, profiled, non-profiled; bpf/memtrace.h
MAX_FRAME_WORDS = 1 << 16  # a larger "frame size" is not one (bpf/memtrace.h)

FIELDS = {
    "heaps_len": ("GrowableArrayBase", "_len"),
    "heaps_data": ("GrowableArray<int>", "_data"),
    "memory": ("CodeHeap", "_memory"),
    "segmap": ("CodeHeap", "_segmap"),
    "log2_segment": ("CodeHeap", "_log2_segment_size"),
    "low_boundary": ("VirtualSpace", "_low_boundary"),
    "high_boundary": ("VirtualSpace", "_high_boundary"),
    "block_header_at": ("HeapBlock", "_header"),
    "block_used": ("HeapBlock::Header", "_used"),
    "frame_size": ("CodeBlob", "_frame_size"),
    "data_offset": ("CodeBlob", "_data_offset"),
    "content_begin": ("CodeBlob", "_content_begin"),
}


class Layout:
    """The offsets the code heap reader and the walk need, from one JVM's
    tables."""

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
        self.used_at = self.block_header_at + self.block_used
        if self.used_at >= self.block_header:
            raise ValueError("this JVM's HeapBlock holds no used flag in its header")

    def walk_fields(self) -> dict[str, int]:
        """What the walk reads of a block and its blob (jvm_code_head's
        fields)."""
        return {"block_header": self.block_header, "used_at": self.used_at,
                "frame_size_at": self.frame_size, "data_offset_at": self.data_offset,
                "content_begin_at": self.content_begin}


@dataclass(frozen=True)
class CodeHeap:
    lo: int  # reserved: [low_boundary, high_boundary)
    hi: int
    segmap: int  # its segment map's low_boundary
    log2_segment: int


def read_code_heaps(read: Reader, layout: Layout) -> Optional[tuple[CodeHeap, ...]]:
    """The JVM's code heaps; None when they cannot be read (the code cache
    not set up yet)."""
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
    heaps = []
    for i in range(count):
        heap = u64(read, data + 8 * i)
        found = _heap(read, layout, heap) if heap else None
        if found is None:
            return None
        heaps.append(found)
    spans = sorted((h.lo, h.hi) for h in heaps)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None  # heaps do not overlap: not the tables' layout
    return tuple(heaps)


def _heap(read: Reader, layout: Layout, heap: int) -> Optional[CodeHeap]:
    low = u64(read, heap + layout.memory + layout.low_boundary)
    high = u64(read, heap + layout.memory + layout.high_boundary)
    segmap = u64(read, heap + layout.segmap + layout.low_boundary)
    raw = read(heap + layout.log2_segment, 4)
    if not low or not high or not segmap or raw is None:
        return None
    log2 = struct.unpack("<i", raw)[0]
    if not 4 <= log2 <= 16 or not low < high or high - low > 1 << 40:
        return None
    return CodeHeap(low, high, segmap, log2)
