"""kmem:rss_stat fires on every page fault of every process. Full mode keeps
it for every target (the RSS at the process's exit). Light mode, built for
a low cost, needs it only to measure what malloc_trim gives back, so there
it is attached only when the target runs code that imports malloc_trim (at
start, or when such a library is mapped later)."""

from __future__ import annotations

import signal
import time


def _tracepoints_while_attached(tracer, probes) -> set[str]:
    tracer.wait_attached(probes)
    time.sleep(0.5)  # the import check runs at start, before the first snapshot
    return probes.tracepoints(probes.below(tracer.pid))


def test_full_mode_watches_the_rss_of_every_target(programs, spawn, start_memtrace, probes):
    target = spawn([programs["idle"]])
    tracer = start_memtrace(["--json", "-p", str(target.pid), "--duration", "60"])
    names = _tracepoints_while_attached(tracer, probes)
    rc, _, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert "rss_stat" in names, names


def test_light_no_rss_tracepoint_for_a_target_that_cannot_trim(programs, spawn, start_memtrace,
                                                               probes):
    target = spawn([programs["idle"]])
    tracer = start_memtrace(["--json", "--light", "-p", str(target.pid), "--duration", "60"])
    names = _tracepoints_while_attached(tracer, probes)
    rc, _, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert "sys_enter_mmap" in names, names
    assert "rss_stat" not in names, names


def test_light_rss_tracepoint_for_a_target_that_imports_malloc_trim(
        retention_binary, spawn, start_memtrace, probes, tmp_path):
    target = spawn([retention_binary, tmp_path / "truth.json", "--wait"])
    tracer = start_memtrace(["--json", "--light", "-p", str(target.pid), "--duration", "60"])
    names = _tracepoints_while_attached(tracer, probes)
    rc, _, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert "rss_stat" in names, names


# malloc_trim reached through dlsym (ctypes), so no object imports it: the
# first call finds the RSS unwatched and is marked so; the ones after it are
# measured.
TRIM_BY_DLSYM = """
import ctypes, time
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_trim(0)
time.sleep(1.0)
blocks = [libc.malloc(64 << 10) for _ in range(800)]
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks[:-1]:
    libc.free(b)
libc.malloc_trim(0)
"""


def test_light_a_trim_through_dlsym_starts_the_rss_watch(run_memtrace):
    rc, doc, stderr = run_memtrace(["--json", "--light", "--interval", "0.2", "--",
                                    "/usr/bin/python3", "-c", TRIM_BY_DLSYM])
    assert rc == 0, stderr
    calls = doc["trim"]["recent"]
    assert [c["measured"] for c in calls] == [False, True], calls
    assert calls[0]["returned_bytes"] == 0
    assert calls[1]["returned_bytes"] > 40 << 20, calls  # ~50 MiB of freed blocks
