"""The traced process's address space, rebuilt from its memory syscalls.

The heap side shows what malloc handed out. This side shows what the process
took from the OS (mmap, brk growth, mprotect to writable) and what it gave
back (munmap, brk shrink, madvise, mprotect to PROT_NONE, mremap shrink). The
gap between the two is what glibc keeps.

`AddressSpace` is seeded once from /proc/PID/maps at attach, then updated by
`apply` for each syscall the collector reports, and given /proc/PID/smaps text
each interval for resident bytes. It is pure: no bcc and no I/O (the caller
reads /proc).

Regions work like the kernel's VMAs: each has one protection, so mprotect
splits them. Pieces of one mapping share a `mapping_id`, and adjacent pieces
with the same protection merge again, so an arena heap grown by thousands of
mprotect steps stays two regions (its RW head and PROT_NONE tail).

Sizes are bytes. `returned_bytes` counts a flow: bytes handed back by calls,
so madvising the same range twice counts it twice. The other byte counts are
the current state.
"""

from __future__ import annotations

import heapq
import os
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from memtrace.errors import MemtraceError
from memtrace.process.glibc.layout import HEAP_MAX_SIZE
from memtrace.process.procfs import Mapping, parse_maps, parse_smaps
from memtrace.model.snapshot import StackKey

# Linux uapi values, the same on x86_64 and arm64 (asm-generic); mips,
# sparc and powerpc differ and are not supported.
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
_PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC  # drops PROT_GROWSDOWN/UP

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_NORESERVE = 0x4000
MAP_STACK = 0x20000

MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTNEED_LOCKED = 24
# Advice that drops the pages: the range stays mapped but the memory goes
# back to the OS. MADV_COLD/PAGEOUT only age or swap pages, so they don't count.
_RETURNING_ADVICE = frozenset({MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_DONTNEED_LOCKED})

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

# Event kinds, as the collector names them.
MMAP = "mmap"
MUNMAP = "munmap"
BRK = "brk"
MPROTECT = "mprotect"
MREMAP = "mremap"
MADVISE = "madvise"
EVENT_KINDS = (MMAP, MUNMAP, BRK, MPROTECT, MREMAP, MADVISE)

# Region kinds.
ANONYMOUS = "anonymous"
FILE = "file"
HEAP = "heap"  # the brk heap, [heap]
STACK = "stack"
ARENA_HEAP = "glibc-arena-heap"  # a non-main arena's 64 MiB aligned NORESERVE heap
MMAPPED_CHUNK = "glibc-mmapped-chunk"  # one large malloc served by its own mmap
# Mapped inside a malloc-family call of an allocator other than glibc's
# (jemalloc's extents, tcmalloc's spans, mimalloc's segments).
ALLOCATOR_MAPPING = "allocator-mapping"
OTHER = "other"  # [vdso], [vvar], anon_inode:..., ...
REGION_KINDS = (ANONYMOUS, FILE, HEAP, STACK, ARENA_HEAP, MMAPPED_CHUNK, ALLOCATOR_MAPPING, OTHER)

# glibc's HEAP_MAX_SIZE on 64-bit: 2 * DEFAULT_MMAP_THRESHOLD_MAX.
ARENA_HEAP_BYTES = HEAP_MAX_SIZE

# A syscall returning -errno, seen as signed or as unsigned 64-bit.
_ERRNO_UNSIGNED_MIN = (1 << 64) - 4095


@dataclass(frozen=True, slots=True)
class VmEvent:
    """One completed memory syscall of the traced process."""

    ts_ns: int
    tid: int
    kind: str  # one of EVENT_KINDS
    addr: int  # mremap: the old address
    length: int  # mremap: the old length
    prot: int = 0
    flags: int = 0  # mmap flags, madvise advice or mremap flags
    new_addr: int = 0  # mremap with MREMAP_FIXED
    new_length: int = 0  # mremap
    result: int = 0  # the syscall's return: an address, the new break, 0 or -errno
    stack_key: Optional[StackKey] = None
    in_malloc: bool = False  # made from inside a malloc-family call
    malloc_stack_key: Optional[StackKey] = None  # that call's stack
    scanned: tuple[int, ...] = ()  # light mode: top of the user stack, raw words

    @property
    def failed(self) -> bool:
        return self.result < 0 or self.result >= _ERRNO_UNSIGNED_MIN


@dataclass(frozen=True, slots=True)
class Origin:
    """Who made a mapping. tid None means it existed before the trace began."""

    tid: Optional[int] = None
    stack_key: Optional[StackKey] = None
    in_malloc: bool = False
    malloc_stack_key: Optional[StackKey] = None
    ts_ns: Optional[int] = None
    scanned: tuple[int, ...] = ()

    @property
    def pre_existing(self) -> bool:
        return self.tid is None

    def __str__(self) -> str:
        if self.pre_existing:
            return "pre-existing"
        return f"tid {self.tid}" + (" in malloc" if self.in_malloc else "")


PRE_EXISTING = Origin()


def _origin_of(event: VmEvent) -> Origin:
    return Origin(event.tid, event.stack_key, event.in_malloc, event.malloc_stack_key, event.ts_ns,
                  event.scanned)


@dataclass(frozen=True, slots=True)
class Region:
    """A range of one protection, like a kernel VMA."""

    start: int
    end: int
    prot: int
    flags: int  # mmap flags (from maps: MAP_PRIVATE/SHARED, MAP_ANONYMOUS)
    kind: str  # one of REGION_KINDS
    origin: Origin
    mapping_id: int  # shared by the pieces of one mapping
    path: str = ""
    returned_bytes: int = 0
    resident_bytes: int = 0  # from the last smaps sample
    anon_bytes: int = 0  # from the last smaps sample

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)

    @property
    def committed_bytes(self) -> int:
        return self.size if self.writable else 0

    @property
    def reserved_bytes(self) -> int:
        """Address space held without memory behind it."""
        if self.writable:
            return 0
        if self.prot == PROT_NONE or self.flags & MAP_NORESERVE:
            return self.size
        return 0


@dataclass(frozen=True)
class VmTotals:
    mapped_bytes: int = 0
    reserved_bytes: int = 0
    committed_bytes: int = 0
    resident_bytes: int = 0
    anon_bytes: int = 0
    returned_bytes: int = 0


# ------------------------------------------------------------------ /proc


def parse_start_brk(stat_text: str) -> Optional[int]:
    """start_brk (field 47) of /proc/PID/stat: where the brk heap begins,
    needed when the process has no [heap] yet."""
    # comm may hold spaces and parentheses: fields resume after the last ')'
    fields = stat_text[stat_text.rfind(")") + 2 :].split()
    try:
        return int(fields[47 - 3])
    except (IndexError, ValueError):
        return None


# ------------------------------------------------------------------ model


class AddressSpace:
    """One process's regions, keyed by start and kept sorted for bisect, so an
    event costs a lookup plus the regions it touches. page_size defaults to
    this machine's: the target runs here."""

    def __init__(
        self, page_size: Optional[int] = None, arena_heap_bytes: int = ARENA_HEAP_BYTES
    ) -> None:
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        # False in light mode: events never say they were made inside malloc.
        self.malloc_seen = True
        # glibc's heaps and chunks have shapes of their own; another
        # allocator's mappings are known by being made inside its calls.
        self.glibc = True
        self.arena_heap_bytes = arena_heap_bytes
        self._reset()

    def _reset(self) -> None:
        # Region starts, sorted, for bisect; and each start's region.
        self._starts: list[int] = []
        self._by_start: dict[int, Region] = {}
        self._next_mapping_id = 1
        self._returned_by_kind: dict[str, int] = {}
        self._heap_start: Optional[int] = None
        self.initial_break: Optional[int] = None  # the break when tracing began
        self.brk: Optional[int] = None  # the current break
        self.applied_events = 0
        self.failed_events = 0
        # Bytes we held that the kernel showed to be unmapped (missed events).
        self.stale_bytes = 0
        # Resident bytes of the last smaps sample that no region of ours covers.
        self.unattributed_resident_bytes = 0

    # ---------------------------------------------------------- seeding

    def seed_from_maps(self, text: str, start_brk: Optional[int] = None) -> None:
        """Start over from /proc/PID/maps. Pass start_brk (`parse_start_brk`)
        so brk growth is placed right in a process without a [heap] yet."""
        self._reset()
        entries = parse_maps(text)
        arena_ids = self._guess_arena_heaps(entries)
        for i, m in enumerate(entries):
            flags = MAP_SHARED if m.perms[3:4] == "s" else MAP_PRIVATE
            if not m.path or m.path.startswith("[anon:"):
                flags |= MAP_ANONYMOUS
            kind = ARENA_HEAP if i in arena_ids else _kind_of_maps_path(m.path)
            mapping_id = arena_ids.get(i) or self._new_mapping_id()
            prot = _prot_of_perms(m.perms)
            self._insert(Region(m.start, m.end, prot, flags, kind, PRE_EXISTING, mapping_id, m.path))
            if m.path == "[heap]":
                self._heap_start = m.start
                self.brk = self.initial_break = m.end
        if self.brk is None and start_brk:
            self.brk = self.initial_break = start_brk

    def _guess_arena_heaps(self, entries: list[Mapping]) -> dict[int, int]:
        """Arena heaps made before the trace, by their shape: anonymous, at a
        64 MiB boundary, a RW head then an optional PROT_NONE tail, 64 MiB in
        all. (The kernel merges a full heap with a neighbour's head; those stay
        anonymous.) Returns entry index -> shared mapping id."""
        size = self.arena_heap_bytes
        found: dict[int, int] = {}
        for i, m in enumerate(entries):
            if m.path or m.start % size or m.perms != "rw-p":
                continue
            pieces = [i]
            if m.size < size and i + 1 < len(entries):
                tail = entries[i + 1]
                if tail.start == m.end and not tail.path and tail.perms == "---p":
                    pieces.append(i + 1)
            if entries[pieces[-1]].end - m.start == size:
                mapping_id = self._new_mapping_id()
                found.update((j, mapping_id) for j in pieces)
        return found

    # ---------------------------------------------------------- events

    def apply(self, event: VmEvent) -> None:
        handler = _HANDLERS.get(event.kind)
        if handler is None:
            raise MemtraceError(
                f"unknown memory event kind {event.kind!r}: the collector and "
                "memtrace.model.addrspace disagree; report this bug"
            )
        if event.failed:
            self.failed_events += 1
            return
        handler(self, event)
        self.applied_events += 1

    def _mmap(self, ev: VmEvent) -> None:
        start = ev.result
        end = start + self._page_up(ev.length)
        if end <= start:
            return
        fixed = bool(ev.flags & MAP_FIXED)
        # glibc re-maps part of its own heap PROT_NONE when shrinking it under
        # strict overcommit: that part stays the same heap.
        heap = self._arena_heap_covering(start, end) if fixed and ev.in_malloc else None
        # Without MAP_FIXED the kernel picked a free range: whatever we hold
        # there is stale, not returned.
        self._unmap(start, end, returned=fixed)
        prot = ev.prot & _PROT_MASK
        if heap is not None:
            self._insert(Region(start, end, prot, heap.flags, ARENA_HEAP, heap.origin, heap.mapping_id))
        else:
            kind, mapping_id = _kind_of_mmap(ev, self.malloc_seen, self.glibc), self._new_mapping_id()
            self._insert(Region(start, end, prot, ev.flags, kind, _origin_of(ev), mapping_id))
        self._merge_range(start, end)

    def _munmap(self, ev: VmEvent) -> None:
        self._unmap(ev.addr, ev.addr + self._page_up(ev.length), returned=True)

    def _brk(self, ev: VmEvent) -> None:
        # brk returns the break, whether it moved or not.
        new_break = ev.result
        if new_break == 0:
            return
        if self.brk is None:
            # Nothing tells where the heap began: start counting from here.
            self.brk = self.initial_break = new_break
            return
        old_end, new_end = self._page_up(self.brk), self._page_up(new_break)
        self.brk = new_break
        if new_end == old_end:
            return
        heap = self.region_at(self._heap_start) if self._heap_start is not None else None
        if heap is None or heap.kind != HEAP or heap.start != self._heap_start:
            # never seen, or unmapped behind our back (missed events)
            if new_end > old_end:
                self._unmap(old_end, new_end, returned=False)
                self._heap_start = old_end
                self._insert(self._orphan(ev, old_end, new_end, HEAP, "[heap]"))
            return
        if new_end > heap.end:
            self._unmap(heap.end, new_end, returned=False)
            self._by_start[heap.start] = replace(heap, end=new_end)
            return
        if new_end <= heap.start:
            self._remove(heap)
            self._count_returned(heap.kind, heap.size)
            return
        shrunk = heap.end - new_end
        self._count_returned(heap.kind, shrunk)
        cut = _resized(heap, heap.start, new_end)
        self._by_start[heap.start] = replace(cut, returned_bytes=heap.returned_bytes + shrunk)

    def _mprotect(self, ev: VmEvent) -> None:
        start, end = ev.addr, ev.addr + self._page_up(ev.length)
        prot = ev.prot & _PROT_MASK
        for r in self._carve(start, end):
            if r.prot == prot:
                continue
            if r.writable and prot == PROT_NONE:
                self._count_returned(r.kind, r.size)
            self._by_start[r.start] = replace(r, prot=prot)
        self._merge_range(start, end)

    def _mremap(self, ev: VmEvent) -> None:
        old_start, new_start = ev.addr, ev.result
        old_len, new_len = self._page_up(ev.length), self._page_up(ev.new_length)
        fixed = bool(ev.flags & MREMAP_FIXED)
        if old_len == 0:
            # A second mapping of the same shared pages; the first stays.
            source = self.region_at(old_start)
            self._unmap(new_start, new_start + new_len, returned=fixed)
            if source is not None:
                copy = Region(new_start, new_start + new_len, source.prot, source.flags, source.kind,
                              _origin_of(ev), self._new_mapping_id(), source.path)
                self._insert(copy)
            else:
                self._insert(self._orphan(ev, new_start, new_start + new_len))
            return
        if new_len < old_len:
            shrunk = self._unmap(old_start + new_len, old_start + old_len, returned=True)
            self._credit_returned(old_start + new_len - 1, shrunk)
        kept = min(old_len, new_len)
        if new_start != old_start:
            moved = self._carve(old_start, old_start + kept)
            if not ev.flags & MREMAP_DONTUNMAP:
                for r in moved:
                    self._remove(r)
            self._unmap(new_start, new_start + kept, returned=fixed)
            shift = new_start - old_start
            for r in moved:
                self._insert(replace(r, start=r.start + shift, end=r.end + shift))
            if not moved:
                self._insert(self._orphan(ev, new_start, new_start + kept))
        if new_len > old_len:
            grow_start, grow_end = new_start + old_len, new_start + new_len
            self._unmap(grow_start, grow_end, returned=False)
            last = self.region_at(grow_start - 1)
            if last is not None:
                self._by_start[last.start] = replace(last, end=grow_end)
            else:
                self._insert(self._orphan(ev, grow_start, grow_end))
        self._merge_range(new_start, new_start + new_len)

    def _madvise(self, ev: VmEvent) -> None:
        if ev.flags not in _RETURNING_ADVICE:
            return
        start, end = ev.addr, ev.addr + self._page_up(ev.length)
        # No split: malloc_trim sends thousands of these into one heap.
        for r in self._overlapping(start, end):
            if not r.writable:
                continue
            n = min(end, r.end) - max(start, r.start)
            # Positional, not replace(): glibc shrinking a thread heap sends
            # thousands a second, and replace() was most of their cost.
            self._by_start[r.start] = Region(r.start, r.end, r.prot, r.flags, r.kind, r.origin,
                                             r.mapping_id, r.path, r.returned_bytes + n,
                                             r.resident_bytes, r.anon_bytes)
            self._count_returned(r.kind, n)

    # ---------------------------------------------------------- sampling

    def update_resident(self, smaps: "str | Sequence[Mapping]") -> None:
        """Resident and anonymous bytes per region from /proc/PID/smaps (its
        text, or its entries already parsed). The kernel may split or merge
        differently from us, so each smaps entry's bytes are shared among our
        regions by how much of it they overlap."""
        resident: dict[int, int] = {}
        anon: dict[int, int] = {}
        unattributed = 0
        for e in parse_smaps(smaps) if isinstance(smaps, str) else smaps:
            size = e.end - e.start
            e_rss, e_anon = e.rss_bytes or 0, e.anonymous_bytes or 0
            covered = given_rss = given_anon = 0
            for r in self._overlapping(e.start, e.end):
                covered += min(e.end, r.end) - max(e.start, r.start)
                # Shares from running totals, so a fully covered entry is
                # shared out to the byte.
                rss, anon_so_far = e_rss * covered // size, e_anon * covered // size
                resident[r.start] = resident.get(r.start, 0) + rss - given_rss
                anon[r.start] = anon.get(r.start, 0) + anon_so_far - given_anon
                given_rss, given_anon = rss, anon_so_far
            unattributed += e_rss - given_rss
        for start, r in self._by_start.items():
            rss, anon_bytes = resident.get(start, 0), anon.get(start, 0)
            if (rss, anon_bytes) != (r.resident_bytes, r.anon_bytes):
                self._by_start[start] = replace(r, resident_bytes=rss, anon_bytes=anon_bytes)
        self.unattributed_resident_bytes = unattributed

    # ---------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._starts)

    def regions(self, kind: Optional[str] = None) -> list[Region]:
        """Regions in address order, optionally of one kind."""
        out = [self._by_start[s] for s in self._starts]
        return out if kind is None else [r for r in out if r.kind == kind]

    def mark_kind(self, start: int, end: int, kind: str) -> None:
        """What a closer look found [start, end) to be, within one region:
        that part becomes a region of its own of that kind."""
        r = self.region_at(start)
        if r is None or end <= start or end > r.end or r.kind == kind:
            return
        self._remove(r)
        if r.start < start:
            self._insert(_resized(r, r.start, start))
        if end < r.end:
            self._insert(replace(_resized(r, end, r.end), mapping_id=self._new_mapping_id()))
        self._insert(replace(_resized(r, start, end), kind=kind, mapping_id=self._new_mapping_id()))

    def confirm_arena_heaps(self, heap_starts: set[int]) -> None:
        """The arenas as glibc lists them: a region taken for an arena heap
        by its shape alone (seeded from the maps, or mapped outside malloc's
        sight in light mode) that is in none of their heaps is plain
        anonymous memory. Go's heap, for one, reserves 64 MiB at 64 MiB
        boundaries, a RW head then PROT_NONE, just as a glibc heap looks.

        And the other way: a heap whose head the kernel merged with the
        mapping below it (a full heap) has no shape of its own in the maps,
        so the part of such a region inside a listed heap becomes one."""
        size = self.arena_heap_bytes
        for r in self.regions(ARENA_HEAP):
            if (r.origin.pre_existing or not self.malloc_seen) and r.start - r.start % size not in heap_starts \
                    and not r.path:
                self._remove(r)
                self._insert(replace(r, kind=ANONYMOUS))
        for start in sorted(heap_starts):
            for r in self._overlapping(start, start + size):
                if r.kind == ANONYMOUS and (r.origin.pre_existing or not self.malloc_seen):
                    self.mark_kind(max(start, r.start), min(start + size, r.end), ARENA_HEAP)

    def region_at(self, addr: int) -> Optional[Region]:
        i = bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        r = self._by_start[self._starts[i]]
        return r if addr < r.end else None

    def totals(self, kind: Optional[str] = None) -> VmTotals:
        mapped = reserved = committed = resident = anon = 0
        for r in self.regions(kind):
            mapped += r.size
            reserved += r.reserved_bytes
            committed += r.committed_bytes
            resident += r.resident_bytes
            anon += r.anon_bytes
        if kind is None:
            returned = sum(self._returned_by_kind.values())
        else:
            returned = self._returned_by_kind.get(kind, 0)
        return VmTotals(mapped, reserved, committed, resident, anon, returned)

    def largest_unreturned(self, n: int, kind: Optional[str] = None) -> list[Region]:
        """The n regions holding the most resident bytes (each with its origin)."""
        held = (r for r in self.regions(kind) if r.resident_bytes > 0)
        return heapq.nlargest(
            n, held, key=lambda r: (r.resident_bytes, r.committed_bytes, -r.start)
        )

    # ---------------------------------------------------------- internals

    def _page_up(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def _new_mapping_id(self) -> int:
        self._next_mapping_id += 1
        return self._next_mapping_id - 1

    def _count_returned(self, kind: str, n: int) -> None:
        self._returned_by_kind[kind] = self._returned_by_kind.get(kind, 0) + n

    def _orphan(
        self, ev: VmEvent, start: int, end: int, kind: Optional[str] = None, path: str = ""
    ) -> Region:
        """A RW anonymous region made by ev that extends no mapping we know:
        the brk heap's first growth, or memory whose mapping we missed."""
        if kind is None:
            kind = MMAPPED_CHUNK if ev.in_malloc else ANONYMOUS
        flags = MAP_PRIVATE | MAP_ANONYMOUS
        mapping_id = self._new_mapping_id()
        return Region(start, end, PROT_READ | PROT_WRITE, flags, kind, _origin_of(ev), mapping_id, path)

    def _insert(self, r: Region) -> None:
        insort(self._starts, r.start)
        self._by_start[r.start] = r

    def _remove(self, r: Region) -> None:
        del self._starts[bisect_left(self._starts, r.start)]
        del self._by_start[r.start]

    def _first_overlap(self, addr: int) -> int:
        """Index in _starts of the first region ending after addr."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and self._by_start[self._starts[i]].end > addr:
            return i
        return i + 1

    def _overlapping(self, start: int, end: int) -> list[Region]:
        out = []
        starts = self._starts
        i = self._first_overlap(start)
        while i < len(starts) and starts[i] < end:
            out.append(self._by_start[starts[i]])
            i += 1
        return out

    def _split(self, r: Region, at: int) -> Region:
        """Cut r at `at`; returns the left part. Counts are shared by size:
        exact where a count is uniform, a fair guess otherwise."""
        left = _resized(r, r.start, at)
        right = replace(
            r,
            start=at,
            returned_bytes=r.returned_bytes - left.returned_bytes,
            resident_bytes=r.resident_bytes - left.resident_bytes,
            anon_bytes=r.anon_bytes - left.anon_bytes,
        )
        self._by_start[r.start] = left
        self._insert(right)
        return left

    def _carve(self, start: int, end: int) -> list[Region]:
        """Split regions at start and end; return those inside [start, end)."""
        starts = self._starts
        i = self._first_overlap(start)
        if i < len(starts) and starts[i] < start:
            self._split(self._by_start[starts[i]], start)
            i += 1
        inside = []
        while i < len(starts) and starts[i] < end:
            r = self._by_start[starts[i]]
            if r.end > end:
                inside.append(self._split(r, end))
                break
            inside.append(r)
            i += 1
        return inside

    def _unmap(self, start: int, end: int, returned: bool) -> int:
        """Drop [start, end). Returns the committed bytes given back."""
        given_back = 0
        for r in self._carve(start, end):
            self._remove(r)
            if not returned:
                self.stale_bytes += r.size
            elif r.writable:
                self._count_returned(r.kind, r.size)
                given_back += r.size
        return given_back

    def _credit_returned(self, addr: int, n: int) -> None:
        """Charge bytes already counted as returned to the region at addr,
        the part of the mapping that lives on."""
        r = self.region_at(addr)
        if r is not None and n:
            self._by_start[r.start] = replace(r, returned_bytes=r.returned_bytes + n)

    def _merge_range(self, start: int, end: int) -> None:
        """Merge adjacent pieces of one mapping with the same protection, from
        the left neighbour of start to the right neighbour of end."""
        starts, by_start = self._starts, self._by_start
        i = max(self._first_overlap(start) - 1, 0)
        while i + 1 < len(starts) and starts[i] <= end:
            left, right = by_start[starts[i]], by_start[starts[i + 1]]
            same = left.mapping_id == right.mapping_id and left.prot == right.prot
            if same and left.end == right.start:
                by_start[left.start] = replace(
                    left,
                    end=right.end,
                    returned_bytes=left.returned_bytes + right.returned_bytes,
                    resident_bytes=left.resident_bytes + right.resident_bytes,
                    anon_bytes=left.anon_bytes + right.anon_bytes,
                )
                del starts[i + 1]
                del by_start[right.start]
            else:
                i += 1

    def _arena_heap_covering(self, start: int, end: int) -> Optional[Region]:
        inside = self._overlapping(start, end)
        if not inside or inside[0].start > start or inside[-1].end < end:
            return None
        first = inside[0]
        for prev, r in zip(inside, inside[1:]):
            if r.start != prev.end:
                return None
        if all(r.kind == ARENA_HEAP and r.mapping_id == first.mapping_id for r in inside):
            return first
        return None


_HANDLERS: dict[str, Callable[[AddressSpace, VmEvent], None]] = {
    MMAP: AddressSpace._mmap,
    MUNMAP: AddressSpace._munmap,
    BRK: AddressSpace._brk,
    MPROTECT: AddressSpace._mprotect,
    MREMAP: AddressSpace._mremap,
    MADVISE: AddressSpace._madvise,
}


def _resized(r: Region, start: int, end: int) -> Region:
    """r cut down to [start, end), its counts shared by size."""
    keep, size = end - start, r.size
    return replace(
        r,
        start=start,
        end=end,
        returned_bytes=r.returned_bytes * keep // size,
        resident_bytes=r.resident_bytes * keep // size,
        anon_bytes=r.anon_bytes * keep // size,
    )


def _kind_of_mmap(ev: VmEvent, malloc_seen: bool = True, glibc: bool = True) -> str:
    if not ev.flags & MAP_ANONYMOUS:
        return FILE
    if ev.flags & (MAP_STACK | MAP_GROWSDOWN):
        return STACK
    if not malloc_seen and ev.flags & MAP_NORESERVE and ev.prot & _PROT_MASK == PROT_NONE \
            and ev.length in (HEAP_MAX_SIZE, 2 * HEAP_MAX_SIZE):
        # Light mode sees no malloc calls: new_heap's reservation by its shape.
        return ARENA_HEAP
    if ev.in_malloc and not glibc:
        return ALLOCATOR_MAPPING
    if ev.in_malloc:
        # glibc's new_heap is malloc's only NORESERVE mapping; it maps twice
        # the heap size and unmaps the ends to reach 64 MiB alignment.
        return ARENA_HEAP if ev.flags & MAP_NORESERVE else MMAPPED_CHUNK
    return ANONYMOUS


def _kind_of_maps_path(path: str) -> str:
    if path == "[heap]":
        return HEAP
    if path == "[stack]" or path.startswith("[stack:"):
        return STACK
    if path.startswith("[anon:"):
        # glibc >= 2.39 names its mappings when glibc.mem.decorate_maps is set
        if "glibc: malloc arena" in path:
            return ARENA_HEAP
        if "glibc: malloc]" in path:
            return MMAPPED_CHUNK
        return ANONYMOUS
    if not path:
        return ANONYMOUS
    return FILE if path.startswith("/") else OTHER


def _prot_of_perms(perms: str) -> int:
    prot = PROT_NONE
    if perms[0:1] == "r":
        prot |= PROT_READ
    if perms[1:2] == "w":
        prot |= PROT_WRITE
    if perms[2:3] == "x":
        prot |= PROT_EXEC
    return prot
