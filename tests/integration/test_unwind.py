"""Whole stacks through code built without frame pointers, unwound from
.eh_frame in the kernel (bpf/common.bpf.c, collect/unwind.py).

- tests/programs/unwind_chains.c (-O2 -fomit-frame-pointer) knows its call
  chains: each is one stack, with its exact bytes, every frame named, down
  to _start or clone3.
- Debian's sqlite3 CLI and /usr/bin/python3 (no frame pointers in them,
  their libraries or glibc): most allocated bytes are in stacks that reach
  the SQLite API or the interpreter loop, and few are in stacks cut short.
- The inflater JVM (tests/programs/Inflate.java) with default flags: libz's
  blocks are charged to stacks that reach the JNI frame in libzip that
  names the Inflater, through libz (no frame pointers).
- Debian's qemu-system-x86_64, launched: its 52 files need more rows than
  the tables once held; the stacks through the accelerator it dlopens go
  down to clone3, and those cut at the guest code it translated say it is
  generated code. With too few rows, the note names --unwind-rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

SQLITE_API = re.compile(r"^sqlite3_(step|exec|prepare\w*)\+")
# The interpreter loop, or the Python frames shown in its place (CPython 3.11).
EVAL_LOOP = re.compile(r"^_PyEval_EvalFrameDefault\+|\[py\]$")
UNNAMED = re.compile(r"^(0x|function at )")
LIBZ_FRAME = re.compile(r"\[libz\.so[\d.]*\]$")
INFLATER_JNI = re.compile(r"^Java_java_util_zip_Inflater_\w+\+")


def function_of(frame: str) -> str:
    """'recurse+0x1f [unwind_chains]' -> 'recurse'."""
    return frame.split(" ", 1)[0].split("+", 1)[0]


def share_reaching(doc: dict, pattern: re.Pattern) -> float:
    total = sum(s["alloc_bytes"] for s in doc["stacks"])
    reaching = sum(s["alloc_bytes"] for s in doc["stacks"]
                   if any(pattern.search(f) for f in s["frames"]))
    return reaching / total if total else 0.0


def top_stacks(doc: dict, n: int = 5) -> str:
    top = sorted(doc["stacks"], key=lambda s: -s["alloc_bytes"])[:n]
    return json.dumps([{"alloc_bytes": s["alloc_bytes"], "frames": s["frames"]} for s in top],
                      indent=1)


def test_known_chains_without_frame_pointers_are_exact(programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(["--json", "--", programs["unwind_chains"], truth_path])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    truth = json.loads(truth_path.read_text())
    for chain in truth["chains"]:
        want = chain["frames"]
        found = [s for s in doc["stacks"]
                 if [function_of(f) for f in s["frames"][: len(want)]] == want]
        assert len(found) == 1, f"chain {want}: {len(found)} stacks; {top_stacks(doc, 8)}"
        stack = found[0]
        assert (stack["alloc_bytes"], stack["alloc_count"]) == (
            chain["alloc_bytes"], chain["alloc_count"]), stack
        assert not stack["truncated"], stack["frames"]
        unnamed = [f for f in stack["frames"] if UNNAMED.search(f)]
        assert not unnamed, stack["frames"]
        assert function_of(stack["frames"][-1]) in ("_start", "clone3", "clone"), stack["frames"]


def test_sqlite3_stacks_reach_the_sqlite_api(run_memtrace, tmp_path):
    sqlite3 = shutil.which("sqlite3")
    assert sqlite3, "sqlite3 is not installed: run install.sh --test-tools"
    script = tmp_path / "inserts.sql"
    lines = ["create table t(a integer primary key, b text, c blob);", "begin;"]
    lines += [f"insert into t(b, c) values('row {i}', randomblob({50 + i % 200}));"
              for i in range(20000)]
    lines += ["commit;"]  # nothing printed: memtrace's JSON is all of stdout
    script.write_text("\n".join(lines) + "\n")
    rc, doc, stderr = run_memtrace(
        ["--json", "--", sqlite3, tmp_path / "t.db", f".read {script}"])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert share_reaching(doc, SQLITE_API) >= 0.8, top_stacks(doc)
    assert doc["truncated"]["alloc_bytes_share"] <= 0.2, top_stacks(doc)


def test_python3_stacks_reach_the_interpreter_loop(run_memtrace, tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text(
        "import json\n"
        "rows = [{'id': i, 'name': 'row %d' % i, 'tags': [str(i), 'x' * (i % 50)]}\n"
        "        for i in range(30000)]\n"
        "back = json.loads(json.dumps(rows))\n"
        "blocks = [bytearray(2000 + i % 3000) for i in range(3000)]\n"
        "assert len(back) == 30000 and len(blocks) == 3000\n"
    )
    python3 = Path("/usr/bin/python3")
    assert python3.exists(), "/usr/bin/python3 is missing"
    rc, doc, stderr = run_memtrace(["--json", "--", python3, script])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert share_reaching(doc, EVAL_LOOP) >= 0.8, top_stacks(doc)
    assert doc["truncated"]["alloc_bytes_share"] <= 0.2, top_stacks(doc)


def test_jvm_libz_stacks_reach_the_inflater_without_preserve_frame_pointer(
        java_tools, inflate_classpath, tracers, wait_attached, wait_file, _prerequisites, tmp_path):
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    java = subprocess.Popen(
        [java_tools[0], "-XX:+UseSerialGC", "-Xmx256m", "-cp", str(inflate_classpath), "Inflate",
         str(tmp_path), "--threads", "2", "--per-thread", "50"],
        stdin=subprocess.DEVNULL)
    tracer = None
    try:
        ready = json.loads(wait_file(tmp_path / "ready.json", java))
        tracer = tracers.start(["--json", "--interval", "0.5", "-p", str(ready["pid"]),
                                "--duration", "300"])
        wait_attached([tracer])
        (tmp_path / "ready.go").touch()
        wait_file(tmp_path / "phase1.json", java)
        time.sleep(0.5)
        doc = tracers.finish(tracer, "memtrace -p (a JVM with default flags)")
        (tmp_path / "phase1.go").touch()
        wait_file(tmp_path / "gc.json", java, timeout=90)
        (tmp_path / "gc.go").touch()
        assert java.wait(30) == 0
    finally:
        tracers.kill_all([tracer, java])
    libz = [s for s in doc["stacks"] if s["frames"] and LIBZ_FRAME.search(s["frames"][0])]
    live = sum(s["live_bytes"] for s in libz)
    assert live > 0, top_stacks(doc)
    reaching = sum(s["live_bytes"] for s in libz
                   if any(INFLATER_JNI.search(f) for f in s["frames"]))
    assert reaching >= 0.9 * live, json.dumps([s["frames"] for s in libz], indent=1)[:4000]


QEMU_ACCEL = re.compile(r"^tcg_cpus_exec\+.*\[accel-tcg-x86_64\.so\]$")


def _qemu_child(tracer_pid: int, timeout: float = 30.0) -> int:
    """The pid of the qemu that memtrace launched, once it has exec'd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{tracer_pid}/task").glob("*"):
            for child in (task / "children").read_text().split():
                try:
                    if Path(f"/proc/{child}/exe").resolve().name.startswith("qemu-system"):
                        return int(child)
                except OSError:
                    pass
        time.sleep(0.1)
    pytest.fail("memtrace did not launch qemu within 30 s", pytrace=False)


def test_qemu_stacks_through_the_accelerator_it_dlopens_are_whole(start_memtrace):
    """Debian's qemu-system-x86_64 and its libraries map 52 files without
    frame pointers, 646,000 unwind rows; at start it dlopens its TCG
    accelerator, through which every allocation of a vCPU thread goes. The
    tables held 524,288 rows: the accelerator found them full, and each of
    those stacks stopped at tcg_cpus_exec, from the trace's start to its end."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is not installed: run install.sh --test-tools"
    tracer = start_memtrace(["--json", "--", qemu, "-display", "none", "-m", "64", "-no-reboot",
                             "-serial", "null", "-monitor", "none", "-nodefaults"])
    pid = _qemu_child(tracer.pid)
    time.sleep(5)  # SeaBIOS looks for something to boot: the vCPU thread translates code
    os.kill(pid, signal.SIGTERM)
    rc, doc, stderr = tracer.wait(60)
    assert doc is not None, f"no JSON on stdout (rc {rc}); stderr: {stderr}"
    notes = [n["kind"] for n in doc.get("notes", [])]
    assert "unwind_tables_full" not in notes, doc["notes"]
    through = [s for s in doc["stacks"] if any(QEMU_ACCEL.search(f) for f in s["frames"])]
    assert through, top_stacks(doc)
    cut = [s["frames"] for s in through if QEMU_ACCEL.search(s["frames"][-1])]
    assert not cut, json.dumps(cut[:5], indent=1)
    whole = [s for s in through if function_of(s["frames"][-1]) in ("clone3", "clone")]
    assert len(whole) == len(through), json.dumps([s["frames"] for s in through[:5]], indent=1)
    # The guest code TCG translated calls helpers that allocate; no table
    # unwinds it, and its frames say what it is, not a bare address.
    generated = [s for s in doc["stacks"] if s["frames"][-1].endswith(" [generated code]")]
    assert generated, top_stacks(doc)


def test_full_unwind_tables_say_how_to_make_room(programs, run_memtrace, tmp_path):
    """With too few rows for the program and its libraries, the note says so
    and names the option that gives more."""
    rc, doc, stderr = run_memtrace(["--json", "--unwind-rows", "1024", "--",
                                    programs["unwind_chains"], tmp_path / "truth.json"])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    full = [n for n in doc.get("notes", []) if n["kind"] == "unwind_tables_full"]
    assert full, doc.get("notes")
    assert "--unwind-rows 2048 (now 1024)" in full[0]["text"], full[0]
