"""Frames of real programs are named, never bare addresses: a stripped
Debian binary (the sqlite3 CLI and its libsqlite3), a stripped library whose
debug file only a local debuginfod server has, and a HotSpot JVM's
JIT-compiled code, named from its perf map."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from memtrace.model.frames import split_frame

pytestmark = pytest.mark.bpf

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
SERVER_START_S = 60.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install.sh --test-tools installs it", pytrace=False)
    return path


def _bare(frames) -> list[str]:
    return [f for f in frames if split_frame(f)[0] is None]


@pytest.fixture(scope="module")
def built(names_library):
    return names_library


def test_sqlite3_frames_are_functions(run_memtrace, tmp_path):
    sqlite3 = _tool("sqlite3")
    script = tmp_path / "load.sql"
    script.write_text(
        "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT);\n"
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<50000)"
        " INSERT INTO t SELECT x, hex(randomblob(40)) FROM c;\n"
        "CREATE INDEX ib ON t(b);\n")
    result = run_memtrace(["--json", "--", sqlite3, str(tmp_path / "t.db"), f".read {script}"], timeout=120)
    assert result.rc == 0, result.stderr
    stacks = result.doc["stacks"]
    frames = [f for st in stacks for f in st["frames"]]
    assert any("[libsqlite3" in f for f in frames), frames
    assert _bare(frames) == []
    truncated = result.doc["truncated"]
    assert truncated["stack_count"] == result.doc["truncated_stack_count"]
    assert 0 <= truncated["alloc_bytes_share"] <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def debuginfod_server(built, tmp_path):
    """The URL of a debuginfod server (Debian's) that alone has the test
    library's debug file."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(built.debug_file, served / "libnames.so.debug")
    port = _free_port()
    server = subprocess.Popen([_tool("debuginfod"), "-F", "-p", str(port), "-d", str(tmp_path / "db.sqlite"),
                               "-t", "0", "-g", "0", "-c", "1", str(served)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/buildid/{built.build_id}/debuginfo", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"debuginfod did not serve the debug file within {SERVER_START_S}s: "
                                f"{server.stderr.read().decode(errors='replace') if server.poll() is not None else ''}",
                                pytrace=False)
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def test_debuginfod_names_a_stripped_library(built, debuginfod_server, run_memtrace, tmp_path):
    env = {**os.environ, "DEBUGINFOD_URLS": debuginfod_server,
           "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache")}
    result = run_memtrace(["--json", "--interval", "0.2", "--", str(built.program("buildid")), "50", "3000"],
                          env=env, timeout=120)
    assert result.rc == 0, result.stderr
    ours = [st for st in result.doc["stacks"] if any("[libnames.so]" in f for f in st["frames"])]
    assert ours, result.doc["stacks"]
    heaviest = max(ours, key=lambda st: st["alloc_bytes"])
    assert heaviest["alloc_bytes"] >= 50 * 4000
    names = [split_frame(f)[0] for f in heaviest["frames"] if "[libnames.so]" in f]
    assert names[:3] == ["names_static_grow", "names_static_outer", "names_exported"], heaviest["frames"]
    assert (tmp_path / "cache" / built.build_id / "debuginfo").is_file()


def test_stripped_library_without_debug_file_shows_function_starts(built, run_memtrace):
    result = run_memtrace(["--json", "--", str(built.program("stripped")), "50", "100"], timeout=120)
    assert result.rc == 0, result.stderr
    frames = [f for st in result.doc["stacks"] for f in st["frames"] if "[libnames.so]" in f]
    assert frames and _bare(frames) == []
    assert any(f.startswith("function at 0x") for f in frames), frames
    assert any(f.startswith("names_exported+") for f in frames), frames


def test_jit_frames_are_named_from_the_perf_map(java_tools, start_memtrace, tmp_path):
    java, javac = java_tools
    subprocess.run([javac, "-d", str(tmp_path), str(PROGRAMS / "InflaterLoop.java")], check=True)
    jvm = subprocess.Popen([java, "-XX:+PreserveFramePointer", "-cp", str(tmp_path), "InflaterLoop"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert jvm.stdout.readline().strip() == "ready"
        tracer = start_memtrace(["--json", "--interval", "0.5", "--duration", "20", "-p", str(jvm.pid)])
        result = tracer.wait(120)
    finally:
        jvm.kill()
        jvm.wait(10)
        Path(f"/tmp/perf-{jvm.pid}.map").unlink(missing_ok=True)
    assert result.rc == 0, result.stderr
    libz = [st for st in result.doc["stacks"] if st["frames"] and "inflateInit2_" in st["frames"][0]]
    assert libz, [st["frames"][:3] for st in result.doc["stacks"]]
    frames = [f for st in libz for f in st["frames"]]
    assert _bare(frames) == [], frames
    assert any(f.startswith("InflaterLoop.") and f.endswith(" [JIT]") for f in frames), frames


@pytest.fixture(scope="module")
def go_program(tmp_path_factory):
    """tests/programs/golang/cgoleak.go built with Debian's Go, and a copy
    stripped as Go programs ship (Debian's prometheus has no .symtab)."""
    go = _tool("go")
    work = tmp_path_factory.mktemp("golang")
    shutil.copy(PROGRAMS / "golang" / "cgoleak.go", work / "main.go")
    (work / "go.mod").write_text("module cgoleak\n\ngo 1.18\n")
    env = {**os.environ, "HOME": str(work), "GOCACHE": str(work / "cache"), "GOFLAGS": "-mod=mod",
           "GOPATH": str(work / "gopath"), "CGO_ENABLED": "1"}
    built = subprocess.run([go, "build", "-o", "cgoleak", "."], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.fail(f"go build failed:\n{built.stderr}", pytrace=False)
    stripped = work / "cgoleak.stripped"
    shutil.copy(work / "cgoleak", stripped)
    subprocess.run([_tool("strip"), str(stripped)], check=True)
    return work / "cgoleak", stripped


def test_a_stripped_go_program_is_named_and_walked_into_go(go_program, run_memtrace):
    from memtrace.symbols.elf import ElfSymbols

    with_symbols, stripped = go_program
    # The symbol table's names, as Go's table spells them (the assembly
    # functions' ABI suffix left out); linker markers such as runtime.text
    # share an address with a function and are not functions.
    want = {f.address: f.name.removesuffix(".abi0") for f in ElfSymbols(str(with_symbols)).functions
            if f.name.startswith(("main.", "runtime.")) and f.name not in ("runtime.text", "runtime.etext")}
    named = ElfSymbols(str(stripped))
    assert not named.has_symtab and ".gopclntab" in named.names_from
    got = {addr: getattr(named.lookup(addr), "name", None) for addr in want}
    assert len(want) > 500 and got == want, [(hex(a), want[a], got[a]) for a in want if got[a] != want[a]][:5]

    for program in (stripped, with_symbols):
        rc, doc, stderr = run_memtrace(["--json", "--", program])
        assert rc == 0, stderr
        kept = [s for s in doc["stacks"] if s["live_bytes"] == 500 * 4096]
        assert len(kept) == 1, [(s["live_bytes"], s["frames"][:4]) for s in doc["stacks"][:5]]
        # From the C code on the system stack through the cgo call to the Go
        # callers on the goroutine's stack (bpf/go.bpf.c), down to its bottom.
        # (The symbol table spells assembly functions with their ABI.)
        functions = [split_frame(f)[0].removesuffix(".abi0") for f in kept[0]["frames"]]
        assert functions[1:] == ["runtime.asmcgocall", "runtime.cgocall", "main._Cfunc_keep",
                                 "main.leakInGo", "main.main", "runtime.main", "runtime.goexit"], functions
        assert not kept[0]["truncated"], program
    # The Go runtime's own mappings, named back into its heap.
    origins = [f for r in doc["regions"] for f in r["origin_frames"]]
    assert any(f.startswith("runtime.mmap") for f in origins), doc["regions"]
