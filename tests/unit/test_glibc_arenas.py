"""glibc arena reading on a fake process: memory laid out by hand as glibc
2.36 would, so every figure has a known answer, then broken on purpose."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from typing import Optional

import pytest

from memtrace.process.glibc.layout import (
    HEAP_MAX_SIZE,
    MALLOC_STATE_SIZE,
    OFF_BINS,
    OFF_FASTBINS,
    OFF_NEXT,
    OFF_TOP,
    PAGE_SIZE,
    fastbin_index,
    reveal_ptr,
)
from memtrace.process.procfs import Mapping, parse_maps, parse_smaps
from memtrace.process.glibc.trim import consolidate, madvise_range, systrim_range
from memtrace.process.glibc.inspect import ArenaReport, inspect_arenas, read_arenas
from memtrace.process.glibc.locate import find_heaps

PREV_INUSE = 1
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LIBC_DATA = 0x7F10_0000_0000
MAIN_ARENA = LIBC_DATA + 0x1C60
BRK = 0x5555_0000_0000
BRK_SIZE = 0x80000
HEAP = 0x7F00_0400_0000  # 64 MiB aligned
HEAP_SIZE = 0x40000
THREAD_ARENA = HEAP + 0x30  # right after the 48-byte heap_info
THREAD_CHUNKS = HEAP + 0x8D0  # after malloc_state, 16-aligned


class FakeMemory:
    """Sparse memory with pagemap answers: every page resident unless told."""

    def __init__(self) -> None:
        self.segments: dict[int, bytearray] = {}
        self.absent_pages: set[int] = set()
        self.pagemap_readable = True
        self.reads = 0

    def add(self, start: int, size: int) -> None:
        self.segments[start] = bytearray(size)

    def _segment(self, address: int, size: int) -> Optional[tuple[int, bytearray]]:
        for start, data in self.segments.items():
            if start <= address and address + size <= start + len(data):
                return start, data
        return None

    def put(self, address: int, *words: int) -> None:
        found = self._segment(address, 8 * len(words))
        assert found is not None, hex(address)
        start, data = found
        struct.pack_into(f"<{len(words)}Q", data, address - start, *words)

    def read(self, address: int, size: int) -> Optional[bytes]:
        self.reads += 1
        found = self._segment(address, size)
        if found is None:
            return None
        start, data = found
        return bytes(data[address - start : address - start + size])

    def resident_bytes(self, start: int, end: int) -> Optional[int]:
        if not self.pagemap_readable:
            return None
        pages = range(start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE)
        return sum(PAGE_SIZE for p in pages if p * PAGE_SIZE not in self.absent_pages)

    def forget(self) -> None:
        pass


@dataclass
class FakeArena:
    """A malloc_state and the chunks it owns, written into FakeMemory."""

    address: int
    first_chunk: int
    region_end: int
    next: int = 0
    system_mem: int = 0
    fastbins: list[int] = field(default_factory=lambda: [0] * 10)
    bins: dict[int, list[int]] = field(default_factory=dict)  # bin index -> chunks
    top: int = 0
    free: dict[str, int] = field(default_factory=dict)

    def bin_header(self, index: int) -> int:
        return self.address + OFF_BINS + (index - 1) * 16 - 16

    def lay_out(self, memory: FakeMemory, plan: list[tuple[int, str]]) -> list[int]:
        """plan: (chunk size, "used" | "fast" | "bin N"); the rest is top."""
        address, placed, fast_chain = self.first_chunk, [], {}
        for size, kind in plan:
            memory.put(address + 8, size | PREV_INUSE)
            placed.append(address)
            if kind == "fast":
                fast_chain.setdefault(fastbin_index(size), []).append(address)
            elif kind.startswith("bin"):
                self.bins.setdefault(int(kind.split()[1]), []).append(address)
            address += size
        self.top = address
        memory.put(self.top + 8, (self.region_end - self.top) | PREV_INUSE)
        for index, chain in fast_chain.items():
            self.fastbins[index] = chain[0]
            for here, there in zip(chain, chain[1:] + [0]):
                memory.put(here + 16, (here + 16) >> 12 ^ there)
        for index, chain in self.bins.items():
            header = self.bin_header(index)
            ring = [header] + chain + [header]
            for i, chunk in enumerate(chain, start=1):
                memory.put(chunk + 16, ring[i + 1], ring[i - 1])
        return placed

    def write(self, memory: FakeMemory) -> None:
        memory.put(self.address + OFF_FASTBINS, *self.fastbins)
        memory.put(self.address + OFF_TOP, self.top)
        for index in range(1, 128):
            chain = self.bins.get(index, [])
            header = self.bin_header(index)
            fd, bk = (chain[0], chain[-1]) if chain else (header, header)
            memory.put(self.address + OFF_BINS + (index - 1) * 16, fd, bk)
        memory.put(self.address + OFF_NEXT, self.next, 0, 1, self.system_mem, self.system_mem)


def _maps(thread_heap: bool = True) -> list[Mapping]:
    maps = [
        Mapping(BRK, BRK + BRK_SIZE, "rw-p", 0, 0, "[heap]", rss_bytes=BRK_SIZE),
        Mapping(LIBC_DATA - 0x1000, LIBC_DATA, "r--p", 0x1CF000, 339380, LIBC),
        Mapping(LIBC_DATA, LIBC_DATA + 0x2000, "rw-p", 0x1D3000, 339380, LIBC),
        Mapping(LIBC_DATA + 0x2000, LIBC_DATA + 0xF000, "rw-p", 0, 0, ""),
    ]
    if thread_heap:
        maps += [
            Mapping(HEAP, HEAP + HEAP_SIZE, "rw-p", 0, 0, "", rss_bytes=HEAP_SIZE),
            Mapping(HEAP + HEAP_SIZE, HEAP + HEAP_MAX_SIZE, "---p", 0, 0, "", rss_bytes=0),
        ]
    return maps


def _main_arena(memory: FakeMemory, next_arena: int) -> FakeArena:
    main = FakeArena(MAIN_ARENA, BRK + 0x290, BRK + BRK_SIZE, next=next_arena, system_mem=BRK_SIZE)
    # used | free 64 KiB in the unsorted bin | used | free 16 KiB large | used | top
    main.lay_out(memory, [(0x400, "used"), (0x10000, "bin 1"), (0x100, "used"),
                          (0x4000, "bin 100"), (0x200, "used")])
    main.write(memory)
    return main


def two_arena_process() -> tuple[FakeMemory, FakeArena, FakeArena]:
    memory = FakeMemory()
    memory.add(LIBC_DATA, 0xF000)
    memory.add(BRK, BRK_SIZE)
    memory.add(HEAP, HEAP_SIZE)
    memory.put(HEAP, THREAD_ARENA, 0, HEAP_SIZE, HEAP_SIZE, PAGE_SIZE)
    thread = FakeArena(THREAD_ARENA, THREAD_CHUNKS, HEAP + HEAP_SIZE, next=MAIN_ARENA,
                       system_mem=HEAP_SIZE)
    # used | free 32 KiB | two fastbin chunks that consolidate into it | used
    # | free 8 KiB in a large bin | used | one fastbin chunk against top | top
    thread.lay_out(memory, [(0x1000, "used"), (0x8000, "bin 1"), (0x30, "fast"), (0x30, "fast"),
                            (0x1000, "used"), (0x2000, "bin 97"), (0x100, "used"), (0x40, "fast")])
    thread.write(memory)
    main = _main_arena(memory, THREAD_ARENA)
    return memory, main, thread


def _pages(start: int, end: int) -> int:
    """Independent restatement of mtrim: whole pages past the first 48 bytes."""
    first = -(-(start + 48) // PAGE_SIZE) * PAGE_SIZE
    return max(0, (end - first) // PAGE_SIZE * PAGE_SIZE)


# ---------------------------------------------------------------- procfs

SMAPS = """\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
Anonymous:            12 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
Rss:                 132 kB
Anonymous:           128 kB
THPeligible:    0
7f0100000000-7f0100001000 r--p 00001000 fe:00 4242                       /opt/my app/lib x.so
Rss:                   4 kB
"""


def test_parse_smaps_keeps_sizes_in_bytes_and_odd_paths() -> None:
    heap, anon, lib = parse_smaps(SMAPS)
    assert (heap.path, heap.rss_bytes, heap.anonymous_bytes, heap.swap_bytes) == ("[heap]", 12288, 12288, 0)
    assert anon.is_plain_anonymous and anon.writable and anon.size == 0x21000
    assert (anon.rss_bytes, anon.anonymous_bytes, anon.swap_bytes) == (135168, 131072, None)
    assert lib.path == "/opt/my app/lib x.so" and lib.inode == 4242 and lib.offset == 0x1000
    assert not lib.is_plain_anonymous and lib.anonymous_bytes is None


def test_parse_maps_skips_lines_it_does_not_understand() -> None:
    maps = parse_maps("garbage\n" + SMAPS)
    assert [m.path for m in maps] == ["[heap]", "", "/opt/my app/lib x.so"]
    assert all(m.rss_bytes is None for m in maps)


# ---------------------------------------------------------------- trim


def test_madvise_range_skips_the_chunk_header_and_partial_pages() -> None:
    assert madvise_range(0x1000, 0x1000 + 4096 + 48) is None  # too small to hold a page
    assert madvise_range(0x1000, 0x3000) == (0x2000, 0x3000)  # page 0x1000 holds the header
    assert madvise_range(0x1FE0, 0x4000) == (0x3000, 0x4000)  # header ends past 0x2000
    assert madvise_range(0x1FD0, 0x4008) == (0x2000, 0x4000)  # header ends at 0x2000


def test_consolidate_merges_neighbours_and_feeds_top() -> None:
    chunks = [(0x3000, 0x30), (0x1000, 0x2000), (0x5000, 0x100), (0x5100, 0x40)]
    free, top, top_size = consolidate(chunks, 0x5140, 0x1000)
    assert free == [(0x1000, 0x3030)]
    assert (top, top_size) == (0x5000, 0x1140)


def test_systrim_needs_brk_to_end_the_top_chunk() -> None:
    assert systrim_range(0x10000, 0x5000, brk=0x15000) == (0x11000, 0x15000)
    assert systrim_range(0x10000, 0x5000, brk=0x16000) is None  # someone else moved brk
    assert systrim_range(0x10000, 0x1020, brk=0x11020) is None  # less than a page past MINSIZE


def test_reveal_ptr_undoes_safe_linking() -> None:
    field_address, target = 0x7F00_0400_1230, 0x7F00_0400_5670
    assert reveal_ptr(field_address, (field_address >> 12) ^ target) == target


# ---------------------------------------------------------------- arenas


def test_two_arenas_read_to_the_byte() -> None:
    memory, main, thread = two_arena_process()
    report = inspect_arenas(42, memory, _maps())

    assert report.reliable, report.to_json()
    assert report.main_arena_found_by == "next list"
    m, t = report.arenas
    assert (m.address, m.kind, t.address, t.kind) == (MAIN_ARENA, "main", THREAD_ARENA, "thread")

    assert [(h.address, h.size, h.reserved_size, h.resident_bytes) for h in t.heaps] == [
        (HEAP, HEAP_SIZE, HEAP_MAX_SIZE, HEAP_SIZE)
    ]
    assert (t.system_mem, t.attached_threads, t.top_address) == (HEAP_SIZE, 1, thread.top)
    assert t.top_bytes == HEAP + HEAP_SIZE - thread.top
    assert (t.fastbin_bytes, t.unsorted_bytes, t.smallbin_bytes, t.largebin_bytes) == (
        0xA0, 0x8000, 0, 0x2000
    )
    assert t.free_chunk_count == 5 and t.largest_free_chunk_bytes == 0x8000
    assert t.live_estimate_bytes == HEAP_SIZE - 0xA0 - 0x8000 - 0x2000 - t.top_bytes
    # The 32 KiB chunk swallows the two fastbin chunks after it; the 8 KiB
    # one stands alone; the last fastbin chunk joins top, which stays.
    unsorted = thread.bins[1][0]
    large = thread.bins[97][0]
    assert t.trimmable_bytes == _pages(unsorted, unsorted + 0x8060) + _pages(large, large + 0x2000)

    assert (m.system_mem, m.top_bytes) == (BRK_SIZE, BRK + BRK_SIZE - main.top)
    assert (m.unsorted_bytes, m.largebin_bytes, m.fastbin_bytes) == (0x10000, 0x4000, 0)
    brk_tail = (m.top_bytes - 33) // PAGE_SIZE * PAGE_SIZE  # systrim(0)
    u, lg = main.bins[1][0], main.bins[100][0]
    assert m.trimmable_bytes == _pages(u, u + 0x10000) + _pages(lg, lg + 0x4000) + brk_tail
    assert report.trimmable_bytes == m.trimmable_bytes + t.trimmable_bytes
    json.dumps(report.to_json())


def test_a_heap_merged_with_its_neighbour_is_found_and_counted_alone() -> None:
    # A full heap (or any read/write MAP_NORESERVE mapping) just below the
    # heap: the kernel makes the two one mapping, which starts below the
    # heap's boundary. Its last MiB stands for the neighbour here.
    memory, _, _ = two_arena_process()
    below = 1 << 20
    maps = [m for m in _maps() if m.start != HEAP] + [
        Mapping(HEAP - below, HEAP + HEAP_SIZE, "rw-p", 0, 0, "", rss_bytes=below + HEAP_SIZE)
    ]
    maps.sort(key=lambda m: m.start)
    memory.absent_pages = {HEAP + HEAP_SIZE - PAGE_SIZE}
    report = inspect_arenas(42, memory, maps)

    assert report.reliable, report.to_json()
    [heap] = report.arenas[1].heaps
    assert (heap.address, heap.size) == (HEAP, HEAP_SIZE)
    assert heap.resident_bytes == HEAP_SIZE - PAGE_SIZE  # its own pages, from the pagemap


def test_a_boundary_inside_a_mapping_is_read_only_when_its_page_is_in_ram() -> None:
    memory, _, _ = two_arena_process()
    maps = [m for m in _maps() if m.start != HEAP] + [
        Mapping(HEAP - PAGE_SIZE, HEAP + HEAP_SIZE, "rw-p", 0, 0, "", rss_bytes=HEAP_SIZE)
    ]
    memory.absent_pages = {HEAP}
    assert find_heaps(memory, sorted(maps, key=lambda m: m.start)) == []
    memory.absent_pages = set()
    assert [h.address for h in find_heaps(memory, sorted(maps, key=lambda m: m.start))] == [HEAP]


def test_trim_estimate_counts_only_resident_pages() -> None:
    memory, main, thread = two_arena_process()
    unsorted = thread.bins[1][0]
    first = -(-(unsorted + 48) // PAGE_SIZE) * PAGE_SIZE
    memory.absent_pages = {first, first + PAGE_SIZE}
    full = inspect_arenas(42, two_arena_process()[0], _maps()).arenas[1].trimmable_bytes
    assert inspect_arenas(42, memory, _maps()).arenas[1].trimmable_bytes == full - 2 * PAGE_SIZE


def test_single_arena_main_found_by_scanning_libc_data() -> None:
    memory = FakeMemory()
    memory.add(LIBC_DATA, 0xF000)
    memory.add(BRK, BRK_SIZE)
    main = _main_arena(memory, MAIN_ARENA)
    report = inspect_arenas(42, memory, _maps(thread_heap=False))
    assert report.reliable, report.to_json()
    assert (report.main_arena_address, report.main_arena_found_by) == (MAIN_ARENA, "libc scan")
    assert report.arenas[0].top_address == main.top


def test_untouched_main_arena_reads_as_empty() -> None:
    memory = FakeMemory()
    memory.add(LIBC_DATA, 0xF000)
    memory.add(BRK, BRK_SIZE)
    memory.put(MAIN_ARENA + OFF_NEXT, MAIN_ARENA, 0, 1)  # glibc's static initialiser
    report = inspect_arenas(42, memory, _maps(thread_heap=False))
    assert report.main_arena_address == MAIN_ARENA
    arena = report.arenas[0]
    assert (arena.system_mem, arena.free_bytes, arena.top_bytes) == (0, 0, 0)


def test_no_libc_is_reported_not_raised() -> None:
    memory = FakeMemory()
    report = inspect_arenas(42, memory, [Mapping(0x1000, 0x2000, "rw-p", 0, 0, "")])
    assert report.arenas == () and not report.reliable
    assert any("libc.so.6" in p for p in report.problems)


def test_bin_link_leaving_the_arena_marks_it_unreliable() -> None:
    memory, main, thread = two_arena_process()
    memory.put(thread.bins[97][0] + 16, 0xDEAD0000)  # fd now points nowhere
    report = inspect_arenas(42, memory, _maps())
    t = report.arenas[1]
    assert not t.reliable and not report.reliable
    assert any("leaves the arena" in n for n in t.notes)
    assert t.trimmable_bytes == 0  # no estimate from a list we could not trust
    assert report.arenas[0].reliable


def test_fastbin_cycle_ends_the_walk() -> None:
    memory, main, thread = two_arena_process()
    head = thread.fastbins[1]
    memory.put(head + 16, (head + 16) >> 12 ^ head)  # points at itself
    t = inspect_arenas(42, memory, _maps()).arenas[1]
    assert not t.reliable and any("listed twice" in n for n in t.notes)


def test_walk_budget_is_reported() -> None:
    memory, main, thread = two_arena_process()
    t = inspect_arenas(42, memory, _maps(), max_chunks=2).arenas[1]
    assert t.free_chunk_count == 2
    assert not t.reliable and any("walk stopped" in n for n in t.notes)


def test_unreadable_pagemap_is_noted() -> None:
    memory, main, thread = two_arena_process()
    memory.pagemap_readable = False
    t = inspect_arenas(42, memory, _maps()).arenas[1]
    assert t.trimmable_bytes > 0 and any("pagemap" in n for n in t.notes)


class ChangingMemory(FakeMemory):
    """The target allocates between any two of our reads of its arena."""

    def read(self, address: int, size: int) -> Optional[bytes]:
        data = super().read(address, size)
        if data is not None and size == MALLOC_STATE_SIZE:
            top = struct.unpack_from("<Q", data, OFF_TOP)[0]
            self.put(address + OFF_TOP + 8, top + self.reads)  # last_remainder moves
        return data


def test_arena_changing_under_the_walk_is_noted() -> None:
    memory = ChangingMemory()
    memory.add(LIBC_DATA, 0xF000)
    memory.add(BRK, BRK_SIZE)
    _main_arena(memory, MAIN_ARENA)
    arena = inspect_arenas(42, memory, _maps(thread_heap=False)).arenas[0]
    assert not arena.reliable and any("kept changing" in n for n in arena.notes)


@pytest.mark.parametrize("seed", range(8))
def test_garbage_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    memory, main, thread = two_arena_process()
    for start, data in memory.segments.items():
        for _ in range(200):
            offset = rng.randrange(0, len(data) - 8) & ~7
            value = rng.choice([0, rng.getrandbits(64), start + rng.randrange(len(data))])
            struct.pack_into("<Q", data, offset, value)
    report = inspect_arenas(42, memory, _maps())
    assert isinstance(report, ArenaReport)
    json.dumps(report.to_json())


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    memory = FakeMemory()
    for start, size in ((LIBC_DATA, 0xF000), (BRK, BRK_SIZE), (HEAP, HEAP_SIZE)):
        memory.segments[start] = bytearray(rng.getrandbits(8) for _ in range(size))
    report = inspect_arenas(42, memory, _maps())
    assert isinstance(report, ArenaReport)


def test_missing_process_is_an_error_in_the_report() -> None:
    report = read_arenas(2**22 + 12345)  # above the default pid_max
    assert report.error is not None and not report.reliable
