"""Python frames in the stacks of a CPython 3.11 process (bpf/python.bpf.c,
memtrace.cpython): a script with known functions keeps its blocks, and the
stacks holding them name those functions, innermost first, with their
lines, in place of the interpreter loop's native frames; a thread's
allocations name its own functions, not those of the thread holding the
GIL. Debian's /usr/bin/python3 (3.11, the interpreter linked in) and a
program that runs Python from Debian's libpython3.11.so (as pyenv's
builds and programs that embed Python do) both."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

PROGRAMS_DIR = Path(__file__).resolve().parent.parent / "programs"
BLOCK_OVERHEAD = sys.getsizeof(b"")  # a bytes object's header, allocated with its data

# Each entry: the block size, how many, and the Python frames (function
# part, innermost first) that must lead the Python part of their stacks.
KEPT = {
    4096: (3000, ["inner_alloc", "leak_in_outer", "main", "<module>"]),
    8192: (2000, ["Holder.leak_in_method", "main", "<module>"]),
    12288: (1000, ["thread_alloc", "Thread.run", "Thread._bootstrap_inner", "Thread._bootstrap"]),
}

SCRIPT = '''\
import os
import sys
import threading
import time

kept = []


def inner_alloc():
    return bytes(4096)  # line 10


def leak_in_outer():
    return inner_alloc()  # line 14


class Holder:
    def leak_in_method(self):
        for _ in range(2000):
            kept.append(bytes(8192))


def thread_alloc():
    for _ in range(1000):
        kept.append(bytes(12288))
        time.sleep(0)  # let the main thread take the GIL between blocks


def main():
    worker = threading.Thread(target=thread_alloc)
    worker.start()
    for _ in range(3000):
        kept.append(leak_in_outer())
    Holder().leak_in_method()
    worker.join()
    time.sleep(1.5)  # names are read from its memory while it lives
    sys.stdout.flush()
    os._exit(0)  # the blocks stay live to the end


main()
'''

PY_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\) \[py\]$")


def python_frames(frames: list[str]) -> list[tuple[str, str, int]]:
    out = []
    for frame in frames:
        m = PY_FRAME.match(frame)
        if m:
            out.append((m["func"], m["file"], int(m["line"])))
    return out


def block_size(stack: dict) -> int:
    """The size of the blocks a stack holds (0: not one size)."""
    count = stack["alloc_count"]
    return stack["alloc_bytes"] // count - BLOCK_OVERHEAD if count else 0


@pytest.fixture(scope="session")
def libpython_program(tmp_path_factory) -> Path:
    """tests/programs/pyembed.c: Python run from Debian's libpython3.11.so."""
    config = shutil.which("python3-config", path="/usr/bin")
    if config is None:
        pytest.fail("/usr/bin/python3-config not found: apt-get install python3-dev", pytrace=False)
    flags = subprocess.run([config, "--includes", "--ldflags", "--embed"], capture_output=True,
                           text=True, check=True).stdout.split()
    binary = tmp_path_factory.mktemp("pyembed") / "pyembed"
    cmd = ["gcc", "-O2", "-o", str(binary), str(PROGRAMS_DIR / "pyembed.c"), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr}", pytrace=False)
    return binary


@pytest.mark.parametrize("python", ["/usr/bin/python3", "libpython"],
                         ids=["debian-static", "libpython"])
def test_stacks_name_the_python_functions_that_allocated(python, run_memtrace, tmp_path, request):
    if python == "libpython":
        python = str(request.getfixturevalue("libpython_program"))
    assert Path(python).exists(), f"{python} is missing"
    script = tmp_path / "keeper.py"
    script.write_text(SCRIPT)
    rc, doc, stderr = run_memtrace(["--json", "--", python, script])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    stacks = doc["stacks"]
    for size, (count, want) in KEPT.items():
        expected = count * (size + BLOCK_OVERHEAD)
        named = 0
        for s in stacks:
            py = python_frames(s["frames"])
            if block_size(s) == size and [f for f, _, _ in py[: len(want)]] == want:
                named += s["live_bytes"]
        top = sorted((s for s in stacks if block_size(s) == size), key=lambda s: -s["live_bytes"])
        assert named >= 0.9 * expected, (size, named, expected, [t["frames"] for t in top[:3]])
        assert named <= expected * 1.01, (size, named, expected)
    # The lines of the chain through leak_in_outer.
    chain = next(python_frames(s["frames"]) for s in stacks
                 if block_size(s) == 4096 and python_frames(s["frames"])[:1]
                 and python_frames(s["frames"])[0][0] == "inner_alloc")
    want = [("inner_alloc", str(script), 10), ("leak_in_outer", str(script), 14)]
    assert chain[:2] == want, chain


def test_python_frames_replace_the_interpreter_loop_only(run_memtrace, tmp_path):
    """The native frames around the Python ones stay: the allocator's below,
    the interpreter's startup above (down to _start)."""
    script = tmp_path / "keeper.py"
    script.write_text(SCRIPT)
    rc, doc, stderr = run_memtrace(["--json", "--", "/usr/bin/python3",
                                    script])
    assert rc == 0, stderr
    stack = max((s for s in doc["stacks"] if block_size(s) == 4096), key=lambda s: s["live_bytes"])
    frames = stack["frames"]
    first_py = next(i for i, f in enumerate(frames) if f.endswith("[py]"))
    last_py = max(i for i, f in enumerate(frames) if f.endswith("[py]"))
    assert first_py > 0 and not any(f.startswith("_PyEval_EvalFrameDefault")
                                    for f in frames[first_py:last_py]), frames
    assert all(f.endswith("[py]") for f in frames[first_py:last_py + 1]), frames
    assert frames[-1].startswith("_start"), frames


BUSY = '''\
def churn():
    kept = []
    while True:
        kept.append(bytes(2000))  # line 4
        if len(kept) > 5000:
            kept.clear()


print("ready", flush=True)
churn()
'''


def test_attached_to_a_busy_interpreter(run_memtrace, spawn, tmp_path):
    """-p on a Python process already allocating: the walk is told where its
    Python is at the attach, and the blocks its loop allocates from then on
    name that loop's function and line."""
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    target = spawn(["/usr/bin/python3", script], stdout=subprocess.PIPE, text=True)
    assert target.stdout.readline().strip() == "ready"
    rc, doc, stderr = run_memtrace(["--json", "--duration", "2", "-p", str(target.pid)])
    assert rc == 0, stderr
    sized = [s for s in doc["stacks"] if block_size(s) == 2000]
    total = sum(s["alloc_bytes"] for s in sized)
    named = sum(s["alloc_bytes"] for s in sized
                if python_frames(s["frames"])[:1] == [("churn", str(script), 4)])
    assert total > 1 << 20, doc["heap"]
    assert named >= 0.9 * total, [s["frames"][:6] for s in sized[:3]]
    assert target.poll() is None, "the target was harmed"


GIL_RELEASED = '''\
import os
import sqlite3
import sys
import time


def build_index(db):
    db.execute("create index by_text on t(b)")  # line 8


def fill(db):
    db.executemany("insert into t values (?, ?)", ((i, "x" * 200) for i in range(20000)))  # line 12


def main():
    db = sqlite3.connect(":memory:")
    db.execute("create table t(a, b)")
    fill(db)
    build_index(db)
    time.sleep(1.5)  # names are read from its memory while it lives
    sys.stdout.flush()
    os._exit(0)


main()
'''


def test_frames_of_a_thread_that_released_the_gil(run_memtrace, tmp_path):
    """sqlite3_step runs with the GIL released, and SQLite allocates there:
    those blocks still name the Python function that called execute, read
    from the thread's own state (not the GIL holder's, which is none or
    another thread)."""
    script = tmp_path / "index.py"
    script.write_text(GIL_RELEASED)
    rc, doc, stderr = run_memtrace(["--json", "--", "/usr/bin/python3", script])
    assert rc == 0, stderr
    in_sqlite = [s for s in doc["stacks"] if any(f.startswith("sqlite3_step+") for f in s["frames"])]
    total = sum(s["alloc_bytes"] for s in in_sqlite)
    by_caller: dict = {}
    for s in in_sqlite:
        py = python_frames(s["frames"])
        caller = py[0] if py else None
        by_caller[caller] = by_caller.get(caller, 0) + s["alloc_bytes"]
    assert total > 1 << 20, [s["frames"][:8] for s in doc["stacks"][:3]]
    assert by_caller.get(None, 0) <= 0.1 * total, by_caller
    assert by_caller.get(("build_index", str(script), 8), 0) > 0, by_caller
    assert by_caller.get(("fill", str(script), 12), 0) > 0, by_caller
