"""What `read_arenas` returns: plain frozen dataclasses, sizes in bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Heap:
    """One contiguous block of an arena: a thread arena's 64 MiB-aligned
    heap, or the main arena's brk heap."""

    address: int
    size: int  # bytes in use by the arena from `address` (heap_info.size; brk extent)
    mprotect_size: int  # bytes made read/write so far (== size for brk)
    reserved_size: int  # address space held: HEAP_MAX_SIZE for a thread heap
    resident_bytes: Optional[int]  # Rss from smaps; None when unknown


@dataclass(frozen=True)
class Arena:
    """One arena as read: its memory, free lists, top chunk and what
    malloc_trim(0) would release. `reliable` is False when any check failed;
    `notes` say which."""

    address: int
    kind: str  # "main" or "thread"
    heaps: tuple[Heap, ...]  # oldest first
    system_mem: int  # bytes glibc got from the OS for this arena
    max_system_mem: int
    attached_threads: int  # 0: on glibc's free list, waiting for a thread
    top_address: int
    top_bytes: int  # the top chunk: free, at the end of the newest heap
    fastbin_bytes: int
    unsorted_bytes: int
    smallbin_bytes: int
    largebin_bytes: int
    free_chunk_count: int
    largest_free_chunk_bytes: int
    trimmable_bytes: int  # estimate: resident bytes malloc_trim(0) would release now
    reliable: bool
    notes: tuple[str, ...] = ()

    @property
    def free_bytes(self) -> int:
        """Free chunks in fastbins and bins (top and tcache not included)."""
        return self.fastbin_bytes + self.unsorted_bytes + self.smallbin_bytes + self.largebin_bytes

    @property
    def live_estimate_bytes(self) -> int:
        """An estimate of the bytes in use: system_mem - free - top. It counts
        chunk headers, chunks parked in thread caches (tcache) and glibc's own
        headers as in use."""
        return max(0, self.system_mem - self.free_bytes - self.top_bytes)

    @property
    def resident_bytes(self) -> Optional[int]:
        values = [h.resident_bytes for h in self.heaps]
        return None if not values or None in values else sum(v for v in values if v is not None)


@dataclass(frozen=True)
class ArenaReport:
    """Every arena of one process at one moment. Chunks that malloc served
    with their own mmap (large blocks) belong to no arena and are not here."""

    pid: int
    arenas: tuple[Arena, ...] = ()  # main first, then in glibc's `next` order
    main_arena_address: Optional[int] = None
    main_arena_found_by: str = "not found"  # "next list", "libc scan" or "not found"
    libc_path: Optional[str] = None
    error: Optional[str] = None  # set when nothing could be read
    problems: tuple[str, ...] = ()

    @property
    def reliable(self) -> bool:
        return self.error is None and not self.problems and all(a.reliable for a in self.arenas)

    @property
    def system_mem(self) -> int:
        return sum(a.system_mem for a in self.arenas)

    @property
    def free_bytes(self) -> int:
        return sum(a.free_bytes for a in self.arenas)

    @property
    def top_bytes(self) -> int:
        return sum(a.top_bytes for a in self.arenas)

    @property
    def live_estimate_bytes(self) -> int:
        return sum(a.live_estimate_bytes for a in self.arenas)

    @property
    def trimmable_bytes(self) -> int:
        return sum(a.trimmable_bytes for a in self.arenas)

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "reliable": self.reliable,
            "error": self.error,
            "problems": list(self.problems),
            "libc_path": self.libc_path,
            "main_arena_address": self.main_arena_address,
            "main_arena_found_by": self.main_arena_found_by,
            "system_mem": self.system_mem,
            "free_bytes": self.free_bytes,
            "top_bytes": self.top_bytes,
            "live_estimate_bytes": self.live_estimate_bytes,
            "trimmable_bytes": self.trimmable_bytes,
            "arenas": [_arena_json(a) for a in self.arenas],
        }


def _arena_json(a: Arena) -> dict:
    return {
        "address": a.address,
        "kind": a.kind,
        "heaps": [asdict(h) for h in a.heaps],
        "system_mem": a.system_mem,
        "max_system_mem": a.max_system_mem,
        "attached_threads": a.attached_threads,
        "top_address": a.top_address,
        "top_bytes": a.top_bytes,
        "free_bytes": a.free_bytes,
        "fastbin_bytes": a.fastbin_bytes,
        "unsorted_bytes": a.unsorted_bytes,
        "smallbin_bytes": a.smallbin_bytes,
        "largebin_bytes": a.largebin_bytes,
        "free_chunk_count": a.free_chunk_count,
        "largest_free_chunk_bytes": a.largest_free_chunk_bytes,
        "live_estimate_bytes": a.live_estimate_bytes,
        "resident_bytes": a.resident_bytes,
        "trimmable_bytes": a.trimmable_bytes,
        "reliable": a.reliable,
        "notes": list(a.notes),
    }
