"""Snapshots as Prometheus metrics, for `--serve`'s /metrics.

One family per figure, one sample per target, labelled pid, comm and host.
Names carry the `memtrace_` prefix and their base unit; counters end in
`_total`. No stack is ever a label: a label value per stack would make a
new series per call path. Stacks go to /debug/pprof/heap instead.

prometheus_client writes the exposition: the text format, or OpenMetrics
when the scraper's Accept header asks for it (`choose_encoder`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from memtrace.process import procfs
from memtrace.model.snapshot import DropStats, Snapshot

TARGET_LABELS = ("pid", "comm", "host")


@dataclass(frozen=True)
class Figure:
    """One metric family: its name (with unit and _total), help, kind, and
    the value it takes from a snapshot (None: the snapshot has no such
    figure, and the target gets no sample)."""

    name: str
    help: str
    kind: str  # "gauge" | "counter"
    value: Callable[[Snapshot], Optional[float]]
    full_only: bool = False  # counted by the malloc probes: absent in light mode


def _heap_live(s: Snapshot) -> int:
    # The gap holds the figure the trace has: exact with probes, glibc's
    # own estimate in light mode.
    return s.gap.heap_live_bytes if s.gap is not None else s.heap.live_bytes


def _section(name: str, attr: str) -> Callable[[Snapshot], Optional[float]]:
    def value(s: Snapshot) -> Optional[float]:
        section = getattr(s, name)
        return None if section is None else getattr(section, attr)

    return value


FIGURES: tuple[Figure, ...] = (
    Figure("memtrace_rss_bytes", "Resident set size of the target.", "gauge",
           lambda s: s.process.rss_bytes),
    Figure("memtrace_rss_anon_bytes", "Anonymous resident memory of the target.", "gauge",
           lambda s: s.process.rss_anon_bytes),
    Figure("memtrace_heap_live_bytes",
           "Heap bytes the program holds (an estimate from glibc's arenas in light mode).",
           "gauge", _heap_live),
    Figure("memtrace_heap_peak_live_bytes",
           "The traced heap's highest live bytes, kept at every call.",
           "gauge", lambda s: s.heap.peak_live_bytes, full_only=True),
    Figure("memtrace_heap_live_before_trace_bytes",
           "Live heap bytes allocated before memtrace attached (an estimate from glibc's books).",
           "gauge", lambda s: s.heap.live_before_trace_bytes),
    Figure("memtrace_heap_live_not_resident_bytes",
           "Live heap bytes in pages never touched (outside the RSS).",
           "gauge", _section("gap", "heap_live_not_resident_bytes")),
    Figure("memtrace_heap_allocated_bytes_total", "Heap bytes allocated since the trace began.",
           "counter", lambda s: s.heap.counters.alloc_bytes, full_only=True),
    Figure("memtrace_heap_freed_bytes_total", "Heap bytes freed since the trace began.",
           "counter", lambda s: s.heap.counters.free_bytes, full_only=True),
    Figure("memtrace_heap_allocations_total", "Heap allocations since the trace began.",
           "counter", lambda s: s.heap.counters.alloc_count, full_only=True),
    Figure("memtrace_heap_frees_total", "Heap frees since the trace began.",
           "counter", lambda s: s.heap.counters.free_count, full_only=True),
    Figure("memtrace_allocator_committed_bytes", "Writable memory glibc's arenas took from the OS.",
           "gauge", _section("allocator", "committed_bytes")),
    Figure("memtrace_allocator_resident_bytes", "Resident memory of glibc's arenas.",
           "gauge", _section("allocator", "resident_bytes")),
    Figure("memtrace_allocator_retained_bytes",
           "Resident arena memory the program freed and glibc keeps.",
           "gauge", _section("allocator", "retained_bytes")),
    Figure("memtrace_allocator_arenas", "glibc arenas in the target.",
           "gauge", _section("allocator", "arena_count")),
    Figure("memtrace_other_anon_bytes",
           "Anonymous resident memory that is neither heap nor arena (JVM heap, stacks, mmaps).",
           "gauge", _section("gap", "other_anon_bytes")),
    Figure("memtrace_address_space_committed_bytes", "Writable mappings of the target.",
           "gauge", _section("os", "committed_bytes")),
    Figure("memtrace_address_space_returned_bytes_total",
           "Bytes the target gave back to the OS (munmap, madvise, ...) since the trace began.",
           "counter", _section("os", "returned_bytes")),
    Figure("memtrace_trim_calls_total", "malloc_trim calls since the trace began.",
           "counter", lambda s: s.heap.trim_calls),
    Figure("memtrace_trim_returned_bytes_total",
           "Anonymous RSS that malloc_trim calls gave back since the trace began.",
           "counter", _section("trim", "returned_bytes")),
    Figure("memtrace_trim_estimate_bytes", "What malloc_trim(0) would give back now (estimate).",
           "gauge", _section("trim", "estimate_bytes")),
    Figure("memtrace_light_mode", "1 when the target is traced without malloc probes.",
           "gauge", lambda s: int(s.light)),
)

# DropStats field -> the `reason` label of memtrace_drops_total
DROP_REASONS = tuple(f.name for f in fields(DropStats))


def _family(name: str, help: str, kind: str, labels: Sequence[str]) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    # The base unit the name ends with, for OpenMetrics' UNIT line.
    unit = next((u for u in ("bytes", "seconds") if name.removesuffix("_total").endswith(f"_{u}")), "")
    return cls(name, help, labels=list(labels), unit=unit)


def target_families(snapshots: Sequence[Snapshot], host: str) -> Iterator[Metric]:
    """The per-target families, each with one sample per snapshot that has
    the figure."""
    for figure in FIGURES:
        family = _family(figure.name, figure.help, figure.kind, TARGET_LABELS)
        for s in snapshots:
            if figure.full_only and s.light:
                continue
            value = figure.value(s)
            if value is not None:
                family.add_metric([str(s.pid), s.comm, host], value)
        yield family

    arenas = _family("memtrace_arena_retained_bytes",
                     "Resident memory one glibc arena keeps after the program freed it.",
                     "gauge", (*TARGET_LABELS, "arena", "kind"))
    drops = _family("memtrace_drops_total",
                    "What the kernel side could not record, by reason (raise the map size named).",
                    "counter", (*TARGET_LABELS, "reason"))
    for s in snapshots:
        labels = [str(s.pid), s.comm, host]
        for a in s.arenas:
            arenas.add_metric([*labels, a.id, a.kind], a.retained_bytes)
        if not s.light:
            for reason in DROP_REASONS:
                drops.add_metric([*labels, reason], getattr(s.heap.drops, reason))
    yield arenas
    yield drops


@dataclass(frozen=True)
class SelfStats:
    """memtrace's own cost, for the same scrape."""

    cpu_seconds: float
    rss_bytes: int
    targets: int

    @classmethod
    def now(cls, targets: int) -> "SelfStats":
        times = os.times()
        rss = (procfs.memory(os.getpid()) or {}).get("rss_bytes", 0)
        return cls(times.user + times.system, rss, targets)


def self_families(stats: SelfStats, host: str) -> Iterator[Metric]:
    for name, help, kind, value in (
        ("memtrace_self_cpu_seconds_total", "CPU time memtrace itself used (user and system).",
         "counter", stats.cpu_seconds),
        ("memtrace_self_rss_bytes", "memtrace's own resident set size.", "gauge", stats.rss_bytes),
        ("memtrace_targets", "Processes memtrace traces now.", "gauge", stats.targets),
    ):
        family = _family(name, help, kind, ("host",))
        family.add_metric([host], value)
        yield family


class _Families:
    """What prometheus_client's encoders read: anything with collect()."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(snapshots: Sequence[Snapshot], accept: Optional[str],
               stats: Optional[SelfStats] = None,
               host: Optional[str] = None) -> tuple[bytes, str]:
    """(body, content type) of /metrics for the Accept header given."""
    host = host or socket.gethostname()
    stats = stats or SelfStats.now(len(snapshots))
    encoder, content_type = choose_encoder(accept or "")
    families = _Families([*target_families(snapshots, host), *self_families(stats, host)])
    return encoder(families), content_type
