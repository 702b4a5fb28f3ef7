"""Find a process's heaps and arenas, including glibc's `main_arena`.

Thread arena heaps are found from /proc/PID/maps alone: each is anonymous
memory starting on a HEAP_MAX_SIZE boundary with a `heap_info` header whose
`ar_ptr` names its arena. `main_arena` is a static inside libc.so.6, which
distributions ship stripped, so it is found without symbols: first through
the arenas' circular `next` list (the one member not living in a heap), and
failing that (a single-arena process) by scanning libc's writable data for
a `malloc_state` that points to itself and whose bins are consistent.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence

from .layout import (
    HEAP_INFO_READ_SIZE,
    HEAP_MAX_SIZE,
    MALLOC_STATE_SIZE,
    NBINS,
    NONCONTIGUOUS_BIT,
    OFF_NEXT,
    PAGE_SIZE,
    WORD,
    ArenaHeader,
    HeapInfo,
    parse_arena_header,
    parse_heap_info,
)
from ..procfs import Mapping

MAX_ARENAS = 4096  # glibc's default cap is 8 per core; this only stops loops
_MAX_SCAN_BYTES = 4 << 20  # libc's .data + .bss are tens of KiB
_LIBC_NAME = re.compile(r"^libc(\.so\.6|-\d+\.\d+\.so)$")

Region = tuple[int, int]


class Memory(Protocol):
    def read(self, address: int, size: int) -> Optional[bytes]: ...

    def resident_bytes(self, start: int, end: int) -> Optional[int]: ...


def libc_path(maps: Iterable[Mapping]) -> Optional[str]:
    for m in maps:
        if m.path and _LIBC_NAME.match(os.path.basename(m.path)):
            return m.path
    return None


def libc_data_regions(maps: Sequence[Mapping], path: str) -> list[Region]:
    """libc's writable data: its file-backed .data and the anonymous .bss
    right after it, as one span when they touch."""
    regions: list[Region] = []
    for i, m in enumerate(maps):
        if m.path != path or not m.writable:
            continue
        start, end = m.start, m.end
        after = maps[i + 1] if i + 1 < len(maps) else None
        if after is not None and after.start == end and after.is_plain_anonymous and after.writable:
            end = after.end
        if regions and regions[-1][1] == start:
            start = regions.pop()[0]
        regions.append((start, end))
    return regions


def brk_regions(maps: Iterable[Mapping]) -> list[Region]:
    """The brk heap ("[heap]"), where the main arena normally lives."""
    regions: list[Region] = []
    for m in maps:
        if m.path == "[heap]":
            if regions and regions[-1][1] == m.start:
                regions[-1] = (regions[-1][0], m.end)
            else:
                regions.append((m.start, m.end))
    return regions


def _plausible_heap(h: HeapInfo) -> bool:
    if h.ar_ptr == 0 or h.ar_ptr % WORD:
        return False
    if not (0 < h.size <= HEAP_MAX_SIZE) or h.size % PAGE_SIZE:
        return False
    if not (h.size <= h.mprotect_size <= HEAP_MAX_SIZE):
        return False
    if h.prev % HEAP_MAX_SIZE:
        return False
    # A first heap holds its own arena just after heap_info.
    return h.prev != 0 or h.address < h.ar_ptr < h.address + PAGE_SIZE


def find_heaps(memory: Memory, maps: Iterable[Mapping]) -> list[HeapInfo]:
    """Every plausible thread-arena heap, in address order.

    A heap's head is not always a mapping of its own. glibc places a new
    heap right after the last one it reserved when it can, and when the heap
    below is already all read/write the kernel merges the two (same flags,
    MAP_NORESERVE included, and the new head not yet touched). So every
    HEAP_MAX_SIZE boundary inside a read/write anonymous mapping is looked
    at, not only its start; one whose page is not in RAM is skipped rather
    than read, which would fault it in (a heap's header was written, so its
    page is there)."""
    heaps = []
    for m in maps:
        if not m.is_plain_anonymous or not m.writable:
            continue
        address = -(-m.start // HEAP_MAX_SIZE) * HEAP_MAX_SIZE
        while address + HEAP_INFO_READ_SIZE <= m.end:
            h = _heap_at(memory, address, inside=address != m.start)
            if h is not None:
                heaps.append(h)
            address += HEAP_MAX_SIZE
    return heaps


def _heap_at(memory: Memory, address: int, inside: bool) -> Optional[HeapInfo]:
    if inside and memory.resident_bytes(address, address + PAGE_SIZE) == 0:
        return None
    data = memory.read(address, HEAP_INFO_READ_SIZE)
    if data is None:
        return None
    h = parse_heap_info(address, data)
    return h if _plausible_heap(h) else None


def read_arena_header(memory: Memory, address: int) -> Optional[ArenaHeader]:
    if address == 0 or address % WORD:
        return None
    data = memory.read(address, MALLOC_STATE_SIZE)
    return None if data is None else parse_arena_header(address, data)


def _inside(address: int, regions: Sequence[Region]) -> bool:
    return any(start <= address < end for start, end in regions)


def looks_like_thread_arena(arena: ArenaHeader, heaps: Sequence[HeapInfo]) -> bool:
    """A thread arena's top chunk lies in one of its heaps, and its `next`
    is a real pointer (the ring always closes through main_arena)."""
    if arena.next == 0 or arena.next % WORD:
        return False
    if arena.system_mem > len(heaps) * HEAP_MAX_SIZE:
        return False
    return any(h.address < arena.top < h.end for h in heaps)


def looks_like_main_arena(
    arena: ArenaHeader, chunk_regions: Sequence[Region], known_arenas: Iterable[int] = ()
) -> bool:
    """Whether a `malloc_state` read from libc's data is plausibly main_arena:
    its `next` closes the ring (itself, or an arena we found in a heap), and
    top and every bin point either into the brk heap or back at the arena."""
    if arena.next != arena.address and arena.next not in set(known_arenas):
        return False
    if arena.top == 0:
        # Before the first malloc: nothing but the static initialiser.
        return arena.system_mem == 0 and not any(arena.bins)
    if arena.flags & NONCONTIGUOUS_BIT:
        return arena.top == arena.initial_top or arena.system_mem > 0
    if arena.top != arena.initial_top and not _inside(arena.top, chunk_regions):
        return False
    if arena.max_system_mem < arena.system_mem:
        return False
    for i in range(1, NBINS):
        header = arena.bin_header(i)
        for link in arena.bin_links(i):
            if link != header and not _inside(link, chunk_regions):
                return False
    return True


def scan_for_main_arena(
    memory: Memory, data_regions: Sequence[Region], chunk_regions: Sequence[Region],
    known_arenas: Iterable[int] = (),
) -> Optional[int]:
    """Search libc's writable data for main_arena; its address, or None."""
    known = set(known_arenas)
    for start, end in data_regions:
        size = min(end - start, _MAX_SCAN_BYTES)
        data = memory.read(start, size)
        if data is None:
            continue
        words = struct.unpack(f"<{size // WORD}Q", data[: size // WORD * WORD])
        last = (size - MALLOC_STATE_SIZE) // WORD
        for i in range(0, last + 1):
            candidate = start + i * WORD
            nxt = words[i + OFF_NEXT // WORD]
            if nxt != candidate and nxt not in known:
                continue
            arena = parse_arena_header(candidate, data[i * WORD : i * WORD + MALLOC_STATE_SIZE])
            if looks_like_main_arena(arena, chunk_regions, known):
                return candidate
    return None


@dataclass
class ArenaRing:
    """The arenas in glibc's `next` order, main first when it is known."""

    addresses: list[int] = field(default_factory=list)
    main: Optional[int] = None
    main_found_by: str = "not found"  # "next list", "libc scan" or "not found"
    problems: list[str] = field(default_factory=list)


def _ring_from(memory: Memory, start: int) -> tuple[list[int], bool]:
    """Follow `next` from `start`; (members, whether it closed properly)."""
    members = [start]
    address = start
    for _ in range(MAX_ARENAS):
        header = read_arena_header(memory, address)
        if header is None:
            return members, False
        address = header.next
        if address == start:
            return members, True
        if address in members or address == 0:
            return members, False
        members.append(address)
    return members, False


def find_arenas(
    memory: Memory, maps: Sequence[Mapping], heaps: Sequence[HeapInfo]
) -> ArenaRing:
    """All arenas, main first when found, with what looked wrong on the way."""
    ring = ArenaRing()
    heap_arenas = _heap_arenas(memory, heaps, ring.problems)
    in_heap = set(heap_arenas)
    path = libc_path(maps)
    data_regions = libc_data_regions(maps, path) if path else []
    chunk_regions = brk_regions(maps)

    members: list[int] = []
    for start in heap_arenas:
        members, closed = _ring_from(memory, start)
        if closed:
            break
    else:
        if heap_arenas:
            ring.problems.append("the arenas' next list did not close on itself")
    for a in members:
        header = None if a in in_heap else read_arena_header(memory, a)
        if (
            header is not None
            and (not data_regions or _inside(a, data_regions))
            and looks_like_main_arena(header, chunk_regions, in_heap)
        ):
            ring.main, ring.main_found_by = a, "next list"
            break

    if ring.main is None:
        found = scan_for_main_arena(memory, data_regions, chunk_regions, in_heap)
        if found is not None:
            ring.main, ring.main_found_by = found, "libc scan"
            if found not in members:
                members, closed = _ring_from(memory, found)
                if not closed:
                    ring.problems.append("the arenas' next list did not close on itself")
    if ring.main is None:
        ring.problems.append(
            "main_arena not found: libc's data did not validate"
            if path
            else "no libc.so.6 mapped: not a dynamically linked glibc program"
        )
    ring.addresses = _ordered(members, ring.main, in_heap, ring.problems)
    return ring


def _heap_arenas(memory: Memory, heaps: Sequence[HeapInfo], problems: list[str]) -> list[int]:
    """The arenas named by heaps, keeping only those that look like one."""
    arenas = []
    for address in sorted({h.ar_ptr for h in heaps}):
        header = read_arena_header(memory, address)
        own = [h for h in heaps if h.ar_ptr == address]
        if header is not None and looks_like_thread_arena(header, own):
            arenas.append(address)
        else:
            problems.append(f"heap at {own[0].address:#x} names {address:#x}, which is no arena")
    return arenas


def _ordered(
    members: list[int], main: Optional[int], in_heap: set[int], problems: list[str]
) -> list[int]:
    """The ring rotated to start at main (glibc's own order), then any
    arena that has heaps but was not on the ring."""
    if main is not None and main in members:
        at = members.index(main)
        members = members[at:] + members[:at]
    ordered = [a for a in members if a == main or a in in_heap]
    if len(ordered) < len(members):
        problems.append(f"{len(members) - len(ordered)} arena(s) on the next list have no heap")
    for a in sorted(in_heap):
        if a not in ordered:
            ordered.append(a)
            problems.append(f"arena {a:#x} has heaps but is not on the next list")
    return ordered
