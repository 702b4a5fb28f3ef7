"""The per-interval Python work of a trace with many churning stacks, without
the kernel: the row book, the aggregation and the recorder replayed on
flows made here (issue 16, target 1). Not part of the test suite: it
measures, and needs no root.

    .venv/bin/python bench/pipeline.py                       # 100,000 stacks, 2,000 changed a step
    .venv/bin/python bench/pipeline.py --changed 200
    .venv/bin/python bench/pipeline.py --profile prof.out    # the steps under cProfile

Each step changes `--changed` random rows the way bench/scale_target.c
does (a block freed and one of another size allocated at the same stack),
then runs what a snapshot runs on them: the flows put into the row book
and settled, the stacks aggregated, and the snapshot written to a
recording. Printed: the median CPU milliseconds of each stage over the
steps after the first few (the first place every stack). bench/scale.py
measures the same work inside a real trace; this one isolates it, with
steady figures from one run to the next, to weigh a change to one stage.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


from memtrace.collect.aggregate import StackAggregator
from memtrace.collect.rows import RowBook
from memtrace.model.snapshot import Flow, HeapTotals, Snapshot
from memtrace.record.recorder import Recorder

WARM_STEPS = 3
TID = 4242
BUCKET = 0x7f00_0000_0000 >> 26


def frames_for(n: int, depth: int) -> list[tuple[str, ...]]:
    """bench/scale_target.c's shape: a leaf, one of 16 functions per base-16
    digit, then plain frames, with names shared as a symbolizer shares them."""
    steps = [f"step_{d:x} (scale_target.c) [scale_target]" for d in range(16)]
    plain = tuple(f"nest_{i} (scale_target.c) [scale_target]" for i in range(depth)) + (
        "main (scale_target.c) [scale_target]", "__libc_start_call_main [libc.so.6]")
    out = []
    for i in range(n):
        digits = tuple(steps[(i >> (4 * k)) & 15] for k in range(5))
        out.append(("leaf (scale_target.c) [scale_target]",) + digits + plain)
    return out


def run(args) -> dict[str, list[float]]:
    rng = random.Random(1)
    all_frames = frames_for(args.stacks, args.depth)
    frames_of = {(i + 1, 0x400000 + i): f for i, f in enumerate(all_frames)}.__getitem__
    flows: list[Flow] = []
    book = RowBook()
    for i in range(args.stacks):
        size = 16 + rng.randrange(256)
        flow = Flow(TID, (i + 1, 0x400000 + i), BUCKET, size, 0, 1, 0, size + 16, 0)
        flows.append(flow)
        book.put(i, None, flow)
    aggregator = StackAggregator(127)
    times: dict[str, list[float]] = {k: [] for k in ("rows", "settle", "aggregate", "record", "all")}
    out_dir = Path(tempfile.mkdtemp(prefix="memtrace-pipeline-"))
    recorder = Recorder(str(out_dir / "pipeline.memtrace"), {})
    profile = cProfile.Profile() if args.profile else None
    changed_rows = None
    clock = time.process_time
    try:
        for step in range(args.steps + WARM_STEPS):
            if step:
                t0 = clock()
                for i in rng.sample(range(args.stacks), args.changed):
                    f = flows[i]
                    size = 16 + rng.randrange(256)
                    new = Flow(f.tid, f.stack_key, f.bucket, f.alloc_bytes + size, f.alloc_bytes,
                               f.alloc_count + 1, f.alloc_count, f.alloc_chunk_bytes + size + 16,
                               f.alloc_chunk_bytes)
                    flows[i] = new
                    book.put(i, f, new)
            t1 = clock()
            if profile is not None and step >= WARM_STEPS:
                profile.enable()
            changed_rows = book.settle() if step else None
            t2 = clock()
            stacks = aggregator.update(book.rows, changed_rows, frames_of, 0)
            t3 = clock()
            snap = Snapshot(pid=1, comm="scale_target", elapsed_s=float(step), interval_s=1.0,
                            heap=HeapTotals(counters=book.totals), stacks=stacks)
            recorder.write(snap)
            t4 = clock()
            if profile is not None:
                profile.disable()
            if step >= WARM_STEPS:
                for name, took in (("rows", t1 - t0), ("settle", t2 - t1), ("aggregate", t3 - t2),
                                   ("record", t4 - t3), ("all", t4 - t0)):
                    times[name].append(took * 1000)
            gc.collect(1)
            gc.freeze()  # as a session does at the end of each interval
    finally:
        recorder.close()
    if profile is not None:
        profile.dump_stats(args.profile)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", type=int, default=100_000)
    p.add_argument("--changed", type=int, default=2_000, help="rows changed a step")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--profile", metavar="FILE", help="the measured steps under cProfile, stats into FILE")
    args = p.parse_args()
    times = run(args)
    print(f"{args.stacks} stacks, {args.changed} rows changed a step; median CPU ms of {args.steps} steps")
    print("  ".join(f"{name} {statistics.median(v):.1f}" for name, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
