"""The facts every view shows about a snapshot, decided once.

The live screen styles them and the batch/summary views print them plain;
both take the wording from here so they never disagree. `header(s)` is
the header as `HeaderLine`s in display order; each line says what kind it
is (a group of fields, the gap, a drop, a hint, a note) so a view can mark
it, and a section the snapshot lacks (older recordings, the address-space
layer off) simply gives no line.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from memtrace.model.snapshot import ArenaStats, RegionStats, Snapshot, StackStats, ThreadStats
from memtrace.output.notes import note_text
from memtrace.output.view.fmt import (
    NO_RATE,
    fmt_bytes,
    fmt_count,
    fmt_counted,
    fmt_count_rate,
    fmt_duration,
    fmt_rate,
    fmt_si,
)

# How a value should look: the live view maps tones to colours.
PLAIN, GOOD, BAD, WARN, DIM, TITLE = "plain", "good", "bad", "warn", "dim", "title"


@dataclass(frozen=True)
class Field:
    label: str
    value: str
    tone: str = PLAIN

    @property
    def text(self) -> str:
        return f"{self.label} {self.value}" if self.label else self.value


# What a header line is, so a view can mark it (a badge, a bar).
FIELDS, GAP, DROP, HINT, NOTE = "fields", "gap", "drop", "hint", "note"


@dataclass(frozen=True)
class HeaderLine:
    """One header line: fields packed left to right (wrapping between
    fields, never inside one), or for drops, hints and notes one sentence.

    `rank` says what stays when the screen is short: low ranks first.
    `compact` is a shorter wording of the same fields for narrow screens.
    """

    rank: int
    kind: str
    fields: tuple[Field, ...] = ()
    text: str = ""
    compact: tuple[Field, ...] = ()
    sep: str = "  "

    def plain(self) -> str:
        if self.kind == DROP:
            return f"DROPS: {self.text}"
        if self.kind == HINT:
            return f"HINT: {self.text}"
        if self.kind == NOTE:
            return f"note: {self.text}"
        return self.sep.join(f.text for f in self.fields)


# Each drop counter, what it lost (a noun, then what befell it), and the
# flag that fixes it (None until the CLI has one: then the line says what
# was lost and stops there).
_DROP_ADVICE: tuple[tuple[str, str, str, Optional[str], str], ...] = (
    ("allocs_map_full", "allocation", "untracked", "raise --max-allocs", "allocs map full"),
    ("stats_map_full", "allocation", "untracked", "raise --max-stats", "too many thread+stack pairs"),
    ("pending_map_full", "call", "untracked", None, "too many threads inside malloc at once"),
    ("stack_lost", "stack", "lost", "raise --stack-storage-size", "stack storage full"),
    ("vm_events_lost", "address-space event", "lost", "raise --event-buffer", "ring buffer full"),
)


def drop_warnings(s: Snapshot) -> list[str]:
    """One line per non-zero drop counter, naming the flag that fixes it."""
    drops = s.heap.drops
    lines = []
    for attr, noun, fate, fix, why in _DROP_ADVICE:
        n = getattr(drops, attr, 0)
        if n:
            # The fix comes before the cause so a narrow screen still shows it.
            lines.append(f"{fmt_counted(n, noun)} {fate}: " + (f"{fix} ({why})" if fix else why))
    return lines


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def target_state(s: Snapshot, replay: bool = False) -> tuple[str, str]:
    """('running', GOOD) or ('exited with status 1', BAD) and the like;
    in a replay 'replay' for 'running', and 'replay: ' before the rest.
    A negative status is a signal, as subprocess reports it."""
    if s.target_alive:
        return ("replay", TITLE) if replay else ("running", GOOD)
    state, tone = _ended(s.exit_status)
    return (f"replay: {state}", tone) if replay else (state, tone)


def _ended(status: Optional[int]) -> tuple[str, str]:
    if status is None:
        return "exited (status unknown)", WARN
    if status < 0:
        return f"killed by {signal_name(-status)}", BAD
    return f"exited with status {status}", GOOD if status == 0 else BAD


def is_estimate(s: Snapshot) -> bool:
    """Heap live and retained figures come from glibc's own structures, not
    from malloc probes (light mode)."""
    return s.light or (s.allocator is not None and s.allocator.estimate)


def arena_live(a: ArenaStats) -> str:
    """An arena's live bytes, those from before an attach included; '~'
    where any part is an estimate."""
    estimate = a.live_is_estimate or a.live_before_trace_bytes
    return ("~" if estimate else "") + fmt_bytes(a.all_live_bytes)


def estimated(s: Snapshot, n: int) -> str:
    """A heap figure, '~'-prefixed when it is an estimate."""
    return ("~" if is_estimate(s) else "") + fmt_bytes(n)


def _identity(s: Snapshot, every_s: Optional[float] = None, replay: bool = False) -> list[Field]:
    state, tone = target_state(s, replay)
    fields = [Field("", "memtrace", TITLE)]
    if s.light:
        # Next to the name: every '~' figure on screen depends on it.
        fields.append(Field("", "light mode", WARN))
    fields += [
        Field("pid", f"{s.pid} ({s.comm})"),
        Field("", state, tone),
        Field("up", fmt_duration(s.elapsed_s)),
    ]
    if every_s or s.interval_s > 0:
        # The interval asked for: the measured one wobbles by milliseconds.
        fields.append(Field("every", fmt_duration(every_s or s.interval_s)))
    return fields


def _gap_fields(s: Snapshot, compact: bool) -> tuple[Field, ...]:
    g = s.gap
    if g is None:
        return ()
    # Blocks from before an attach are counted from glibc's books: estimated.
    before = bool(s.heap.live_before_trace_bytes)
    live = ("~" if before and not is_estimate(s) else "") + estimated(s, g.heap_live_bytes)
    fields = [
        Field("anon RSS", fmt_bytes(g.rss_anon_bytes), TITLE),
        Field("= heap live", live),
        Field("+ retained" if compact else "+ allocator retained", estimated(s, g.allocator_retained_bytes)),
        Field("+ other", fmt_bytes(g.other_anon_bytes)),
    ]
    if g.heap_live_not_resident_bytes:
        fields.append(Field("(live, never touched:" if not compact else "(untouched:",
                            fmt_bytes(g.heap_live_not_resident_bytes) + ")"))
    return tuple(fields)


def before_trace_note(s: Snapshot) -> Optional[str]:
    """Said once wherever stacks are shown: the heap from before an attach
    has no stacks."""
    before = s.heap.live_before_trace_bytes
    if not before:
        return None
    return (f"~{fmt_bytes(before)} of the heap is from before the attach: live in the gap, "
            "in no stack (stacks hold what was allocated while traced)")


def exit_note(s: Snapshot) -> Optional[str]:
    """After the process's exit: which figures are from when."""
    if s.target_alive:
        return None
    parts = []
    if s.process.at_exit:
        parts.append("RSS as the kernel counted it at the exit")
    if s.memory_read_elapsed_s is not None and s.memory_read_elapsed_s < s.elapsed_s - 0.05:
        parts.append(f"arenas and regions as read at {fmt_duration(s.memory_read_elapsed_s)}")
    if not parts:
        return None
    return "the process has exited: heap live at the exit; " + "; ".join(parts)


def gap_text(s: Snapshot) -> Optional[str]:
    """'anon RSS 7.0 GiB = heap live 700.0 MiB + allocator retained ...'."""
    fields = _gap_fields(s, compact=False)
    return " ".join(f.text for f in fields) if fields else None


def _gap(s: Snapshot) -> list[HeaderLine]:
    if s.gap is None:
        return []
    return [HeaderLine(0, GAP, _gap_fields(s, False), compact=_gap_fields(s, True), sep=" ")]


def arena_kinds(arenas: Sequence[ArenaStats]) -> str:
    """'1 main, 8 thread'."""
    main = sum(1 for a in arenas if a.kind == "main")
    parts = [f"{main} main"] if main else []
    if len(arenas) - main:
        parts.append(f"{len(arenas) - main} thread")
    return ", ".join(parts)


def _allocator(s: Snapshot) -> list[Field]:
    return _allocator_fields(s, compact=False)


def _allocator_compact(s: Snapshot) -> list[Field]:
    return _allocator_fields(s, compact=True)


def _allocator_fields(s: Snapshot, compact: bool) -> list[Field]:
    a = s.allocator
    if a is None:
        return []
    if compact:
        fields = [
            Field("arenas", str(a.arena_count), TITLE),
            Field("committed", fmt_bytes(a.committed_bytes)),
            Field("resident", fmt_bytes(a.resident_bytes)),
        ]
        if s.trim is not None:
            fields.append(Field("trim would return", "~" + fmt_bytes(s.trim.estimate_bytes)))
        return fields
    kinds = arena_kinds(s.arenas)
    fields = [
        Field(f"{a.kind} arenas", f"{a.arena_count}" + (f" ({kinds})" if kinds else ""), TITLE),
        Field("committed", fmt_bytes(a.committed_bytes)),
        Field("resident", fmt_bytes(a.resident_bytes)),
    ]
    if s.gap is None:  # otherwise the gap line says it
        fields.append(Field("retained", estimated(s, a.retained_bytes)))
    if a.mmapped_chunk_count:
        fields.append(
            Field("mmapped chunks", f"{fmt_count(a.mmapped_chunk_count)} ({fmt_bytes(a.mmapped_chunk_bytes)})")
        )
    if s.trim is not None:
        fields.append(Field("malloc_trim(0) would return", "~" + fmt_bytes(s.trim.estimate_bytes)))
    unreliable = sum(1 for arena in s.arenas if not arena.reliable)
    if unreliable:
        fields.append(Field("", f"{unreliable} read unreliably", WARN))
    return fields


def _memory(s: Snapshot) -> list[Field]:
    p, c = s.process, s.heap.counters
    fields = []
    # The heap first: it is what memtrace adds to what `top` already shows.
    # The gap line, when there is one, already gives heap live and anon RSS;
    # without malloc probes (light mode) there are no blocks to count.
    if s.gap is None and not s.light:
        fields.append(Field("heap live", fmt_bytes(c.live_bytes), TITLE))
        fields.append(Field("in", fmt_counted(c.live_count, "block")))
    elif not s.light:
        fields.append(Field("live blocks", fmt_count(c.live_count)))
    fields.append(Field("RSS", fmt_bytes(p.rss_bytes)))
    if s.gap is None:
        fields.append(Field("anon", fmt_bytes(p.rss_anon_bytes)))
    if p.peak_rss_bytes is not None:
        fields.append(Field("peak", fmt_bytes(p.peak_rss_bytes)))
    if s.heap.peak_live_bytes and not s.light:
        fields.append(Field("heap peak", fmt_bytes(s.heap.peak_live_bytes)))
    return fields


def _address_space(s: Snapshot) -> list[Field]:
    o = s.os
    if o is None:
        return []
    return [
        Field("address space: mapped", fmt_bytes(o.mapped_bytes)),
        Field("reserved", fmt_bytes(o.reserved_bytes)),
        Field("committed", fmt_bytes(o.committed_bytes)),
        Field("resident", fmt_bytes(o.resident_bytes)),
        Field("returned", fmt_bytes(o.returned_bytes)),
    ]


def trim_calls_text(calls: int, released: int) -> str:
    """'1 call, which released memory', '3 calls, 1 of which released memory'."""
    if calls == 1:
        return "1 call, which released memory" if released else "1 call, which released nothing"
    if not released:
        return f"{fmt_count(calls)} calls, none of which released memory"
    if released >= calls:
        return f"{fmt_count(calls)} calls, each of which released memory"
    return f"{fmt_count(calls)} calls, {fmt_count(released)} of which released memory"


def first_interval(s: Snapshot) -> bool:
    """The first snapshot: its interval runs from the start, and there is no
    earlier reading to take rates from."""
    return s.interval_s >= s.elapsed_s


def interval_label(s: Snapshot, every_s: Optional[float] = None) -> str:
    """The last interval, said steadily: the interval asked for when the
    measured one is close to it (it is late by a few milliseconds)."""
    if every_s and abs(s.interval_s - every_s) <= every_s * _STEADY_SHARE:
        return fmt_duration(every_s)
    return fmt_duration(s.interval_s)


_STEADY_SHARE = 0.2


def trim_text(s: Snapshot) -> Optional[str]:
    """'3 (1 released) returned 40.0 MiB'; None when malloc_trim was not called."""
    h = s.heap
    calls = max(h.trim_calls, s.trim.calls if s.trim is not None else 0)
    if not calls:
        return None
    text = f"{fmt_count(calls)} ({fmt_count(h.trim_released_calls)} released)"
    if s.trim is not None:
        text += f" returned {fmt_bytes(s.trim.returned_bytes)}"
    return text


def _totals(s: Snapshot) -> list[Field]:
    h = s.heap
    c = h.counters
    fields = []
    if not s.light:  # without malloc probes there is no traffic to count
        fields += [
            Field("since start: allocated",
                  f"{fmt_bytes(c.alloc_bytes)} ({fmt_si(c.alloc_count)} {'call' if c.alloc_count == 1 else 'calls'})"),
            Field("freed", f"{fmt_bytes(c.free_bytes)} ({fmt_si(c.free_count)})"),
        ]
    if h.untracked_free_count:
        # Frees of blocks allocated before tracing began: expected early on.
        fields.append(Field("untracked frees", fmt_count(h.untracked_free_count), DIM))
    trim = trim_text(s)
    if trim:
        fields.append(Field("malloc_trim", trim))
    return fields


def _rates(s: Snapshot, every_s: Optional[float] = None) -> list[Field]:
    if s.light:
        return []
    r = s.rates
    if first_interval(s):
        fields = [Field("rates: malloc", NO_RATE, DIM), Field("free", NO_RATE, DIM)]
    else:
        over = f"last {interval_label(s, every_s)}:" if s.interval_s > 0 else "rates:"
        fields = [
            Field(f"{over} malloc", f"{fmt_rate(r.alloc_bytes_per_s)} {fmt_count_rate(r.alloc_count_per_s)}"),
            Field("free", f"{fmt_rate(r.free_bytes_per_s)} {fmt_count_rate(r.free_count_per_s)}"),
        ]
    truncated = s.truncated_stack_count
    if truncated:
        fields.append(
            Field("truncated stacks", f"{fmt_count(truncated)}/{fmt_count(len(s.stacks))}", WARN)
        )
    return fields


DROPS_RANK = 1
HINTS_RANK = 1
DETAIL_RANK = 3  # from here on, lines a short screen gives up for its tables
NOTES_RANK = 10


def _fields(
    rank: int,
    group: Callable[[Snapshot], list[Field]],
    compact: Optional[Callable[[Snapshot], list[Field]]] = None,
) -> Callable[[Snapshot], list[HeaderLine]]:
    def lines(s: Snapshot) -> list[HeaderLine]:
        fields = group(s)
        short = tuple(compact(s)) if compact else ()
        return [HeaderLine(rank, FIELDS, tuple(fields), compact=short)] if fields else []

    return lines


def _memory_line(s: Snapshot) -> list[HeaderLine]:
    # Without the gap line, heap live (on this line) is the headline.
    return _fields(3 if s.gap is not None else 2, _memory)(s)


def _drops(s: Snapshot) -> list[HeaderLine]:
    return [HeaderLine(DROPS_RANK, DROP, text=d) for d in drop_warnings(s)]


def _hints(s: Snapshot) -> list[HeaderLine]:
    return [HeaderLine(HINTS_RANK, HINT, text=note_text(h)) for h in s.hints]


def _notes(s: Snapshot) -> list[HeaderLine]:
    derived = [n for n in (exit_note(s), before_trace_note(s)) if n]
    return [HeaderLine(NOTES_RANK, NOTE, text=n) for n in (*derived, *map(note_text, s.notes))]


# The header in display order; each entry gives [] when its section is
# absent. Ranks (in the entries) say what a short screen keeps: the gap and
# who is traced, then drops and hints, then the allocator, memory, rates...
_IDENTITY = _fields(0, _identity)
_RATES = _fields(4, _rates)
HEADER: list[Callable[[Snapshot], list[HeaderLine]]] = [
    _gap,
    _IDENTITY,
    _drops,
    _fields(2, _allocator, _allocator_compact),
    _hints,
    _memory_line,
    _fields(5, _address_space),
    _fields(6, _totals),
    _RATES,
    _notes,
]


def header(s: Snapshot, every_s: Optional[float] = None, replay: bool = False) -> list[HeaderLine]:
    """Every header line that has something to say, in display order.
    `every_s` is the interval asked for, `replay` says the snapshot is
    played back from a recording."""
    extras = {
        _IDENTITY: _fields(0, lambda snap: _identity(snap, every_s, replay)),
        _RATES: _fields(4, lambda snap: _rates(snap, every_s)),
    }
    return [line for part in HEADER for line in extras.get(part, part)(s)]


def header_lines(s: Snapshot) -> list[tuple[int, list[Field]]]:
    """(rank, fields) per line of fields, the gap included."""
    return [(line.rank, list(line.fields)) for line in header(s) if line.fields]


# ---------------------------------------------------------------- ordering

# The ways the stacks table can be ranked ("r" toggles in the live view).
SORT_LIVE, SORT_RETAINED = "live", "retained"
SORTS = (SORT_LIVE, SORT_RETAINED)


def top_stacks(s: Snapshot, by: str = SORT_LIVE) -> list[StackStats]:
    """Stacks by live bytes (or by retained bytes), largest first (the
    model sorts them by live already; a replayed or hand-made snapshot may
    not)."""
    if by == SORT_RETAINED:
        return sorted(
            s.stacks, key=lambda st: (-st.retained_bytes, -st.counters.live_bytes, -st.counters.alloc_bytes)
        )
    return sorted(s.stacks, key=lambda st: (-st.counters.live_bytes, -st.counters.alloc_bytes))


def top_threads(s: Snapshot) -> list[ThreadStats]:
    return sorted(s.threads, key=lambda t: (-t.counters.live_bytes, -t.counters.alloc_bytes, t.tid))


def top_arenas(s: Snapshot) -> list[ArenaStats]:
    """Arenas by what they retain, then by what is resident."""
    return sorted(s.arenas, key=lambda a: (-a.retained_bytes, -a.resident_bytes, a.id))


def top_regions(s: Snapshot) -> list[RegionStats]:
    return sorted(s.regions, key=lambda r: (-r.resident_bytes, -r.committed_bytes, r.start))


def retained_percent(a: ArenaStats) -> str:
    return f"{100 * a.retained_bytes // a.resident_bytes}%" if a.resident_bytes else "-"


# Region kinds as the address-space model names them, said shorter.
_REGION_KINDS = {
    "glibc-arena-heap": "arena heap",
    "glibc-mmapped-chunk": "mmapped chunk",
    "allocator-mapping": "allocator",
    "heap": "brk heap",
    "anonymous": "anonymous",
}


def region_kind(r: RegionStats) -> str:
    return _REGION_KINDS.get(r.kind, r.kind)


def thread_label(tid: Optional[int], names: dict[int, str]) -> str:
    """'101 Inflater-1', or 'before trace' for a region older than the trace."""
    if tid is None:
        return "before trace"
    return f"{tid} {names[tid]}" if names.get(tid) else str(tid)


def thread_names(s: Snapshot) -> dict[int, str]:
    return {t.tid: t.name for t in s.threads if t.name and t.name != "?"}


def name_list(tids: Sequence[int], names: dict[int, str]) -> list[str]:
    """Thread names for a list of tids, like names grouped with a count:
    ['Inflater-1', 'worker x4', '4711'] (a tid when the name is unknown)."""
    counts: dict[str, int] = {}
    for tid in tids:
        label = names.get(tid) or str(tid)
        counts[label] = counts.get(label, 0) + 1
    return [f"{label} x{n}" if n > 1 else label for label, n in counts.items()]


def truncation_advice(s: Snapshot) -> Optional[str]:
    n = s.truncated_stack_count
    if not n:
        return None
    return (
        f"{n} of {len(s.stacks)} stacks look truncated (depth limit hit or no thread "
        "entry point reached): frames may be missing where code lacks frame pointers"
    )
