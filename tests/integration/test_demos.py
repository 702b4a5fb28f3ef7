"""Each built-in demo and reproduction, run under memtrace, shows its signature.

The demos (tracer/demos/) print their own ground truth on stderr; these tests
check memtrace's JSON against it, with small sizes so each run takes seconds:

- arena-retention: freed blocks stay resident in the threads' arenas
  (retained, not live), and --trim returns what the program's RSS lost;
- inflater: after GC the heap's live bytes fall, the workers' arenas keep
  the pages, and the libz stacks carry that retention;
- leak: one stack grows with time, its frames[0] is the leaking function,
  and nothing is retained beside it;
- threads, startup: run to the end with exit 0 and a sane snapshot (threads:
  per-thread figures equal to the program's own).

`memtrace demo NAME` launches a demo traced from its first instruction (one
snapshot, at exit). For two moments of one run, the demo is started with
--pause and two tracers attach before it allocates; each is stopped (SIGINT)
at its moment while the demo waits between phases.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

import pytest

pytestmark = pytest.mark.bpf

# Short, so the last /proc sample before a stop or an exit is recent.
INTERVAL = "0.25"
# Long enough for two samples after a demo reaches the state to check.
SETTLE_S = 0.6
PHASE_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 120.0

LIBZ_FRAME = re.compile(r"\[libz\.so[\d.]*\]$")
TRUTH = re.compile(r"^\[[\w-]+\] truth (?P<phase>[\w-]+): (?P<fields>.*)$")


# ---------------------------------------------------------------- helpers


def truth_lines(stderr: str, phase: str) -> list[dict[str, str]]:
    """The key=value fields of every `[demo] truth PHASE: ...` line."""
    found = []
    for line in stderr.splitlines():
        m = TRUTH.match(line)
        if m and m["phase"] == phase:
            found.append(dict(f.split("=", 1) for f in m["fields"].split() if "=" in f))
    return found


def per_thread(lines: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {t["thread"]: t for t in lines if "thread" in t}


def total_line(lines: list[dict[str, str]]) -> dict[str, str]:
    """The phase's summary line (the one without thread=)."""
    rest = [t for t in lines if "thread" not in t]
    assert rest, f"no summary truth line in {lines}"
    return rest[0]


def function(frame: str) -> str:
    return frame.split("+", 1)[0].split(" ", 1)[0]


def libz_stacks(doc: dict) -> list[dict]:
    """Stacks whose immediate malloc caller is in libz (zlib has no frame
    pointers, so the walk often ends there)."""
    return [s for s in doc["stacks"] if s["frames"] and LIBZ_FRAME.search(s["frames"][0])]


def total(rows: list[dict], key: str) -> int:
    return sum(r[key] for r in rows)


def brief(doc: dict) -> dict:
    """What a failure message shows of a snapshot."""
    return {
        "heap_live": doc["heap"]["live_bytes"],
        "allocator": doc.get("allocator"),
        "trim": doc.get("trim"),
        "top_stacks": [
            (s["frames"][:3], s["live_bytes"], s["retained_bytes"]) for s in doc["stacks"][:5]
        ],
    }


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME for the session: demos are built once, from source."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def demo_env(demo_cache: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(demo_cache)}


@pytest.fixture
def demo_argv(demo_cache: Path):
    """demo_argv(NAME, options) -> the demo's command line (built if needed)."""
    from memtrace.demos import catalog
    from memtrace.errors import MemtraceError

    def argv(name: str, options: Sequence[str]) -> list[str]:
        try:
            return catalog.get(name).argv(demo_cache / "memtrace" / "demos", list(options))
        except MemtraceError as e:
            pytest.fail(f"building demo {name}: {e}", pytrace=False)

    return argv


@pytest.fixture
def launch_demo(run_memtrace, demo_env):
    """launch_demo(NAME, program options) -> Result of `memtrace demo NAME
    --json`, failing unless memtrace and the demo exited 0 with a snapshot."""

    def launch(name: str, options: Sequence[str] = ()):
        args = ["demo", name, "--json", "--interval", INTERVAL, "--", *options]
        result = run_memtrace(args, timeout=RUN_TIMEOUT_S, env=demo_env)
        if result.rc != 0 or result.doc is None:
            pytest.fail(f"memtrace {' '.join(args)}: rc={result.rc}, "
                        f"stderr: {result.stderr[-3000:]}", pytrace=False)
        return result

    return launch


class PausedDemo:
    """A demo started with --pause, its stderr in a file to watch."""

    def __init__(self, proc: subprocess.Popen, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_paused(self, phase: str, timeout: float = PHASE_TIMEOUT_S) -> None:
        """Until the demo waits before `phase` (it printed its truth for the
        phase before)."""
        marker = f"paused before phase {phase}:"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.stderr():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"demo never paused before {phase} (rc={self.proc.poll()}): "
                    f"{self.stderr()[-3000:]}", pytrace=False)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def step(self, phase: str) -> None:
        """Let the current pause go and wait for the one before `phase`."""
        self.resume()
        self.wait_paused(phase)

    def finish(self) -> None:
        self.resume()
        try:
            rc = self.proc.wait(PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo still running: {self.stderr()[-2000:]}", pytrace=False)
        assert rc == 0, f"demo exited {rc}: {self.stderr()[-2000:]}"


@pytest.fixture
def paused_demo(spawn, demo_argv, tmp_path: Path):
    def start(name: str, options: Sequence[str], first_phase: str) -> PausedDemo:
        stderr_path = tmp_path / f"{name}.stderr"
        with open(stderr_path, "w") as err:
            proc = spawn(demo_argv(name, ["--pause", *options]), stderr=err,
                         stdout=subprocess.DEVNULL)
        demo = PausedDemo(proc, stderr_path)
        demo.wait_paused(first_phase)
        return demo

    return start


@pytest.fixture
def attach_two(start_memtrace, probes):
    """attach_two(pid) -> two tracers attached to pid, uprobes in place."""

    def attach(pid: int):
        tracers = [start_memtrace(["--json", "--interval", INTERVAL, "-p", str(pid)])
                   for _ in range(2)]
        for t in tracers:
            t.wait_attached(probes)
        return tracers

    return attach


def stop(tracer, what: str) -> dict:
    result = tracer.stop(signal.SIGINT)
    if result.rc != 0 or result.doc is None:
        pytest.fail(f"memtrace ({what}) rc={result.rc}: {result.stderr[-2000:]}", pytrace=False)
    return result.doc


# ---------------------------------------------------------------- arena-retention

ARENA_THREADS = 4
ARENA_MIB = 16
ARENA_OPTIONS = ["--threads", str(ARENA_THREADS), "--mib", str(ARENA_MIB), "--hold", "1"]


@pytest.fixture(scope="module")
def arena_runs():
    """Launched arena-retention runs, one per option list per module."""
    return {}


@pytest.fixture
def arena_run(arena_runs, launch_demo):
    def run(*extra: str):
        if extra not in arena_runs:
            arena_runs[extra] = launch_demo("arena-retention", [*ARENA_OPTIONS, *extra])
        return arena_runs[extra]

    return run


def test_arena_retention_keeps_freed_blocks_resident(arena_run):
    result = arena_run()
    doc, after_free = result.doc, truth_lines(result.stderr, "free")
    threads, freed = per_thread(after_free), total_line(after_free)
    allocator = doc["allocator"]
    shown = brief(doc)

    # live is what the program holds (plus glibc's few blocks of its own)
    truth_live = int(freed["live_bytes"])
    assert truth_live <= doc["heap"]["live_bytes"] <= truth_live + 64 * 1024, shown
    # ... and the rest of what the arenas hold resident is retained
    assert allocator["arena_count"] >= ARENA_THREADS + 1, shown
    assert allocator["retained_bytes"] >= 0.5 * allocator["resident_bytes"], shown
    assert doc["gap"]["allocator_retained_bytes"] == allocator["retained_bytes"], doc["gap"]

    # each worker's own arena: its live equals the worker's truth, the rest kept
    by_tid = {int(t["tid"]): t for t in threads.values()}
    mine = [a for a in doc["arenas"] if a["kind"] == "thread" and set(a["tids"]) & set(by_tid)]
    assert len(mine) == ARENA_THREADS, doc["arenas"]
    for arena in mine:
        (tid,) = arena["tids"]
        assert arena["live_bytes"] == int(by_tid[tid]["live_bytes"]), (arena, by_tid[tid])
        assert arena["retained_bytes"] >= 0.5 * arena["resident_bytes"], arena

    # the stack that allocated it is charged the retention
    top = max(doc["stacks"], key=lambda s: s["retained_bytes"])
    assert function(top["frames"][0]) == "inflate_block", shown
    assert top["retained_bytes"] >= 0.5 * allocator["retained_bytes"], top
    assert doc["trim"]["calls"] == 0, doc["trim"]
    assert doc["trim"]["estimate_bytes"] >= 0.5 * allocator["retained_bytes"], doc["trim"]


def test_arena_retention_trim_returns_what_rss_lost(arena_run):
    untrimmed = arena_run().doc
    result = arena_run("--trim")
    doc, stderr = result.doc, result.stderr
    freed, trimmed = total_line(truth_lines(stderr, "free")), total_line(
        [t for t in truth_lines(stderr, "trim") if "rss_bytes" in t])
    rss_drop = int(freed["rss_bytes"]) - int(trimmed["rss_bytes"])
    trim = doc["trim"]
    shown = brief(doc)

    assert rss_drop > 0.5 * ARENA_THREADS * ARENA_MIB * 1024 * 1024, (freed, trimmed)
    assert trim["calls"] >= 1, shown
    assert doc["heap"]["trim_calls"] >= 1, doc["heap"]
    assert abs(trim["returned_bytes"] - rss_drop) <= 0.05 * rss_drop, (
        f"memtrace says malloc_trim returned {trim['returned_bytes']} B, "
        f"the program's RSS fell {rss_drop} B")
    # after the trim little is retained, where the untrimmed run kept most
    before = untrimmed["allocator"]["retained_bytes"]
    assert doc["allocator"]["retained_bytes"] <= 0.1 * before, (
        f"retained {doc['allocator']['retained_bytes']} after trim, {before} without")
    assert doc["allocator"]["retained_bytes"] < doc["allocator"]["live_bytes"], shown


# ---------------------------------------------------------------- inflater

INFLATER_THREADS = 4
INFLATER_PER_THREAD = 250
# zlib's inflate_state (about 7 KiB) and its 32 KiB window, per Inflater.
WINDOW_BYTES = 32 * 1024


@pytest.fixture
def inflater_moments(paused_demo, attach_two):
    """Two snapshots of one inflater run, both traced from before the
    workers started: with every Inflater dropped but live, and after GC."""
    demo = paused_demo("inflater", ["--threads", str(INFLATER_THREADS), "--per-thread",
                                    str(INFLATER_PER_THREAD), "--hold", "0.3"], "prepare")
    before_gc, after_gc = attach_two(demo.proc.pid)
    demo.step("inflate")
    demo.step("hold")
    time.sleep(SETTLE_S)
    before = stop(before_gc, "before GC")
    demo.step("gc")
    demo.step("after-gc")
    time.sleep(SETTLE_S)
    after = stop(after_gc, "after GC")
    demo.finish()
    stderr = demo.stderr()
    return before, after, total_line(truth_lines(stderr, "hold")), total_line(
        truth_lines(stderr, "gc"))


def test_inflater_gc_frees_heap_but_arenas_keep_it(inflater_moments):
    before, after, held, collected = inflater_moments
    dropped = INFLATER_THREADS * INFLATER_PER_THREAD
    assert int(held["dropped_without_end"]) == dropped, held
    assert int(collected["collected"]) == dropped, f"the demo's GC missed some: {collected}"

    # before GC the libz stacks hold every dropped Inflater's state and window
    zlib_before = libz_stacks(before)
    live_before = total(zlib_before, "live_bytes")
    assert live_before >= dropped * (WINDOW_BYTES + 4096), brief(before)
    assert live_before <= 1.1 * int(held["native_bytes_pending_gc"]), (live_before, held)
    workers = {t["tid"] for t in before["threads"] if t["name"].startswith("inflater-")}
    assert len(workers) == INFLATER_THREADS, before["threads"]
    for s in zlib_before:
        if s["live_bytes"]:
            assert set(s["tids"]) <= workers, f"libz stack charged to non-workers: {s}"

    # after GC: the heap's live falls by about that much ...
    zlib_after = libz_stacks(after)
    fell = before["heap"]["live_bytes"] - after["heap"]["live_bytes"]
    assert fell >= 0.9 * live_before, (brief(before), brief(after))
    assert total(zlib_after, "live_bytes") <= 0.05 * live_before, brief(after)
    # ... and the allocator retains it, charged to the libz stacks
    retained = after["allocator"]["retained_bytes"]
    assert retained >= 0.8 * live_before, (
        f"allocator retained {retained} B after GC freed {fell} B: {brief(after)}")
    zlib_retained = total(zlib_after, "retained_bytes")
    assert zlib_retained >= 0.8 * live_before, (
        f"libz stacks retain {zlib_retained} B of the {live_before} B they held: "
        f"{[(s['frames'][:2], s['retained_bytes']) for s in zlib_after]}")
    top = max(after["stacks"], key=lambda s: s["retained_bytes"])
    assert LIBZ_FRAME.search(top["frames"][0]), f"most retained: {top}"
    # in the workers' arenas
    arenas = [a for a in after["arenas"] if set(a["tids"]) & workers]
    assert total(arenas, "retained_bytes") >= 0.8 * live_before, after["arenas"]


# ---------------------------------------------------------------- leak

LEAK_SECONDS = 3
LEAK_RATE_KIB = 256
LEAK_PATH = ["intern_client_name", "register_client", "handle_request"]


@pytest.fixture
def leak_moments(paused_demo, attach_two):
    """Two snapshots of one leak run traced from before it leaked: early in
    the leak phase, and once it is over; and the program's final truth."""
    demo = paused_demo("leak", ["--seconds", str(LEAK_SECONDS), "--rate-kib",
                                str(LEAK_RATE_KIB)], "warmup")
    early_tracer, late_tracer = attach_two(demo.proc.pid)
    demo.step("leak")
    demo.resume()
    time.sleep(LEAK_SECONDS / 3)
    early = stop(early_tracer, "early in the leak")
    demo.wait_paused("hold")
    time.sleep(SETTLE_S)
    late = stop(late_tracer, "after the leak")
    demo.finish()
    leaked = [t for t in truth_lines(demo.stderr(), "leak") if "t" not in t]
    assert leaked, demo.stderr()[-2000:]
    return early, late, leaked[-1]


def test_leak_grows_on_one_stack_without_retention(leak_moments):
    early, late, truth = leak_moments
    for doc in (early, late):
        top = doc["stacks"][0]
        assert [function(f) for f in top["frames"][:3]] == LEAK_PATH, brief(doc)
    early_top, late_top = early["stacks"][0], late["stacks"][0]

    # the leak stack holds exactly what the program leaked
    assert late_top["live_bytes"] == int(truth["leaked_bytes"]), (late_top, truth)
    assert late_top["alloc_count"] == int(truth["leaked_blocks"]), (late_top, truth)
    assert late_top["free_count"] == 0, late_top

    # it grew with time, and the process's live grew by about as much
    growth = late_top["live_bytes"] - early_top["live_bytes"]
    assert early_top["live_bytes"] > 0, brief(early)
    assert growth >= 0.3 * LEAK_RATE_KIB * 1024 * LEAK_SECONDS, (early_top, late_top)
    heap_growth = late["heap"]["live_bytes"] - early["heap"]["live_bytes"]
    assert abs(heap_growth - growth) <= 0.1 * growth + 16 * 1024, (
        f"heap live grew {heap_growth} B, the leak stack {growth} B")
    # the balanced traffic beside it holds nothing
    for s in late["stacks"][1:]:
        if "handle_request" in (function(f) for f in s["frames"]):
            assert s["live_bytes"] <= 8192, s

    # a leak is live, not retained
    assert late_top["retained_bytes"] <= 0.05 * growth, late_top
    assert late["allocator"]["retained_bytes"] <= 0.25 * growth, (
        f"allocator retained {late['allocator']['retained_bytes']} B beside a leak of "
        f"{growth} B: {brief(late)}")


# ---------------------------------------------------------------- threads, startup


def test_threads_demo_matches_its_truth(launch_demo):
    result = launch_demo("threads", ["--duration", "3"])
    doc = result.doc
    assert doc["exit_status"] == 0 and not doc["target_alive"], brief(doc)
    end = truth_lines(result.stderr, "teardown")
    truth = per_thread(end)
    assert set(truth) == {"parser", "cache", "worker-1", "worker-2"}, end
    seen = {t["tid"]: t for t in doc["threads"]}
    for name, t in truth.items():
        got = seen.get(int(t["tid"]))
        assert got is not None, f"no thread {name} tid={t['tid']} in {doc['threads']}"
        assert got["name"] == name, got
        assert (got["live_bytes"], got["alloc_count"], got["free_count"]) == (
            int(t["live_bytes"]), int(t["allocs"]), int(t["frees"])), (
            f"{name}: memtrace {got}, truth {t}")
    leaked = int(total_line(end)["leaked_bytes"])
    top = doc["stacks"][0]
    assert function(top["frames"][0]) == "audit_log_append", brief(doc)
    # Exact by the leaking function. In launch mode a thread's first calls
    # can come before libc's unwind table is loaded (a few ms after its
    # mmap): those stacks end at the frame-pointer walk's end, apart.
    by_leaker = [s for s in doc["stacks"] if function(s["frames"][0]) == "audit_log_append"]
    assert sum(s["live_bytes"] for s in by_leaker) == leaked, (by_leaker, leaked)
    assert top["live_bytes"] >= 0.9 * leaked, (top, leaked)
    drops = doc["heap"]["drops"]
    assert drops["allocs_map_full"] == drops["stats_map_full"] == 0, drops


def test_startup_demo_runs_to_the_end(launch_demo):
    # Held long enough for snapshots while it lives: the JVM runs ~1 s, and
    # the first snapshot comes when the JVM's symbols and tables are read.
    result = launch_demo("startup", ["--hold", "2"])
    doc = result.doc
    assert doc["exit_status"] == 0 and not doc["target_alive"], brief(doc)
    zipstream = truth_lines(result.stderr, "scan-zipstream")
    assert zipstream and zipstream[0]["agrees_with_jarfile"] == "yes", result.stderr[-2000:]
    heap = doc["heap"]
    assert heap["alloc_count"] > 1000 and heap["live_bytes"] > 0, heap
    # traced from the JVM's first instruction: its own threads are named
    names = {t["name"] for t in doc["threads"]}
    assert {"VM Thread", "C1 CompilerThre"} <= names, names
    # the jar scans inflate through zlib, and the JNI entry is walked
    assert libz_stacks(doc), brief(doc)
    assert any(function(f) == "Java_java_util_zip_Inflater_init"
               for s in doc["stacks"] for f in s["frames"]), brief(doc)
    assert heap["drops"]["allocs_map_full"] == 0, heap["drops"]
    assert doc["allocator"]["arena_count"] >= 2, doc["allocator"]
