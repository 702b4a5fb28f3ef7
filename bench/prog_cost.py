"""Nanoseconds per run of each BPF program memtrace (or the floor) attaches,
from the kernel's own accounting (kernel.bpf_stats_enabled).

    sudo .venv/bin/python bench/prog_cost.py [--config memtrace|floor] [--mode fixed64]
        [--threads 1] [--seconds 2] [--reps 3]

Attaches the tracer to one bench/malloc_loop process, turns bpf_stats on for
the runs only (it adds two clock reads per program run), and prints per
program the runs and ns per run, with the ops/s of the workload. The time a
program takes excludes the uprobe trap itself: the floor's programs show
what an empty program costs on top of it. MEMTRACE_BPF_CFLAGS in the
environment reaches memtrace's compile, as for overhead.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Loop, Tracer, configs  # noqa: E402

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def held_program_ids(pids: set[int]) -> set[int]:
    """The ids of every BPF program those processes hold, through a program
    fd or a link fd (uprobe_multi links, which `bpftool perf` does not list,
    and the tail-called walk programs, which nothing attaches): each such
    fd's fdinfo names its prog_id."""
    ids: set[int] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fdinfo")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                text = entry.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def program_stats(pids: set[int]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the programs those processes hold.
    A name loaded twice is counted once per program."""
    ids = held_program_ids(pids)
    done = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                          check=True)
    out: dict[str, tuple[int, int]] = {}
    for prog in json.loads(done.stdout or "[]"):
        if prog.get("id") not in ids:
            continue
        name = prog.get("name", "?")
        ns, runs = out.get(name, (0, 0))
        out[name] = (ns + prog.get("run_time_ns", 0), runs + prog.get("run_cnt", 0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="memtrace")
    parser.add_argument("--mode", default="fixed64", choices=("fixed64", "mixed", "large", "deep"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    from overhead import descendants

    config = next((c for c in configs() if c.name == args.config), None)
    if config is None or config.argv is None or config.missing:
        raise SystemExit(f"prog_cost: no runnable config {args.config!r}")
    loop = Loop()
    tracer = Tracer(config.argv(loop.pid))
    was = STATS_SYSCTL.read_text().strip()
    per_prog: dict[str, list[float]] = {}
    runs_per_op: dict[str, list[float]] = {}
    ops: list[float] = []
    try:
        tracer.wait_attached()
        loop.run(args.mode, args.threads, 0.3)  # warm-up: first stacks, first map entries
        pids = set(descendants(tracer.proc.pid))
        for _ in range(args.reps):
            STATS_SYSCTL.write_text("1\n")
            before = program_stats(pids)
            done = loop.run(args.mode, args.threads, args.seconds)
            ops.append(done)
            after = program_stats(pids)
            STATS_SYSCTL.write_text("0\n")
            for name, (ns, runs) in after.items():
                ns0, runs0 = before.get(name, (0, 0))
                if runs > runs0:
                    per_prog.setdefault(name, []).append((ns - ns0) / (runs - runs0))
                    runs_per_op.setdefault(name, []).append(
                        (runs - runs0) / max(done * args.seconds, 1))
    finally:
        STATS_SYSCTL.write_text(was + "\n")
        tracer.stop()
        loop.close()
    print(f"{args.config}, {args.mode} x{args.threads}: {statistics.median(ops) / 1e6:.3f} M ops/s "
          f"(median of {args.reps}; bpf_stats on)")
    for name, values in sorted(per_prog.items()):
        print(f"  {name:40s} {statistics.median(values):8.0f} ns/run "
              f"{statistics.median(runs_per_op[name]):9.4f} runs/op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
