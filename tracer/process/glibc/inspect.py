"""glibc's arenas of a running process, read from outside it.

`read_arenas(pid)` answers, per arena (the main one on brk, one per group of
threads on 64 MiB mmap'd heaps): how much memory glibc took from the OS
(`system_mem`), how much of it sits free in bins and in the top chunk, how
much is resident, and how much `malloc_trim(0)` would give back right now.
That gap between what the program holds and what glibc keeps is the arena
retention memtrace exists to show.

It reads /proc/PID/{smaps,mem,pagemap} and never writes to the target. The
target keeps running, so every figure is checked; anything that does not
add up marks the arena (and the report) unreliable with a note saying why.
It never raises for what it reads: an unreadable process comes back as a
report with `error` set, for the caller to turn into a MemtraceError.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from .arena import Memory, inspect_arena
from .layout import HEAP_MAX_SIZE, HeapInfo
from .locate import brk_regions, find_arenas, find_heaps, libc_path
from .procfs import ProcessMemory, resident_in
from ..procfs import Mapping, parse_smaps, read_smaps
from .report import Arena, ArenaReport, Heap

__all__ = [
    "Arena",
    "ArenaReport",
    "Heap",
    "Mapping",
    "inspect_arenas",
    "parse_smaps",
    "read_arenas",
    "read_smaps",
]

# Free chunks walked per arena before giving up (and saying so). A heap full
# of small free chunks is the worst case: 64 MiB / 48 B is 1.4 M chunks.
DEFAULT_MAX_CHUNKS = 250_000


def read_arenas(
    pid: int, maps: Optional[Sequence[Mapping]] = None, *, max_chunks: int = DEFAULT_MAX_CHUNKS
) -> ArenaReport:
    """Inspect the glibc arenas of process `pid`.

    `maps` may be passed when the caller already parsed /proc/PID/smaps
    (mappings from plain maps work too; resident sizes then stay None).
    Needs read access to /proc/PID/mem: root, or ptrace rights on the target.
    """
    try:
        if maps is None:
            maps = read_smaps(pid)
    except OSError as e:
        return ArenaReport(pid, error=f"cannot read /proc/{pid}/smaps ({e.strerror}): is pid {pid} alive?")
    try:
        memory = ProcessMemory(pid)
    except OSError as e:
        return ArenaReport(
            pid, error=f"cannot open /proc/{pid}/mem ({e.strerror}): run memtrace as root"
        )
    with memory:
        report = inspect_arenas(pid, memory, maps, max_chunks=max_chunks)
    if not report.arenas and memory.failed_reads:
        return ArenaReport(pid, error=f"reading pid {pid}'s memory failed: did it exit?")
    return report


def inspect_arenas(
    pid: int, memory: Memory, maps: Sequence[Mapping], *, max_chunks: int = DEFAULT_MAX_CHUNKS,
    between: Optional[Callable[[], None]] = None,
) -> ArenaReport:
    """`read_arenas` over an already open memory reader (tests pass a fake).
    `between` runs after each arena: walks can be long, and the caller may
    have a ring buffer to drain meanwhile."""
    maps = sorted(maps, key=lambda m: m.start)
    heaps = find_heaps(memory, maps)
    ring = find_arenas(memory, maps, heaps)
    arenas = []
    for address in ring.addresses:
        if address == ring.main:
            own = _brk_heaps(maps, memory)
            arenas.append(inspect_arena(memory, address, "main", own, maps, max_chunks))
        else:
            own = _thread_heaps(heaps, address, maps, memory)
            arenas.append(inspect_arena(memory, address, "thread", own, maps, max_chunks))
        if between is not None:
            between()
    return ArenaReport(
        pid=pid,
        arenas=tuple(arenas),
        main_arena_address=ring.main,
        main_arena_found_by=ring.main_found_by,
        libc_path=libc_path(maps),
        problems=tuple(ring.problems),
    )


def _brk_heaps(maps: Sequence[Mapping], memory: Memory) -> list[Heap]:
    return [Heap(s, e - s, e - s, e - s, resident_in(maps, s, e, memory)) for s, e in brk_regions(maps)]


def _thread_heaps(
    heaps: Sequence[HeapInfo], arena: int, maps: Sequence[Mapping], memory: Memory
) -> list[Heap]:
    """The arena's heaps oldest first: following heap_info.prev backwards."""
    own = [h for h in heaps if h.ar_ptr == arena]
    newer = {h.prev: h for h in own if h.prev}
    ordered = [h for h in own if h.prev == 0][:1]
    while ordered and ordered[-1].address in newer and len(ordered) < len(own):
        ordered.append(newer[ordered[-1].address])
    ordered += sorted((h for h in own if h not in ordered), key=lambda h: h.address)
    return [
        Heap(
            h.address,
            h.size,
            h.mprotect_size,
            HEAP_MAX_SIZE,
            # Both parts of the reservation: the read/write head and the PROT_NONE rest.
            resident_in(maps, h.address, h.address + HEAP_MAX_SIZE, memory),
        )
        for h in ordered
    ]
