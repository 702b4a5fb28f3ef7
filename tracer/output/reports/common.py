"""What every report is made from, and the choices they share: which
snapshot, which weight per stack, how a frame is named in a flame graph."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Snapshot, StackStats
from memtrace.record.timeline import TimePoint, allocator_retained_bytes
from memtrace.output.reports.select import WEIGHTS, Selection, StackPolicy, select_stacks, weight_of
from memtrace.model.frames import UNNAMED_FUNCTION, split_frame

if TYPE_CHECKING:
    from memtrace.output.reports.diff import Baseline

# --by: what a stack's weight is.
BY_CHOICES = WEIGHTS


@dataclass(frozen=True)
class ReportData:
    """One moment of a recording and the context a report shows with it."""

    snapshot: Snapshot
    by: str = "live"
    when: str = "end"  # how the moment was chosen: 'end', 'peak', '12.0'
    index: int = 0
    peak: Optional[Snapshot] = None  # the snapshot at peak, for the gap there
    peak_index: Optional[int] = None
    timeline: Sequence[TimePoint] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    complete: bool = True  # the recorder closed the file
    source: str = ""  # the recording's path
    # The recording's last word on the kernel's peak RSS and the heap's peak.
    final: Optional[Snapshot] = None
    # --since: snapshot's heap, threads and stacks are changes since this.
    since: Optional["Baseline"] = None
    # The end of a live trace (the summary), not a moment of a recording.
    trace_end: bool = False
    policy: StackPolicy = StackPolicy()  # --top and --min-size


@dataclass(frozen=True)
class Peak:
    """One peak for every report: the kernel's high-water mark of the RSS,
    the snapshot nearest to it (the highest RSS sampled) and how far below
    it that snapshot is; and the heap's own peak, kept at every call."""

    rss_bytes: Optional[int]
    nearest: Optional[Snapshot]
    below_bytes: int
    heap_live_bytes: int
    heap_live_elapsed_s: Optional[float]


def peak_of(data: ReportData) -> Peak:
    last = data.final or data.snapshot
    nearest = data.peak
    sampled = nearest.process.rss_bytes if nearest is not None else 0
    kernel = max((x for x in (last.process.peak_rss_bytes, sampled) if x), default=None)
    return Peak(kernel, nearest, max(0, (kernel or 0) - (sampled or 0)),
                last.heap.peak_live_bytes, last.heap.peak_live_elapsed_s)


def peak_texts(data: ReportData) -> list[str]:
    """'peak RSS 842.0 MiB (the kernel's high-water mark); the nearest
    snapshot, at 1.6s, had 102.1 MiB (739.9 MiB below)', and the heap's."""
    from memtrace.output.view.fmt import fmt_bytes

    p = peak_of(data)
    out = []
    if p.rss_bytes:
        text = f"peak RSS {fmt_bytes(p.rss_bytes)} (the kernel's high-water mark)"
        if p.nearest is not None and p.nearest.process.rss_bytes:
            text += (f"; the nearest snapshot, at {p.nearest.elapsed_s:.1f}s, had "
                     f"{fmt_bytes(p.nearest.process.rss_bytes)}")
            text += f" ({fmt_bytes(p.below_bytes)} below)" if p.below_bytes else " (the same)"
        out.append(text)
    if p.heap_live_bytes:
        at = f" at {p.heap_live_elapsed_s:.1f}s" if p.heap_live_elapsed_s is not None else ""
        out.append(f"peak heap live {fmt_bytes(p.heap_live_bytes)}{at}")
    return out


def stack_weight(stack: StackStats, by: str) -> int:
    if by not in BY_CHOICES:
        raise MemtraceError(f"unknown weight {by!r}: use one of {', '.join(BY_CHOICES)}")
    return weight_of(stack, by)


def check_by(snapshot: Snapshot, by: str) -> None:
    """Refuse a weight the snapshot cannot give, in one line."""
    if by not in BY_CHOICES:
        raise MemtraceError(f"unknown weight {by!r}: use one of {', '.join(BY_CHOICES)}")
    if by == "retained" and not snapshot.has_retained:
        raise MemtraceError(
            "no stack holds retained bytes at this moment (they come from the allocator's"
            " arenas, read in full mode on glibc): use --by live or --by allocated"
        )


def selected_stacks(data: ReportData, by: str, limit: Optional[int] = None,
                    min_share: float = 0.0) -> Selection:
    """The stacks with a positive weight that the report's policy keeps,
    heaviest first (memtrace.output.reports.select)."""
    check_by(data.snapshot, by)
    return select_stacks(data.snapshot.stacks, by, limit=limit, positive=True, policy=data.policy,
                         min_share=min_share, threads=data.snapshot.threads)


def frame_label(frame: str) -> str:
    """A frame as a flame-graph box: the function without its offset, so
    one function is one box; an unsymbolized address becomes its module."""
    func, module = split_frame(frame)
    if func is not None and func.startswith(UNNAMED_FUNCTION) and module:
        return f"{func} [{module}]"  # two files' starts can be equal
    if func is not None:
        return func
    if module:
        return f"[{module}]"
    return frame.strip() or "[unknown]"


def unit(by: str) -> str:
    return {"live": "live bytes", "allocated": "allocated bytes", "retained": "retained bytes"}[by]


def moment(data: ReportData) -> str:
    """'at 12.0s (end)' and the like."""
    return moment_words(data.snapshot.elapsed_s, data.when)


def moment_words(elapsed_s: float, when: str) -> str:
    """A snapshot at elapsed_s, chosen by `when` ('end', 'peak', '12.0')."""
    if when in ("end", "peak", "start"):
        return f"at {elapsed_s:.1f}s ({when})"
    try:
        asked = float(when)
    except ValueError:
        return f"at {elapsed_s:.1f}s"
    return f"at {elapsed_s:.1f}s (the last snapshot by {asked:g}s)"


def command_line(metadata: dict[str, Any]) -> Optional[str]:
    cmd = metadata.get("command_line") or metadata.get("cmdline")
    if isinstance(cmd, (list, tuple)):
        return shlex.join(str(part) for part in cmd)
    return str(cmd) if cmd else None


def recorded_on(metadata: dict[str, Any]) -> list[str]:
    """['host vm', 'kernel 6.1.0', 'glibc 2.36', 'memtrace 0.1.0'], as known."""
    facts = [f"{k} {metadata[k]}" for k in ("host", "kernel") if metadata.get(k)]
    glibc = metadata.get("glibc")
    if glibc:
        facts.append(str(glibc) if str(glibc).startswith("glibc") else f"glibc {glibc}")
    if metadata.get("memtrace_version"):
        facts.append(f"memtrace {metadata['memtrace_version']}")
    return facts


def retained_at(s: Optional[Snapshot]) -> Optional[int]:
    return allocator_retained_bytes(s) if s is not None else None
