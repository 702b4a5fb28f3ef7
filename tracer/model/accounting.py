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
    flows: Optional[Iterable[Flow]],
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
    They are live, never retained."""
    flows = list(flows) if flows is not None else None
    owner: dict[int, int] = {}
    for index, arena in enumerate(arenas):
        for bucket in buckets_of(arena):
            owner.setdefault(bucket, index)
    live = [0] * len(arenas)
    live_chunks = [0] * len(arenas)
    freed_by_stack: list[dict[StackKey, int]] = [dict() for _ in arenas]
    tids: list[set[int]] = [set() for _ in arenas]
    if flows is not None:
        for f in flows:
            i = owner.get(f.bucket)
            if i is None:
                continue  # an mmapped chunk, outside every arena
            if f.before_exec:
                continue  # gone with the image that made them: nothing live, nothing freed here
            # Flow.live_bytes and live_chunk_bytes spelled out: this loop
            # runs over every row of the map each interval.
            live[i] += f.alloc_bytes - f.free_bytes
            live_chunks[i] += f.alloc_chunk_bytes - f.free_chunk_bytes
            if f.alloc_bytes and f.tid:  # tid 0: exited threads, folded
                tids[i].add(f.tid)
            if f.free_bytes:
                freed = freed_by_stack[i]
                freed[f.stack_key] = freed.get(f.stack_key, 0) + f.free_bytes
    stats = []
    stack_retained: dict[StackKey, int] = {}
    for i, arena in enumerate(arenas):
        estimate = flows is None
        in_use = max(0, arena.system_mem_bytes - arena.free_bytes)  # glibc's books
        before = 0
        if attached and not estimate and arena.existed_before_trace:
            before = max(0, in_use - live_chunks[i])
        live_bytes = in_use if estimate else max(0, live[i])
        resident = sum(h.resident_bytes for h in arena.heaps)
        stat = ArenaStats(
            id=f"0x{arena.address:x}",
            kind=arena.kind,
            tids=tuple(sorted(tids[i])),
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
        _share_retained(stat.retained_bytes, freed_by_stack[i], stack_retained)
    arena_live = sum(s.live_bytes for s in stats)
    arena_before = sum(s.live_before_trace_bytes for s in stats)
    if flows is None:
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
    allocator = AllocatorStats(
        arena_count=len(stats),
        committed_bytes=sum(s.committed_bytes for s in stats) + chunks.committed_bytes
        + chunks.before_trace_bytes,
        resident_bytes=sum(s.resident_bytes for s in stats) + chunk_resident,
        live_bytes=live_total,
        retained_bytes=sum(s.retained_bytes for s in stats),
        mmapped_chunk_count=chunks.count + chunks.before_trace_count,
        mmapped_chunk_bytes=chunk_resident,
        estimate=flows is None,
        live_before_trace_bytes=before_total,
        live_not_resident_bytes=max(0, live_total - live_resident),
    )
    return AllocatorAccount(tuple(stats), allocator, stack_retained)


RETAINED_SHARE_UNIT = 4096


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
    unit = RETAINED_SHARE_UNIT
    given = 0
    for key, freed in freed_by_stack.items():
        share = retained * freed // freed_total // unit * unit
        if share:
            out[key] = out.get(key, 0) + share
            given += share
    top = max(freed_by_stack, key=lambda k: (freed_by_stack[k], k))
    out[top] = out.get(top, 0) + retained - given


def account_mappings(kind: str, committed_bytes: int, resident_bytes: int,
                     heap_live_bytes: int) -> AllocatorAccount:
    """An allocator whose books cannot be read from outside (jemalloc,
    tcmalloc, mimalloc keep theirs in structures only their own code
    walks): what it holds is the anonymous memory it mapped inside its
    calls, and retained is the resident part of that less the live heap.
    Its blocks are all inside those mappings, so the live heap counts as
    resident up to what they hold."""
    live_resident = min(heap_live_bytes, resident_bytes)
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
