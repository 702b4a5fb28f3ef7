"""Walk an arena's free lists (fastbins and bins) in a running process.

The target may be freeing and allocating while we read, and a stale or
corrupt link must never send us wandering: every chunk is checked against
the arena's own memory regions, lists are walked with a step budget, and a
repeated chunk ends the walk. Each anomaly becomes a problem string; the
caller marks the result unreliable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from .layout import (
    CHUNK_HEAD_SIZE,
    MALLOC_ALIGNMENT,
    MINSIZE,
    NBINS,
    NFASTBINS,
    OFF_FD,
    ArenaHeader,
    ChunkHead,
    bin_kind,
    fastbin_index,
    parse_chunk_head,
    reveal_ptr,
)

Region = tuple[int, int]  # [start, end) where this arena's chunks may lie


class Memory(Protocol):
    def read(self, address: int, size: int) -> Optional[bytes]: ...


@dataclass(frozen=True)
class FreeChunk:
    address: int
    size: int
    kind: str  # "fast", "unsorted", "small" or "large"


@dataclass
class FreeLists:
    chunks: list[FreeChunk] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: bool = False  # the step budget ran out: free bytes undercounted

    def bytes_of(self, kind: str) -> int:
        return sum(c.size for c in self.chunks if c.kind == kind)


def region_of(address: int, size: int, regions: Sequence[Region]) -> Optional[Region]:
    for start, end in regions:
        if start <= address and address + size <= end:
            return (start, end)
    return None


class _Walker:
    def __init__(self, memory: Memory, regions: Sequence[Region], max_chunks: int) -> None:
        self.memory = memory
        self.regions = regions
        self.budget = max_chunks
        self.seen: set[int] = set()
        self.out = FreeLists()

    def chunk(self, address: int, where: str) -> Optional[ChunkHead]:
        """Read and check one free chunk; None (with a problem noted) if bad."""
        region = region_of(address, MINSIZE, self.regions)
        if address % MALLOC_ALIGNMENT or region is None:
            self.out.problems.append(f"{where}: link to {address:#x} leaves the arena")
            return None
        data = self.memory.read(address, CHUNK_HEAD_SIZE)
        if data is None:
            self.out.problems.append(f"{where}: chunk {address:#x} unreadable")
            return None
        head = parse_chunk_head(address, data)
        if head.size < MINSIZE or head.size % MALLOC_ALIGNMENT or address + head.size > region[1]:
            self.out.problems.append(f"{where}: chunk {address:#x} has bad size {head.size:#x}")
            return None
        if address in self.seen:
            self.out.problems.append(f"{where}: chunk {address:#x} listed twice")
            return None
        return head

    def take(self) -> bool:
        if self.budget <= 0:
            self.out.truncated = True
            return False
        self.budget -= 1
        return True

    def fastbin(self, index: int, head_ptr: int) -> None:
        where = f"fastbin {index}"
        address = head_ptr
        while address and self.take():
            head = self.chunk(address, where)
            if head is None:
                return
            if fastbin_index(head.size) != index:
                self.out.problems.append(f"{where}: chunk {address:#x} has the wrong size {head.size:#x}")
                return
            self.seen.add(address)
            self.out.chunks.append(FreeChunk(address, head.size, "fast"))
            address = reveal_ptr(address + OFF_FD, head.fd)

    def bin(self, index: int, fd: int, bk: int, header: int) -> None:
        where = f"bin {index}"
        kind = bin_kind(index)
        previous, address = header, fd
        if fd == header or (fd == 0 and bk == 0):
            return  # empty (zero before the arena is initialised)
        while address != header and self.take():
            head = self.chunk(address, where)
            if head is None:
                return
            if head.bk != previous:
                self.out.problems.append(f"{where}: chunk {address:#x} bk does not point back")
                return
            self.seen.add(address)
            self.out.chunks.append(FreeChunk(address, head.size, kind))
            previous, address = address, head.fd


def walk_free_lists(
    memory: Memory, arena: ArenaHeader, regions: Sequence[Region], max_chunks: int
) -> FreeLists:
    """Every chunk in the arena's fastbins and bins (not tcache: chunks
    parked there count as in use, for glibc's arena and for us)."""
    walker = _Walker(memory, regions, max_chunks)
    for i in range(NFASTBINS):
        walker.fastbin(i, arena.fastbins[i])
    for i in range(1, NBINS):
        fd, bk = arena.bin_links(i)
        walker.bin(i, fd, bk, arena.bin_header(i))
    return walker.out
