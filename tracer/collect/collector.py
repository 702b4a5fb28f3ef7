"""Kernel maps and /proc in, one `Snapshot` out, once per interval."""

from __future__ import annotations

import time
from typing import Optional

from memtrace import procfs
from memtrace.collect.probes import Probes
from memtrace.symbols import Symbolizer
from memtrace.model import (
    Counters,
    HeapTotals,
    ProcessStats,
    Snapshot,
    StackKey,
    aggregate_stacks,
    aggregate_threads,
    rates_between,
)

MAX_STACK_DEPTH = 127  # kernel.perf_event_max_stack's default


class Collector:
    def __init__(self, pid: int, comm: str, heap: Probes) -> None:
        self.pid = pid
        self.comm = comm
        self.heap = heap
        self.symbols = Symbolizer(pid)
        self.started = time.monotonic()
        self.previous: Optional[Snapshot] = None
        self._frames: dict[StackKey, tuple[str, ...]] = {}
        self._names: dict[int, str] = {}
        self._process = ProcessStats()

    def frames_of(self, key: StackKey) -> tuple[str, ...]:
        frames = self._frames.get(key)
        if frames is None:
            stack_id, caller = key
            # The walk starts at the probe inside malloc and, from there,
            # skips the immediate caller: the caller comes from the return
            # address read on entry, deeper frames from the walk.
            deeper = []
            for addr in self.heap.stack_addresses(stack_id)[1:]:
                if not self.symbols.is_code(addr):
                    break  # the walk left the stack's frame chain
                deeper.append(addr)
            frames = self.symbols.frames(([caller] if caller else []) + deeper)
            self._frames[key] = frames
        return frames

    def _refresh_process(self) -> bool:
        mem = procfs.memory(self.pid)
        if mem is None:
            return False
        self._process = ProcessStats(
            rss_bytes=mem.get("rss_bytes", 0),
            rss_anon_bytes=mem.get("rss_anon_bytes", 0),
            peak_rss_bytes=mem.get("peak_rss_bytes"),
        )
        self._names.update(procfs.thread_names(self.pid))
        return True

    def snapshot(self, target_alive: bool = True, exit_status: Optional[int] = None) -> Snapshot:
        """Read everything once. With the target gone, /proc figures keep
        their last values and names stay as they were."""
        reading = self.heap.read()
        alive = target_alive and self._refresh_process()
        live_tids = procfs.thread_ids(self.pid) if alive else []
        for tid, name in reading.thread_names.items():
            self._names.setdefault(tid, name)
        self.symbols.new_round()
        elapsed = time.monotonic() - self.started
        heap = HeapTotals(
            counters=sum((r.counters for r in reading.rows), start=Counters()),
            untracked_free_count=reading.untracked_free_count,
            trim_calls=reading.trim_calls,
            trim_released_calls=reading.trim_released_calls,
            drops=reading.drops,
        )
        notes = []
        if reading.drops.allocs_map_full:
            notes.append("allocations were dropped: the live-allocation map is full; raise --max-allocs")
        if reading.drops.stats_map_full:
            notes.append("allocations were dropped: too many (thread, stack) pairs; raise --max-stats")
        if reading.drops.stack_lost:
            notes.append("some deep stacks were lost (immediate callers kept); raise --stack-storage-size")
        snap = Snapshot(
            pid=self.pid,
            comm=self.comm,
            elapsed_s=elapsed,
            interval_s=elapsed - self.previous.elapsed_s if self.previous else elapsed,
            process=self._process,
            heap=heap,
            threads=aggregate_threads(reading.rows, self._names, live_tids),
            stacks=aggregate_stacks(reading.rows, self.frames_of, MAX_STACK_DEPTH, self.previous),
            rates=rates_between(self.previous, heap, elapsed),
            target_alive=alive,
            exit_status=exit_status,
            notes=tuple(notes),
        )
        self.previous = snap
        return snap

