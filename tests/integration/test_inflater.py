"""The incident memtrace was born from, end to end: a JVM whose worker
threads drop zlib Inflaters without end().

tests/programs/Inflate.java: 4 workers each create 250 Inflaters and inflate
through each in small steps, so zlib mallocs its state (inflateInit2_) and
its 32 KiB window (inflate) in the worker's glibc arena, and keep them; each
then makes one more, a "pin" kept to the end. After the drop, GC and the
JDK's cleaner thread free the 1000 dropped ones, and glibc keeps the memory
in the workers' arenas.

Two full-mode traces attach to the JVM before the workers start: the first
is stopped once the Inflaters are all live, the second after the cleaner
freed them. Both saw every Inflater allocation.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

INTERVAL = 0.5
THREADS = 4
PER_THREAD = 250
WINDOW_BYTES = 32 * 1024  # zlib's window for the default 15 window bits
JAVA_FLAGS = ["-XX:+PreserveFramePointer", "-XX:+UseSerialGC", "-Xmx256m"]

LIBZ_FRAME = re.compile(r"\[libz\.so[\d.]*\]$")


@pytest.fixture(scope="module")
def inflater_run(java_tools, inflate_classpath, tracers, wait_attached, wait_file, _prerequisites,
                 tmp_path_factory):
    """{"before": doc, "after": doc, "ready"/"phase1"/"gc": truth}."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    work: Path = tmp_path_factory.mktemp("inflate")
    java = subprocess.Popen(
        [java_tools[0], *JAVA_FLAGS, "-cp", str(inflate_classpath), "Inflate", str(work),
         "--threads", str(THREADS), "--per-thread", str(PER_THREAD)],
        stdin=subprocess.DEVNULL,
    )
    running: list[subprocess.Popen] = []
    out: dict = {}
    try:
        out["ready"] = json.loads(wait_file(work / "ready.json", java))
        pid = out["ready"]["pid"]
        args = ["--json", "--interval", str(INTERVAL), "-p", str(pid), "--duration", "300"]
        running += [tracers.start(args), tracers.start(args)]
        wait_attached(running)
        (work / "ready.go").touch()
        out["phase1"] = json.loads(wait_file(work / "phase1.json", java))
        time.sleep(INTERVAL)
        out["before"] = tracers.finish(running[0], "memtrace -p (before GC)")
        (work / "phase1.go").touch()
        out["gc"] = json.loads(wait_file(work / "gc.json", java, timeout=90))
        time.sleep(INTERVAL)
        out["after"] = tracers.finish(running[1], "memtrace -p (after GC)")
        (work / "gc.go").touch()
        assert java.wait(30) == 0
    finally:
        tracers.kill_all([*running, java])
    return out


def libz_stacks(doc: dict) -> list[dict]:
    """Stacks whose immediate malloc caller is in libz."""
    return [s for s in doc["stacks"] if s["frames"] and LIBZ_FRAME.search(s["frames"][0])]


def total(stacks: list[dict], key: str) -> int:
    return sum(s[key] for s in stacks)


def worker_tids(run: dict) -> set[int]:
    return {w["tid"] for w in run["ready"]["workers"]}


def worker_arenas(doc: dict, workers: set[int]) -> list[dict]:
    return [a for a in doc["arenas"] if workers & set(a["tids"])]


def freed_by_cleaner(run: dict) -> int:
    return total(libz_stacks(run["before"]), "live_bytes") - total(libz_stacks(run["after"]), "live_bytes")


def callers(doc: dict) -> list[str]:
    return sorted({s["frames"][0] for s in doc["stacks"] if s["frames"]})[:80]


def test_inflaters_hold_libz_memory_before_gc(inflater_run):
    before, phase1 = inflater_run["before"], inflater_run["phase1"]
    created = phase1["inflaters"]
    assert created == THREADS * (PER_THREAD + 1), phase1
    stacks = libz_stacks(before)
    assert stacks, f"no stack has its frames[0] in libz; frames[0] seen: {callers(before)}"
    init = [s for s in stacks if s["frames"][0].startswith("inflateInit2_+")]
    assert init, [s["frames"][0] for s in stacks]
    # one inflate_state per Inflater, all still live
    assert total(init, "alloc_count") == created, init
    assert total(init, "free_count") == 0, init
    # plus one 32 KiB window each, from inflate()
    assert total(stacks, "live_bytes") >= created * (WINDOW_BYTES + 1024), stacks
    workers = worker_tids(inflater_run)
    for s in stacks:
        assert set(s["tids"]) <= workers, f"libz stack charged to non-workers: {s}"
    # the workers' arenas hold it
    arenas = worker_arenas(before, workers)
    assert arenas, [(a["id"], a["tids"]) for a in before["arenas"]]
    assert total(arenas, "live_bytes") >= total(stacks, "live_bytes"), arenas


def test_heap_live_falls_after_gc_but_retained_stays(inflater_run):
    before, after, gc = inflater_run["before"], inflater_run["after"], inflater_run["gc"]
    assert gc["unreachable"] == gc["dropped"] == THREADS * PER_THREAD, gc
    freed = freed_by_cleaner(inflater_run)
    assert freed >= gc["dropped"] * WINDOW_BYTES, (freed, gc)
    fell = before["heap"]["live_bytes"] - after["heap"]["live_bytes"]
    assert fell >= 0.9 * freed, (before["heap"], after["heap"])
    rose = after["allocator"]["retained_bytes"] - before["allocator"]["retained_bytes"]
    assert rose >= 0.9 * freed, (
        f"allocator retained {before['allocator']['retained_bytes']} -> "
        f"{after['allocator']['retained_bytes']} while the cleaner freed {freed}"
    )
    assert after["gap"]["allocator_retained_bytes"] >= freed * 0.9, after["gap"]


def test_retention_is_in_the_workers_arenas(inflater_run):
    before, after = inflater_run["before"], inflater_run["after"]
    freed = freed_by_cleaner(inflater_run)
    workers = worker_tids(inflater_run)
    arenas = worker_arenas(after, workers)
    retained = total(arenas, "retained_bytes")
    shown = json.dumps([{k: a[k] for k in ("id", "kind", "tids", "resident_bytes", "live_bytes",
                                           "retained_bytes")} for a in after["arenas"]])
    assert retained >= 0.9 * freed, (
        f"workers' arenas retain {retained}, the cleaner freed {freed}: {shown}")
    # the same process, so the same arena ids: the growth is theirs too (the
    # cleaner thread freed the memory, but it went back to the arenas it
    # came from)
    was = {a["id"]: a["retained_bytes"] for a in before["arenas"]}
    grew = sum(a["retained_bytes"] - was.get(a["id"], 0) for a in arenas)
    assert grew >= 0.9 * freed, f"workers' arenas' retained grew {grew}, freed {freed}: {shown}"


def test_retention_is_charged_to_libz_stacks(inflater_run):
    after = inflater_run["after"]
    freed = freed_by_cleaner(inflater_run)
    stacks = libz_stacks(after)
    assert stacks, f"no stack has its frames[0] in libz after GC; frames[0] seen: {callers(after)}"
    # what is still live is the pins: one state and window per worker
    assert total(stacks, "live_bytes") <= THREADS * (WINDOW_BYTES + 16 * 1024), stacks
    assert total(stacks, "retained_bytes") >= 0.9 * freed, stacks
    init = [s for s in stacks if s["frames"][0].startswith("inflateInit2_+")]
    assert total(init, "retained_bytes") > 0, init
    workers = worker_tids(inflater_run)
    for s in stacks:
        assert set(s["tids"]) <= workers, f"libz stack charged to non-workers: {s}"
    top = max(after["stacks"], key=lambda s: s["retained_bytes"])
    assert LIBZ_FRAME.search(top["frames"][0]), f"most retained: {top}"
