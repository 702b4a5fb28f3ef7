"""The fixed cost of a trace: how long `memtrace --json -- /bin/true` takes
as a whole, and where that time goes (issue 16, target 4).

    sudo .venv/bin/python bench/fixed_cost.py              # 5 runs each, full and --light
    sudo .venv/bin/python bench/fixed_cost.py --runs 9 --cold

Wall time: the memtrace command run as a process, median of --runs, after
one warm-up run (Python's bytecode is written to a scratch directory, as an
installed memtrace has it).
Breakdown: the same trace run inside this process with the steps timed
(median per step over --runs); "other" is what no step covers (argument
parsing, sinks, the interpreter's exit is not in it). --cold empties the
BPF object cache before every run (MEMTRACE_CACHE_DIR, a temporary
directory), so that each one compiles."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["--json", "--", "/bin/true"]


def memtrace_exe() -> str:
    """The memtrace of the venv this runs in (another checkout's venv
    measures that checkout)."""
    beside = Path(sys.executable).parent / "memtrace"
    return str(beside) if beside.exists() else shutil.which("memtrace") or "memtrace"


def wall_times(mode: list[str], runs: int, cold: bool, cache: Path) -> tuple[list, list]:
    """Wall and CPU (user + system, memtrace and its target) seconds of each run."""
    walls, cpus = [], []
    for _ in range(runs):
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        done = subprocess.run([memtrace_exe(), *mode, *COMMAND], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        walls.append(time.monotonic() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            sys.exit(f"memtrace failed: {done.stderr.strip()}")
    return walls, cpus


# Steps of one trace: (label, module, attribute path). Nested steps are
# timed inside their parents and shown indented.
STEPS = [
    ("preflight", "memtrace.cli.preflight", "check_all"),
    ("allocator discovery", "memtrace.process.target", "allocator_of_command"),
    ("launch (fork, exec stop)", "memtrace.process.launch", "Launched.__init__"),
    ("probe sites", "memtrace.collect.probes", "resolve_sites"),
    ("BPF object", "memtrace.collect.probes", "Probes.load"),
    ("  compile (bcc, clang)", "bcc", "BPF.__init__"),
    ("  cache read", "memtrace.collect.bpfcache", "read_cached"),
    ("  cache write", "memtrace.collect.bpfcache", "write_cached"),
    ("  maps, tracepoints (cached)", "memtrace.collect.bpfcache", "loaded_object"),
    ("attach", "memtrace.collect.probes", "Probes.attach"),
    ("collector start", "memtrace.collect.collector", "Collector.start"),
    ("netlink watch", "memtrace.cli.common", "_open_watch"),
    ("startup hold armed", "memtrace.collect.launchhold", "hold_at_libraries"),
    ("release (held at ld.so)", "memtrace.process.launch", "Launched.release"),
    ("  tables and names", "memtrace.collect.launchhold", "LibrariesHold.reached"),
    ("session (target runs, final snapshot)", "memtrace.cli.session", "Session._loop"),
    ("  snapshots", "memtrace.collect.collector", "Collector.snapshot"),
    ("detach", "memtrace.collect.probes", "Probes.detach"),
    ("JSON out", "memtrace.output.sinks.jsonout", "JsonSink.close"),
]


def _wrap(totals: dict, label: str, owner, name: str) -> None:
    inner = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.monotonic() - start

    setattr(owner, name, timed)


def breakdown(mode: list[str], runs: int, cold: bool, cache: Path) -> dict[str, list[float]]:
    """Each run in a child process (a fresh interpreter, as the command
    has), reporting its step times on stdout."""
    per_step: dict[str, list[float]] = {}
    for _ in range(runs):
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        os.environ["MEMTRACE_BENCH_T0"] = repr(time.time())
        done = subprocess.run([sys.executable, __file__, "--one", *mode], capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"run failed: {done.stderr.strip()[-2000:]}")
        for line in done.stdout.splitlines():
            label, _, value = line.rpartition("\t")
            per_step.setdefault(label, []).append(float(value))
    return per_step


def one_run(mode: list[str]) -> None:
    import importlib

    from memtrace.cli import main

    # from the parent's fork: the interpreter's start and the first imports
    started = time.monotonic() - (time.time() - float(os.environ["MEMTRACE_BENCH_T0"]))
    totals: dict[str, float] = {"interpreter, first imports": time.monotonic() - started}
    for label, module, path in STEPS:
        try:  # a step an older checkout has not got is left out
            owner = importlib.import_module(module)
            *outer, name = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            getattr(owner, name)
        except (ImportError, AttributeError):
            continue
        _wrap(totals, label, owner, name)
    sys.argv = ["memtrace", *mode, *COMMAND]
    real_stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        main()
    except SystemExit:
        pass
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
    totals["total (in process)"] = time.monotonic() - started
    top = sum(v for k, v in totals.items() if not k.startswith(" ") and k != "total (in process)")
    totals["other"] = totals["total (in process)"] - top
    with os.fdopen(real_stdout, "w") as out:
        for label, value in totals.items():
            out.write(f"{label}\t{value}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="compile in every run")
    if sys.argv[1:2] == ["--one"]:
        one_run(sys.argv[2:])
        return
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="memtrace-fixed-cost-"))
    cache = scratch / "cache"
    if args.cold:
        os.environ["MEMTRACE_CACHE_DIR"] = str(cache)
    # Python's bytecode, as an installed memtrace has it (a checkout run
    # with PYTHONDONTWRITEBYTECODE compiles every module on every run)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    try:
        for mode in ([], ["--light"]):
            name = "full" if not mode else "--light"
            wall_times(mode, 1, False, cache)  # warm-up: bytecode, and the cache unless --cold
            walls, cpus = wall_times(mode, args.runs, args.cold, cache)
            print(f"\n{name}: memtrace --json -- /bin/true, median of {args.runs}: "
                  f"wall {statistics.median(walls):.2f} s (min {min(walls):.2f}, max "
                  f"{max(walls):.2f}), CPU {statistics.median(cpus):.2f} s; load average "
                  f"{os.getloadavg()[0]:.1f}")
            steps = breakdown(mode, args.runs, args.cold, cache)
            order = (["interpreter, first imports"] + [s[0] for s in STEPS]
                     + ["other", "total (in process)"])
            for label in order:
                if label in steps:
                    print(f"  {label:<40} {statistics.median(steps[label]):6.3f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
