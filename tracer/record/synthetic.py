"""Synthetic sessions: snapshots with every section filled, made without a
target or BPF. The recorder's tests and size estimates use them, so the
file format is exercised by what the tracer can produce, not by hand-picked
cases only.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator, Optional

from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.model.snapshot import (
    AllocatorStats,
    ArenaStats,
    Counters,
    DropStats,
    Gap,
    HeapRow,
    HeapTotals,
    OsStats,
    ProcessStats,
    RegionStats,
    Snapshot,
    TrimCall,
    TrimStats,
    aggregate_stacks,
    aggregate_threads,
    rates_between,
)

MIB = 1 << 20


def _frames(rng: random.Random, i: int) -> tuple[str, ...]:
    depth = rng.randint(2, 14)
    inner = tuple(f"fn_{i}_{d}+0x{rng.randrange(16, 4096):x} [libapp.so]" for d in range(depth))
    outer = ("start_thread+0x7d [libc.so.6]",) if i % 7 else ()  # every 7th looks truncated
    return inner + outer


def session(
    count: int,
    *,
    stacks: int = 40,
    threads: int = 6,
    changes: int = 12,
    regions: int = 20,
    seed: int = 1,
    interval_s: float = 1.0,
    sections: bool = True,
) -> Iterator[Snapshot]:
    """`count` snapshots of a process with `stacks` call sites on `threads`
    threads, `changes` of whose (thread, stack) counters move per interval.
    With `sections`, the address-space sections change now and then too."""
    rng = random.Random(seed)
    pool = [_frames(rng, i) for i in range(stacks)]
    rows: dict[tuple[int, int], Counters] = {}
    names = {1000 + t: f"worker-{t}" for t in range(threads)}
    prev: Optional[Snapshot] = None
    trim_calls: list[TrimCall] = []
    region_table = [
        [0x7F0000000000 + r * 64 * MIB, 0x7F0000000000 + r * 64 * MIB + rng.randint(1, 64) * MIB]
        for r in range(regions)
    ]
    for k in range(count):
        for _ in range(changes):
            key = (1000 + rng.randrange(threads), rng.randrange(stacks))
            c = rows.get(key, Counters())
            size = rng.choice((16, 32, 64, 4096, 65536, rng.randint(1, 1 << 20)))
            freed = rng.randint(0, c.live_bytes) if rng.random() < 0.6 and c.live_bytes > 0 else 0
            rows[key] = c + Counters(size, freed, 1, 1 if freed else 0)
        if k and k % 9 == 0 and rows:
            # A thread's rows vanish (it exited and the collector dropped it).
            gone = rng.randrange(threads) + 1000
            rows = {key: c for key, c in rows.items() if key[0] != gone}
        heap_rows = [HeapRow(t, (s, 0), c) for (t, s), c in rows.items()]
        alive = [t for t in names if (t - 1000 + k // 20) % threads]  # one exits now and then
        thread_stats = aggregate_threads(heap_rows, names, alive)
        retained = {(s, 0): rng.randrange(0, 4 * MIB) for (_, s) in rows if rng.random() < 0.3} if sections else None
        stack_stats = aggregate_stacks(heap_rows, lambda key: pool[key[0]], 32, prev, retained)
        total = sum((r.counters for r in heap_rows), Counters())
        heap = HeapTotals(
            total,
            untracked_free_count=k // 3,
            trim_calls=len(trim_calls),
            trim_released_calls=sum(1 for t in trim_calls if t.result),
            drops=DropStats(stack_lost=k // 25, stats_map_full=k // 40),
        )
        elapsed = k * interval_s + rng.random() * 0.01
        rss = 200 * MIB + total.live_bytes + rng.randrange(8 * MIB)
        snapshot = Snapshot(
            pid=4242,
            comm="java",
            elapsed_s=elapsed,
            interval_s=interval_s,
            process=ProcessStats(rss, rss - 50 * MIB, None if k < 3 else rss + MIB),
            heap=heap,
            threads=thread_stats,
            stacks=stack_stats,
            rates=rates_between(prev, heap, elapsed),
            notes=(Note.of(notes.UNWIND_TABLES_FULL),) if k == 0 else (),
        )
        if sections:
            for region in region_table:
                if rng.random() < 0.1:
                    region[1] += 4096 * rng.randint(1, 64)
            if k % 11 == 5:
                region_table.append([0x7E0000000000 + k * MIB, 0x7E0000000000 + (k + 2) * MIB])
            if k % 13 == 7 and len(region_table) > 2:
                region_table.pop(rng.randrange(len(region_table)))
            if k % 17 == 3:
                trim_calls.append(TrimCall(1000, elapsed, rng.randrange(MIB), rng.randint(0, 1)))
            region_stats = tuple(
                RegionStats(s, e, "anon", pool[i % stacks], 1000 + i % threads, i % 2 == 0, e - s, (e - s) // 2)
                for i, (s, e) in enumerate(region_table)
            )
            arenas = tuple(
                ArenaStats(
                    id=f"0x7f00{a:04x}0000",
                    kind="main" if a == 0 else "thread",
                    tids=(1000 + a,),
                    heap_count=1 + k // 30,
                    reserved_bytes=64 * MIB,
                    committed_bytes=(8 + a + k // 10) * MIB,
                    resident_bytes=(6 + a + k // 12) * MIB,
                    live_bytes=(4 + a) * MIB,
                    free_bytes=MIB,
                )
                for a in range(min(threads, 4))
            )
            committed = sum(r.committed_bytes for r in region_stats)
            retained_total = sum(a.retained_bytes for a in arenas)
            snapshot = replace(
                snapshot,
                os=OsStats(committed + MIB, 64 * MIB, committed, committed // 2, k * 4096),
                allocator=AllocatorStats(
                    arena_count=len(arenas),
                    committed_bytes=sum(a.committed_bytes for a in arenas),
                    resident_bytes=sum(a.resident_bytes for a in arenas),
                    live_bytes=total.live_bytes,
                    retained_bytes=retained_total,
                ),
                arenas=arenas,
                regions=region_stats,
                trim=TrimStats(len(trim_calls), sum(t.returned_bytes for t in trim_calls), MIB, tuple(trim_calls[-3:])),
                gap=Gap(rss - 50 * MIB, total.live_bytes, retained_total, max(0, rss - 50 * MIB - total.live_bytes - retained_total)),
                hints=(Note.of(notes.TRIM_WOULD_RETURN, bytes=MIB),) if k > 5 else (),
            )
        if k == count - 1 and count > 3:
            snapshot = replace(snapshot, target_alive=False, exit_status=-9)
        yield snapshot
        prev = snapshot
