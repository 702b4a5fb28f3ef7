"""Soak: memtrace in full mode with --record on a service-like target for
minutes (10 by default), then checks that nothing drifted or got lost.

    sudo .venv/bin/python bench/soak.py                 # 10 minutes
    sudo .venv/bin/python bench/soak.py --minutes 1     # a short run
    sudo .venv/bin/python bench/soak.py --keep DIR      # keep the recording in DIR

The target (`soak_target.c`) runs worker threads that come and go; they
malloc, calloc, realloc and free with a checked pattern in every block, hand
blocks to one another, and map, protect and unmap memory; it execs itself
once, at 40 % of the time. memtrace launches it (`--json --record`), and
its own RSS and CPU are read from /proc every few seconds.

Checked, each printed with PASS or FAIL (exit status 1 if any failed):
- the target's own checks: no pattern mismatch in either phase, exit 0;
- no probe lost: memtrace counted every malloc, calloc and realloc the
  target made in both phases (before and after the exec), and no drop
  counter moved (the counts are printed either way);
- memtrace's RSS and CPU flat: the mean over the last third of the run
  against the first third (after a minute of warm-up, or 10 % of a short
  run), within 10 % + 8 MB and 1.5x + 1 point of a core;
- the recording readable: `memtrace report` on it succeeds and it holds a
  snapshot for (nearly) every interval, with the exec in its notes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import build_target  # noqa: E402  (bench/ is not a package)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK_HZ = os.sysconf("SC_CLK_TCK")


def memtrace_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    return [python, "-m", "memtrace"]


def read_proc(pid: int) -> tuple[int, int]:
    """(VmRSS bytes, utime + stime ticks) of one process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, int(fields[11]) + int(fields[12])


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
        self.failed += not ok


def thirds(samples: list[tuple[float, int, int]], warmup_s: float) -> tuple[list, list]:
    kept = [s for s in samples if s[0] >= warmup_s]
    n = len(kept) // 3
    return kept[:n], kept[-n:]


def cpu_share(part: list[tuple[float, int, int]]) -> float:
    """Share of one core over a stretch of samples, in %."""
    (t0, _, c0), (t1, _, c1) = part[0], part[-1]
    return 100.0 * (c1 - c0) / TICK_HZ / (t1 - t0) if t1 > t0 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0, help="memtrace --interval (default 1)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between /proc samples")
    parser.add_argument("--keep", metavar="DIR", help="keep the recording and the outputs here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak.py needs root: it attaches uprobes", file=sys.stderr)
        return 2
    seconds = args.minutes * 60
    target = build_target("soak_target", ("-pthread",))
    work = Path(args.keep or tempfile.mkdtemp(prefix="memtrace-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rec, results, final = work / "soak.memtrace", work / "target.jsonl", work / "final.json"
    for path in (rec, results, final):
        path.unlink(missing_ok=True)
    argv = [*memtrace_command(), "--json", "--interval", str(args.interval), "--record", str(rec),
            "--", str(target), f"{seconds:.1f}", f"{seconds * 0.4:.1f}", str(results)]
    print(f"soak: {args.minutes:g} min; {' '.join(argv)}", flush=True)
    samples: list[tuple[float, int, int]] = []  # (s since start, RSS bytes, CPU ticks)
    started = time.monotonic()
    with open(final, "w") as out, open(work / "memtrace.stderr", "w") as err:
        tracer = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            while tracer.poll() is None:
                try:
                    rss, ticks = read_proc(tracer.pid)
                    samples.append((time.monotonic() - started, rss, ticks))
                except (OSError, StopIteration, IndexError):
                    pass  # exiting
                try:
                    tracer.wait(args.sample_s)
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - started > seconds + 300:
                    tracer.terminate()
        finally:
            if tracer.poll() is None:
                tracer.kill()
            tracer.wait()
    wall = time.monotonic() - started
    stderr_text = (work / "memtrace.stderr").read_text()
    checks = Checks()
    print(f"\nmemtrace ran {wall:.0f} s and exited {tracer.returncode}")
    checks(tracer.returncode == 0, f"memtrace exit status 0 (the target's) {stderr_text.strip()[-300:]}")

    phases = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    checks(len(phases) == 2, f"the target ran both phases (before and after its exec): {len(phases)}")
    mismatches = sum(p["mismatches"] for p in phases)
    checks(mismatches == 0, f"target checks: {mismatches} mismatches in "
           f"{sum(p['checked_bytes'] for p in phases) / 1e9:.1f} GB checked")
    made = sum(p["mallocs"] + p["callocs"] + p["reallocs"] for p in phases)
    freed = sum(p["frees"] + p["reallocs"] for p in phases)
    threads = sum(p["threads"] for p in phases)
    print(f"  target: {threads} threads, {made} allocations (malloc, calloc, realloc), "
          f"{sum(p['frees'] for p in phases)} frees, {sum(p['maps'] for p in phases)} mmaps")

    try:
        doc = json.loads(final.read_text())
    except ValueError:
        doc = {}
    heap = doc.get("heap", {})
    drops = heap.get("drops", {})
    counted, counted_free = heap.get("alloc_count", 0), heap.get("free_count", 0)
    # libc allocates a little for itself (stdio, thread start-up): a few more.
    checks(made <= counted <= made + max(1000, made // 1000),
           f"no probe lost: memtrace counted {counted} allocations, the target made {made}")
    checks(freed <= counted_free <= freed + max(1000, freed // 1000),
           f"memtrace counted {counted_free} frees (realloc counts as one), the target made {freed}")
    dropped = {k: v for k, v in drops.items() if v}
    checks(not dropped and not heap.get("dropped_count"),
           f"drops counted: {drops}, dropped_count {heap.get('dropped_count')}, "
           f"untracked frees {heap.get('untracked_free_count')}")

    warmup = min(60.0, seconds * 0.1)
    first, last = thirds(samples, warmup)
    if len(first) >= 2 and len(last) >= 2:
        rss0 = statistics.mean(s[1] for s in first) / 1e6
        rss1 = statistics.mean(s[1] for s in last) / 1e6
        cpu0, cpu1 = cpu_share(first), cpu_share(last)
        peak = max(s[1] for s in samples) / 1e6
        whole = cpu_share(samples)
        checks(rss1 <= rss0 * 1.10 + 8, f"memtrace RSS flat: {rss0:.1f} MB in the first third, "
               f"{rss1:.1f} MB in the last (peak {peak:.1f} MB)")
        checks(cpu1 <= cpu0 * 1.5 + 1, f"memtrace CPU flat: {cpu0:.1f} % of a core in the first "
               f"third, {cpu1:.1f} % in the last ({whole:.1f} % over the run)")
    else:
        checks(False, f"too few /proc samples ({len(samples)}) for RSS and CPU")

    report = subprocess.run([*memtrace_command(), "report", str(rec), "--format", "json"],
                            capture_output=True, text=True, timeout=600)
    checks(report.returncode == 0 and not report.stderr,
           f"`memtrace report` on the recording: exit {report.returncode} {report.stderr.strip()[:300]}")
    sys.path.insert(0, str(ROOT))
    from memtrace.record.reader import open_recording

    with open_recording(str(rec)) as recording:
        count, complete, duration = len(recording), recording.complete, recording.duration_s
        last_notes = recording.snapshot(count - 1).notes if count else ()
    expected = seconds / args.interval
    checks(count >= expected * 0.95 and complete,
           f"recording: {count} snapshots over {duration:.0f} s (about {expected:.0f} expected), "
           f"{'closed' if complete else 'not closed'}, {rec.stat().st_size / 1e6:.1f} MB, "
           f"alone: {sorted(p.name for p in rec.parent.iterdir() if p.name.startswith(rec.name))}")
    checks(any(n.kind == "exec" for n in last_notes), f"the exec is in the notes: {list(last_notes)}")
    print(f"\n{'FAILED' if checks.failed else 'passed'}; outputs in {work}")
    if not args.keep and not checks.failed:
        shutil.rmtree(work)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
