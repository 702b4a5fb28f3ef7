"""The gap between what a process holds and what it took from the OS.

Pure functions over plain data: glibc's arenas as read from outside the
process (`memtrace.process.glibc.report.Arena`), the kernel's per-bucket heap flows
and the heap totals. They answer, per arena, how much is live and how much
is retained (resident but freed), which stacks filled what is retained, and
what a user might try about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.model.snapshot import BUCKET_SHIFT, AllocatorStats, ArenaStats, Flow, Gap, JvmStats, StackKey

MiB = 1 << 20


@dataclass(frozen=True)
class HeapSpan:
    """What accounting needs of one arena heap (or of the brk heap)."""

    address: int
    reserved_bytes: int
    committed_bytes: int
    resident_bytes: int


@dataclass(frozen=True)
class ArenaInput:
    """An arena as read from glibc's structures, reduced to plain numbers."""

    address: int
    kind: str  # "main" | "thread"
    heaps: tuple[HeapSpan, ...]
    system_mem_bytes: int = 0
    free_bytes: int = 0  # bins + top chunk
    trimmable_bytes: int = 0
    reliable: bool = True
    # Its heaps were mapped before the trace began: it may hold blocks no
    # probe saw allocated.
    existed_before_trace: bool = True


def buckets_of(arena: ArenaInput) -> set[int]:
    out: set[int] = set()
    for heap in arena.heaps:
        span = max(heap.reserved_bytes, heap.committed_bytes, 1)
        out.update(range(heap.address >> BUCKET_SHIFT, ((heap.address + span - 1) >> BUCKET_SHIFT) + 1))
    return out


@dataclass(frozen=True)
class ChunkSpans:
    """glibc's mmapped chunks (one large block each, outside every arena):
    those the trace saw made, and those found mapped when it began."""

    count: int = 0
    committed_bytes: int = 0
    resident_bytes: int = 0
    # Found at the attach (their headers read): live, but not traced.
    before_trace_count: int = 0
    before_trace_bytes: int = 0
    before_trace_resident_bytes: int = 0


@dataclass(frozen=True)
class AllocatorAccount:
    arenas: tuple[ArenaStats, ...]
    allocator: AllocatorStats
    stack_retained: dict[StackKey, int]  # estimated share of arena retention per stack


def account_allocator(
    arenas: Sequence[ArenaInput],
    flows: "Optional[Iterable[Flow] | BucketBook]",
    heap_live_bytes: int,
    chunks: ChunkSpans = ChunkSpans(),
    attached: bool = False,
) -> AllocatorAccount:
    """With flows (full mode) arena live bytes are exact sums of what the
    probes saw land in each arena's buckets; without (light mode) they are
    glibc's own view: system_mem less what its free lists and top hold.

    attached: the trace began in a running process, whose blocks from
    before are in no flow. glibc's books still count them: what an arena
    has in use beyond the chunks traced into it is taken for them (an
    estimate, which also holds the few blocks the per-thread caches keep).
    They are live, never retained.

    flows: the flows themselves, or their sums per bucket kept up to date
    (BucketBook): with 100,000 stacks a pass over every flow each interval
    took a tenth of a second."""
    book = None if flows is None else flows if isinstance(flows, BucketBook) else BucketBook.of(flows)
    owner: dict[int, int] = {}
    for index, arena in enumerate(arenas):
        for bucket in buckets_of(arena):
            owner.setdefault(bucket, index)
    live = [0] * len(arenas)
    live_chunks = [0] * len(arenas)
    mine: list[list[_Bucket]] = [[] for _ in arenas]
    if book is not None:
        for bucket, index in owner.items():
            b = book.buckets.get(bucket)
            if b is not None:
                live[index] += b.live_bytes
                live_chunks[index] += b.live_chunk_bytes
                mine[index].append(b)
    stats = []
    stack_retained: dict[StackKey, int] = {}
    for i, arena in enumerate(arenas):
        estimate = book is None
        in_use = max(0, arena.system_mem_bytes - arena.free_bytes)  # glibc's books
        before = 0
        if attached and not estimate and arena.existed_before_trace:
            before = max(0, in_use - live_chunks[i])
        live_bytes = in_use if estimate else max(0, live[i])
        resident = sum(h.resident_bytes for h in arena.heaps)
        stat = ArenaStats(
            id=f"0x{arena.address:x}",
            kind=arena.kind,
            tids=tuple(sorted({tid for b in mine[i] for tid in b.tids})),
            heap_count=len(arena.heaps),
            reserved_bytes=sum(h.reserved_bytes for h in arena.heaps),
            committed_bytes=sum(h.committed_bytes for h in arena.heaps),
            resident_bytes=resident,
            live_bytes=live_bytes,
            system_mem_bytes=arena.system_mem_bytes,
            free_bytes=arena.free_bytes,
            # malloc_trim gives back free pages; only resident ones lower the RSS.
            trimmable_bytes=min(arena.trimmable_bytes, max(0, resident - live_bytes - before)),
            live_is_estimate=estimate,
            reliable=arena.reliable,
            live_before_trace_bytes=before,
        )
        stats.append(stat)
        # Who left it behind: shares of the retained bytes in proportion to
        # the bytes each stack freed into this arena.
        _share_retained_of(stat.retained_bytes, mine[i], stack_retained)
    arena_live = sum(s.live_bytes for s in stats)
    arena_before = sum(s.live_before_trace_bytes for s in stats)
    if book is None:
        # Light mode: the arenas' books, and the large blocks mapped alone.
        chunk_live = chunks.committed_bytes + chunks.before_trace_bytes
        live_total = arena_live + chunk_live
        before_total = 0
    else:
        # Traced blocks outside every arena are mmapped chunks.
        chunk_live = max(0, heap_live_bytes - sum(max(0, x) for x in live)) \
            + (chunks.before_trace_bytes if attached else 0)
        live_total = heap_live_bytes + arena_before + (chunks.before_trace_bytes if attached else 0)
        before_total = arena_before + (chunks.before_trace_bytes if attached else 0)
    chunk_resident = chunks.resident_bytes + chunks.before_trace_resident_bytes
    live_resident = sum(min(s.all_live_bytes, s.resident_bytes) for s in stats) \
        + min(chunk_live, chunk_resident)
    if not arenas and book is not None:
        # No arena read (a command gone within its first interval, arenas
        # unreadable): where its blocks lie is not known, and none is said
        # never touched but those of the chunks seen mapped alone. Counted
        # as held, up to the anonymous RSS (gap()).
        live_resident += max(0, heap_live_bytes - chunks.committed_bytes)
    allocator = AllocatorStats(
        arena_count=len(stats),
        committed_bytes=sum(s.committed_bytes for s in stats) + chunks.committed_bytes
        + chunks.before_trace_bytes,
        resident_bytes=sum(s.resident_bytes for s in stats) + chunk_resident,
        live_bytes=live_total,
        retained_bytes=sum(s.retained_bytes for s in stats),
        mmapped_chunk_count=chunks.count + chunks.before_trace_count,
        mmapped_chunk_bytes=chunk_resident,
        estimate=book is None,
        live_before_trace_bytes=before_total,
        live_not_resident_bytes=max(0, live_total - live_resident),
    )
    return AllocatorAccount(tuple(stats), allocator, stack_retained)


RETAINED_SHARE_UNIT = 4096


def _bin(freed_bytes: int) -> int:
    """The bin of a stack's freed bytes: its power of two and the three bits
    after the first, growing with the bytes. By power of two only, the bin
    at the threshold of a page's share held most of 100,000 stacks that
    free a few hundred bytes each, all looked at every interval."""
    bits = freed_bytes.bit_length()
    return bits << 3 | (freed_bytes >> (bits - 4) & 7 if bits >= 4 else freed_bytes & 7)


class _Bucket:
    """One 64 MiB bucket's flows, added up: live bytes, the threads that
    allocated there, and the bytes each stack freed there, also binned by
    their power of two (and the one that freed most), so that the few
    stacks big enough to get a share of the arena's retained bytes are
    found without a pass over all of them."""

    __slots__ = ("live_bytes", "live_chunk_bytes", "freed_bytes", "freed", "_bins", "_most", "_tids")

    def __init__(self) -> None:
        self.live_bytes = 0
        self.live_chunk_bytes = 0
        self.freed_bytes = 0
        self.freed: dict[StackKey, int] = {}
        self._bins: dict[int, set[StackKey]] = {}  # _bin() of the bytes freed -> stacks
        # (bytes, stack) of the stack that freed most, None when it must be
        # looked for again (the top one freed less: an exec, a folded or
        # gone row). Counters only grow otherwise: a heap that took every
        # change (2,000 pushes a snapshot, and a rebuild every 100,000) cost
        # more than keeping the one at the top.
        self._most: Optional[tuple[int, StackKey]] = None
        self._tids: dict[int, int] = {}  # tid -> its flows here that allocated

    @property
    def tids(self):
        return self._tids.keys()

    def add(self, f: Flow, sign: int) -> None:
        self.live_bytes += sign * (f.alloc_bytes - f.free_bytes)
        self.live_chunk_bytes += sign * (f.alloc_chunk_bytes - f.free_chunk_bytes)
        if f.alloc_bytes:
            self._allocating(f.tid, sign)
        if f.free_bytes:
            self._freed(f.stack_key, sign * f.free_bytes)

    def move(self, old: Flow, new: Flow) -> None:
        """add(old, -1) then add(new, 1), in one step, for a flow of the same
        thread and stack whose counts moved: most changes, each looking up
        the stack's freed bytes once, not twice."""
        self.live_bytes += (new.alloc_bytes - new.free_bytes) - (old.alloc_bytes - old.free_bytes)
        self.live_chunk_bytes += (new.alloc_chunk_bytes - new.free_chunk_bytes) \
            - (old.alloc_chunk_bytes - old.free_chunk_bytes)
        allocating = bool(new.alloc_bytes) - bool(old.alloc_bytes)
        if allocating:
            self._allocating(new.tid, allocating)
        if new.free_bytes != old.free_bytes:
            self._freed(new.stack_key, new.free_bytes - old.free_bytes)

    def _allocating(self, tid: int, change: int) -> None:
        if not tid:
            return  # tid 0: exited threads, folded
        n = self._tids.get(tid, 0) + change
        if n:
            self._tids[tid] = n
        else:
            del self._tids[tid]

    def _freed(self, key: StackKey, change: int) -> None:
        before = self.freed.get(key, 0)
        after = before + change
        self.freed_bytes += change
        was, now = _bin(before), _bin(after)
        if was != now:
            if before:
                self._bins[was].discard(key)
            if after:
                self._bins.setdefault(now, set()).add(key)
        most = self._most
        if after:
            self.freed[key] = after
            if most is not None:
                if key == most[1]:
                    # The top one freed more, or less: then another may top it.
                    self._most = (after, key) if change > 0 else None
                elif after > most[0] or after == most[0] and key > most[1]:
                    self._most = (after, key)
        else:
            del self.freed[key]
            if most is not None and key == most[1]:
                self._most = None

    def top(self) -> tuple[int, StackKey]:
        """(bytes, stack) of the stack that freed most here (the greatest
        key among equals, as max() over (bytes, key) picks); the bucket
        must have frees."""
        if self._most is None:
            self._most = max((n, k) for k, n in self.freed.items())
        return self._most

    def at_least(self, freed_bytes: int):
        """The stacks that freed at least that many bytes here."""
        low = _bin(max(1, freed_bytes))
        for place, keys in self._bins.items():
            if place > low:
                yield from keys
            elif place == low:
                yield from (k for k in keys if self.freed[k] >= freed_bytes)


class BucketBook:
    """Per 64 MiB bucket, what the arena accounting needs of the flows in
    it, kept from the flows that changed (put), as memtrace.collect.rows
    keeps the (thread, stack) rows."""

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket] = {}

    @classmethod
    def of(cls, flows: Iterable[Flow]) -> "BucketBook":
        book = cls()
        for f in flows:
            book.put(None, f)
        return book

    def put(self, old: Optional[Flow], new: Optional[Flow]) -> None:
        """A flow was `old` and is now `new` (None: none)."""
        if old is not None and new is not None and old.bucket == new.bucket and old.tid == new.tid \
                and old.stack_key == new.stack_key and not old.before_exec and not new.before_exec:
            self.buckets[old.bucket].move(old, new)
            return
        # Blocks of an image gone by exec: nothing live, nothing freed here.
        if old is not None and not old.before_exec:
            self.buckets[old.bucket].add(old, -1)
        if new is not None and not new.before_exec:
            b = self.buckets.get(new.bucket)
            if b is None:
                b = self.buckets[new.bucket] = _Bucket()
            b.add(new, 1)


def _share_retained(retained: int, freed_by_stack: dict[StackKey, int], out: dict[StackKey, int]) -> None:
    """Shares in whole pages, as the RSS is counted; the pages left over
    from rounding down go to the stack that freed most, so the shares add
    up to the arena's retained bytes. To the byte, every stack's share
    moved with every free anywhere in the arena: with 100,000 stacks all
    of them changed every interval, for the view, the model's work and
    the recording alike."""
    freed_total = sum(freed_by_stack.values())
    if not freed_total or not retained:
        return
    top = max(freed_by_stack, key=lambda k: (freed_by_stack[k], k))
    _give_shares(retained, freed_by_stack.items(), freed_total, top, out)


def _give_shares(retained: int, candidates, freed_total: int, top: StackKey,
                 out: dict[StackKey, int]) -> None:
    """candidates: (stack, bytes it freed) of every stack whose share may
    be a page or more."""
    unit = RETAINED_SHARE_UNIT
    given = 0
    for key, freed in candidates:
        share = retained * freed // freed_total // unit * unit
        if share:
            out[key] = out.get(key, 0) + share
            given += share
    out[top] = out.get(top, 0) + retained - given


def _share_retained_of(retained: int, buckets: Sequence[_Bucket], out: dict[StackKey, int]) -> None:
    """_share_retained over an arena's buckets, looking only at the stacks
    that can get a page, or be the top: the others freed too little."""
    freed_total = sum(b.freed_bytes for b in buckets)
    if not freed_total or not retained:
        return
    n = len(buckets)

    def freed(key: StackKey) -> int:
        return sum(b.freed.get(key, 0) for b in buckets)

    if n == 1:
        top = buckets[0].top()[1]
    else:
        # The top freed at least what any stack freed in one bucket: so at
        # least 1/n of that in one of them.
        most = max(b.top()[0] for b in buckets if b.freed)
        suspects = {key for b in buckets for key in b.at_least(-(-most // n))}
        top = max(suspects, key=lambda k: (freed(k), k))
    # A share is a page or more where freed * retained >= page * freed_total.
    floor = -(-(RETAINED_SHARE_UNIT * freed_total) // (retained * n))
    keys = {key for b in buckets for key in b.at_least(floor)}
    _give_shares(retained, ((key, freed(key)) for key in keys), freed_total, top, out)


def account_mappings(kind: str, committed_bytes: int, resident_bytes: int,
                     heap_live_bytes: int, attached: bool = False) -> AllocatorAccount:
    """An allocator whose books cannot be read from outside (jemalloc,
    tcmalloc, mimalloc keep theirs in structures only their own code
    walks): what it holds is the anonymous memory it mapped inside its
    calls, and retained is the resident part of that less the live heap.
    Its blocks are all inside those mappings, so the live heap counts as
    resident up to what they hold. attached: the mappings made before the
    trace are not known, and blocks land in them too; none is then said
    never touched (the gap holds them up to the anonymous RSS)."""
    live_resident = heap_live_bytes if attached else min(heap_live_bytes, resident_bytes)
    allocator = AllocatorStats(
        kind=kind,
        committed_bytes=committed_bytes,
        resident_bytes=resident_bytes,
        live_bytes=heap_live_bytes,
        retained_bytes=max(0, resident_bytes - heap_live_bytes),
        live_not_resident_bytes=heap_live_bytes - live_resident,
    )
    return AllocatorAccount((), allocator, {})


def gap(rss_anon_bytes: int, allocator: AllocatorStats) -> Gap:
    """The equation, to the byte. The live heap counts in it with its
    resident part only; what was never touched is shown apart. Figures read
    at slightly different moments (smaps, status) are clipped so that the
    parts add up and none is negative."""
    live_resident = max(0, allocator.live_bytes - allocator.live_not_resident_bytes)
    heap_live = min(live_resident, rss_anon_bytes)
    retained = min(allocator.retained_bytes, rss_anon_bytes - heap_live)
    return Gap(
        rss_anon_bytes=rss_anon_bytes,
        heap_live_bytes=heap_live,
        allocator_retained_bytes=retained,
        other_anon_bytes=rss_anon_bytes - heap_live - retained,
        heap_live_not_resident_bytes=allocator.live_bytes - heap_live,
    )


def hints(arenas: Sequence[ArenaStats], trim_estimate_bytes: int, rss_anon_bytes: int) -> tuple[Note, ...]:
    """Suggestions with their numbers, when the numbers call for them.
    They are hints: the allocator's future behaviour is not certain.

    Rules: an estimate never exceeds what is resident (trimmable bytes are
    capped by the arenas' retained bytes, and those by the RSS); no two
    hints contradict (malloc_trim is suggested only where the free lists
    say it would give something back); blocks from before an attach are
    live, never retained."""
    out = []
    trim_estimate_bytes = min(trim_estimate_bytes, sum(a.retained_bytes for a in arenas),
                              rss_anon_bytes)
    threads = [a for a in arenas if a.kind == "thread"]
    t_resident = sum(a.resident_bytes for a in threads)
    t_retained = sum(a.retained_bytes for a in threads)
    if len(threads) >= 2 and t_retained >= 32 * MiB and t_retained >= 0.4 * t_resident:
        out.append(Note.of(notes.THREAD_ARENAS_RETAIN, arenas=len(threads),
                           retained_bytes=t_retained, resident_bytes=t_resident))
    trim_said = False
    main = next((a for a in arenas if a.kind == "main"), None)
    if main is not None and main.retained_bytes >= 32 * MiB and main.retained_bytes >= 0.4 * main.resident_bytes:
        if main.trimmable_bytes >= main.retained_bytes // 2:
            out.append(Note.of(notes.MAIN_ARENA_TRIMMABLE, retained_bytes=main.retained_bytes,
                               trimmable_bytes=main.trimmable_bytes))
            trim_said = True
        else:
            out.append(Note.of(notes.MAIN_ARENA_FRAGMENTED, retained_bytes=main.retained_bytes,
                               trimmable_bytes=main.trimmable_bytes))
            trim_said = True
    if not trim_said and trim_estimate_bytes >= 16 * MiB \
            and trim_estimate_bytes >= 0.1 * max(1, rss_anon_bytes):
        out.append(Note.of(notes.TRIM_WOULD_RETURN, bytes=trim_estimate_bytes))
    return tuple(out)


def jvm_hints(jvm: Optional[JvmStats]) -> tuple[Note, ...]:
    """What a JVM's flags keep from the stacks: without frame pointers in
    compiled code, its frames end the walk unless their sizes were read
    from the code cache."""
    if jvm is None or jvm.preserve_frame_pointer is not False or jvm.compiled_frames_walked:
        return ()
    return (Note.of(notes.JVM_NO_FRAME_POINTER),)
