"""Allocators other than glibc's (issue 12): the heap ground-truth program
under LD_PRELOAD of Debian's jemalloc, tcmalloc and mimalloc, exact per
thread and per stack, in launch (through `env`) and attach mode; Debian's
Redis, which links jemalloc, loaded by redis-benchmark on 127.0.0.1; Debian's
prometheus, a Go program whose heap has a glibc heap's shape."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
LIBRARIES = {
    "jemalloc": "libjemalloc.so.2",
    "tcmalloc": "libtcmalloc_minimal.so.4",
    "mimalloc": "libmimalloc.so.2",
}


def _heap_checks():
    """The ground-truth assertions of test_heap.py, shared."""
    path = Path(__file__).with_name("test_heap.py")
    spec = importlib.util.spec_from_file_location("memtrace_test_heap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECKS = _heap_checks()


def _library(kind: str) -> Path:
    lib = LIBDIR / LIBRARIES[kind]
    if not lib.exists():
        pytest.fail(f"{lib} is missing: install.sh --test-tools installs it", pytrace=False)
    return lib


@pytest.mark.parametrize("kind", list(LIBRARIES))
def test_launch_under_ld_preload_is_exact(kind, programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace([
        "--json", "--interval", "0.2", "--",
        "env", f"LD_PRELOAD={_library(kind)}", programs["threads"], truth_path, "--hold-ms", "600"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    assert doc["allocator"]["kind"] == kind, doc["allocator"]
    assert doc["heap"]["dropped_count"] == 0, doc["heap"]
    CHECKS.assert_threads_match(doc, truth)
    CHECKS.assert_functions_match(doc, truth)
    gap = doc["gap"]
    assert gap["heap_live_bytes"] >= sum(t["live_bytes"] for t in truth["threads"]), gap
    assert any(kind in n and "not available" in n for n in (x["text"] for x in doc["notes"])), doc["notes"]


@pytest.mark.parametrize("kind", list(LIBRARIES))
def test_attach_under_ld_preload_is_exact(kind, programs, spawn, start_memtrace, probes,
                                          wait_file, tmp_path):
    truth_path = tmp_path / "truth.json"
    target = spawn([programs["threads"], truth_path, "--wait"],
                   env={"LD_PRELOAD": str(_library(kind))})
    pid = int(wait_file(tmp_path / "truth.json.ready", target))
    tracer = start_memtrace(["--json", "--interval", "0.2", "-p", str(pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)
    truth = json.loads(wait_file(truth_path, target))
    rc, doc, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert doc["allocator"]["kind"] == kind
    CHECKS.assert_threads_match(doc, truth)
    CHECKS.assert_functions_match(doc, truth)
    target.send_signal(signal.SIGUSR1)  # untraced now: frees, self-checks and exits
    assert target.wait(30) == 0


@pytest.mark.parametrize("kind", list(LIBRARIES))
def test_cpp_operators_are_counted_once(kind, programs, run_memtrace, tmp_path):
    """new and delete of these allocators do not go through malloc: they
    are probed themselves (and relays are not probed twice)."""
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace([
        "--json", "--interval", "0.2", "--",
        "env", f"LD_PRELOAD={_library(kind)}", programs["cppnew"], truth_path, "--hold-ms", "300"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    assert doc["allocator"]["kind"] == kind
    for function, want in truth["functions"].items():
        # 'alloc_with_new_array(unsigned long)+0x9 [cppnew]': C++ names carry their arguments
        stacks = [s for s in doc["stacks"]
                  if s["frames"] and s["frames"][0].split("(")[0].split("+")[0] == function]
        assert CHECKS.summed(stacks) == CHECKS.counters(want), (function, stacks)
    # A delete that calls the allocator's own probed free is one free.
    assert doc["heap"]["untracked_free_count"] < 50, doc["heap"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=30).stdout


def test_redis_from_debian_is_traced_in_jemalloc(memtrace_cmd, tmp_path):
    """Debian's redis-server links libjemalloc.so.2. Launched under memtrace,
    loaded by redis-benchmark (bounded) on 127.0.0.1: its allocations are
    counted, the kind is jemalloc, and the live blocks in jemalloc's size
    classes are within 5 % of Redis's own used_memory, read while idle."""
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: install.sh --test-tools installs redis", pytrace=False)
    port = _free_port()
    duration = 15.0
    started = time.monotonic()
    tracer = subprocess.Popen(
        [*memtrace_cmd, "--json", "--interval", "1", "--duration", str(duration), "--",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--logfile", str(tmp_path / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "PONG" not in _redis_cli(port, "ping"):
            assert tracer.poll() is None, tracer.stderr.read()
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.2)
        bench = subprocess.run(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-n", "30000",
             "-t", "set", "-d", "1000", "-r", "20000", "-P", "16"],
            capture_output=True, text=True, timeout=60)
        assert bench.returncode == 0, bench.stderr
        info = dict(line.split(":", 1) for line in _redis_cli(port, "info", "memory").split()
                    if ":" in line)
        used = int(info["used_memory"])
        # The trace ends at --duration with Redis idle; then memtrace waits
        # for the command, which is told to stop.
        time.sleep(max(0.0, started + duration + 3 - time.monotonic()))
        _redis_cli(port, "shutdown", "nosave")
        out, err = tracer.communicate(timeout=90)
        assert tracer.returncode == 0, err
        doc = json.loads(out)
    finally:
        _redis_cli(port, "shutdown", "nosave")
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    heap = doc["heap"]
    assert doc["allocator"]["kind"] == "jemalloc", doc["allocator"]
    assert heap["alloc_count"] > 30000, heap
    assert abs(heap["live_allocator_bytes"] - used) <= 0.05 * used, (heap, used)


def test_an_exec_into_another_allocator_is_said(programs, run_memtrace, tmp_path):
    """No silent zeros: the shell is glibc's, the program it execs runs on
    jemalloc, which was not probed."""
    rc, doc, stderr = run_memtrace([
        "--json", "--interval", "0.3", "--", "/bin/sh", "-c",
        f"LD_PRELOAD={_library('jemalloc')} exec {programs['threads']} {tmp_path / 't.json'} "
        "--hold-ms 800"])
    assert rc == 0, stderr
    assert any("after the exec, malloc is jemalloc's" in n for n in (x["text"] for x in doc["notes"])), doc["notes"]


def test_an_exec_into_another_allocator_is_said_of_a_program_gone_within_an_interval(
        programs, run_memtrace, tmp_path):
    """The same, for a program that exits before the first snapshot (0.3 s,
    at an interval of 5): its loader's own list is never read, so the exec
    is judged from the new program's files, its LD_PRELOAD read from its
    environment, as soon as the exec is seen."""
    started = time.monotonic()
    rc, doc, stderr = run_memtrace([
        "--json", "--interval", "5", "--", "/bin/sh", "-c",
        f"LD_PRELOAD={_library('jemalloc')} exec {programs['threads']} {tmp_path / 't.json'} "
        "--hold-ms 300"])
    assert rc == 0, stderr
    assert time.monotonic() - started < 5, "the program outlived an interval: the test proves nothing"
    said = [n["text"] for n in doc["notes"] if n["kind"] == "allocator_changed"]
    assert said and said[0].startswith("after the exec, malloc is jemalloc's ("), doc["notes"]


def test_a_copy_linked_into_the_program_is_found(programs, run_memtrace, tmp_path):
    """jemalloc linked into the executable itself (libjemalloc-dev's
    archive): the program defines malloc, so it is the object probed."""
    archive = LIBDIR / "libjemalloc_pic.a"
    if not archive.exists():
        pytest.fail(f"{archive} is missing: install.sh --test-tools installs libjemalloc-dev",
                    pytrace=False)
    source = Path(__file__).resolve().parents[1] / "programs" / "threads.c"
    binary = tmp_path / "threads_jemalloc"
    build = subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o",
                            str(binary), str(source), str(archive), "-lm", "-lstdc++", "-ldl"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.2", "--", binary, truth_path,
                                    "--hold-ms", "600"])
    assert rc == 0, stderr
    assert doc["allocator"]["kind"] == "jemalloc", doc["allocator"]
    truth = json.loads(truth_path.read_text())
    CHECKS.assert_threads_match(doc, truth, names=False)
    CHECKS.assert_functions_match(doc, truth)


def test_a_go_programs_heap_is_not_taken_for_glibc_arenas(spawn, run_memtrace, tmp_path):
    """Debian's prometheus (Go, with cgo: glibc is loaded) reserves its heap
    at 0xc000000000 in 64 MiB, a RW head then PROT_NONE: a glibc thread
    heap's shape. glibc lists no arena there, so it is anonymous memory."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus not found: sudo ./install.sh --test-tools", pytrace=False)
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 60s\nscrape_configs: []\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = spawn([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    go_heap = 0xC000000000
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        maps = Path(f"/proc/{target.pid}/maps").read_text()
        if f"{go_heap:x}-" in maps:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"prometheus mapped nothing at {go_heap:#x}: {maps[:2000]}")
    rc, doc, stderr = run_memtrace(["--json", "--duration", "1", "-p", str(target.pid)])
    assert rc == 0, stderr
    at_go_heap = [r for r in doc["regions"] if go_heap <= r["start"] < go_heap + (1 << 32)]
    assert at_go_heap, [(hex(r["start"]), r["kind"]) for r in doc["regions"]]
    assert {r["kind"] for r in at_go_heap} == {"anonymous"}, at_go_heap
    assert target.poll() is None, "the target was harmed"


def test_chromiums_own_malloc_is_traced_as_another_allocator(run_memtrace, tmp_path):
    """Debian's chromium executable defines malloc itself (PartitionAlloc's
    shim), with glibc's internal names (__libc_malloc) beside it: it was
    taken for glibc's, and the notes said "glibc" of it. Its malloc is
    probed in the executable, counted, and named as its own."""
    chromium = Path("/usr/lib/chromium/chromium")
    assert chromium.exists(), "chromium is not installed: run install.sh --test-tools"
    page = tmp_path / "page.html"
    page.write_text("<html><body><script>const rows = [];"
                    "for (let i = 0; i < 50000; i++) rows.push({i, s: 'row ' + i});"
                    "document.body.append(rows.length);</script></body></html>")
    rc, doc, stderr = run_memtrace(["--json", "--", chromium, "--headless", "--no-sandbox",
                                    "--disable-gpu", "--user-data-dir=" + str(tmp_path / "profile"),
                                    "--dump-dom", page.as_uri()])
    assert rc == 0, stderr[-2000:]
    assert doc is not None, stderr[-2000:]
    assert doc["allocator"]["kind"] == "other", doc["allocator"]
    assert doc["heap"]["alloc_count"] >= 10_000, doc["heap"]
    named = [n["text"] for n in doc["notes"] if n["kind"] == "allocator_opaque"]
    assert named and named[0].startswith("the malloc in chromium: "), doc["notes"]
