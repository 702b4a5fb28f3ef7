"""Plain-text views: the batch sink (like `top -b`) and the end-of-trace
summary. No ANSI codes and no cursor movement: the output goes to pipes,
logs and CI, and must read the same there as on a terminal.

Each block is a list of section functions (snapshot -> lines); a section
returns [] when its part of the snapshot is absent (an older recording, or
the address-space layer off), so both read any snapshot.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence, TextIO

from memtrace.model import ArenaStats, RegionStats, Snapshot, StackStats, ThreadStats
from memtrace.view import status
from memtrace.view.fmt import (
    ellipsize,
    fit_list,
    fmt_bytes,
    fmt_count,
    fmt_counted,
    fmt_duration,
    fmt_si,
    fmt_signed_bytes,
    frame_chain,
)

Section = Callable[[Snapshot], list[str]]

_ARROW = " <- "  # ASCII: logs may not be UTF-8
_MAX_TIDS_LISTED = 8
_NO_PROBES = "light mode has no malloc probes"


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Columns padded to their widest cell; `align` has one 'l' or 'r' per
    column. The last column is not padded, so lines carry no trailing blanks."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = []
    for row in [list(headers), *rows]:
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if align[i] == "r":
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell if last else cell.ljust(widths[i]))
        out.append("  ".join(cells).rstrip())
    return out


def _header(s: Snapshot) -> list[str]:
    return [line.plain() for line in status.header(s)]


def _chain(frames: Sequence[str], width: int) -> str:
    return frame_chain(frames, width, max_frames=8, sep=_ARROW, more="...")


def _stack_table(stacks: Sequence[StackStats], chain_width: int, interval_s: float, retained: bool = False) -> list[str]:
    delta = f"+/- {fmt_duration(interval_s)}" if interval_s > 0 else "+/-"
    rows = [
        [
            fmt_bytes(st.counters.live_bytes),
            *([fmt_bytes(st.retained_bytes) if st.retained_bytes else "0"] if retained else []),
            fmt_signed_bytes(st.live_delta_bytes) if st.live_delta_bytes else "0",
            fmt_si(st.counters.live_count),
            str(len(st.tids)),
            ("~ " if st.truncated else "") + _chain(st.frames, chain_width),
        ]
        for st in stacks
    ]
    headers = ["LIVE", *(["RETAINED"] if retained else []), delta, "BLOCKS", "THR", "STACK (caller first, ~ truncated)"]
    return plain_table(headers, rows, "rr" + "r" * retained + "rrl")


def _arena_table(s: Snapshot, arenas: Sequence[ArenaStats], threads_width: int = 60) -> list[str]:
    names = status.thread_names(s)
    rows = [
        [
            a.id,
            a.kind + ("?" if not a.reliable else ""),
            str(a.heap_count),
            fmt_bytes(a.reserved_bytes),
            fmt_bytes(a.committed_bytes),
            fmt_bytes(a.resident_bytes),
            status.arena_live(a),
            fmt_bytes(a.retained_bytes),
            status.retained_percent(a),
            fmt_bytes(a.trimmable_bytes),
            fit_list(status.name_list(a.tids, names), threads_width, mark="..."),
        ]
        for a in arenas
    ]
    headers = ["ARENA", "KIND", "HEAPS", "RESERVED", "COMMITTED", "RESIDENT", "LIVE", "RETAINED", "RET%", "TRIMMABLE", "THREADS"]
    return plain_table(headers, rows, "llrrrrrrrrl")


def _region_table(s: Snapshot, regions: Sequence[RegionStats], chain_width: int) -> list[str]:
    names = status.thread_names(s)

    def origin(r: RegionStats) -> str:
        if r.origin_frames:
            return _chain(r.origin_frames, chain_width)
        return "(made before the trace began)" if r.origin_tid is None else "(no stack)"

    rows = [
        [
            f"0x{r.start:x}",
            status.region_kind(r),
            fmt_bytes(r.end - r.start),
            fmt_bytes(r.committed_bytes),
            fmt_bytes(r.resident_bytes),
            ellipsize(status.thread_label(r.origin_tid, names), 24, "..."),
            "malloc" if r.in_malloc else "direct",
            origin(r),
        ]
        for r in regions
    ]
    headers = ["START", "KIND", "SIZE", "COMMITTED", "RESIDENT", "THREAD", "VIA", "ORIGIN (caller first)"]
    return plain_table(headers, rows, "llrrrlll")


def _arenas_title(s: Snapshot, shown: int) -> str:
    title = f"{shown} of {len(s.arenas)} by retained bytes ({status.arena_kinds(s.arenas)})"
    marks = []
    if any(a.live_is_estimate for a in s.arenas):
        marks.append("~ estimate")
    if any(not a.reliable for a in s.arenas):
        marks.append("? unreliable read")
    return title + (f", {', '.join(marks)}" if marks else "")


def _thread_table(threads: Sequence[ThreadStats]) -> list[str]:
    rows = [
        [
            str(t.tid),
            t.name,
            fmt_bytes(t.counters.live_bytes),
            fmt_si(t.counters.live_count),
            fmt_bytes(t.counters.alloc_bytes),
            fmt_bytes(t.counters.free_bytes),
            "alive" if t.alive else "exited",
        ]
        for t in threads
    ]
    return plain_table(["TID", "NAME", "LIVE", "BLOCKS", "ALLOCATED", "FREED", "STATE"], rows, "rlrrrrl")


def _more(shown: int, total: int, what: str) -> list[str]:
    return [f"  (+{total - shown} more {what})"] if total > shown else []


# ---------------------------------------------------------------- batch


class BatchView:
    """The sink for a stdout that is not a terminal: one plain block per
    snapshot, flushed at once so `| tee` and log shippers see it live.

    Args:
        file: where to write; sys.stdout by default (looked up at write time).
        max_stacks, max_threads: rows per table.
        width: the stack column is fitted so lines stay about this wide.
    """

    def __init__(
        self,
        file: Optional[TextIO] = None,
        max_stacks: int = 10,
        max_threads: int = 10,
        width: int = 132,
        max_arenas: int = 10,
        max_regions: int = 5,
    ) -> None:
        self._file = file
        self.max_stacks = max_stacks
        self.max_threads = max_threads
        self.max_arenas = max_arenas
        self.max_regions = max_regions
        self.width = width

    def render_block(self, s: Snapshot) -> str:
        lines = [f"--- {time.strftime('%H:%M:%S')} " + "-" * 20]
        lines += _header(s)
        stacks = status.top_stacks(s)[: self.max_stacks]
        if s.light and not s.stacks:
            lines.append(f"STACKS none: {_NO_PROBES}")
        else:
            lines.append(f"STACKS {len(stacks)} of {len(s.stacks)} by live bytes")
        if stacks:
            retained = status.any_retained(s)
            # Room left for frames after the numeric columns (~45 characters).
            room = self.width - 45 - (11 if retained else 0)
            lines += _stack_table(stacks, max(20, room), s.interval_s, retained)
        threads = status.top_threads(s)[: self.max_threads]
        lines.append(f"THREADS {len(threads)} of {len(s.threads)} by live bytes")
        if threads:
            lines += _thread_table(threads)
        if s.allocator is not None or s.arenas:
            arenas = status.top_arenas(s)[: self.max_arenas]
            lines.append(f"ARENAS {_arenas_title(s, len(arenas))}" if s.arenas else "ARENAS none read")
            if arenas:
                lines += _arena_table(s, arenas, threads_width=max(20, self.width - 110))
        if s.os is not None or s.regions:
            regions = status.top_regions(s)[: self.max_regions]
            lines.append(f"REGIONS {len(regions)} of the {len(s.regions)} largest never returned to the OS, by resident bytes")
            if regions:
                lines += _region_table(s, regions, max(20, self.width - 90))
        return "\n".join(lines) + "\n\n"

    def update(self, snapshot: Snapshot) -> None:
        out = self._file or sys.stdout
        out.write(self.render_block(snapshot))
        out.flush()

    def close(self) -> None:
        out = self._file or sys.stdout
        out.flush()

    write = update  # the Sink protocol's name


# ---------------------------------------------------------------- summary


def _summary_totals(s: Snapshot) -> list[str]:
    state, _ = status.target_state(s)
    target = f"target {state}" if not s.target_alive else "target still running (trace stopped)"
    p, h = s.process, s.heap
    c = h.counters
    rss = f"RSS {fmt_bytes(p.rss_bytes)}, anon {fmt_bytes(p.rss_anon_bytes)}"
    if p.peak_rss_bytes is not None:
        rss += f", peak {fmt_bytes(p.peak_rss_bytes)} (the kernel's high-water mark)"
    when = "at its exit" if p.at_exit else "at the end"
    lines = [
        f"memtrace summary: pid {s.pid} ({s.comm}), traced for {fmt_duration(s.elapsed_s)}",
        target,
        f"process {when}: {rss}",
    ]
    for note in (status.exit_note(s), status.before_trace_note(s)):
        if note:
            lines.append(f"  {note}")
    if s.light:
        # No malloc probes: no blocks or calls to count, only glibc's view.
        live = f"~{fmt_bytes(s.gap.heap_live_bytes)} (estimate)" if s.gap is not None else "unknown"
        lines.append(f"heap live at the end: {live}; light mode: no malloc probes")
    else:
        lines += [
            f"heap live {when}: {fmt_bytes(c.live_bytes)} in {fmt_counted(c.live_count, 'block')}",
            f"  allocated {fmt_bytes(c.alloc_bytes)} in {fmt_counted(c.alloc_count, 'call')},"
            f" freed {fmt_bytes(c.free_bytes)} in {fmt_counted(c.free_count, 'call')}",
        ]
        if h.peak_live_bytes:
            at = (f" at {fmt_duration(h.peak_live_elapsed_s)}"
                  if h.peak_live_elapsed_s is not None else "")
            lines.append(f"  heap peak: {fmt_bytes(h.peak_live_bytes)} live{at}")
    if h.untracked_free_count:
        lines.append(
            f"  untracked frees: {fmt_count(h.untracked_free_count)} (blocks allocated before tracing began)"
        )
    if h.trim_calls and s.trim is None:  # else the gap section tells it, with bytes
        lines.append(
            f"  malloc_trim: {status.trim_calls_text(h.trim_calls, h.trim_released_calls)}"
        )
    return lines


def _summary_quality(s: Snapshot) -> list[str]:
    drops = status.drop_warnings(s)
    lines = [f"DROPS: {d}" for d in drops] if drops else ["drops: none"]
    advice = status.truncation_advice(s)
    if advice:
        lines.append(f"truncated stacks: {advice}")
        cut = s.truncated_shares()
        lines.append(f"  in truncated stacks: {cut['stack_share']:.0%} of stacks,"
                     f" {cut['live_bytes_share']:.0%} of live bytes,"
                     f" {cut['alloc_bytes_share']:.0%} of allocated bytes")
    return lines


def _tid_list(tids: Sequence[int], names: dict[int, str]) -> str:
    shown = [f"{t} {names[t]}" if t in names else str(t) for t in tids[:_MAX_TIDS_LISTED]]
    more = f", +{len(tids) - _MAX_TIDS_LISTED} more" if len(tids) > _MAX_TIDS_LISTED else ""
    return ", ".join(shown) + more


def _summary_stacks(s: Snapshot, limit: int = 10) -> list[str]:
    if not s.stacks:
        return ["", f"stacks: none ({_NO_PROBES})" if s.light else "stacks: no tracked allocations"]
    names = {t.tid: t.name for t in s.threads}
    stacks = status.top_stacks(s)[:limit]
    lines = ["", f"top {len(stacks)} of {len(s.stacks)} stacks by live bytes (frames innermost first):"]
    for rank, st in enumerate(stacks, start=1):
        c = st.counters
        retained = f"; retained ~{fmt_bytes(st.retained_bytes)} (estimate)" if st.retained_bytes else ""
        lines.append(
            f"#{rank}  {fmt_bytes(c.live_bytes)} live in {fmt_counted(c.live_count, 'block')};"
            f" allocated {fmt_bytes(c.alloc_bytes)} in {fmt_counted(c.alloc_count, 'call')};"
            f" last interval {fmt_signed_bytes(st.live_delta_bytes)}{retained}"
        )
        lines.append(f"    threads: {_tid_list(st.tids, names)}")
        lines += [f"      {frame}" for frame in st.frames] or ["      (no frames)"]
        if st.truncated:
            lines.append("      ... (stack may be truncated: outer frames missing)")
    return lines


def _summary_threads(s: Snapshot, limit: int = 20) -> list[str]:
    if not s.threads:
        return []
    exited = sum(1 for t in s.threads if not t.alive)
    title = f"threads: {len(s.threads)} seen allocating" + (f", {exited} exited" if exited else "")
    shown = status.top_threads(s)[:limit]
    return ["", title] + ["  " + line for line in _thread_table(shown)] + _more(len(shown), len(s.threads), "threads")


def _summary_gap(s: Snapshot) -> list[str]:
    """Where the anonymous memory went, what the allocator holds, what
    malloc_trim did and would do, and what to try."""
    lines = []
    gap = status.gap_text(s)
    if gap:
        lines += [
            f"the gap at the end: {gap}",
            "  (heap live: blocks the program holds; allocator retained: freed memory the"
            " arenas keep resident; other: thread stacks, direct mmaps, JVM heap, chunk overheads)",
        ]
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
        lines.append("hints (the allocator's future behaviour is not certain):")
        lines += [f"  - {h}" for h in s.hints]
    return [""] + lines if lines else []


def _summary_arenas(s: Snapshot, limit: int = 20) -> list[str]:
    if s.allocator is None and not s.arenas:
        return []
    if not s.arenas:
        return ["", "arenas: none read"]
    shown = status.top_arenas(s)[:limit]
    return (
        ["", f"arenas: {_arenas_title(s, len(shown))}"]
        + ["  " + line for line in _arena_table(s, shown)]
        + _more(len(shown), len(s.arenas), "arenas")
    )


def _summary_regions(s: Snapshot, limit: int = 12) -> list[str]:
    if not s.regions:
        return []
    shown = status.top_regions(s)[:limit]
    return (
        ["", "largest regions never returned to the OS, by resident bytes (VIA malloc: made inside a malloc call):"]
        + ["  " + line for line in _region_table(s, shown, 100)]
        + _more(len(shown), len(s.regions), "regions")
    )


def _summary_retained_stacks(s: Snapshot, limit: int = 5) -> list[str]:
    if not status.any_retained(s):
        return []
    stacks = [st for st in status.top_stacks(s, status.SORT_RETAINED) if st.retained_bytes][:limit]
    rows = [[fmt_bytes(st.retained_bytes), fmt_bytes(st.counters.live_bytes), _chain(st.frames, 100)] for st in stacks]
    return (
        ["", "stacks whose frees the arenas still keep (estimated share of retained bytes):"]
        + ["  " + line for line in plain_table(["RETAINED", "LIVE", "STACK (caller first)"], rows, "rrl")]
    )


def _summary_notes(s: Snapshot) -> list[str]:
    if not s.notes:
        return []
    return ["", "notes:"] + [f"  - {n}" for n in s.notes]


# In the order a reader asks: how big, can the numbers be trusted, where
# did the memory go, who holds it.
SUMMARY_SECTIONS: list[Section] = [
    _summary_totals,
    _summary_quality,
    _summary_gap,
    _summary_arenas,
    _summary_regions,
    _summary_retained_stacks,
    _summary_stacks,
    _summary_threads,
    _summary_notes,
]


def render_summary(snapshot: Snapshot) -> str:
    """The report printed when a trace ends, as plain text."""
    lines: list[str] = []
    for section in SUMMARY_SECTIONS:
        lines += section(snapshot)
    return "\n".join(lines) + "\n"
