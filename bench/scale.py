"""Scale: memtrace on a target with many distinct live stacks that churn
(issue 16, targets 1-3). Not part of the test suite: it measures.

    .venv/bin/python bench/scale.py                          # 100,000 stacks, 25 s
    .venv/bin/python bench/scale.py --stacks 50000 --seconds 25
    .venv/bin/python bench/scale.py --stacks 57000 --ramp 90 --seconds 300   # Tomcat-like
    .venv/bin/python bench/scale.py --profile prof.out       # memtrace under cProfile
    .venv/bin/python bench/scale.py --keep DIR               # keep the recording
    .venv/bin/python bench/scale.py --steady-after 20        # also CPU per snapshot from 20 s in

memtrace launches `scale_target.c` (`--json --record --interval 1`, with
kernel maps large enough for the stacks). Measured:
- memtrace's own CPU (its process, not the target), % of one core, from
  /proc between 5 s after its start and the target's exit: the compile and
  attach before and the final snapshot after are left out;
- its peak RSS (VmHWM) up to the target's exit;
- its CPU seconds per snapshot in the steady state: from the end of the
  third snapshot (the first ones symbolize every new stack) to the target's
  exit, over the snapshots in between (the final snapshot, taken at the
  exit, anchors the recording's clock). On a machine shared with other work a
  late snapshot may only have waited for a core: this figure over the
  interval is what memtrace takes of a core when every snapshot is on time;
- snapshots on time: the intervals between the recorded snapshots (median,
  largest, and how many were over the interval + 0.25 s);
- the recording's size, in total and per table (sqlite's dbstat), and the
  projection to an hour: the file as it is, less the bytes written after
  the ramp, plus those bytes per second (per second of the recording, not
  per snapshot: a late snapshot holds more changes; scaled by the pages'
  overhead over the row data) times the rest of the hour;
- `memtrace report` on the recording: seconds (wall and CPU) and output
  bytes per format, bare and with --top 100 (json, folded).

With --profile, memtrace runs under cProfile and the 25 functions with the
most own time and the most cumulated time are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import resource
import signal
import sqlite3
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


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def trace(args, target: Path, rec: Path, out_dir: Path) -> dict:
    size = max(65536, 1 << (2 * args.stacks - 1).bit_length())
    memtrace = [python()]
    if args.profile:
        memtrace += ["-m", "cProfile", "-o", args.profile]
    if args.stages:
        after = int(args.steady_after / args.interval) if args.steady_after else 3  # snapshots
        memtrace += [str(ROOT / "bench" / "stages.py"), "--after", str(after), "--"]
    else:
        memtrace += ["-m", "memtrace"]
    memtrace += ["--json", "--interval", str(args.interval), "--record", str(rec),
                 "--max-stats", str(size), "--stack-storage-size", str(size),
                 "--", str(target), str(args.stacks), str(args.seconds), str(args.rate),
                 str(args.ramp), str(args.depth)]
    with open(out_dir / "trace.json", "w") as out, open(out_dir / "trace.err", "w") as err:
        started = time.monotonic()
        tracer = subprocess.Popen(memtrace, stdout=out, stderr=err)
        first = last = None
        samples: list[tuple[float, int]] = []  # (t, memtrace's CPU ticks)
        peak_rss = 0
        target_pid = None
        spy = None
        while tracer.poll() is None:
            time.sleep(0.05)
            t = time.monotonic() - started
            try:
                ticks = cpu_ticks(tracer.pid)
                peak_rss = peak_rss_bytes(tracer.pid)
            except OSError:
                break
            if target_pid is None:
                for kid in children(tracer.pid):
                    # By what it runs: a child forked to launch it names
                    # the target in its command line before its exec.
                    try:
                        if os.path.realpath(f"/proc/{kid}/exe") == str(target.resolve()):
                            target_pid = kid
                    except OSError:
                        pass
            if target_pid is not None and not os.path.exists(f"/proc/{target_pid}/stat"):
                break  # the target is gone: what follows is the final snapshot
            samples.append((t, ticks))
            if spy is None and args.pyspy and t >= args.spy_after:
                spy = subprocess.Popen(
                    [str(Path(python()).parent / "py-spy"), "record", "-p", str(tracer.pid),
                     "-r", str(args.spy_rate), "-d", str(int(args.seconds + 60)), "--nonblocking", "-f", "raw",
                     "-o", args.pyspy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if t >= 5.0:
                if first is None:
                    first = (t, ticks)
                last = (t, ticks)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT (not SIGTERM)
            spy.wait()
        tracer.wait()
        wall = time.monotonic() - started
    cpu = None
    if first and last and last[0] > first[0]:
        cpu = 100.0 * (last[1] - first[1]) / TICK_HZ / (last[0] - first[0])
    return {"exit": tracer.returncode, "cpu_pct": cpu, "wall_s": wall, "samples": samples,
            "peak_rss_bytes": peak_rss}


def cpu_per_snapshot(t: dict, times: list[float], skip: int = 3) -> tuple[float, int]:
    """memtrace's CPU seconds per snapshot once it runs steadily: its CPU
    from the end of snapshot `skip` (the first ones symbolize every new
    stack) to the target's exit, over the snapshots in between. The final
    snapshot, taken as the exit is seen, anchors the recording's clock to
    ours."""
    samples = t["samples"]
    if len(times) < skip + 3 or not samples:
        return 0.0, 0
    offset = samples[-1][0] - times[-1]
    start = times[skip - 1] + offset
    after = [s for s in samples if s[0] >= start]
    count = sum(1 for x in times[skip:-1] if x + offset <= samples[-1][0])
    if not after or not count:
        return 0.0, 0
    return (samples[-1][1] - after[0][1]) / TICK_HZ / count, count


def table_sizes(rec: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
    except sqlite3.Error:
        rows = []
    db.close()
    return dict(rows)


def snapshot_times(rec: Path) -> list[float]:
    db = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
    times = [r[0] for r in db.execute("SELECT elapsed_s FROM snapshots ORDER BY id")]
    db.close()
    return times


def naming_ends(rec: Path) -> int:
    """How many snapshots came before every stack was named (memtrace names
    new stacks within a budget per snapshot, and says so in a note)."""
    import zlib

    db = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
    last = 0
    for sid, value in db.execute("SELECT snapshot_id, value FROM sections WHERE name = 'notes'"):
        text = zlib.decompress(value).decode() if isinstance(value, bytes) else (value or "")
        if "still being named" in text:
            last = max(last, sid)
    db.close()
    return last


def growth(rec: Path, ramp_s: float, after_s: float = 0.0) -> tuple[int, int, float]:
    """Bytes of row data written for the snapshots after the ramp, and the
    seconds they cover: (ramp bytes, steady bytes, steady seconds). Per
    second, not per snapshot: a late snapshot holds more changes."""
    db = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
    per: dict[int, int] = {}
    for sid, n in db.execute("SELECT snapshot_id, length(data) FROM changes"):
        per[sid] = per.get(sid, 0) + n
    for sid, n in db.execute("SELECT snapshot_id, length(value) FROM sections"):
        per[sid] = per.get(sid, 0) + (n or 0)
    times = dict(db.execute("SELECT id, elapsed_s FROM snapshots"))
    db.close()
    if not times:
        return 0, 0, 0.0
    # The ramp ends with the last snapshot 2 s after it, or the first one;
    # and not before every stack is named (after_s).
    base = max((t for t in times.values() if t <= max(ramp_s + 2, after_s)), default=min(times.values()))
    ramp = sum(n for sid, n in per.items() if times.get(sid, 0) <= base)
    steady_ids = [sid for sid, t in times.items() if t > base]
    steady = sum(per.get(sid, 0) for sid in steady_ids)
    if not steady_ids:
        return ramp, steady, 0.0
    return ramp, steady, max(times[s] for s in steady_ids) - base


def report(rec: Path, out_dir: Path, fmt: str, extra: list[str]) -> tuple[float, float, int, int]:
    """(wall s, CPU s, output bytes, exit status) of one `memtrace report`."""
    out = out_dir / f"report-{fmt}{'-'.join([''] + extra)}.out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run([python(), "-m", "memtrace", "report", str(rec), "--format", fmt,
                        "-o", str(out), *extra], capture_output=True, text=True)
    dt = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if r.returncode:
        print(f"  report {fmt} {' '.join(extra)}: exit {r.returncode}: {r.stderr.strip()[:200]}")
    return dt, cpu, out.stat().st_size if out.exists() else 0, r.returncode


def print_samples(path: str, top: int = 25) -> None:
    """py-spy's folded stacks: each function's share of the samples, own
    and with what it calls."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            count = int(n)
            total += count
            frames = [re.sub(r" \((/.*/)?([^/]+):\d+\)$", r" (\2)", fr) for fr in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for fr in set(frames):
                inclusive[fr] = inclusive.get(fr, 0) + count
    for title, table in (("own", own), ("inclusive", inclusive)):
        print(f"\n-- py-spy: {top} functions by {title} samples (of {total}) --")
        for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {100 * n / total:5.1f} %  {name}")


def print_profile(path: str) -> None:
    stats = pstats.Stats(path)
    for key in ("tottime", "cumulative"):
        print(f"\n-- memtrace's 25 functions by {key} --")
        stats.sort_stats(key).print_stats(25)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=25.0, help="how long the target runs")
    p.add_argument("--rate", type=float, default=20_000, help="frees and mallocs a second")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which the stacks appear")
    p.add_argument("--depth", type=int, default=8, help="plain frames under the distinct ones")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--profile", metavar="FILE", help="run memtrace under cProfile, stats into FILE")
    p.add_argument("--py-spy", metavar="FILE", dest="pyspy",
                   help="sample memtrace with py-spy (from --spy-after to the target's exit), folded into FILE")
    p.add_argument("--spy-rate", type=int, default=50, metavar="HZ",
                   help="py-spy's samples a second (400 gives a profile of one run worth reading)")
    p.add_argument("--spy-after", type=float, default=5.0, metavar="S",
                   help="start py-spy this many seconds in (past the first snapshots: the steady state)")
    p.add_argument("--steady-after", type=float, default=0.0, metavar="S",
                   help="also CPU per snapshot from S seconds in (every stack named, the heap warm)")
    p.add_argument("--stages", action="store_true",
                   help="CPU ms per snapshot of each stage (bench/stages.py), from --steady-after on")
    p.add_argument("--keep", metavar="DIR", help="keep the recording and the outputs here")
    p.add_argument("--no-reports", action="store_true")
    args = p.parse_args()

    if args.pyspy and not (Path(python()).parent / "py-spy").exists():
        sys.exit("scale.py: --py-spy needs py-spy in memtrace's venv: .venv/bin/pip install py-spy")
    target = build_target("scale_target", ("-fno-optimize-sibling-calls",))
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="memtrace-scale-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = out_dir / "scale.memtrace"
    for suffix in ("", "-wal"):
        Path(str(rec) + suffix).unlink(missing_ok=True)
    print(f"{args.stacks} stacks, {args.rate:g} churn/s, ramp {args.ramp:g} s, depth {args.depth},"
          f" {args.seconds:g} s at --interval {args.interval:g}")
    for attempt in range(20):
        t = trace(args, target, rec, out_dir)
        err = (out_dir / "trace.err").read_text()
        # Debian's unpatched bcc tools (memleak-bpfcc) attach with a random
        # ref_ctr_offset: while one runs, nobody can probe the same malloc.
        if not (t["exit"] and "ref_ctr_offset" in err):
            break
        print("  malloc is probed by another bcc tool: trying again in 15 s")
        for suffix in ("", "-wal"):
            Path(str(rec) + suffix).unlink(missing_ok=True)
        time.sleep(15)
    if t["exit"]:
        print(f"memtrace exited {t['exit']}: {(out_dir / 'trace.err').read_text()[-500:]}")
        return 1
    cpu = f"{t['cpu_pct']:.1f} % of a core" if t["cpu_pct"] is not None else "n/a"
    print(f"memtrace CPU while the target ran: {cpu}; whole run {t['wall_s']:.1f} s;"
          f" load average {os.getloadavg()[0]:.1f}")
    print(f"memtrace's peak RSS while the target ran: {t['peak_rss_bytes'] / 2**20:.0f} MiB")
    try:
        final = json.loads((out_dir / "trace.json").read_text())
        drops = final["heap"]["drops"]
        print(f"final: {len(final['stacks'])} stacks, {final['truncated_stack_count']} look truncated;"
              f" drops {drops}")
    except (OSError, ValueError, KeyError) as e:
        print(f"final JSON unreadable: {e}")
    times = snapshot_times(rec)
    per, n = cpu_per_snapshot(t, times)
    if n:
        print(f"CPU per snapshot: {1000 * per:.0f} ms over the {n} snapshots after the first 3,"
              f" {100 * per / args.interval:.1f} % of a core if each came on time at --interval {args.interval:g}")
    if args.steady_after:
        skip = sum(1 for x in times if x < args.steady_after)
        per, n = cpu_per_snapshot(t, times, skip=max(3, skip))
        print(f"CPU per snapshot from {args.steady_after:g} s in: {1000 * per:.0f} ms over {n} snapshots,"
              f" {100 * per / args.interval:.1f} % of a core")
    named = naming_ends(rec)
    if named:
        per, n = cpu_per_snapshot(t, times, skip=max(3, named + 1))
        print(f"stacks being named until snapshot {named} ({times[named - 1]:.1f} s);"
              + (f" after: {1000 * per:.0f} ms per snapshot over {n}, {100 * per / args.interval:.1f} % of a core"
                 if n else " too few snapshots after"))
    gaps = [b - a for a, b in zip(times, times[1:])]
    if gaps:
        late = sum(1 for g in gaps if g > args.interval + 0.25)
        print(f"snapshots: {len(times)}; interval median {statistics.median(gaps):.2f} s, "
              f"largest {max(gaps):.2f} s, {late} of {len(gaps)} late (> {args.interval + 0.25:g} s)")
    size = rec.stat().st_size
    tables = table_sizes(rec)
    print(f"recording: {size / 1e6:.1f} MB; " + ", ".join(
        f"{k} {v / 1e6:.1f}" for k, v in sorted(tables.items(), key=lambda kv: -kv[1])
        if v >= 100_000))
    ramp_b, steady_b, steady_s = growth(rec, args.ramp, times[named - 1] if named else 0.0)
    if steady_s > 0:
        # Row data to file bytes: SQLite's pages are not full.
        db = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
        data = sum(db.execute(q).fetchone()[0] or 0 for q in (
            "SELECT sum(length(data)) FROM changes", "SELECT sum(length(value)) FROM sections"))
        db.close()
        pages = tables.get("changes", 0) + tables.get("sections", 0)
        per_s = steady_b / steady_s * (pages / data if data and pages else 1.0)
        hour = size - steady_b + per_s * (3600 - args.ramp)
        print(f"steady growth {per_s / 1e3:.1f} kB/s (rows and their pages) over {steady_s:.0f} s; "
              f"an hour: about {hour / 1e6:.0f} MB (the file so far, less its steady part, "
              f"plus that rate for {3600 - args.ramp:g} s)")
    if not args.no_reports:
        for fmt, extra in (("text", []), ("json", []), ("json", ["--top", "100"]), ("folded", []),
                           ("folded", ["--top", "100"]), ("html", [])):
            dt, cpu, n, rc = report(rec, out_dir, fmt, extra)
            if not rc:
                print(f"report {fmt:6} {' '.join(extra):10} {dt:5.2f} s (CPU {cpu:5.2f} s) {n / 1e6:8.2f} MB")
    if args.stages:
        err = (out_dir / "trace.err").read_text()
        print(err[err.find("\n-- CPU ms per snapshot"):].rstrip() if "-- CPU ms per snapshot" in err
              else "no stage times: memtrace did not end normally")
    if args.profile:
        print_profile(args.profile)
    if args.pyspy and os.path.exists(args.pyspy):
        print_samples(args.pyspy)
    if args.keep:
        print(f"kept in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
