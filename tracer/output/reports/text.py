"""The plain-text report: what a person reads first, at the end of a trace
(the summary) and on a recording (`report --format text`). Both are this
one renderer of (Snapshot, context): the summary is the text report of the
final snapshot, with no recording around it.

Sections are functions of the report data returning lines ([] when their
part is absent: an older recording, or the address-space layer off), in
the order a reader asks the questions: how big, can the numbers be
trusted, where did the memory go, who holds it. No ANSI codes: the text
goes to pipes, logs and CI.
"""

from __future__ import annotations

from typing import Callable, Optional, TextIO

from memtrace.model.snapshot import Snapshot, StackStats
from memtrace.output.notes import about_allocator, note_text
from memtrace.output.reports.common import (
    ReportData,
    command_line,
    moment,
    peak_texts,
    recorded_on,
    unit,
    selected_stacks,
)
from memtrace.output.reports.select import StackPolicy
from memtrace.output.view import status
from memtrace.output.view.fmt import fmt_bytes, fmt_count, fmt_counted, fmt_duration, fmt_signed_bytes
from memtrace.output.view.text import (
    _arena_table,
    _arenas_title,
    _chain,
    _more,
    _region_table,
    _thread_table,
    plain_table,
)

STACKS_SHOWN = 10
RETAINED_STACKS_SHOWN = 5
THREADS_SHOWN = 20
ARENAS_SHOWN = 20
REGIONS_SHOWN = 12
_TIDS_SHOWN = 8
_NO_PROBES = "light mode has no malloc probes"


def _when(d: ReportData) -> str:
    """The moment as words in a sentence: 'at the end', 'at its exit', or
    a recording's 'at 12.0s (peak)'."""
    if d.trace_end:
        return "at its exit" if d.snapshot.process.at_exit else "at the end"
    return moment(d)


def _title(d: ReportData) -> list[str]:
    s = d.snapshot
    if d.trace_end:
        lines = [f"memtrace summary: pid {s.pid} ({s.comm}), traced for {fmt_duration(s.elapsed_s)}"]
    else:
        lines = [f"memtrace report: pid {s.pid} ({s.comm}) {moment(d)} of a {fmt_duration(_duration(d))} recording"]
        facts = recorded_on(d.metadata)
        if facts:
            lines.append("recorded on " + ", ".join(facts))
        cmd = command_line(d.metadata)
        if cmd:
            lines.append(f"command: {cmd}")
        if not d.complete:
            lines.append("note: the recording was not closed (memtrace was killed or crashed);"
                         " it holds every interval up to its last write")
    state, _ = status.target_state(s)
    lines.append(f"target {state}" if not s.target_alive else
                 "target still running (trace stopped)" if d.trace_end else "target running")
    if d.since is not None:
        lines.append(f"changes since {d.since.label}: heap, stacks and threads below are what changed")
    if d.policy.filtered:
        lines.append(f"stacks shown: only those that pass {d.policy.words()}")
    return lines


def _duration(d: ReportData) -> float:
    return d.timeline[-1].elapsed_s if d.timeline else d.snapshot.elapsed_s


def _totals(d: ReportData) -> list[str]:
    s = d.snapshot
    p, h = s.process, s.heap
    c = h.counters
    when = _when(d)
    recording = d.peak is not None or d.final is not None
    rss = f"RSS {fmt_bytes(p.rss_bytes)}, anon {fmt_bytes(p.rss_anon_bytes)}"
    if p.peak_rss_bytes is not None and not recording:
        rss += f", peak {fmt_bytes(p.peak_rss_bytes)} (the kernel's high-water mark)"
    lines = [f"process {when}: {rss}"]
    for note in (status.exit_note(s), status.before_trace_note(s)):
        if note:
            lines.append(f"  {note}")
    if recording:
        lines += peak_texts(d)
    if s.light:
        # No malloc probes: no blocks or calls to count, only glibc's view.
        live = f"~{fmt_bytes(s.gap.heap_live_bytes)} (estimate)" if s.gap is not None else "unknown"
        lines.append(f"heap live {when}: {live}; light mode: no malloc probes")
    else:
        live = fmt_signed_bytes(c.live_bytes) if d.since is not None else fmt_bytes(c.live_bytes)
        lines += [
            f"heap live {when}: {live} in {fmt_counted(c.live_count, 'block')}",
            f"  allocated {fmt_bytes(c.alloc_bytes)} in {fmt_counted(c.alloc_count, 'call')},"
            f" freed {fmt_bytes(c.free_bytes)} in {fmt_counted(c.free_count, 'call')}",
        ]
        if h.peak_live_bytes and not recording:
            at = (f" at {fmt_duration(h.peak_live_elapsed_s)}"
                  if h.peak_live_elapsed_s is not None else "")
            lines.append(f"  heap peak: {fmt_bytes(h.peak_live_bytes)} live{at}")
    if h.untracked_free_count:
        lines.append(f"  untracked frees: {fmt_count(h.untracked_free_count)}"
                     " (blocks allocated before tracing began)")
    if h.trim_calls and s.trim is None:  # else the gap section tells it, with bytes
        lines.append(f"  malloc_trim: {status.trim_calls_text(h.trim_calls, h.trim_released_calls)}")
    return lines


def _since(d: ReportData) -> list[str]:
    b = d.since
    if b is None:
        return []
    parts = [f"heap live {fmt_signed_bytes(b.heap_live_bytes)}"]
    if b.rss_bytes is not None:
        parts.insert(0, f"RSS {fmt_signed_bytes(b.rss_bytes)}")
    if b.retained_bytes is not None:
        parts.append(f"allocator retained {fmt_signed_bytes(b.retained_bytes)}")
    if b.other_anon_bytes is not None:
        parts.append(f"other {fmt_signed_bytes(b.other_anon_bytes)}")
    stacks = f"{fmt_counted(b.stacks_grown, 'stack')} grew, {fmt_count(b.stacks_shrunk)} shrank"
    return ["", f"since {b.label}: " + ", ".join(parts) + f"; {stacks}"]


def _quality(d: ReportData) -> list[str]:
    s = d.snapshot
    drops = status.drop_warnings(s)
    lines = [f"DROPS: {w}" for w in drops] if drops else ["drops: none"]
    advice = status.truncation_advice(s)
    if advice:
        lines.append(f"truncated stacks: {advice}")
        cut = s.truncated_shares()
        lines.append(f"  in truncated stacks: {cut['stack_share']:.0%} of stacks,"
                     f" {cut['live_bytes_share']:.0%} of live bytes,"
                     f" {cut['alloc_bytes_share']:.0%} of allocated bytes")
    return [""] + lines


def _gap(d: ReportData) -> list[str]:
    """Where the anonymous memory went, what the allocator holds, what
    malloc_trim did and would do, and what to try."""
    s = d.snapshot
    lines = []
    gap = status.gap_text(s)
    if gap:
        lines += [
            f"the gap {_when(d)}: {gap}",
            "  (heap live: blocks the program holds; allocator retained: freed memory the"
            " arenas keep resident; other: thread stacks, direct mmaps, JVM heap, chunk overheads)",
        ]
    if d.peak is not None and d.peak is not s and d.peak.gap is not None:
        lines.append(f"the gap at the peak ({d.peak.elapsed_s:.1f}s): {status.gap_text(d.peak)}")
    if status.is_estimate(s):
        lines.append("  light mode: no malloc probes; ~ marks heap figures estimated from glibc's own structures")
    a = s.allocator
    if a is not None:
        kinds = status.arena_kinds(s.arenas)
        text = (
            f"allocator ({a.kind}): {a.arena_count} arenas" + (f" ({kinds})" if kinds else "")
            + f", committed {fmt_bytes(a.committed_bytes)}, resident {fmt_bytes(a.resident_bytes)},"
            f" live {status.estimated(s, a.live_bytes)}, retained {status.estimated(s, a.retained_bytes)}"
        )
        if a.mmapped_chunk_count:
            text += f"; {fmt_counted(a.mmapped_chunk_count, 'mmapped chunk')} ({fmt_bytes(a.mmapped_chunk_bytes)})"
        lines.append(text)
    o = s.os
    if o is not None:
        lines.append(
            f"address space: mapped {fmt_bytes(o.mapped_bytes)}, reserved {fmt_bytes(o.reserved_bytes)},"
            f" committed {fmt_bytes(o.committed_bytes)}, resident {fmt_bytes(o.resident_bytes)},"
            f" returned to the OS since the trace began {fmt_bytes(o.returned_bytes)}"
        )
    t = s.trim
    if t is not None:
        lines.append(
            f"malloc_trim: {status.trim_calls_text(t.calls, s.heap.trim_released_calls)};"
            f" returned {fmt_bytes(t.returned_bytes)} (measured);"
            f" malloc_trim(0) would return about {fmt_bytes(t.estimate_bytes)} now (estimate)"
        )
        for call in t.recent:
            returned = fmt_bytes(call.returned_bytes) if call.measured else "? (not measured)"
            lines.append(
                f"  at {fmt_duration(call.elapsed_s)} thread {call.tid}: returned {returned}"
                f" (malloc_trim returned {call.result})"
            )
    if s.hints:
        caveat = " (the allocator's future behaviour is not certain)" if any(map(about_allocator, s.hints)) else ""
        lines.append(f"hints{caveat}:")
        lines += [f"  - {note_text(h)}" for h in s.hints]
    return [""] + lines if lines else []


def _arenas(d: ReportData) -> list[str]:
    s = d.snapshot
    if s.allocator is None and not s.arenas:
        return []
    if not s.arenas:
        return ["", "arenas: none read"]
    shown = status.top_arenas(s)[:ARENAS_SHOWN]
    return (
        ["", f"arenas: {_arenas_title(s, len(shown))}"]
        + ["  " + line for line in _arena_table(s, shown)]
        + _more(len(shown), len(s.arenas), "arenas")
    )


def _regions(d: ReportData) -> list[str]:
    s = d.snapshot
    if not s.regions:
        return []
    shown = status.top_regions(s)[:REGIONS_SHOWN]
    return (
        ["", "largest regions never returned to the OS, by resident bytes (VIA malloc: made inside a malloc call):"]
        + ["  " + line for line in _region_table(s, shown, 100)]
        + _more(len(shown), len(s.regions), "regions")
    )


def _retained_stacks(d: ReportData) -> list[str]:
    s = d.snapshot
    if not s.has_retained:
        return []
    stacks = selected_stacks(d, "retained", limit=RETAINED_STACKS_SHOWN).shown
    rows = [[fmt_bytes(st.retained_bytes), fmt_bytes(st.counters.live_bytes), _chain(st.frames, 100)]
            for st in stacks]
    return (
        ["", "stacks whose frees the arenas still keep (estimated share of retained bytes):"]
        + ["  " + line for line in plain_table(["RETAINED", "LIVE", "STACK (caller first)"], rows, "rrl")]
    )


def _tid_list(tids, names: dict[int, str]) -> str:
    shown = [f"{t} {names[t]}" if t in names else str(t) for t in tids[:_TIDS_SHOWN]]
    more = f", +{len(tids) - _TIDS_SHOWN} more" if len(tids) > _TIDS_SHOWN else ""
    return ", ".join(shown) + more


def _stack_block(rank: int, st: StackStats, names: dict[int, str], change: bool) -> list[str]:
    c = st.counters
    live = fmt_signed_bytes(c.live_bytes) if change else fmt_bytes(c.live_bytes)
    delta = "" if change else f"; last interval {fmt_signed_bytes(st.live_delta_bytes)}"
    retained = f"; retained ~{fmt_bytes(st.retained_bytes)} (estimate)" if st.retained_bytes else ""
    lines = [
        f"#{rank}  {live} live in {fmt_counted(c.live_count, 'block')};"
        f" allocated {fmt_bytes(c.alloc_bytes)} in {fmt_counted(c.alloc_count, 'call')}{delta}{retained}",
        f"    threads: {_tid_list(st.tids, names) or '-'}",
    ]
    lines += [f"      {frame}" for frame in st.frames] or ["      (no frames)"]
    if st.truncated:
        lines.append("      ... (stack may be truncated: outer frames missing)")
    return lines


def _stacks_by(d: ReportData, by: str) -> list[str]:
    s = d.snapshot
    chosen = selected_stacks(d, by, limit=STACKS_SHOWN)
    shown = chosen.shown
    if not shown:
        if not s.stacks:
            return ["", f"stacks: none ({_NO_PROBES})" if s.light else "stacks: no tracked allocations"]
        return ["", f"stacks by {unit(by)}: none"]
    names = {t.tid: t.name for t in s.threads}
    lines = ["", f"top {len(shown)} of {len(shown) + chosen.other_count} stacks by {unit(by)}"
             " (frames innermost first):"]
    for rank, st in enumerate(shown, start=1):
        lines += _stack_block(rank, st, names, change=d.since is not None)
    return lines


def _stacks(d: ReportData) -> list[str]:
    # The chosen weight first. A report on a recording then answers by live
    # and allocated bytes too; the summary keeps to one list.
    order = [d.by]
    if not d.trace_end:
        order += [by for by in ("live", "allocated") if by != d.by]
    lines: list[str] = []
    for by in order:
        lines += _stacks_by(d, by)
        if not d.snapshot.stacks:
            break  # "none" said once
    return lines


def _threads(d: ReportData) -> list[str]:
    s = d.snapshot
    if not s.threads:
        return []
    exited = sum(1 for t in s.threads if not t.alive)
    title = f"threads: {len(s.threads)} seen allocating" + (f", {exited} exited" if exited else "")
    shown = status.top_threads(s)[:THREADS_SHOWN]
    return ["", title] + ["  " + line for line in _thread_table(shown)] + _more(len(shown), len(s.threads), "threads")


def _jvm(d: ReportData) -> list[str]:
    """A JVM's own count of its mallocs (NMT) beside the heap we traced,
    and what NMT cannot see: the rest is native libraries' (JNI, zlib)."""
    s = d.snapshot
    j = s.jvm
    if j is None or j.nmt_malloc_bytes is None:
        return []
    estimate = " (with an estimate of the blocks from before the attach)" \
        if s.heap.live_before_trace_bytes else ""
    return [
        "",
        f"JVM native memory tracking: malloc {fmt_bytes(j.nmt_malloc_bytes)} in "
        f"{fmt_count(j.nmt_malloc_count or 0)} blocks; heap live "
        f"{fmt_bytes(j.heap_live_bytes(s.heap))}{estimate}",
        f"  not seen by NMT: {fmt_bytes(j.not_seen_by_nmt_bytes(s.heap))}"
        " (mallocs of native libraries and JNI code, zlib's among them)",
    ]


def _notes(d: ReportData) -> list[str]:
    s = d.snapshot
    if not s.notes:
        return []
    return ["", "notes:"] + [f"  - {note_text(n)}" for n in s.notes]


SECTIONS: list[Callable[[ReportData], list[str]]] = [
    _title,
    _totals,
    _since,
    _quality,
    _gap,
    _arenas,
    _regions,
    _retained_stacks,
    _stacks,
    _threads,
    _jvm,
    _notes,
]


def render_text(d: ReportData) -> str:
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(d)
    return "\n".join(lines) + "\n"


def render_summary(snapshot: Snapshot, policy: Optional[StackPolicy] = None) -> str:
    """What a trace prints when it ends: the text report of its final
    snapshot."""
    return render_text(ReportData(snapshot=snapshot, trace_end=True, policy=policy or StackPolicy()))


class TextReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        out.write(render_text(self.data))
