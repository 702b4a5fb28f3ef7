"""Naming frames of stripped code: function starts from .eh_frame, names
from MiniDebugInfo, separate debug files (build id, .gnu_debuglink) and
debuginfod, and the JVM's perf map. The test library (tests/programs/
names_build.py) is built for real, in every way a library loses its names,
and a real process maps it: the Symbolizer reads that process's maps."""

from __future__ import annotations

import glob
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from memtrace.symbols import debuginfo

from memtrace.jvm import perfmap as jvm
from memtrace.symbols.ehframe import function_ranges
from memtrace.symbols.elf import ElfSymbols, symbols_of
from memtrace.model import notes
from memtrace.model.snapshot import Counters, Snapshot, StackStats
from memtrace.output.reports.common import frame_label
from memtrace.symbols.symbolizer import Symbolizer
from memtrace.model.frames import split_frame
from memtrace.output.view.fmt import short_frame

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


# The library's static functions (tests/programs/names_lib.c).
STATIC_FUNCTIONS = ("names_static_grow", "names_static_outer")


@pytest.fixture(scope="module")
def built(names_library):
    return names_library


@pytest.fixture(scope="module")
def truth(built):
    """Name -> (start, size) of the library's functions, from the copy that
    was not stripped."""
    full = ElfSymbols(str(built.library("full")))
    return {name: (start, end - start) for (start, name), end in full._named.items()}


def _readelf_ranges(path: str) -> list[tuple[int, int]]:
    out = subprocess.run(["readelf", "--debug-dump=frames", path], capture_output=True, text=True).stdout
    return sorted((int(a, 16), int(b, 16)) for a, b in re.findall(r"FDE cie=\w+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", out))


# ---------------------------------------------------------------- .eh_frame

@pytest.mark.parametrize("pattern", ["/usr/lib/x86_64-linux-gnu/libz.so.1.*", "/usr/bin/python3.*[0-9]"])
def test_eh_frame_gives_every_function_readelf_sees(pattern):
    path = sorted(glob.glob(pattern))[0]
    elf = ElfSymbols(path)
    assert sorted(elf._unnamed) == _readelf_ranges(path)
    assert len(elf._unnamed) > 50


def test_eh_frame_survives_garbage():
    assert function_ranges(b"", 0) == []
    assert function_ranges(b"\xff" * 64, 0x1000) == []
    # A record whose CIE pointer leads nowhere is skipped; the next is read.
    assert function_ranges(b"\x08\x00\x00\x00" + b"\x40\x00\x00\x00" + b"\0" * 4, 0) == []


def test_stripped_library_names_static_functions_by_their_start(built, truth):
    elf = symbols_of(str(built.library("stripped")))
    assert not elf.has_symtab
    start, size = truth["names_static_grow"]
    found = elf.lookup(start + 3)
    assert (found.name, found.start, found.offset) == (None, start, 3)
    exported, _ = truth["names_exported"]
    assert elf.lookup(exported).name == "names_exported"  # .dynsym still names it


def test_mini_debuginfo_names_static_functions(built, truth):
    elf = symbols_of(str(built.library("mini")))
    assert ".gnu_debugdata" in elf.names_from
    for name in STATIC_FUNCTIONS:
        start, _ = truth[name]
        assert elf.lookup(start + 1).name == name


# ---------------------------------------------------------------- debug files

def test_debuglink_beside_the_file_is_used_when_its_crc_matches(built, truth):
    elf = ElfSymbols(str(built.library("debuglink")))
    assert elf.debuglink[0] == "libnames.so.debug"
    assert debuginfo.attach_debug_names(elf, str(built.library("debuglink")), "/")
    start, _ = truth["names_static_outer"]
    assert elf.lookup(start).name == "names_static_outer"


def test_debuglink_with_another_crc_is_refused(built, tmp_path):
    directory = tmp_path / "lib"
    directory.mkdir()
    shutil.copy(built.library("debuglink"), directory / "libnames.so")
    (directory / "libnames.so.debug").write_bytes(built.debug_file.read_bytes() + b"\0")
    elf = ElfSymbols(str(directory / "libnames.so"))
    assert not debuginfo.attach_debug_names(elf, str(directory / "libnames.so"), "/")


def test_build_id_debug_file_is_found_inside_the_process_root(built, truth, tmp_path):
    root = tmp_path / "root"
    where = root / "usr/lib/debug/.build-id" / built.build_id[:2]
    where.mkdir(parents=True)
    shutil.copy(built.debug_file, where / f"{built.build_id[2:]}.debug")
    elf = ElfSymbols(str(built.library("buildid")))
    assert debuginfo.attach_debug_names(elf, "/usr/lib/libnames.so", str(root))
    start, _ = truth["names_static_grow"]
    assert elf.lookup(start).name == "names_static_grow"


def test_a_symlink_never_leads_out_of_the_process_root(built, tmp_path):
    root = tmp_path / "root"
    where = root / "usr/lib/debug/.build-id" / built.build_id[:2]
    where.mkdir(parents=True)
    # Absolute: resolved inside the root, where nothing is.
    os.symlink(str(built.debug_file), where / f"{built.build_id[2:]}.debug")
    elf = ElfSymbols(str(built.library("buildid")))
    assert debuginfo.find_debug_file(elf, "/usr/lib/libnames.so", str(root)) is None
    # Relative, climbing out: stopped at the root as well.
    os.unlink(where / f"{built.build_id[2:]}.debug")
    os.symlink("../" * 12 + str(built.debug_file).lstrip("/"), where / f"{built.build_id[2:]}.debug")
    assert debuginfo.find_debug_file(elf, "/usr/lib/libnames.so", str(root)) is None


def test_a_fifo_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "x.debug")
    assert debuginfo._read_debug_file(str(tmp_path), "/x.debug") == []


# ---------------------------------------------------------------- a live process

@pytest.fixture
def run(built):
    """run(variant, env=None) -> the running names_main's pid; it holds
    its blocks until the test ends."""
    started = []

    def start(variant: str) -> int:
        proc = subprocess.Popen([str(built.program(variant)), "10", "wait"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc.pid

    yield start
    for proc in started:
        proc.stdin.close()
        proc.wait(10)


def _address(pid: int, library: Path, vaddr: int) -> int:
    """Where the process maps the library's virtual address `vaddr`."""
    elf = ElfSymbols(str(library))
    segment = next(s for s in elf.segments if s.vaddr <= vaddr < s.vaddr + s.filesz)
    offset = vaddr - segment.vaddr + segment.offset
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith("/libnames.so"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                file_offset = int(fields[2], 16)
                if file_offset <= offset < file_offset + end - start:
                    return start + offset - file_offset
    raise AssertionError(f"{library} does not map 0x{vaddr:x}")


@pytest.mark.parametrize("variant,named", [("full", True), ("mini", True), ("debuglink", True),
                                           ("stripped", False)])
def test_frames_of_a_running_process(built, truth, run, variant, named):
    pid = run(variant)
    symbols = Symbolizer(pid)
    start, _ = truth["names_static_grow"]
    frame = symbols.frame(_address(pid, built.library(variant), start + 4))
    if named:
        assert frame == "names_static_grow+0x4 [libnames.so]"
    else:
        assert frame == f"function at 0x{start:x}+0x4 [libnames.so]"
        assert split_frame(frame) == (f"function at 0x{start:x}", "libnames.so")


class _DebuginfodHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.release.wait(10)  # held until the test has seen the frame unnamed
        m = re.fullmatch(r"/buildid/([0-9a-f]+)/debuginfo", self.path)
        body = self.files.get(m.group(1)) if m else None
        self.send_response(200 if body else 404)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_debuginfod_names_come_later_without_blocking(built, truth, run, tmp_path, monkeypatch):
    _DebuginfodHandler.files = {built.build_id: built.debug_file.read_bytes()}
    _DebuginfodHandler.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DebuginfodHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DEBUGINFOD_URLS", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("DEBUGINFOD_CACHE_PATH", str(tmp_path / "cache"))
        monkeypatch.setattr(debuginfo, "_client_made", False)
        symbols_of.__globals__["_symbols_cache"].clear()  # a fresh image: no names yet
        pid = run("buildid")
        symbols = Symbolizer(pid)
        start, _ = truth["names_static_grow"]
        addr = _address(pid, built.library("buildid"), start)
        assert symbols.frame(addr).startswith("function at ")  # the server holds the file
        generation = symbols.generation
        _DebuginfodHandler.release.set()
        assert debuginfo.client().wait(built.build_id, 20)
        symbols.new_round()
        assert symbols.generation == generation + 1
        assert symbols.frame(addr) == "names_static_grow+0x0 [libnames.so]"
        assert (tmp_path / "cache" / built.build_id / "debuginfo").is_file()  # elfutils' layout
    finally:
        _DebuginfodHandler.release.set()
        server.shutdown()


# ---------------------------------------------------------------- the JVM

def test_perf_map_lines_are_parsed_defensively():
    data = (b"0x00007f0000001000 0x0000000000000100 Interpreter\n"
            b"0x00007f0000002000 0x40 void java.util.zip.Inflater.<init>(boolean)\n"
            b"garbage line\n0xzz 0x10 x\n0x10\n"
            b"0x00007f0000003000 0x20 StubRoutines (1)\n"
            b"0x00007f0000002000 0x40 long java.util.zip.Inflater.init(boolean)\n")  # recompiled
    entries = jvm.parse_perf_map(data)
    assert entries == [(0x7F0000001000, 0x7F0000001100, "Interpreter"),
                       (0x7F0000002000, 0x7F0000002040, "java.util.zip.Inflater.init(boolean)"),
                       (0x7F0000003000, 0x7F0000003020, "StubRoutines (1)")]


def _own_perf_map(monkeypatch) -> tuple[jvm.PerfMap, Path]:
    monkeypatch.setattr(jvm.shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    perf = jvm.PerfMap(os.getpid())
    return perf, Path(f"/tmp/perf-{perf.nspid}.map")


def test_perf_map_of_the_process_names_its_code(monkeypatch):
    perf, path = _own_perf_map(monkeypatch)
    try:
        path.write_bytes(b"7f0000001000 100 Interpreter\n")
        assert perf.load() and perf.take_update()
        assert perf.lookup(0x7F0000001010) == ("Interpreter", 0x10)
        path.unlink()
        assert not perf.load()  # the JVM is gone: the last map stays
        assert perf.lookup(0x7F0000001010) == ("Interpreter", 0x10)
    finally:
        path.unlink(missing_ok=True)


def test_perf_map_through_a_symlink_or_of_another_user_is_refused(monkeypatch, tmp_path):
    perf, path = _own_perf_map(monkeypatch)
    target = tmp_path / "elsewhere.map"
    target.write_bytes(b"7f0000001000 100 Interpreter\n")
    try:
        os.symlink(target, path)
        assert not perf.load()
        path.unlink()
        path.write_bytes(b"7f0000001000 100 Interpreter\n")
        os.chown(path, 12345, -1)
        assert not perf.load()
        assert perf.lookup(0x7F0000001010) is None
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- reports

def test_unnamed_functions_group_by_their_start_and_module():
    a = "function at 0x3a40+0x1a [libz.so.1.2.13]"
    b = "function at 0x3a40+0x60 [libz.so.1.2.13]"
    assert split_frame(a)[0] == split_frame(b)[0] == "function at 0x3a40"
    assert frame_label(a) == frame_label(b) == "function at 0x3a40 [libz.so.1.2.13]"
    assert short_frame(a) == "function at 0x3a40 [libz]"
    assert short_frame("java.util.zip.Inflater.<init>(boolean)+0x40 [JIT]") == "java.util.zip.Inflater.<init>"


def test_truncated_shares_in_count_and_bytes():
    stacks = (StackStats(("f [a]",), (), Counters(alloc_bytes=300, free_bytes=100), truncated=True),
              StackStats(("g [a]", "start_thread [libc.so.6]"), (), Counters(alloc_bytes=100), truncated=False),
              StackStats(("h [a]",), (), Counters(alloc_bytes=600, free_bytes=600), truncated=False))
    snapshot = Snapshot(pid=1, comm="x", elapsed_s=1.0, stacks=stacks)
    assert snapshot.to_json()["truncated"] == {"stack_count": 1, "stack_share": 0.3333,
                                               "live_bytes_share": 0.6667, "alloc_bytes_share": 0.3}


def test_summary_tells_the_truncated_shares():
    from memtrace.output.reports.text import render_summary

    stacks = (StackStats(("f [a]",), (), Counters(alloc_bytes=300), truncated=True),
              StackStats(("g [a]", "start_thread [libc.so.6]"), (), Counters(alloc_bytes=100)))
    text = render_summary(Snapshot(pid=1, comm="x", elapsed_s=1.0, stacks=stacks))
    assert "in truncated stacks: 50% of stacks, 75% of live bytes, 75% of allocated bytes" in text


def test_a_symbol_without_size_spans_its_fde(built, truth):
    start, size = truth["names_asm_sizeless"]
    assert size == 1  # st_size 0
    assert symbols_of(str(built.library("full"))).lookup(start + 6).name == "names_asm_sizeless"


def test_jcmd_never_sends_sigquit_to_a_process_that_would_die_of_it(monkeypatch):
    perf, _ = _own_perf_map(monkeypatch)
    assert not perf.attach_is_safe()  # Python does not catch SIGQUIT
    assert perf.problem.kind == notes.JVM_NO_SIGQUIT


def test_jcmd_never_attaches_to_a_jvm_without_the_attach_mechanism():
    # A shell that catches SIGQUIT, with the JVM's option on its command line.
    child = subprocess.Popen(["sh", "-c", 'trap "echo" QUIT; echo ready; read x', "sh",
                              "-XX:+DisableAttachMechanism"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        perf = jvm.PerfMap(child.pid)
        assert not perf.attach_is_safe()
        assert perf.problem.kind == notes.JVM_ATTACH_DISABLED
    finally:
        child.stdin.close()
        child.wait(10)


def test_a_socket_left_by_a_dead_jvm_does_not_make_its_pid_safe():
    # The CI found it: a JVM killed earlier left /tmp/.java_pid<N>, and the
    # kernel gave N to a process that must never get SIGQUIT.
    child = subprocess.Popen(["sleep", "30"])
    stale = f"/tmp/.java_pid{child.pid}"
    server = socket.socket(socket.AF_UNIX)
    try:
        if os.path.exists(stale):
            os.unlink(stale)
        server.bind(stale)  # bound by us, not by the child
        perf = jvm.PerfMap(child.pid)
        assert not perf.attach_is_safe()
        assert perf.problem.kind == notes.JVM_NO_SIGQUIT
    finally:
        server.close()
        os.unlink(stale)
        child.kill()
        child.wait(10)


def test_code_mapped_from_no_file_is_said_to_be_generated():
    """Outside a JVM, an address in an executable mapping of no file is
    generated code (qemu's translated code, another JIT); an address in
    no executable mapping stays a bare address."""
    import ctypes
    import mmap

    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # a shared one shows as /dev/zero
    code = mmap.mmap(-1, mmap.PAGESIZE, flags=private,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    data = mmap.mmap(-1, mmap.PAGESIZE, flags=private)
    try:
        code_at = ctypes.addressof(ctypes.c_char.from_buffer(code))
        data_at = ctypes.addressof(ctypes.c_char.from_buffer(data))
        symbols = Symbolizer(os.getpid())
        assert symbols.frame(code_at + 0x10) == f"0x{code_at + 0x10:x} [generated code]"
        assert symbols.frame(data_at + 0x10) == f"0x{data_at + 0x10:x}"
    finally:
        code.close()
        data.close()
