"""Java frames and the JVM's own figures, on a real HotSpot JVM running
tests/programs/Inflate.java (see test_inflater.py for the program).

One JVM with -XX:+PreserveFramePointer and -XX:NativeMemoryTracking=summary:
the Java method that creates the Inflaters is named in the libz stacks
(JIT-compiled, from the perf map, or interpreted, from the frame's Method*),
and NMT's malloc total is reported beside our heap live. One JVM without
the flag, its Inflater code JIT-compiled first: the walk goes through the
compiled frames by their sizes, read in the code heap, and the hint about
the flag is not given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.bpf

INTERVAL = 0.5
WINDOW_BYTES = 32 * 1024  # zlib's window, one per Inflater
BASE_FLAGS = ["-XX:+UseSerialGC", "-Xmx128m"]
LIBZ_FRAME = re.compile(r"\[libz\.so[\d.]*\]$")
CREATOR = re.compile(r"^Inflate\$Worker\.inflateOne\(\)")
HINT_FLAG = "-XX:+PreserveFramePointer"


def run_inflate(flags, threads, per_thread, java_tools, inflate_classpath, tracers, wait_attached,
                wait_file, work: Path, text: bool = False, warmup: int = 0) -> tuple[dict, dict]:
    """(memtrace's final JSON, or {"text": summary}, the program's phase1
    truth): a trace attached before the workers start (after their
    `warmup` Inflaters), stopped once every Inflater is live."""
    java = subprocess.Popen(
        [java_tools[0], *BASE_FLAGS, *flags, "-cp", str(inflate_classpath), "Inflate", str(work),
         "--threads", str(threads), "--per-thread", str(per_thread), "--warmup", str(warmup)],
        stdin=subprocess.DEVNULL,
    )
    tracer = None
    try:
        pid = json.loads(wait_file(work / "ready.json", java))["pid"]
        args = ["-v", "--interval", str(INTERVAL), "-p", str(pid), "--duration", "300"]
        tracer = tracers.start(args if text else ["--json", *args])
        wait_attached([tracer])
        # -v's last line before the trace's loop, which takes SIGINT as the
        # end (one before it interrupts memtrace's start).
        for line in tracer.stderr:
            if "probes attached" in line:
                break
        (work / "ready.go").touch()
        phase1 = json.loads(wait_file(work / "phase1.json", java))
        time.sleep(2 * INTERVAL)
        if text:
            tracer.send_signal(2)
            out, err = tracer.communicate(timeout=120)
            assert tracer.returncode == 0, err[-2000:]
            return {"text": out}, phase1
        return tracers.finish(tracer, "memtrace -p (java)"), phase1
    finally:
        tracers.kill_all([tracer, java])


@pytest.fixture(scope="module")
def with_frame_pointers(java_tools, inflate_classpath, tracers, wait_attached, wait_file,
                        _prerequisites, tmp_path_factory):
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    return run_inflate(["-XX:+PreserveFramePointer", "-XX:NativeMemoryTracking=summary"], 2, 150,
                       java_tools, inflate_classpath, tracers, wait_attached, wait_file,
                       tmp_path_factory.mktemp("java-fp"))


def libz_stacks(doc: dict) -> list[dict]:
    return [s for s in doc["stacks"] if s["frames"] and LIBZ_FRAME.search(s["frames"][0])]


def test_the_method_that_creates_inflaters_is_named(with_frame_pointers):
    """In the stacks of inflateInit2_, which keeps the frame pointer of its
    JNI caller: the walk goes on into the Java frames. (zlib's inflate(),
    which mallocs the window, uses rbp for data: its stacks need the CFI
    unwinder.)"""
    doc, phase1 = with_frame_pointers
    stacks = libz_stacks(doc)
    assert stacks, sorted({s["frames"][0] for s in doc["stacks"] if s["frames"]})[:50]
    init = [s for s in stacks if s["frames"][0].startswith("inflateInit2_+")]
    assert sum(s["alloc_count"] for s in init) == phase1["inflaters"], init
    named = [s for s in init if any(CREATOR.match(f) for f in s["frames"])]
    shown = [s["frames"][:10] for s in init if s not in named][:3]
    assert sum(s["alloc_count"] for s in named) >= 0.9 * phase1["inflaters"], shown
    assert not any(HINT_FLAG in h for h in (x["text"] for x in doc["hints"])), doc["hints"]
    assert doc["jvm"]["preserve_frame_pointer"] is True, doc["jvm"]


def test_interpreted_frames_name_their_method(with_frame_pointers):
    doc, _ = with_frame_pointers
    assert doc["jvm"]["interpreter_found"] is True, doc["jvm"]
    interpreted = {f for s in doc["stacks"] for f in s["frames"] if f.endswith(" [Interpreter]")}
    assert interpreted, "no interpreted frame in any stack"
    # Each one a Class.method(args), none left as a bare Method*.
    unnamed = sorted(f for f in interpreted if f.startswith("Method* "))
    assert len(unnamed) <= 0.05 * len(interpreted), unnamed[:10]
    assert any(f.startswith("Inflate.main(java.lang.String[])") for f in interpreted), \
        sorted(interpreted)[:40]


def test_nmt_malloc_total_beside_heap_live(with_frame_pointers):
    doc, phase1 = with_frame_pointers
    jvm = doc["jvm"]
    nmt = jvm["nmt_malloc_bytes"]
    assert nmt is not None and nmt >= 1 << 20, jvm  # a JVM mallocs megabytes at start
    assert jvm["nmt_malloc_count"] > 1000, jvm
    assert jvm["heap_live_bytes"] == doc["heap"]["live_bytes"] + doc["heap"].get(
        "live_before_trace_bytes", 0), jvm
    # zlib's mallocs are outside NMT: at least the Inflaters' windows
    assert jvm["not_seen_by_nmt_bytes"] == jvm["heap_live_bytes"] - nmt, jvm
    assert jvm["not_seen_by_nmt_bytes"] >= 0.9 * phase1["inflaters"] * WINDOW_BYTES, jvm
    # and NMT's own count is not far from what we see of the JVM
    assert nmt <= 2 * jvm["heap_live_bytes"], jvm


JNI_NATIVE = re.compile(r"^java\.util\.zip\.Inflater\.(init|inflateBytesBytes)\(")


def walked_through_compiled_code(frames: list[str]) -> bool:
    """A JIT-compiled Java method (not a native method's wrapper, which
    keeps a frame pointer) whose caller is a Java frame: without the flag,
    only its frame size leads there."""
    return any(f.endswith(" [JIT]") and "+0x" in f and not JNI_NATIVE.match(f)
               and not f.startswith("StubRoutines") and caller.endswith(("[JIT]", "[Interpreter]"))
               for f, caller in zip(frames, frames[1:]))


def test_without_frame_pointers_compiled_frames_are_walked(java_tools, inflate_classpath, tracers,
                                                          wait_attached, wait_file, _prerequisites,
                                                          tmp_path_factory):
    """Without -XX:+PreserveFramePointer, as in the incident memtrace was
    made for: the workers' warm-up makes the JIT compile inflateOne and
    Inflater's methods, which keep no frame pointer; the libz stacks of the
    measured Inflaters (inflateInit2_'s state and inflate()'s window) still
    reach the method that creates them."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    # C1 only: the warm-up's code stays (C2 would replace it during the
    # trace, and code freed before the perf map is read stays unnamed).
    doc, phase1 = run_inflate(["-XX:TieredStopAtLevel=1"], 2, 150, java_tools, inflate_classpath,
                              tracers, wait_attached, wait_file,
                              tmp_path_factory.mktemp("java-nofp"), warmup=3000)
    stacks = libz_stacks(doc)
    live = sum(s["live_bytes"] for s in stacks)
    assert live >= phase1["inflaters"] * WINDOW_BYTES, live
    reaching = [s for s in stacks if any(CREATOR.match(f) for f in s["frames"])]
    shown = [s["frames"][:10] for s in stacks if s not in reaching][:3]
    assert sum(s["live_bytes"] for s in reaching) >= 0.9 * live, shown
    compiled = [s for s in reaching if walked_through_compiled_code(s["frames"])]
    assert sum(s["live_bytes"] for s in compiled) >= 0.5 * live, \
        [s["frames"][:10] for s in reaching[:3]]
    assert doc["jvm"]["preserve_frame_pointer"] is False, doc["jvm"]
    assert doc["jvm"]["compiled_frames_walked"] is True, doc["jvm"]
    assert not any(HINT_FLAG in h["text"] for h in doc["hints"]), doc["hints"]


def test_jit_frames_named_from_the_code_heap_without_warm_up(
        java_tools, inflate_classpath, tracers, memtrace_cmd, wait_attached, wait_file,
        _prerequisites, tmp_path_factory):
    """No warm-up, default tiered compilation: C1 compiles inflateOne and
    Inflater's methods while the workers run, and C2's code replaces C1's.
    The perf map is kept out (a jcmd that fails comes first on memtrace's
    PATH), so what names the compiled frames is the code heap alone, read
    as each stack is new: the blob at the return address, its Method*."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    work = tmp_path_factory.mktemp("java-heapnames")
    no_jcmd = work / "bin"
    no_jcmd.mkdir()
    (no_jcmd / "jcmd").write_text("#!/bin/sh\nexit 1\n")
    (no_jcmd / "jcmd").chmod(0o755)
    env_path = f"PATH={no_jcmd}:{os.environ['PATH']}"
    without_perf_map = SimpleNamespace(
        start=lambda args: subprocess.Popen(["env", env_path, *memtrace_cmd, *args],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True),
        finish=tracers.finish, kill_all=tracers.kill_all)
    doc, phase1 = run_inflate([], 2, 300, java_tools, inflate_classpath, without_perf_map,
                              wait_attached, wait_file, work)
    stacks = libz_stacks(doc)
    jit = [f for s in stacks for f in s["frames"] if f.endswith(" [JIT]")]
    assert jit, [s["frames"][:10] for s in stacks[:3]]
    unnamed = [f for f in jit if f.startswith("0x")]
    assert len(unnamed) <= 0.1 * len(jit), (len(unnamed), len(jit), unnamed[:10])
    live = sum(s["live_bytes"] for s in stacks)
    reaching = sum(s["live_bytes"] for s in stacks if any(CREATOR.match(f) for f in s["frames"]))
    assert reaching >= 0.9 * live, [s["frames"][:10] for s in stacks[:3]]
    assert any(f.startswith("java.util.zip.Inflater.init(boolean)+0x") for f in jit), sorted(set(jit))
