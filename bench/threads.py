"""memtrace attached to a process with many threads: what each snapshot
costs when /proc has thousands of mappings and thread names to read. Not
part of the test suite: it measures.

    sudo .venv/bin/python bench/threads.py                 # 2,000 threads, 10 s at --interval 1
    sudo .venv/bin/python bench/threads.py --threads 500 --seconds 20
    sudo /other/checkout/.venv/bin/python bench/threads.py   # that checkout's memtrace

bench/many_threads.c starts the threads (64 KiB stacks: two mappings each)
and each mallocs a block every ~100 ms. memtrace attaches with `--json
--interval 1` twice, for --seconds and for 1 s; the difference of their CPU
(user and system, from the kernel's accounting of the child) over the
difference of their snapshots is the CPU of one snapshot, the attach and
the final snapshot left out. Median of --runs."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from fixed_cost import memtrace_exe
from targets import build_target


def cpu_of(pid: int, seconds: float) -> tuple[float, float]:
    """(user, system) CPU seconds of `memtrace --json -p pid` for `seconds`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([memtrace_exe(), "--json", "--interval", "1", "--duration", str(seconds),
                           "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"memtrace failed: {done.stderr.strip()}")
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    target = subprocess.Popen([str(build_target("many_threads", ["-pthread"])), str(args.threads)])
    try:
        time.sleep(1.0 + args.threads / 2000)
        maps = sum(1 for _ in open(f"/proc/{target.pid}/maps"))
        users, systems = [], []
        for _ in range(args.runs):
            long_user, long_sys = cpu_of(target.pid, args.seconds)
            short_user, short_sys = cpu_of(target.pid, 1.0)
            snapshots = args.seconds - 1.0
            users.append((long_user - short_user) / snapshots)
            systems.append((long_sys - short_sys) / snapshots)
        user, system = statistics.median(users), statistics.median(systems)
        print(f"{args.threads} threads, {maps} mappings; memtrace per snapshot at --interval 1, "
              f"median of {args.runs}: {1000 * (user + system):.0f} ms "
              f"(user {1000 * user:.0f}, system {1000 * system:.0f}); load average {os.getloadavg()[0]:.1f}")
    finally:
        target.kill()
        target.wait()


if __name__ == "__main__":
    main()
