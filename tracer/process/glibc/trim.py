"""What `malloc_trim(0)` would hand back to the OS, from a free-list walk.

glibc 2.36's `mtrim` runs per arena: it first consolidates the fastbins
(each fastbin chunk merges with free neighbours, and with top if it borders
it), then madvise(MADV_DONTNEED)s the whole pages inside every free chunk,
skipping each chunk's first sizeof(struct malloc_chunk) bytes. Only for the
main arena does it also `systrim` the top chunk, shrinking brk. Thread
arenas' tops are trimmed by free() (heap_trim), never by malloc_trim.

Pure functions: ranges in, ranges out. Intersecting them with resident
pages is the caller's job.
"""

from __future__ import annotations

from typing import Iterable, Optional

from .layout import MINSIZE, PAGE_SIZE, SIZEOF_MALLOC_CHUNK

Range = tuple[int, int]  # [start, end)


def consolidate(
    chunks: Iterable[tuple[int, int]], top: int, top_size: int
) -> tuple[list[Range], int, int]:
    """Merge address-adjacent free chunks, as malloc_consolidate would, and
    fold a run that ends at the top chunk into it.

    Returns (free runs as [start, end), new top address, new top size).
    """
    runs: list[list[int]] = []
    for address, size in sorted(chunks):
        if runs and runs[-1][1] == address:
            runs[-1][1] = address + size
        else:
            runs.append([address, address + size])
    free: list[Range] = []
    for start, end in runs:
        if top and end == top:
            top_size += top - start
            top = start
        else:
            free.append((start, end))
    return free, top, top_size


def madvise_range(start: int, end: int, page: int = PAGE_SIZE) -> Optional[Range]:
    """The pages mtrim would drop inside the free chunk [start, end)."""
    size = end - start
    if size <= page - 1 + SIZEOF_MALLOC_CHUNK:
        return None
    aligned = (start + SIZEOF_MALLOC_CHUNK + page - 1) & ~(page - 1)
    usable = end - aligned
    if usable <= page - 1:
        return None
    return aligned, aligned + (usable & ~(page - 1))


def systrim_range(
    top: int, top_size: int, brk: int, pad: int = 0, page: int = PAGE_SIZE
) -> Optional[Range]:
    """The part of the main arena's top chunk systrim(pad) would give back
    by lowering brk, or None. glibc only does this when brk still ends the
    top chunk (nobody else moved it)."""
    top_area = top_size - MINSIZE - 1
    if top_area <= pad or top + top_size != brk:
        return None
    extra = (top_area - pad) & ~(page - 1)
    if extra == 0:
        return None
    return brk - extra, brk


def trim_ranges(
    chunks: Iterable[tuple[int, int]],
    top: int,
    top_size: int,
    brk: Optional[int],
    pad: int = 0,
) -> list[Range]:
    """Every range malloc_trim(pad) would release in one arena. `brk` is the
    end of the main arena's brk heap; None for thread arenas."""
    free, top, top_size = consolidate(chunks, top, top_size)
    ranges = [r for r in (madvise_range(s, e) for s, e in free) if r is not None]
    if brk is not None:
        tail = systrim_range(top, top_size, brk, pad)
        if tail is not None:
            ranges.append(tail)
    return ranges
