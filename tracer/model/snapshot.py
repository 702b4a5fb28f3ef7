"""The accounting model: plain data in, plain data out.

Nothing here imports bcc, rich or sqlite3. The collector turns kernel maps
into `HeapRow`s; `build_snapshot` turns rows plus symbolized frames into a
`Snapshot`, which every sink (live view, JSON, recorder, reports) consumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from memtrace.model.notes import Note

# A kernel-side stack identity: (stack map id, return address read at the
# stack pointer on entry). The second part names the immediate caller even
# when the frame-pointer walk skips it.
StackKey = tuple[int, int]

# Outermost frames that show a walk reached the bottom of a thread's stack.
_ROOT_FUNCTIONS = (
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "thread_start",  # JVM/native thread trampolines
    "runtime.goexit",  # the bottom of every goroutine's stack (Go)
    "runtime.mstart",  # of a Go thread's system stack
)


# The records a snapshot holds one or more of per stack and per row
# (Counters, HeapRow, Flow, StackStats, ThreadStats) have slots: without an
# instance dictionary each is a fifth of the size and its fields are one
# read away, which at 100,000 stacks is most of what handling a changed
# one costs (cache misses, not Python's own work; bench/README.md, scale).
# They are not frozen, but never changed once made: a frozen dataclass sets
# each field through object.__setattr__ (0.8 us for a Flow, 0.17 us
# without), and ~14,000 of them are made a snapshot at 2,000 changed stacks
# a second. Sinks take an object that is still there for the same record
# (StackChanges): a new value is a new object. unsafe_hash keeps them
# hashable by their fields, as frozen made them.
@dataclass(slots=True, unsafe_hash=True)
class Counters:
    """Heap traffic charged to one key: bytes and calls, allocated and freed."""

    alloc_bytes: int = 0
    free_bytes: int = 0
    alloc_count: int = 0
    free_count: int = 0

    @property
    def live_bytes(self) -> int:
        return self.alloc_bytes - self.free_bytes

    @property
    def live_count(self) -> int:
        return self.alloc_count - self.free_count

    def __add__(self, other: "Counters") -> "Counters":
        return Counters(
            self.alloc_bytes + other.alloc_bytes,
            self.free_bytes + other.free_bytes,
            self.alloc_count + other.alloc_count,
            self.free_count + other.free_count,
        )


@dataclass(slots=True, unsafe_hash=True)
class HeapRow:
    """One entry of the kernel's (thread, stack) aggregate map."""

    tid: int
    stack_key: StackKey
    counters: Counters


@dataclass(slots=True, unsafe_hash=True)
class Flow:
    """Heap bytes one (thread, stack) key put into one 64 MiB-aligned bucket
    of the address space (a glibc thread-arena heap fills exactly one)."""

    tid: int
    stack_key: StackKey
    bucket: int  # address >> BUCKET_SHIFT
    alloc_bytes: int
    free_bytes: int
    alloc_count: int = 0
    free_count: int = 0
    # The same blocks as glibc's chunks (size word and rounding included),
    # comparable with what the arenas' own books say is in use.
    alloc_chunk_bytes: int = 0
    free_chunk_bytes: int = 0
    # Allocated by an image the process has since replaced by exec: those
    # blocks are gone with it.
    before_exec: bool = False

    @property
    def counters(self) -> Counters:
        """Blocks of an image before an exec count as freed by the exec."""
        freed = self.alloc_bytes if self.before_exec else self.free_bytes
        count = self.alloc_count if self.before_exec else self.free_count
        return Counters(self.alloc_bytes, freed, self.alloc_count, count)

    @property
    def live_bytes(self) -> int:
        return self.counters.live_bytes

    @property
    def live_chunk_bytes(self) -> int:
        return 0 if self.before_exec else self.alloc_chunk_bytes - self.free_chunk_bytes


BUCKET_SHIFT = 26  # glibc's HEAP_MAX_SIZE on 64-bit: 64 MiB


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int = 0
    rss_anon_bytes: int = 0
    peak_rss_bytes: Optional[int] = None  # the kernel's high-water mark
    # The figures are the kernel's last values before the process's exit
    # (its RSS counters, as kmem:rss_stat reported them), not a /proc read.
    at_exit: bool = False


@dataclass(frozen=True)
class DropStats:
    """What the kernel side could not record. Never silent: each is shown."""

    allocs_map_full: int = 0  # allocation not tracked: raise --max-allocs
    stats_map_full: int = 0  # allocation not tracked: too many (thread, stack) keys
    pending_map_full: int = 0  # call in flight not tracked: too many threads
    stack_lost: int = 0  # stack id unavailable: raise --stack-storage-size
    vm_events_lost: int = 0  # address-space events the ring buffer had no room for

    @property
    def total(self) -> int:
        return self.allocs_map_full + self.stats_map_full + self.pending_map_full


@dataclass(frozen=True)
class HeapTotals:
    """What the probes traced. Blocks allocated before an attach are not in
    the counters: live_before_trace_bytes estimates them from the
    allocator's own books."""

    counters: Counters = Counters()
    untracked_free_count: int = 0
    trim_calls: int = 0
    trim_released_calls: int = 0  # malloc_trim calls that returned 1
    drops: DropStats = DropStats()
    peak_live_bytes: int = 0  # the traced heap's high-water mark, kept at every call
    peak_live_elapsed_s: Optional[float] = None  # when it was reached
    # The live blocks as the allocator holds them: glibc's chunks (size
    # word and rounding), jemalloc's and mimalloc's size classes (what
    # malloc_usable_size says; Redis's used_memory counts these), tcmalloc's
    # classes approximately.
    live_allocator_bytes: int = 0
    # Attach mode: live blocks allocated before the attach (an estimate:
    # the arenas' in-use bytes less what was traced into them, and large
    # blocks mmapped before). None where it does not apply (launch, light).
    live_before_trace_bytes: Optional[int] = None

    @property
    def live_bytes(self) -> int:
        return self.counters.live_bytes


@dataclass(slots=True, unsafe_hash=True)
class ThreadStats:
    tid: int
    name: str
    counters: Counters
    alive: bool = True


@dataclass(slots=True, unsafe_hash=True)
class StackStats:
    frames: tuple[str, ...]  # innermost first: the malloc caller is frames[0]
    tids: tuple[int, ...]
    counters: Counters
    truncated: bool = False
    live_delta_bytes: int = 0  # growth of live bytes over the last interval
    retained_bytes: int = 0  # estimate: its share of what arenas keep after its frees


class StackChanges(tuple):
    """Snapshot.stacks as the collector keeps it (memtrace.collect.aggregate):
    a tuple of StackStats in the model's order, that also says what changed
    since the tuple `since` (the previous snapshot's): the stacks that are
    new objects (`fresh`) and the objects that went (`gone`); every other
    stack is the very object it was. A sink may then skip comparing the
    others: with 100,000 stacks, finding the few that changed by looking
    at each took the recorder a tenth of a second per interval."""

    since: Optional[tuple] = None
    fresh: tuple = ()
    gone: tuple = ()
    # One for one with fresh: the object of `since` each one replaces, or
    # None for a stack new to the tuple (the others of gone went).
    replaced: tuple = ()


@dataclass(frozen=True)
class Rates:
    """Per-second rates over the last interval."""

    alloc_bytes_per_s: float = 0.0
    free_bytes_per_s: float = 0.0
    alloc_count_per_s: float = 0.0
    free_count_per_s: float = 0.0


@dataclass(frozen=True)
class OsStats:
    """What the process holds of the OS's memory, from the address-space model."""

    mapped_bytes: int = 0
    reserved_bytes: int = 0  # PROT_NONE or MAP_NORESERVE: address space only
    committed_bytes: int = 0  # writable: may become resident
    resident_bytes: int = 0
    returned_bytes: int = 0  # given back since the trace began (munmap, madvise, ...)


@dataclass(frozen=True)
class ArenaStats:
    id: str  # the malloc_state address, hex
    kind: str  # "main" | "thread"
    tids: tuple[int, ...]  # threads seen allocating into it
    heap_count: int
    reserved_bytes: int
    committed_bytes: int
    resident_bytes: int
    live_bytes: int  # heap bytes the program holds inside it (traced; light mode: estimated)
    system_mem_bytes: int = 0  # what glibc says it took from the OS
    free_bytes: int = 0  # in bins and the top chunk, per glibc's own lists
    trimmable_bytes: int = 0  # estimate of what malloc_trim(0) would return now
    live_is_estimate: bool = False  # light mode: from glibc's structures, not probes
    reliable: bool = True
    # Besides live_bytes: blocks allocated before an attach (estimate).
    live_before_trace_bytes: int = 0

    @property
    def all_live_bytes(self) -> int:
        """Traced blocks and, after an attach, those from before."""
        return self.live_bytes + self.live_before_trace_bytes

    @property
    def retained_bytes(self) -> int:
        """Resident but not live: freed memory the allocator keeps."""
        return max(0, self.resident_bytes - self.all_live_bytes)


@dataclass(frozen=True)
class AllocatorStats:
    kind: str = "glibc"
    arena_count: int = 0
    committed_bytes: int = 0
    resident_bytes: int = 0
    live_bytes: int = 0
    retained_bytes: int = 0
    mmapped_chunk_count: int = 0
    mmapped_chunk_bytes: int = 0
    estimate: bool = False  # light mode
    # Part of live_bytes allocated before an attach (estimate, full mode).
    live_before_trace_bytes: int = 0
    # Part of live_bytes in pages never touched (large blocks not written):
    # neither resident nor in the gap.
    live_not_resident_bytes: int = 0


@dataclass(frozen=True)
class RegionStats:
    """A region of the address space that has not been given back."""

    start: int
    end: int
    kind: str
    origin_frames: tuple[str, ...]
    origin_tid: Optional[int]
    in_malloc: bool
    committed_bytes: int
    resident_bytes: int


@dataclass(frozen=True)
class TrimCall:
    tid: int
    elapsed_s: float
    returned_bytes: int  # anonymous RSS before minus after
    result: int  # malloc_trim's return: 1 if it released memory
    # False: the RSS was not watched yet (a program that reaches malloc_trim
    # through dlsym, as Python's ctypes does: watched from its first call on)
    measured: bool = True


@dataclass(frozen=True)
class TrimStats:
    calls: int = 0
    returned_bytes: int = 0
    estimate_bytes: int = 0  # what malloc_trim(0) would return now
    recent: tuple[TrimCall, ...] = ()


@dataclass(frozen=True)
class Gap:
    """rss_anon = heap live + allocator retained + other anonymous memory,
    to the byte, every part >= 0. heap live is the resident part of every
    live block, traced or from before the attach; the live bytes in pages
    never touched are apart (heap_live_not_resident_bytes), outside the sum."""

    rss_anon_bytes: int = 0
    heap_live_bytes: int = 0
    allocator_retained_bytes: int = 0
    other_anon_bytes: int = 0  # JVM heap, thread stacks, direct mmaps, chunk overheads
    heap_live_not_resident_bytes: int = 0


@dataclass(frozen=True)
class JvmStats:
    """A HotSpot JVM's own view, beside ours: whether its compiled frames
    keep frame pointers, and its Native Memory Tracking malloc total (the
    mallocs the JVM makes itself; the heap we see adds every other native
    library's, zlib's Inflaters among them)."""

    preserve_frame_pointer: Optional[bool] = None  # None: not known
    interpreter_found: bool = False  # interpreted frames name their methods
    # compiled frames are walked by their size (read from the code cache),
    # frame pointers or not
    compiled_frames_walked: bool = False
    nmt_malloc_bytes: Optional[int] = None  # None: NMT off or not answered
    nmt_malloc_count: Optional[int] = None
    nmt_elapsed_s: Optional[float] = None  # when NMT answered (since the start)

    def heap_live_bytes(self, heap: HeapTotals) -> int:
        """Our heap live, as NMT counts: since the JVM started (blocks
        from before an attach are an estimate)."""
        return heap.live_bytes + (heap.live_before_trace_bytes or 0)

    def not_seen_by_nmt_bytes(self, heap: HeapTotals) -> Optional[int]:
        if self.nmt_malloc_bytes is None:
            return None
        return self.heap_live_bytes(heap) - self.nmt_malloc_bytes


@dataclass(frozen=True)
class Snapshot:
    pid: int
    comm: str
    elapsed_s: float
    interval_s: float = 0.0
    process: ProcessStats = ProcessStats()
    heap: HeapTotals = HeapTotals()
    threads: tuple[ThreadStats, ...] = ()
    stacks: tuple[StackStats, ...] = ()
    rates: Rates = Rates()
    target_alive: bool = True
    exit_status: Optional[int] = None
    notes: tuple[Note, ...] = field(default_factory=tuple)
    light: bool = False  # no malloc probes: heap figures are estimates
    os: Optional[OsStats] = None
    allocator: Optional[AllocatorStats] = None
    arenas: tuple[ArenaStats, ...] = ()
    regions: tuple[RegionStats, ...] = ()
    trim: Optional[TrimStats] = None
    gap: Optional[Gap] = None
    hints: tuple[Note, ...] = ()
    jvm: Optional[JvmStats] = None  # a HotSpot JVM's own figures
    # When smaps and the arenas were last read (seconds since the start):
    # after the process's exit, the regions and arenas are as of then.
    memory_read_elapsed_s: Optional[float] = None
    # Address-space syscalls since the previous snapshot, for the recorder
    # (ts, tid, kind, addr, length, prot, flags, result, in_malloc, frames);
    # not part of the JSON snapshot.
    vm_events: tuple[dict, ...] = ()

    @property
    def has_retained(self) -> bool:
        """Whether any stack holds a share of the allocator's retained bytes:
        the one test for showing, ranking and weighing stacks by retained.
        Where the arenas were not read, every share is zero."""
        return any(st.retained_bytes > 0 for st in self.stacks)

    @property
    def truncated_stack_count(self) -> int:
        return sum(1 for s in self.stacks if s.truncated)

    def truncated_shares(self) -> dict:
        """The truncated stacks' count, and their shares (0..1) of the
        stacks, of the live bytes and of the allocated bytes."""
        def share(part: int, whole: int) -> float:
            return round(part / whole, 4) if whole > 0 else 0.0

        def live(st: StackStats) -> int:
            return max(0, st.counters.live_bytes)

        cut = [st for st in self.stacks if st.truncated]
        return {
            "stack_count": len(cut),
            "stack_share": share(len(cut), len(self.stacks)),
            "live_bytes_share": share(sum(map(live, cut)), sum(map(live, self.stacks))),
            "alloc_bytes_share": share(sum(st.counters.alloc_bytes for st in cut),
                                       sum(st.counters.alloc_bytes for st in self.stacks)),
        }

    def to_json(self) -> dict:
        return snapshot_to_json(self)


# ---------------------------------------------------------------- building


def looks_truncated(frames: Sequence[str], max_depth: int) -> bool:
    """A walk that hit the depth limit, or whose outermost frame is not a
    thread's entry point, probably lost frames (missing frame pointers)."""
    if not frames:
        return True
    if len(frames) >= max_depth:
        return True
    outer = frames[-1]
    name = outer.split("+", 1)[0].split(" ", 1)[0]
    # Go's symbol table names its assembly functions with their ABI
    # (runtime.goexit.abi0); its own table, without.
    return name.removesuffix(".abi0") not in _ROOT_FUNCTIONS


# Exited threads that hold nothing any more are kept one by one up to this
# many (the latest tids); the rest become one row (tid 0): a service whose
# pool threads come and go would otherwise carry every one of them forever.
EXITED_THREADS_KEPT = 64
EXITED_THREADS_NAME = "(exited threads)"


def aggregate_threads(
    rows: Iterable[HeapRow], names: Mapping[int, str], alive: Iterable[int],
    exited_kept: int = EXITED_THREADS_KEPT,
) -> tuple[ThreadStats, ...]:
    per_tid: dict[int, Counters] = {}
    for row in rows:
        per_tid[row.tid] = per_tid.get(row.tid, Counters()) + row.counters
    alive_set = set(alive)
    threads = [
        ThreadStats(tid, names.get(tid, "?"), c, tid in alive_set)
        for tid, c in per_tid.items()
    ]
    done = sorted((t for t in threads if t.tid and not t.alive and t.counters.live_bytes == 0),
                  key=lambda t: t.tid)
    if len(done) > exited_kept:
        # With the threads the collector already folded (tid 0), if any.
        folded = done[: len(done) - exited_kept] + [t for t in threads if t.tid == 0]
        gone = {t.tid for t in folded}
        threads = [t for t in threads if t.tid not in gone]
        threads.append(ThreadStats(0, EXITED_THREADS_NAME,
                                   sum((t.counters for t in folded), start=Counters()), False))
    threads.sort(key=lambda t: (-t.counters.live_bytes, -t.counters.alloc_bytes, t.tid))
    return tuple(threads)


def aggregate_stacks(
    rows: Iterable[HeapRow],
    frames_of: Callable[[StackKey], tuple[str, ...]],
    max_depth: int,
    previous: Optional[Snapshot] = None,
    retained: Optional[Mapping[StackKey, int]] = None,
) -> tuple[StackStats, ...]:
    """Group rows by symbolized frames (several kernel keys may resolve to the
    same frames) and attach the growth since the previous snapshot."""
    counters: dict[tuple[str, ...], Counters] = {}
    tids: dict[tuple[str, ...], set[int]] = {}
    kept: dict[tuple[str, ...], int] = {}
    retained = retained or {}
    for row in rows:
        frames = frames_of(row.stack_key)
        counters[frames] = counters.get(frames, Counters()) + row.counters
        tids.setdefault(frames, set()).add(row.tid)
    for key, n in retained.items():
        frames = frames_of(key)
        kept[frames] = kept.get(frames, 0) + n
    before = {s.frames: s.counters.live_bytes for s in previous.stacks} if previous else {}
    stacks = [
        StackStats(
            frames=frames,
            tids=tuple(sorted(tids[frames])),
            counters=c,
            truncated=looks_truncated(frames, max_depth),
            live_delta_bytes=c.live_bytes - before.get(frames, 0),
            retained_bytes=kept.get(frames, 0),
        )
        for frames, c in counters.items()
    ]
    stacks.sort(key=lambda s: (-s.counters.live_bytes, -s.counters.alloc_bytes, s.frames))
    return tuple(stacks)


def rates_between(previous: Optional[Snapshot], heap: HeapTotals, elapsed_s: float) -> Rates:
    if previous is None:
        return Rates()
    dt = elapsed_s - previous.elapsed_s
    if dt <= 0:
        return previous.rates
    a, b = previous.heap.counters, heap.counters
    return Rates(
        (b.alloc_bytes - a.alloc_bytes) / dt,
        (b.free_bytes - a.free_bytes) / dt,
        (b.alloc_count - a.alloc_count) / dt,
        (b.free_count - a.free_count) / dt,
    )


# ---------------------------------------------------------------- JSON


def _counters_json(c: Counters) -> dict:
    return {
        "live_bytes": c.live_bytes,
        "alloc_bytes": c.alloc_bytes,
        "free_bytes": c.free_bytes,
        "alloc_count": c.alloc_count,
        "free_count": c.free_count,
    }


def snapshot_to_json(s: Snapshot) -> dict:
    drops = s.heap.drops
    return {
        "pid": s.pid,
        "comm": s.comm,
        "elapsed_s": round(s.elapsed_s, 3),
        "target_alive": s.target_alive,
        "exit_status": s.exit_status,
        "process": {k: v for k, v in asdict(s.process).items() if v is not None},
        "heap": {
            **_counters_json(s.heap.counters),
            "untracked_free_count": s.heap.untracked_free_count,
            "dropped_count": drops.total,
            "drops": asdict(drops),
            "trim_calls": s.heap.trim_calls,
            "trim_released_calls": s.heap.trim_released_calls,
            "live_allocator_bytes": s.heap.live_allocator_bytes,
            "peak_live_bytes": s.heap.peak_live_bytes,
            "peak_live_elapsed_s": s.heap.peak_live_elapsed_s,
            **_before_trace_json(s.heap),
            "rates": asdict(s.rates),
        },
        "threads": [
            {"tid": t.tid, "name": t.name, "alive": t.alive, **_counters_json(t.counters)}
            for t in s.threads
        ],
        "stacks": [
            {
                "frames": list(st.frames),
                "tids": list(st.tids),
                **_counters_json(st.counters),
                "live_delta_bytes": st.live_delta_bytes,
                "retained_bytes": st.retained_bytes,
                "truncated": st.truncated,
            }
            for st in s.stacks
        ],
        "truncated_stack_count": s.truncated_stack_count,
        "truncated": s.truncated_shares(),
        "notes": [n.to_json() for n in s.notes],
        "light": s.light,
        **({"memory_read_elapsed_s": round(s.memory_read_elapsed_s, 3)}
           if s.memory_read_elapsed_s is not None else {}),
        **_address_space_json(s),
    }


def _before_trace_json(heap: HeapTotals) -> dict:
    if heap.live_before_trace_bytes is None:
        return {}
    return {"live_before_trace_bytes": heap.live_before_trace_bytes,
            "live_before_trace_is_estimate": True}


def _address_space_json(s: Snapshot) -> dict:
    """Sections of the address-space layer; absent when it did not run."""
    out: dict = {}
    if s.os is not None:
        out["os"] = asdict(s.os)
    if s.allocator is not None:
        out["allocator"] = asdict(s.allocator)
    if s.os is not None or s.arenas:
        out["arenas"] = [
            {**asdict(a), "tids": list(a.tids), "retained_bytes": a.retained_bytes}
            for a in s.arenas
        ]
        out["regions"] = [
            {**asdict(r), "origin_frames": list(r.origin_frames)} for r in s.regions
        ]
    if s.trim is not None:
        out["trim"] = {
            "calls": s.trim.calls,
            "returned_bytes": s.trim.returned_bytes,
            "estimate_bytes": s.trim.estimate_bytes,
            "recent": [asdict(c) for c in s.trim.recent],
        }
    if s.gap is not None:
        out["gap"] = asdict(s.gap)
    out["hints"] = [h.to_json() for h in s.hints]
    if s.jvm is not None:
        out["jvm"] = _jvm_json(s)
    return out


def _jvm_json(s: Snapshot) -> dict:
    """The JVM's figures, with ours beside NMT's (derived: not decoded)."""
    out = asdict(s.jvm)
    if s.jvm.nmt_malloc_bytes is not None:
        out["heap_live_bytes"] = s.jvm.heap_live_bytes(s.heap)
        out["not_seen_by_nmt_bytes"] = s.jvm.not_seen_by_nmt_bytes(s.heap)
    return out
