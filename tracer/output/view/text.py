"""Plain-text views: the batch sink (like `top -b`), and the tables the
text report (memtrace.output.reports.text, also the end-of-trace summary) shares
with it. No ANSI codes and no cursor movement: the output goes to pipes,
logs and CI, and must read the same there as on a terminal.

Each block is a list of section functions (snapshot -> lines); a section
returns [] when its part of the snapshot is absent (an older recording, or
the address-space layer off), so both read any snapshot.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence, TextIO

from memtrace.model.snapshot import ArenaStats, RegionStats, Snapshot, StackStats, ThreadStats
from memtrace.output.reports.select import StackPolicy, select_stacks
from memtrace.output.view import status
from memtrace.output.view.fmt import (
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
        policy: Optional[StackPolicy] = None,
    ) -> None:
        self._file = file
        self.policy = policy
        self.max_stacks = max_stacks
        self.max_threads = max_threads
        self.max_arenas = max_arenas
        self.max_regions = max_regions
        self.width = width

    def render_block(self, s: Snapshot) -> str:
        lines = [f"--- {time.strftime('%H:%M:%S')} " + "-" * 20]
        lines += _header(s)
        stacks = select_stacks(s.stacks, limit=self.max_stacks, policy=self.policy, threads=s.threads).shown
        if s.light and not s.stacks:
            lines.append(f"STACKS none: {_NO_PROBES}")
        else:
            lines.append(f"STACKS {len(stacks)} of {len(s.stacks)} by live bytes")
        if stacks:
            retained = s.has_retained
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
