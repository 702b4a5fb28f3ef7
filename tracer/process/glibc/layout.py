"""glibc malloc's in-memory layout, as the target process sees it.

Valid for 64-bit glibc 2.32 and later (checked against Debian 12's 2.36 on
x86-64): `malloc_state` has kept this shape since `have_fastchunks` became
an int, fastbin links are mangled ("safe-linking") since 2.32, and
`heap_info` gained `pagesize` in 2.35 (nothing here depends on its size).
Only offsets and decoding live here; no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

WORD = 8
PAGE_SIZE = 4096  # x86-64; glibc trims in units of the kernel page size
# A thread arena's heap is reserved as this much address space and aligned to
# it, which is what lets glibc (and us) find a heap from any pointer in it.
HEAP_MAX_SIZE = 64 << 20
MALLOC_ALIGNMENT = 16
MINSIZE = 32  # smallest chunk
SIZEOF_MALLOC_CHUNK = 48  # prev_size, size, fd, bk, fd_nextsize, bk_nextsize
SIZE_FLAG_BITS = 0x7  # PREV_INUSE | IS_MMAPPED | NON_MAIN_ARENA
NONCONTIGUOUS_BIT = 0x2  # malloc_state.flags: memory not from one brk run

# struct malloc_state
NFASTBINS = 10
NBINS = 128  # bins 1..127 are used: 1 unsorted, 2..63 small, 64..126 large
NSMALLBINS = 64
OFF_FASTBINS = 16
OFF_TOP = 96
OFF_BINS = 112
OFF_NEXT = 2160
MALLOC_STATE_SIZE = 2200

_MALLOC_STATE = struct.Struct("<iii4x10Q2Q254Q4I5Q")
assert _MALLOC_STATE.size == MALLOC_STATE_SIZE

# struct _heap_info: ar_ptr, prev, size, mprotect_size (then pagesize, pad)
_HEAP_INFO = struct.Struct("<4Q")
HEAP_INFO_READ_SIZE = _HEAP_INFO.size

# The start of a chunk as read for list walking: prev_size, size, fd, bk.
_CHUNK_HEAD = struct.Struct("<4Q")
CHUNK_HEAD_SIZE = _CHUNK_HEAD.size
OFF_FD = 16  # a free chunk's forward link, after prev_size and size


@dataclass(frozen=True)
class ArenaHeader:
    """A decoded `struct malloc_state`."""

    address: int
    mutex: int
    flags: int
    fastbins: tuple[int, ...]  # heads of the 10 fastbin lists (not mangled)
    top: int
    last_remainder: int
    bins: tuple[int, ...]  # fd, bk of bins 1..127, interleaved
    next: int
    next_free: int
    attached_threads: int
    system_mem: int
    max_system_mem: int

    def bin_header(self, index: int) -> int:
        """Address of bin `index`'s pseudo-chunk: glibc places it so that its
        fd/bk fields overlay bins[2*(index-1)] and bins[2*(index-1)+1]."""
        return self.address + OFF_BINS + (index - 1) * 2 * WORD - 2 * WORD

    def bin_links(self, index: int) -> tuple[int, int]:
        i = (index - 1) * 2
        return self.bins[i], self.bins[i + 1]

    @property
    def initial_top(self) -> int:
        """What `top` holds before the arena's first allocation."""
        return self.bin_header(1)


def parse_arena_header(address: int, data: bytes) -> ArenaHeader:
    v = _MALLOC_STATE.unpack_from(data)
    return ArenaHeader(
        address=address,
        mutex=v[0],
        flags=v[1],
        fastbins=tuple(v[3:13]),
        top=v[13],
        last_remainder=v[14],
        bins=tuple(v[15:269]),
        next=v[273],
        next_free=v[274],
        attached_threads=v[275],
        system_mem=v[276],
        max_system_mem=v[277],
    )


@dataclass(frozen=True)
class HeapInfo:
    """A decoded `heap_info`, the header at the base of a thread arena's heap."""

    address: int
    ar_ptr: int
    prev: int
    size: int  # bytes in use by the arena, from the heap's base
    mprotect_size: int  # bytes made read/write so far

    @property
    def end(self) -> int:
        return self.address + self.size


def parse_heap_info(address: int, data: bytes) -> HeapInfo:
    ar_ptr, prev, size, mprotect_size = _HEAP_INFO.unpack_from(data)
    return HeapInfo(address, ar_ptr, prev, size, mprotect_size)


@dataclass(frozen=True)
class ChunkHead:
    address: int
    prev_size: int
    size: int  # flags stripped
    fd: int
    bk: int


def parse_chunk_head(address: int, data: bytes) -> ChunkHead:
    prev_size, size, fd, bk = _CHUNK_HEAD.unpack_from(data)
    return ChunkHead(address, prev_size, size & ~SIZE_FLAG_BITS, fd, bk)


def reveal_ptr(field_address: int, stored: int) -> int:
    """Undo glibc's safe-linking of a fastbin/tcache `fd` stored at
    `field_address` (PROTECT_PTR: the field's address >> 12, xor'ed in)."""
    return (field_address >> 12) ^ stored


def fastbin_index(chunk_size: int) -> int:
    return (chunk_size >> 4) - 2


def bin_kind(index: int) -> str:
    if index == 1:
        return "unsorted"
    return "small" if index < NSMALLBINS else "large"
