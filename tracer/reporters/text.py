"""The plain-text report: what a person reads first after a recording.

Sections are functions of the report data returning lines ([] when their
part is absent), in the order a reader asks the questions: what was
traced, how big did it get, where is the gap, which stacks and threads.
"""

from __future__ import annotations

from typing import Callable, TextIO

from memtrace.model import Gap, StackStats
from memtrace.reporters.common import (
    ReportData,
    peak_texts,
    command_line,
    has_retained,
    moment,
    recorded_on,
    unit,
    selected_stacks,
)
from memtrace.view import status
from memtrace.view.fmt import fmt_bytes, fmt_count, fmt_duration, fmt_signed_bytes, frame_chain
from memtrace.view.text import plain_table

STACKS_SHOWN = 10
THREADS_SHOWN = 20
ARENAS_SHOWN = 10
REGIONS_SHOWN = 10
_TIDS_SHOWN = 6


def _title(d: ReportData) -> list[str]:
    s = d.snapshot
    lines = [f"memtrace report: pid {s.pid} ({s.comm}) {moment(d)} of a {fmt_duration(_duration(d))} recording"]
    facts = recorded_on(d.metadata)
    if facts:
        lines.append("recorded on " + ", ".join(facts))
    cmd = command_line(d.metadata)
    if cmd:
        lines.append(f"command: {cmd}")
    if not d.complete:
        lines.append(
            "note: the recording was not closed (memtrace was killed or crashed);"
            " it holds every interval up to its last write"
        )
    state, _ = status.target_state(s)
    lines.append(f"target: {state}")
    return lines


def _duration(d: ReportData) -> float:
    return d.timeline[-1].elapsed_s if d.timeline else d.snapshot.elapsed_s


def _memory(d: ReportData) -> list[str]:
    s = d.snapshot
    p, c = s.process, s.heap.counters
    lines = [""]
    if p.rss_bytes:
        lines.append(f"RSS {fmt_bytes(p.rss_bytes)} (anon {fmt_bytes(p.rss_anon_bytes)})")
    lines += peak_texts(d)
    estimate = " (estimated: recorded without malloc probes)" if s.light else ""
    lines.append(f"heap live {fmt_bytes(c.live_bytes)} in {fmt_count(c.live_count)} blocks{estimate}")
    lines.append(
        f"  allocated {fmt_bytes(c.alloc_bytes)} in {fmt_count(c.alloc_count)} calls,"
        f" freed {fmt_bytes(c.free_bytes)} in {fmt_count(c.free_count)} calls"
    )
    if s.heap.untracked_free_count:
        lines.append(f"  untracked frees {fmt_count(s.heap.untracked_free_count)} (blocks older than the trace)")
    if s.heap.trim_calls:
        lines.append(
            f"  malloc_trim {fmt_count(s.heap.trim_calls)} calls, {fmt_count(s.heap.trim_released_calls)} released memory"
        )
    return lines


def _gap_line(g: Gap) -> str:
    return (
        f"anon RSS {fmt_bytes(g.rss_anon_bytes)} = heap live {fmt_bytes(g.heap_live_bytes)}"
        f" + allocator retained {fmt_bytes(g.allocator_retained_bytes)}"
        f" + other {fmt_bytes(g.other_anon_bytes)}"
    )


def _gap(d: ReportData) -> list[str]:
    lines = []
    if d.snapshot.gap is not None:
        lines.append(f"gap {moment(d)}: {_gap_line(d.snapshot.gap)}")
    if d.peak is not None and d.peak.gap is not None and d.peak is not d.snapshot:
        lines.append(f"gap at the peak ({d.peak.elapsed_s:.1f}s): {_gap_line(d.peak.gap)}")
    return [""] + lines if lines else []


def _address_space(d: ReportData) -> list[str]:
    s = d.snapshot
    lines = []
    if s.os is not None:
        o = s.os
        lines.append(
            f"address space: mapped {fmt_bytes(o.mapped_bytes)}, committed {fmt_bytes(o.committed_bytes)},"
            f" resident {fmt_bytes(o.resident_bytes)}, reserved only {fmt_bytes(o.reserved_bytes)};"
            f" given back so far {fmt_bytes(o.returned_bytes)}"
        )
    if s.allocator is not None:
        a = s.allocator
        estimate = " (estimates)" if a.estimate else ""
        lines.append(
            f"allocator ({a.kind}){estimate}: {a.arena_count} arenas, committed {fmt_bytes(a.committed_bytes)},"
            f" resident {fmt_bytes(a.resident_bytes)}, live {fmt_bytes(a.live_bytes)},"
            f" retained {fmt_bytes(a.retained_bytes)}; {fmt_count(a.mmapped_chunk_count)} mmapped chunks"
            f" ({fmt_bytes(a.mmapped_chunk_bytes)})"
        )
    if s.trim is not None and (s.trim.calls or s.trim.estimate_bytes):
        t = s.trim
        lines.append(
            f"malloc_trim: {fmt_count(t.calls)} calls returned {fmt_bytes(t.returned_bytes)};"
            f" trimming now would return about {fmt_bytes(t.estimate_bytes)}"
        )
    return [""] + lines if lines else []


def _arenas(d: ReportData) -> list[str]:
    arenas = sorted(d.snapshot.arenas, key=lambda a: (-a.retained_bytes, a.id))
    if not arenas:
        return []
    shown = arenas[:ARENAS_SHOWN]
    rows = [
        [
            a.id,
            a.kind,
            str(a.heap_count),
            fmt_bytes(a.committed_bytes),
            fmt_bytes(a.resident_bytes),
            status.arena_live(a),
            fmt_bytes(a.retained_bytes),
            ",".join(str(t) for t in a.tids[:_TIDS_SHOWN]) + ("..." if len(a.tids) > _TIDS_SHOWN else ""),
        ]
        for a in shown
    ]
    table = plain_table(
        ["ARENA", "KIND", "HEAPS", "COMMITTED", "RESIDENT", "LIVE", "RETAINED", "THREADS"], rows, "llrrrrrl"
    )
    return ["", f"arenas: {len(shown)} of {len(arenas)} by retained bytes"] + ["  " + r for r in table]


def _regions(d: ReportData) -> list[str]:
    regions = sorted(d.snapshot.regions, key=lambda r: (-r.committed_bytes, r.start))
    if not regions:
        return []
    shown = regions[:REGIONS_SHOWN]
    rows = [
        [
            f"{r.start:#x}-{r.end:#x}",
            r.kind + (" (malloc)" if r.in_malloc else ""),
            fmt_bytes(r.committed_bytes),
            fmt_bytes(r.resident_bytes),
            str(r.origin_tid) if r.origin_tid is not None else "-",
            frame_chain(r.origin_frames, 60, max_frames=4, sep=" <- ", more="..."),
        ]
        for r in shown
    ]
    table = plain_table(["REGION", "KIND", "COMMITTED", "RESIDENT", "TID", "MAPPED BY"], rows, "llrrrl")
    return ["", f"regions not given back: {len(shown)} of {len(regions)} by committed bytes"] + [
        "  " + r for r in table
    ]


def _quality(d: ReportData) -> list[str]:
    lines = [f"DROPS: {w}" for w in status.drop_warnings(d.snapshot)]
    advice = status.truncation_advice(d.snapshot)
    if advice:
        lines.append(f"truncated stacks: {advice}")
    return [""] + lines if lines else []


def _stack_block(rank: int, st: StackStats, names: dict[int, str], retained: bool) -> list[str]:
    c = st.counters
    tids = ", ".join(f"{t} {names[t]}" if t in names else str(t) for t in st.tids[:_TIDS_SHOWN])
    if len(st.tids) > _TIDS_SHOWN:
        tids += f", +{len(st.tids) - _TIDS_SHOWN} more"
    lines = [
        f"#{rank}  {fmt_bytes(c.live_bytes)} live in {fmt_count(c.live_count)} blocks;"
        f" allocated {fmt_bytes(c.alloc_bytes)} in {fmt_count(c.alloc_count)} calls;"
        f" last interval {fmt_signed_bytes(st.live_delta_bytes)}"
        + (f"; retained {fmt_bytes(st.retained_bytes)}" if retained else ""),
        f"    threads: {tids or '-'}",
    ]
    lines += [f"      {frame}" for frame in st.frames] or ["      (no frames)"]
    if st.truncated:
        lines.append("      ... (outer frames may be missing)")
    return lines


def _stacks_by(d: ReportData, by: str) -> list[str]:
    chosen = selected_stacks(d, by, limit=STACKS_SHOWN)
    shown = chosen.shown
    if not shown:
        return ["", f"stacks by {unit(by)}: none"]
    names = {t.tid: t.name for t in d.snapshot.threads}
    lines = ["", f"top {len(shown)} of {len(shown) + chosen.other_count} stacks by {unit(by)}"
             " (innermost frame first):"]
    retained = has_retained(d.snapshot)
    for rank, st in enumerate(shown, start=1):
        lines += _stack_block(rank, st, names, retained)
    return lines


def _stacks(d: ReportData) -> list[str]:
    # The chosen weight first, then live and allocated: both always answer.
    order = [d.by] + [by for by in ("live", "allocated") if by != d.by]
    lines: list[str] = []
    for by in order:
        lines += _stacks_by(d, by)
    return lines


def _threads(d: ReportData) -> list[str]:
    s = d.snapshot
    if not s.threads:
        return []
    shown = status.top_threads(s)[:THREADS_SHOWN]
    rows = [
        [
            str(t.tid),
            t.name,
            fmt_bytes(t.counters.live_bytes),
            fmt_count(t.counters.live_count),
            fmt_bytes(t.counters.alloc_bytes),
            fmt_bytes(t.counters.free_bytes),
            "alive" if t.alive else "exited",
        ]
        for t in shown
    ]
    table = plain_table(["TID", "NAME", "LIVE", "BLOCKS", "ALLOCATED", "FREED", "STATE"], rows, "rlrrrrl")
    lines = ["", f"threads: {len(shown)} of {len(s.threads)} by live bytes"] + ["  " + r for r in table]
    return lines


def _hints(d: ReportData) -> list[str]:
    s = d.snapshot
    hints = [str(h) for h in getattr(s, "hints", ()) or ()]
    lines = []
    if hints:
        lines += ["", "hints:"] + [f"  - {h}" for h in hints]
    if s.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in s.notes]
    return lines


SECTIONS: list[Callable[[ReportData], list[str]]] = [
    _title,
    _memory,
    _gap,
    _address_space,
    _quality,
    _stacks,
    _threads,
    _arenas,
    _regions,
    _hints,
]


def render_text(d: ReportData) -> str:
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(d)
    return "\n".join(lines) + "\n"


class TextReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        out.write(render_text(self.data))
