"""glibc's large blocks that were mapped before the trace began.

A block above the mmap threshold is a chunk of its own mapping: its header
sits at the mapping's start, prev_size holding the alignment padding (0 but
for memalign) and the size word the mapping's length less that padding,
with only IS_MMAPPED among its flag bits. The kernel merges neighbouring
anonymous mappings into one entry of /proc/PID/maps, so chunks are looked
for at every resident page of an anonymous region (a header is written, so
its page is resident), and each one found is skipped whole. Reads go
through /proc/PID/mem and pagemap, read-only."""

from __future__ import annotations

import struct

from memtrace.model.addrspace import ANONYMOUS, MMAPPED_CHUNK, PROT_READ, PROT_WRITE, AddressSpace

IS_MMAPPED = 0x2
SIZE_BITS = 0x7
# glibc's default mmap threshold: smaller chunks are mmapped only where a
# program lowered M_MMAP_THRESHOLD, and a smaller bound would let chance
# data pass for a header.
MIN_CHUNK_BYTES = 128 << 10
# Resident pages whose first words are looked at, at most, per process.
PAGE_BUDGET = 1 << 16


def chunk_length(header: bytes, room: int, page_size: int) -> int:
    """The mapping length of the mmapped chunk whose header this is, if it
    fits in room bytes; 0 if it is not one."""
    prev_size, size = struct.unpack("<QQ", header)
    length = (size & ~SIZE_BITS) + prev_size
    if (size & SIZE_BITS != IS_MMAPPED or prev_size % 16 or prev_size >= page_size
            or length < MIN_CHUNK_BYTES or length % page_size or length > room):
        return 0
    return length


def find_chunks(read, present: bytes, start: int, end: int, page_size: int,
                budget: list[int]) -> list[tuple[int, int]]:
    """(address, length) of the chunks in [start, end). present: a byte per
    page, 1 where resident; budget: [pages left to look at]."""
    found = []
    page = 0
    pages = (end - start) // page_size
    while page < pages and budget[0] > 0:
        if not present[page]:
            page += 1
            continue
        budget[0] -= 1
        at = start + page * page_size
        header = read(at, 16)
        length = chunk_length(header, end - at, page_size) if header else 0
        if length:
            found.append((at, length))
            page += length // page_size
        else:
            page += 1
    return found


def mark_mmapped_chunks(pid: int, space: AddressSpace) -> int:
    """Mark the parts of pre-existing anonymous regions that are glibc
    mmapped chunks, a region each; returns how many were found. Nothing is
    marked when the memory cannot be read (the process is gone, or no
    permission)."""
    from memtrace.process.glibc.procfs import ProcessMemory

    candidates = [r for r in space.regions(ANONYMOUS)
                  if r.origin.pre_existing and r.prot & (PROT_READ | PROT_WRITE) == PROT_READ | PROT_WRITE
                  and r.size >= MIN_CHUNK_BYTES]
    if not candidates:
        return 0
    try:
        memory = ProcessMemory(pid)
    except OSError:
        return 0
    budget = [PAGE_BUDGET]
    chunks = []
    with memory:
        for r in candidates:
            present = memory.present_pages(r.start, r.end)
            if present is None:
                return 0
            chunks += find_chunks(memory.read, present, r.start, r.end, space.page_size, budget)
    for at, length in chunks:
        space.mark_kind(at, at + length, MMAPPED_CHUNK)
    return len(chunks)
