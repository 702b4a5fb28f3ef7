"""Debian's Tomcat 10 (JDK 17), as a user meets it: traced from its first
instruction through startup and requests, and attached to while it serves
a stream of requests. Nobody here wrote it; the checks are what a user
reads: named native stacks, no drops, a gap that adds up, per-thread
arenas, Java frames walked without the frame-pointer flag (no hint about
it; zlib's live bytes reach the Inflater and the Java method that made it),
and a Tomcat that still serves after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

HOME = Path("/usr/share/tomcat10")
DEBIAN_BASE = Path("/var/lib/tomcat10")
START_TIMEOUT_S = 120  # startup under the tracer, on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tomcat_base(tmp_path) -> tuple[Path, int]:
    """A Tomcat instance of its own: Debian's configuration and ROOT webapp,
    on free ports, with its logs and work files under tmp_path."""
    if not (HOME / "bin" / "catalina.sh").exists() or not (DEBIAN_BASE / "conf").is_dir():
        pytest.fail("tomcat10 is not installed: install.sh --test-tools installs it", pytrace=False)
    base = tmp_path / "tomcat"
    shutil.copytree(DEBIAN_BASE / "conf", base / "conf")
    shutil.copytree(DEBIAN_BASE / "webapps", base / "webapps")
    for name in ("logs", "work", "temp"):
        (base / name).mkdir()
    port = _free_port()
    server = base / "conf" / "server.xml"
    text = server.read_text()
    assert '<Connector port="8080"' in text, "Debian's server.xml changed: no connector on 8080"
    # The shutdown port: Debian's is off (-1); a stock one would listen on 8005.
    server.write_text(text.replace('<Connector port="8080"', f'<Connector port="{port}"')
                      .replace('<Server port="8005"', '<Server port="-1"'))
    return base, port


def _tomcat_env(base: Path) -> dict:
    env = dict(os.environ)
    env.update(CATALINA_HOME=str(HOME), CATALINA_BASE=str(base), CATALINA_TMPDIR=str(base / "temp"))
    env.pop("JAVA_TOOL_OPTIONS", None)
    return env


def _get(port: int, path: str = "/") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_serving(port: int, procs) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[0]} exited ({p.returncode}) before Tomcat served", pytrace=False)
        try:
            if _get(port) == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Tomcat did not serve on port {port} within {START_TIMEOUT_S}s", pytrace=False)


def _java_of(base: Path) -> int:
    """The JVM of this instance (its command line names the base)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"java") and f"-Dcatalina.base={base}".encode() in argv:
            return int(pid)
    pytest.fail("Tomcat's JVM not found", pytrace=False)


class Load:
    """Requests in a loop on a thread: a service that is busy."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.statuses.add(_get(self.port, f"/missing{self.count}" if self.count % 2 else "/"))
            self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.count


def _named_live_share(doc: dict) -> float:
    """The share of live bytes whose stack has a named frame of libjvm.so."""
    def named(stack) -> bool:
        return any("[libjvm.so]" in f and not f.startswith(("0x", "function at")) for f in stack["frames"])

    live = [s for s in doc["stacks"] if s["live_bytes"] > 0]
    total = sum(s["live_bytes"] for s in live)
    return sum(s["live_bytes"] for s in live if named(s)) / max(1, total)


def _libz_stacks(doc: dict) -> list[dict]:
    """Live stacks whose allocation is made in zlib (its first frames)."""
    return [s for s in doc["stacks"] if s["live_bytes"] > 0
            and any("[libz.so" in f for f in s["frames"][:3])]


def _inflater_share(stacks: list[dict]) -> float:
    """The share of these stacks' live bytes that reach the Inflater's JNI
    frames in libzip: zlib itself has no frame pointers, so only a walk by
    its unwind tables gets there."""
    total = sum(s["live_bytes"] for s in stacks)
    reach = sum(s["live_bytes"] for s in stacks
                if any(f.startswith("Java_java_util_zip_Inflater_") for f in s["frames"]))
    return reach / max(1, total)


def _check_gap(doc: dict) -> None:
    gap = doc["gap"]
    parts = gap["heap_live_bytes"] + gap["allocator_retained_bytes"] + gap["other_anon_bytes"]
    assert parts == gap["rss_anon_bytes"], gap
    assert doc["allocator"]["kind"] == "glibc" and doc["allocator"]["arena_count"] >= 2, doc["allocator"]


# Debian's default flags (as in the incident), and the flag users add for
# profilers: both must name who made zlib's memory.
@pytest.mark.parametrize("java_opts", ["", "-XX:+PreserveFramePointer"],
                         ids=["default-flags", "PreserveFramePointer"])
def test_tomcat_traced_from_its_first_instruction(tomcat_base, memtrace_cmd, spawn, java_opts):
    base, port = tomcat_base
    env = _tomcat_env(base)
    env["JAVA_OPTS"] = java_opts
    out = base / "memtrace.json"
    with open(out, "w") as stdout:
        tracer = spawn([*memtrace_cmd, "--json", "--interval", "1", "--",
                        "sh", "-c", f'exec "{HOME}/bin/catalina.sh" run'],
                       env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    _wait_serving(port, [tracer])
    load = Load(port)
    time.sleep(5)
    requests = load.stop()
    assert requests > 20 and load.statuses <= {200, 404}, (requests, load.statuses)
    os.kill(_java_of(base), signal.SIGTERM)  # Tomcat's own shutdown; memtrace ends with it
    try:
        _, stderr = tracer.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        tracer.kill()
        pytest.fail("memtrace did not end when Tomcat did", pytrace=False)
    # memtrace exits as its command did: a JVM ended by SIGTERM exits with 143.
    assert tracer.returncode == 143, stderr
    doc = json.loads(out.read_text())
    assert doc["exit_status"] == 143 and not doc["target_alive"], doc["exit_status"]
    heap = doc["heap"]
    assert doc["comm"] == "java" and heap["dropped_count"] == 0, heap
    assert heap["alloc_count"] > 10_000, heap  # startup alone makes far more
    assert any(n["kind"] == "exec" for n in doc["notes"]), doc["notes"]
    assert _named_live_share(doc) > 0.8, [s["frames"][:3] for s in doc["stacks"][:5]]
    assert doc["truncated"]["live_bytes_share"] < 0.2, doc["truncated"]
    _check_gap(doc)
    # Compiled frames are walked (without -XX:+PreserveFramePointer, by their
    # sizes from the code cache): no hint about the flag either way.
    assert doc["jvm"]["compiled_frames_walked"] is True, doc["jvm"]
    assert not any(h["kind"] == "jvm_no_frame_pointer" for h in doc["hints"]), doc["hints"]
    # The seed incident's question, on a real server: who holds zlib's
    # memory? Startup's JAR scanning leaves Inflaters live (their state and
    # windows), and the Java method that made them is named.
    libz = _libz_stacks(doc)
    assert sum(s["live_bytes"] for s in libz) > 256 * 1024, [s["frames"][:3] for s in libz]
    assert _inflater_share(libz) >= 0.9, [s["frames"][:6] for s in libz[:5]]
    creators = {f for s in libz for f in s["frames"] if f.startswith("java.util.zip.ZipFile.getInputStream(")}
    assert creators, [s["frames"][:12] for s in libz[:3]]
    threads = {t["name"] for t in doc["threads"]}
    assert any(name.startswith("http-nio") for name in threads), sorted(threads)


def test_tomcat_attached_while_it_serves(tomcat_base, memtrace_cmd, spawn, start_memtrace, probes):
    base, port = tomcat_base
    tomcat = spawn([str(HOME / "bin" / "catalina.sh"), "run"], env=_tomcat_env(base),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_serving(port, [tomcat])
    java = _java_of(base)
    load = Load(port)
    try:
        time.sleep(1)
        before = load.count
        tracer = start_memtrace(["--json", "-p", str(java), "--interval", "1", "--duration", "60"])
        tracer.wait_attached(probes)
        time.sleep(4)
        served = load.count - before
        rc, doc, stderr = tracer.stop(signal.SIGINT)
    finally:
        requests = load.stop()
    assert rc == 0, stderr
    assert served > 10, served
    heap = doc["heap"]
    assert heap["alloc_count"] > served and heap["dropped_count"] == 0, heap
    # Requests allocate on Tomcat's worker threads, from the first one after the attach.
    workers = [t for t in doc["threads"] if t["name"].startswith("http-nio") and t["alloc_count"] > 0]
    assert workers, sorted(t["name"] for t in doc["threads"])
    assert heap.get("live_before_trace_bytes", 0) > 0, heap  # the heap it had before the attach
    _check_gap(doc)
    # Not harmed: none of the trace's programs is left, and it serves as before.
    prog_ids = {p["prog_id"] for p in tracer.attached_probes}
    assert prog_ids and not prog_ids & probes.prog_ids(), "BPF programs left after memtrace ended"
    assert _get(port) == 200 and requests > served
    assert tomcat.poll() is None
