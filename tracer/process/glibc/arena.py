"""Inspect one arena: its header, free lists, top chunk and trim estimate."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

from .freelists import FreeLists, Region, region_of, walk_free_lists
from .layout import (
    CHUNK_HEAD_SIZE,
    HEAP_MAX_SIZE,
    MALLOC_STATE_SIZE,
    NONCONTIGUOUS_BIT,
    OFF_FASTBINS,
    ArenaHeader,
    parse_arena_header,
    parse_chunk_head,
)
from ..procfs import Mapping
from .report import Arena, Heap
from .trim import trim_ranges

# Re-reads of an arena that changed while its lists were being walked.
ATTEMPTS = 3
# Problems listed per arena; the rest are implied by `reliable`.
_MAX_PROBLEM_NOTES = 5


class Memory(Protocol):
    def read(self, address: int, size: int) -> Optional[bytes]: ...

    def resident_bytes(self, start: int, end: int) -> Optional[int]: ...

    def forget(self) -> None: ...


class _Notes(list):
    def add(self, text: str) -> None:
        if text not in self:
            self.append(text)


def inspect_arena(
    memory: Memory,
    address: int,
    kind: str,
    heaps: Sequence[Heap],
    maps: Sequence[Mapping],
    max_chunks: int,
) -> Arena:
    """`heaps` are the arena's memory: its thread heaps, or the brk heap."""
    notes = _Notes()
    regions = [(h.address, h.address + h.size) for h in heaps]
    snapshot = _read_consistent(memory, address, kind, regions, maps, max_chunks, notes)
    if snapshot is None:
        return _unreadable(address, kind, heaps)
    header, lists, top_bytes = snapshot

    for problem in lists.problems[:_MAX_PROBLEM_NOTES]:
        notes.add(problem)
    if lists.truncated:
        notes.add(f"more than {max_chunks} free chunks: walk stopped, free bytes undercounted")
    _check_sizes(header, kind, heaps, notes)

    trimmable = 0
    if top_bytes is not None and not lists.problems:
        brk = regions[0][1] if kind == "main" and regions else None
        chunks = [(c.address, c.size) for c in lists.chunks]
        for start, end in trim_ranges(chunks, header.top, top_bytes, brk):
            resident = memory.resident_bytes(start, end)
            if resident is None:
                notes.add("pagemap unreadable: trim estimate assumes free pages are resident")
                resident = end - start
            trimmable += resident

    sizes = [c.size for c in lists.chunks]
    return Arena(
        address=address,
        kind=kind,
        heaps=tuple(heaps),
        system_mem=header.system_mem,
        max_system_mem=header.max_system_mem,
        attached_threads=header.attached_threads,
        top_address=header.top,
        top_bytes=top_bytes or 0,
        fastbin_bytes=lists.bytes_of("fast"),
        unsorted_bytes=lists.bytes_of("unsorted"),
        smallbin_bytes=lists.bytes_of("small"),
        largebin_bytes=lists.bytes_of("large"),
        free_chunk_count=len(sizes),
        largest_free_chunk_bytes=max(sizes, default=0),
        trimmable_bytes=trimmable,
        reliable=not notes,
        notes=tuple(notes),
    )


_Snapshot = tuple[ArenaHeader, FreeLists, Optional[int]]


def _read_consistent(
    memory: Memory,
    address: int,
    kind: str,
    regions: list[Region],
    maps: Sequence[Mapping],
    max_chunks: int,
    notes: _Notes,
) -> Optional[_Snapshot]:
    """Header, free lists and top size, read again while the header changed
    under the walk (the target keeps allocating), up to ATTEMPTS times."""
    snapshot: Optional[_Snapshot] = None
    snapshot_notes = _Notes()
    stable = False
    for _ in range(ATTEMPTS):
        memory.forget()
        before = memory.read(address, MALLOC_STATE_SIZE)
        if before is None:
            break
        header = parse_arena_header(address, before)
        where = _chunk_regions(header, kind, regions, maps)
        snapshot_notes = _Notes()
        lists = walk_free_lists(memory, header, where, max_chunks)
        top_bytes = _top_size(memory, header, where, snapshot_notes)
        snapshot = (header, lists, top_bytes)
        memory.forget()
        after = memory.read(address, MALLOC_STATE_SIZE)
        # The lists and sizes must hold still; the mutex word never does.
        if after is not None and after[OFF_FASTBINS:] == before[OFF_FASTBINS:]:
            stable = True
            break
    if snapshot is None:
        return None
    if not stable:
        notes.add("arena kept changing while read (busy): figures are approximate")
    for note in snapshot_notes:
        notes.add(note)
    if kind == "main" and snapshot[0].flags & NONCONTIGUOUS_BIT:
        notes.add("main arena is not contiguous (brk failed): chunks outside [heap] may be missed")
    return snapshot


def _chunk_regions(
    header: ArenaHeader, kind: str, regions: list[Region], maps: Sequence[Mapping]
) -> list[Region]:
    """Where this arena's chunks may lie. A main arena that fell back to mmap
    when brk failed also has chunks in anonymous mappings."""
    if kind == "main" and header.flags & NONCONTIGUOUS_BIT:
        return regions + [
            (m.start, m.end)
            for m in maps
            if m.is_plain_anonymous and m.writable and m.start % HEAP_MAX_SIZE
        ]
    return regions


def _top_size(
    memory: Memory, header: ArenaHeader, regions: Sequence[Region], notes: _Notes
) -> Optional[int]:
    if header.top in (0, header.initial_top) and header.system_mem == 0:
        return 0  # nothing allocated in this arena yet
    data = memory.read(header.top, CHUNK_HEAD_SIZE) if header.top else None
    if data is None:
        notes.add(f"top chunk {header.top:#x} unreadable")
        return None
    size = parse_chunk_head(header.top, data).size
    region = region_of(header.top, size, regions)
    if region is None:
        notes.add(f"top chunk {header.top:#x} (size {size:#x}) lies outside the arena's heaps")
        return None
    if header.top + size != region[1]:
        notes.add("top chunk does not end its heap")
    return size


def _check_sizes(header: ArenaHeader, kind: str, heaps: Sequence[Heap], notes: _Notes) -> None:
    if not heaps:
        notes.add("no heap found for this arena")
        return
    used = sum(h.size for h in heaps)
    if kind == "thread" and used != header.system_mem:
        notes.add(f"heaps hold {used} bytes but system_mem says {header.system_mem}")
    if kind == "main" and header.system_mem > used and not header.flags & NONCONTIGUOUS_BIT:
        notes.add(f"system_mem {header.system_mem} exceeds the brk heap ({used} bytes)")
    if header.max_system_mem < header.system_mem:
        notes.add("max_system_mem is below system_mem")


def _unreadable(address: int, kind: str, heaps: Sequence[Heap]) -> Arena:
    empty = dict.fromkeys(
        (
            "system_mem", "max_system_mem", "attached_threads", "top_address", "top_bytes",
            "fastbin_bytes", "unsorted_bytes", "smallbin_bytes", "largebin_bytes",
            "free_chunk_count", "largest_free_chunk_bytes", "trimmable_bytes",
        ),
        0,
    )
    return Arena(
        address=address,
        kind=kind,
        heaps=tuple(heaps),
        reliable=False,
        notes=(f"arena at {address:#x} unreadable",),
        **empty,
    )
