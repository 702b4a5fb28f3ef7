"""The address-space model against synthetic syscall sequences.

The sequences copy what strace showed glibc 2.36 (Debian 12) doing: the sizes
and addresses are from real runs of a small threaded malloc program.
"""

from __future__ import annotations

import os
import re

import pytest

from memtrace.model.addrspace import (
    ANONYMOUS,
    ARENA_HEAP,
    FILE,
    HEAP,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_STACK,
    MMAPPED_CHUNK,
    MREMAP_MAYMOVE,
    OTHER,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    STACK,
    AddressSpace,
    VmEvent,
    parse_start_brk,
)
from memtrace.errors import MemtraceError
from memtrace.process.procfs import parse_smaps

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
THREAD = 11837
MALLOC_STACK = (7, 0x7F3CC7A1B2C3)


def ev(kind, addr=0, length=0, result=0, **kw):
    return VmEvent(ts_ns=kw.pop("ts_ns", 1), tid=kw.pop("tid", THREAD), kind=kind, addr=addr, length=length,
                   result=result, **kw)


def in_malloc(kind, addr=0, length=0, result=0, **kw):
    return ev(kind, addr, length, result, in_malloc=True, stack_key=(3, 0x401000), malloc_stack_key=MALLOC_STACK, **kw)


def space(maps="", **kw):
    s = AddressSpace(page_size=PAGE)
    s.seed_from_maps(maps, **kw)
    return s


def new_arena_heap(s, mapped_at, unmaps):
    """glibc new_heap: map twice HEAP_MAX_SIZE reserved, trim to alignment,
    make the first 132 KiB writable."""
    s.apply(in_malloc("mmap", 0, 128 * MiB, mapped_at, prot=PROT_NONE, flags=ANON | MAP_NORESERVE))
    for addr, length in unmaps:
        s.apply(in_malloc("munmap", addr, length))
    base = -(-mapped_at // (64 * MiB)) * (64 * MiB)
    s.apply(in_malloc("mprotect", base, 132 * KiB, prot=RW))
    return base


# Three alignments seen: the mapping lands below, above, or on a 64 MiB line.
ARENA_CASES = [
    (0x7F3CBF200000, [(0x7F3CBF200000, 14680064), (0x7F3CC4000000, 52428800)]),
    (0x7FF648E00000, [(0x7FF648E00000, 52428800), (0x7FF650000000, 14680064)]),
    (0x7F0000000000, [(0x7F0004000000, 64 * MiB)]),
]


@pytest.mark.parametrize("mapped_at, unmaps", ARENA_CASES)
def test_new_arena_heap_is_64_mib_aligned_and_mostly_reserved(mapped_at, unmaps):
    s = space()
    base = new_arena_heap(s, mapped_at, unmaps)

    head, tail = s.regions()
    assert base % (64 * MiB) == 0 and head.start == base and tail.end == base + 64 * MiB
    assert (head.kind, tail.kind) == (ARENA_HEAP, ARENA_HEAP)
    assert (head.prot, tail.prot) == (RW, PROT_NONE)
    assert head.mapping_id == tail.mapping_id
    assert head.origin.tid == THREAD and head.origin.in_malloc
    assert head.origin.malloc_stack_key == MALLOC_STACK
    t = s.totals()
    assert t.mapped_bytes == 64 * MiB
    assert t.committed_bytes == 132 * KiB
    assert t.reserved_bytes == 64 * MiB - 132 * KiB
    # unmapping never-committed address space gives nothing back
    assert t.returned_bytes == 0


def test_arena_heap_grows_by_page_steps_without_fragmenting():
    s = space()
    base = new_arena_heap(s, *ARENA_CASES[0])
    top = base + 132 * KiB
    for step in [4096, 8192, 8192, 12288] * 500:
        s.apply(in_malloc("mprotect", top, step, prot=RW))
        top += step
    assert len(s) == 2  # one RW head, one PROT_NONE tail
    assert s.totals(ARENA_HEAP).committed_bytes == top - base
    assert s.totals(ARENA_HEAP).reserved_bytes == base + 64 * MiB - top


def test_main_arena_grows_by_brk_from_start_brk():
    start_brk = 0x55C8EC2C8000
    s = space(start_brk=start_brk)
    s.apply(in_malloc("brk", 0, result=start_brk))  # brk(NULL)
    for _ in range(3):  # each malloc of ~3000 bytes asks request + 128 KiB
        s.apply(in_malloc("brk", s.brk + 0x21000, result=s.brk + 0x21000))

    (heap,) = s.regions(HEAP)
    assert (heap.start, heap.end) == (start_brk, start_brk + 3 * 0x21000)
    assert heap.committed_bytes == 3 * 132 * KiB
    assert s.initial_break == start_brk and s.brk == heap.end
    assert heap.origin.in_malloc


def test_brk_grows_and_shrinks_a_pre_existing_heap():
    s = space("55c8ec2c8000-55c8ec2e9000 rw-p 00000000 00:00 0                          [heap]\n")
    assert s.initial_break == 0x55C8EC2E9000
    s.apply(in_malloc("brk", 0x55C8EC32B000, result=0x55C8EC32B000))
    # a failed brk returns the old break: nothing moves
    s.apply(in_malloc("brk", 0x7FFFFFFF0000, result=0x55C8EC32B000))
    assert s.totals(HEAP).committed_bytes == 0x63000
    # systrim from malloc_trim
    s.apply(in_malloc("brk", 0x55C8EC2F0000, result=0x55C8EC2F0000))

    (heap,) = s.regions(HEAP)
    assert heap.end == 0x55C8EC2F0000 and heap.origin.pre_existing
    assert heap.returned_bytes == 0x55C8EC32B000 - 0x55C8EC2F0000
    assert s.totals().returned_bytes == heap.returned_bytes


def test_large_malloc_gets_its_own_mapping_realloc_moves_it_free_returns_it():
    s = space()
    s.apply(in_malloc("mmap", 0, 1052672, 0x7F3CC7AC7000, prot=RW, flags=ANON))
    (chunk,) = s.regions()
    assert chunk.kind == MMAPPED_CHUNK and chunk.committed_bytes == 1052672

    s.apply(in_malloc("mremap", 0x7F3CC7AC7000, 1052672, 0x7F3CC78C6000, new_length=2101248, flags=MREMAP_MAYMOVE))
    (moved,) = s.regions()
    assert (moved.start, moved.size) == (0x7F3CC78C6000, 2101248)
    assert moved.origin == chunk.origin and moved.mapping_id == chunk.mapping_id

    s.apply(in_malloc("munmap", 0x7F3CC78C6000, 2101248))
    assert s.regions() == []
    assert s.totals(MMAPPED_CHUNK).returned_bytes == 2101248
    assert s.totals().committed_bytes == 0


def test_mremap_shrink_in_place_is_returned_by_that_mapping():
    s = space()
    s.apply(in_malloc("mmap", 0, 2 * MiB, 0x7F0000200000, prot=RW, flags=ANON))
    s.apply(in_malloc("mremap", 0x7F0000200000, 2 * MiB, 0x7F0000200000, new_length=MiB + 1))
    (chunk,) = s.regions()
    assert chunk.size == MiB + PAGE
    assert chunk.returned_bytes == MiB - PAGE == s.totals().returned_bytes

    s.apply(in_malloc("mremap", 0x7F0000200000, MiB + 1, 0x7F0000200000, new_length=3 * MiB))
    (grown,) = s.regions()
    assert grown.size == 3 * MiB and grown.mapping_id == chunk.mapping_id


def test_malloc_trim_madvises_inside_heaps_committed_stays_resident_drops():
    s = space()
    base = new_arena_heap(s, *ARENA_CASES[1])
    s.apply(in_malloc("mprotect", base + 132 * KiB, 20 * MiB, prot=RW))
    committed = s.totals().committed_bytes
    for i in range(1000):  # the whole pages inside every other 9000-byte chunk, freed
        s.apply(in_malloc("madvise", base + PAGE + i * 18000 // PAGE * PAGE, PAGE, flags=MADV_DONTNEED))

    assert len(s) == 2  # madvise does not split or unmap
    t = s.totals()
    assert t.committed_bytes == committed
    assert t.returned_bytes == s.totals(ARENA_HEAP).returned_bytes == 1000 * PAGE
    assert s.regions()[0].returned_bytes == 1000 * PAGE

    rss_kb = (committed - 1000 * PAGE) // KiB
    s.update_resident(smaps_of(s, {base: rss_kb}))
    t = s.totals()
    assert t.resident_bytes == rss_kb * KiB < t.committed_bytes


def test_advice_that_keeps_pages_and_madvise_on_reserved_space_return_nothing():
    s = space()
    base = new_arena_heap(s, *ARENA_CASES[2])
    s.apply(in_malloc("madvise", base, PAGE, flags=3))  # MADV_WILLNEED
    s.apply(in_malloc("madvise", base + 1 * MiB, PAGE, flags=MADV_DONTNEED))  # PROT_NONE part
    assert s.totals().returned_bytes == 0


def test_munmap_of_the_top_heap_returns_its_committed_part():
    s = space()
    s.apply(ev("mmap", 0, 100 * PAGE, 0x7F1000000000, prot=RW, flags=ANON))
    base = new_arena_heap(s, *ARENA_CASES[0])
    s.apply(in_malloc("mprotect", base + 132 * KiB, 3 * MiB, prot=RW))
    s.apply(in_malloc("munmap", base, 64 * MiB))  # heap_trim -> delete_heap

    assert s.regions(ARENA_HEAP) == []
    assert s.totals(ARENA_HEAP).returned_bytes == 132 * KiB + 3 * MiB
    assert s.totals().committed_bytes == 100 * PAGE


def test_thread_stack_is_a_stack_with_a_reserved_guard_page():
    s = space()
    s.apply(ev("mmap", 0, 8392704, 0x7FF650E32000, prot=PROT_NONE, flags=ANON | MAP_STACK))
    s.apply(ev("mprotect", 0x7FF650E33000, 8 * MiB, prot=RW))
    t = s.totals(STACK)
    assert (t.committed_bytes, t.reserved_bytes) == (8 * MiB, PAGE)


def test_failed_syscalls_are_ignored():
    s = space()
    s.apply(ev("mmap", 0, MiB, -12, prot=RW, flags=ANON))
    s.apply(ev("mmap", 0, MiB, (1 << 64) - 12, prot=RW, flags=ANON))  # -ENOMEM read unsigned
    s.apply(ev("mmap", 0, MiB, 0x7F0000000000, prot=RW, flags=ANON))
    s.apply(ev("munmap", 0x7F0000000000, MiB, -22))
    s.apply(ev("mprotect", 0x7F0000000000, MiB, -13, prot=PROT_NONE))
    assert s.totals().committed_bytes == MiB and s.totals().returned_bytes == 0
    assert (s.failed_events, s.applied_events) == (4, 1)


def test_map_fixed_replaces_the_overlapping_part():
    s = space()
    s.apply(ev("mmap", 0, 16 * PAGE, 0x7F0000000000, prot=RW, flags=ANON))
    s.apply(ev("mmap", 0x7F0000004000, 4 * PAGE, 0x7F0000004000, prot=PROT_NONE,
               flags=ANON | MAP_FIXED | MAP_NORESERVE))
    left, middle, right = s.regions()
    assert (left.size, middle.size, right.size) == (4 * PAGE, 4 * PAGE, 8 * PAGE)
    assert left.mapping_id == right.mapping_id != middle.mapping_id
    assert s.totals().returned_bytes == 4 * PAGE
    assert s.totals().reserved_bytes == 4 * PAGE


def test_malloc_remapping_part_of_its_heap_keeps_it_in_the_heap():
    # shrink_heap under strict overcommit: mmap(MAP_FIXED, PROT_NONE) on the top
    s = space()
    base = new_arena_heap(s, *ARENA_CASES[0])
    s.apply(in_malloc("mprotect", base + 132 * KiB, MiB, prot=RW))
    s.apply(in_malloc("mmap", base + 132 * KiB, MiB, base + 132 * KiB, prot=PROT_NONE, flags=ANON | MAP_FIXED))
    head, tail = s.regions()
    assert head.mapping_id == tail.mapping_id and tail.kind == ARENA_HEAP
    assert s.totals().returned_bytes == MiB


def test_mprotect_splits_regions_and_pieces_merge_back():
    s = space()
    s.apply(ev("mmap", 0, 16 * PAGE, 0x7F0000000000, prot=RW, flags=ANON))
    s.apply(ev("mprotect", 0x7F0000004000, 4 * PAGE, prot=PROT_NONE))
    assert [r.prot for r in s.regions()] == [RW, PROT_NONE, RW]
    t = s.totals()
    assert (t.committed_bytes, t.reserved_bytes, t.returned_bytes) == (12 * PAGE, 4 * PAGE, 4 * PAGE)

    s.apply(ev("mprotect", 0x7F0000004000, 4 * PAGE, prot=RW))  # counts as commit again
    (whole,) = s.regions()
    assert whole.size == 16 * PAGE and s.totals().committed_bytes == 16 * PAGE


def smaps_of(s, rss_kb_at, extra=""):
    """smaps text for the model's own regions; Rss (all anonymous) by start."""
    lines = []
    for r in s.regions():
        perms = ("r" if r.prot & PROT_READ else "-") + ("w" if r.prot & PROT_WRITE else "-") + "-p"
        rss = rss_kb_at.get(r.start, 0)
        lines += [f"{r.start:x}-{r.end:x} {perms} 00000000 00:00 0 ", f"Size: {r.size // KiB} kB",
                  f"Rss: {rss} kB", f"Anonymous: {rss} kB", "VmFlags: rd wr mr mw me ac nr"]
    return "\n".join(lines) + "\n" + extra


def test_resident_bytes_are_attributed_by_overlap():
    s = space()
    s.apply(ev("mmap", 0, 8 * PAGE, 0x7F0000000000, prot=RW, flags=ANON))
    s.apply(ev("mmap", 0, 8 * PAGE, 0x7F0000008000, prot=RW, flags=ANON))
    # the kernel merged our two mappings into one VMA, and maps one we never saw
    smaps = (
        "7f0000000000-7f0000010000 rw-p 00000000 00:00 0\n"
        "Rss:                  48 kB\nAnonymous:            40 kB\nSwap:                  0 kB\n"
        "7f0000020000-7f0000021000 rw-p 00000000 00:00 0\n"
        "Rss:                   4 kB\nAnonymous:             4 kB\n"
    )
    s.update_resident(smaps)
    a, b = s.regions()
    assert (a.resident_bytes, b.resident_bytes) == (24 * KiB, 24 * KiB)
    assert (a.anon_bytes, b.anon_bytes) == (20 * KiB, 20 * KiB)
    assert s.unattributed_resident_bytes == 4 * KiB
    assert s.totals().resident_bytes == 48 * KiB

    s.update_resident("")  # the next sample replaces, never adds
    assert s.totals().resident_bytes == 0


def test_largest_unreturned_ranks_by_resident_bytes_with_origin():
    s = space()
    for i, size in enumerate([2, 8, 4]):
        s.apply(ev("mmap", 0, size * MiB, 0x7F0000000000 + i * 16 * MiB, prot=RW, flags=ANON, tid=100 + i))
    s.update_resident(smaps_of(s, {0x7F0000000000 + i * 16 * MiB: size * 1024 for i, size in enumerate([2, 8, 4])}))
    top = s.largest_unreturned(2)
    assert [r.resident_bytes for r in top] == [8 * MiB, 4 * MiB]
    assert [r.origin.tid for r in top] == [101, 102]


SEED_MAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 1234                       /usr/bin/prog
55d0a1000000-55d0a1200000 rw-p 00000000 00:00 0                          [heap]
7f4a00000000-7f4a00021000 rw-p 00000000 00:00 0 
7f4a00021000-7f4a04000000 ---p 00000000 00:00 0 
7f4a04000000-7f4a08000000 rw-p 00000000 00:00 0 
7f4a08000000-7f4a08100000 rw-p 00000000 00:00 0 
7f4a0c000000-7f4a0c021000 rw-p 00000000 00:00 0 
7f4a0c021000-7f4a0d000000 ---p 00000000 00:00 0 
7f4a10000000-7f4a10200000 r-xp 00000000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_seed_from_maps_names_kinds_and_guesses_pre_existing_arena_heaps():
    s = space(SEED_MAPS)
    kinds = {r.start: r.kind for r in s.regions()}
    assert kinds[0x55D0A0000000] == FILE and kinds[0x7F4A10000000] == FILE
    assert kinds[0x55D0A1000000] == HEAP and kinds[0x7FFC00000000] == STACK
    assert kinds[0x7FFC00100000] == OTHER
    # a 64 MiB aligned RW head + PROT_NONE tail, and a full 64 MiB RW heap
    assert [r.start for r in s.regions(ARENA_HEAP)] == [0x7F4A00000000, 0x7F4A00021000, 0x7F4A04000000]
    # too small to be a heap, and an aligned mapping that is not 64 MiB in all
    assert kinds[0x7F4A08000000] == ANONYMOUS and kinds[0x7F4A0C000000] == ANONYMOUS
    assert all(r.origin.pre_existing for r in s.regions())
    assert s.initial_break == s.brk == 0x55D0A1200000

    head = s.regions(ARENA_HEAP)[0]
    s.apply(in_malloc("mprotect", head.end, PAGE, prot=RW))  # grow_heap on a pre-existing heap
    assert [r.size for r in s.regions(ARENA_HEAP)[:2]] == [0x22000, 64 * MiB - 0x22000]


def test_shapes_taken_for_arena_heaps_that_glibc_does_not_list_are_anonymous():
    # Go's heap reservation (0xc000000000) has a glibc heap's shape.
    go = ("c000000000-c001000000 rw-p 00000000 00:00 0\n"
          "c001000000-c004000000 ---p 00000000 00:00 0\n")
    s = space(go + SEED_MAPS)
    assert [r.start for r in s.regions(ARENA_HEAP)] == [0xC000000000, 0xC001000000, 0x7F4A00000000,
                                                        0x7F4A00021000, 0x7F4A04000000]
    s.confirm_arena_heaps({0x7F4A00000000, 0x7F4A04000000})
    assert [r.start for r in s.regions(ARENA_HEAP)] == [0x7F4A00000000, 0x7F4A00021000, 0x7F4A04000000]
    assert s.region_at(0xC000000000).kind == ANONYMOUS and s.region_at(0xC001000000).kind == ANONYMOUS
    # A heap malloc was seen to map is glibc's, listed yet or not.
    s.apply(in_malloc("mmap", 0, 128 * MiB, result=0x7F4B00000000, prot=0, flags=MAP_NORESERVE | ANON))
    s.confirm_arena_heaps(set())
    assert s.region_at(0x7F4B00000000).kind == ARENA_HEAP


def test_a_listed_heap_merged_with_the_mapping_below_becomes_an_arena_heap():
    # A full heap at 0x7f4a20000000 and the next heap's RW head: one mapping
    # in the maps, then the next heap's PROT_NONE tail.
    merged = ("7f4a20000000-7f4a24021000 rw-p 00000000 00:00 0\n"
              "7f4a24021000-7f4a28000000 ---p 00000000 00:00 0\n")
    s = space(SEED_MAPS + merged)
    assert s.region_at(0x7F4A24000000).kind == ANONYMOUS  # no shape of its own
    s.confirm_arena_heaps({0x7F4A00000000, 0x7F4A04000000, 0x7F4A20000000, 0x7F4A24000000})
    heaps = [(r.start, r.end) for r in s.regions(ARENA_HEAP) if r.start >= 0x7F4A20000000]
    assert heaps == [(0x7F4A20000000, 0x7F4A24000000), (0x7F4A24000000, 0x7F4A24021000),
                     (0x7F4A24021000, 0x7F4A28000000)]
    # Anonymous memory in no listed heap stays so.
    assert s.region_at(0x7F4A08000000).kind == ANONYMOUS


def test_brk_without_any_baseline_starts_counting_at_the_first_break():
    s = space()
    s.apply(in_malloc("brk", 0x5600000A1000, result=0x5600000A1000))
    assert s.initial_break == 0x5600000A1000 and s.regions() == []
    s.apply(in_malloc("brk", 0x5600000C2000, result=0x5600000C2000))
    assert s.totals(HEAP).committed_bytes == 0x21000


def test_unknown_event_kind_is_a_memtrace_error():
    with pytest.raises(MemtraceError):
        space().apply(ev("mlock", 0, PAGE))


def _read(path):
    with open(path) as f:
        return f.read()


def test_this_process_maps_and_smaps():
    maps_text, smaps_text = _read("/proc/self/maps"), _read("/proc/self/smaps")
    s = AddressSpace()
    s.seed_from_maps(maps_text, start_brk=parse_start_brk(_read("/proc/self/stat")))
    s.update_resident(smaps_text)

    lines = maps_text.splitlines()
    assert len(s) == len(lines)
    mapped = sum(int(b, 16) - int(a, 16) for a, b in (re.match(r"(\w+)-(\w+)", ln).groups() for ln in lines))
    assert s.totals().mapped_bytes == mapped
    assert any(r.kind == FILE and "python" in r.path for r in s.regions())
    assert len(s.regions(STACK)) == 1

    entries = parse_smaps(smaps_text)
    rss = sum(e.rss_bytes for e in entries)
    assert rss > 0
    # smaps was read after maps: this process may have mapped more since
    assert s.totals().resident_bytes + s.unattributed_resident_bytes == rss
    assert s.totals().resident_bytes > rss // 2
    assert s.largest_unreturned(3)[0].resident_bytes > 0


def test_start_brk_from_stat_is_where_this_process_heap_begins():
    heap = [ln for ln in _read("/proc/self/maps").splitlines() if ln.endswith("[heap]")]
    start_brk = parse_start_brk(_read(f"/proc/{os.getpid()}/stat"))
    assert start_brk and start_brk % PAGE == 0
    if heap:
        assert int(heap[0].split("-")[0], 16) == start_brk
