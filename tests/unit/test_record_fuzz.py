"""Damaged recordings, made by hypothesis: bytes changed anywhere, in the
schema page or the header, pages replaced or swapped, the file cut short,
the -wal of a killed recorder damaged. Whatever the damage, `memtrace report`
and `replay` (run in-process) end with the readable part (exit 0) or an
error line (exit 2): never an internal error, a traceback or a hang."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from memtrace.cli import main
from memtrace.record.recorder import Recorder
from memtrace.record.synthetic import session

PAGE = 4096
HANG_S = 20  # one example takes some 20 ms


def small_session():
    return session(14, stacks=10, threads=3, regions=5)


@functools.lru_cache(maxsize=None)
def originals() -> dict[str, bytes]:
    """A closed recording, and a killed recorder's file and -wal (made once;
    not a fixture, whose bytes hypothesis would print with every failure)."""
    folder = Path(tempfile.mkdtemp(prefix="memtrace-fuzz-"))
    closed = folder / "closed.rec"
    with Recorder(str(closed), {"command_line": ["app"], "pid": 1}) as rec:
        for n, s in enumerate(small_session()):
            rec.write(s)
            if n == 6:
                rec.write_events([{"ts": 1.0, "tid": 5, "kind": "mmap", "addr": 4096, "length": 8192,
                                   "frames": ["f", "main"]}])
    killed = folder / "killed.rec"
    code = (
        "import os, sys\n"
        "from memtrace.record import recorder\n"
        "from memtrace.record.synthetic import session\n"
        "rec = recorder.Recorder(sys.argv[1], {})\n"
        "for s in session(14, stacks=10, threads=3, regions=5): rec.write(s)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(killed)], check=True, timeout=60)
    try:
        return {
            "closed": closed.read_bytes(),
            "killed": killed.read_bytes(),
            "killed-wal": Path(str(killed) + "-wal").read_bytes(),
        }
    finally:
        shutil.rmtree(folder)


def _pages(data: bytes) -> int:
    return max(1, len(data) // PAGE)


def damaged(data: bytes, kind: str, draw) -> bytes:
    b = bytearray(data)
    size = len(b)
    if kind == "bytes":
        for pos, value in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)),
                                        min_size=1, max_size=30)):
            b[pos] = value
    elif kind == "schema":  # page 1 after the header: sqlite_master
        for pos, value in draw(st.lists(st.tuples(st.integers(100, PAGE - 1), st.integers(0, 255)),
                                        min_size=1, max_size=10)):
            b[pos] = value
    elif kind == "header":
        for pos, value in draw(st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)),
                                        min_size=1, max_size=4)):
            b[pos] = value
    elif kind == "truncate":
        del b[draw(st.integers(0, size - 1)):]
    elif kind == "page":
        page = draw(st.integers(0, _pages(data) - 1))
        rng = random.Random(draw(st.integers(0, 2**32)))
        b[page * PAGE:(page + 1) * PAGE] = rng.randbytes(PAGE)
    elif kind == "swap":
        p, q = sorted(draw(st.lists(st.integers(0, _pages(data) - 1), min_size=2, max_size=2)))
        b[p * PAGE:(p + 1) * PAGE], b[q * PAGE:(q + 1) * PAGE] = b[q * PAGE:(q + 1) * PAGE], b[p * PAGE:(p + 1) * PAGE]
    return bytes(b)


KINDS = ("bytes", "schema", "header", "truncate", "page", "swap")


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), bounded(HANG_S):
        code = main(argv)
    return code, err.getvalue()


# Some 7 s in the suite; MEMTRACE_FUZZ_EXAMPLES=5000 for a longer hunt.
EXAMPLES = int(os.environ.get("MEMTRACE_FUZZ_EXAMPLES", "400"))


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=HANG_S), database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(("closed", "killed", "killed-wal")), kind=st.sampled_from(KINDS), data=st.data())
def test_damaged_recordings_never_crash_the_reader(which, kind, data):
    original = originals()
    folder = Path(tempfile.mkdtemp(prefix="memtrace-fuzz-"))
    try:
        path = folder / "r.rec"
        if which == "closed":
            path.write_bytes(damaged(original["closed"], kind, data.draw))
        elif which == "killed":
            path.write_bytes(damaged(original["killed"], kind, data.draw))
            Path(f"{path}-wal").write_bytes(original["killed-wal"])
        else:
            path.write_bytes(original["killed"])
            Path(f"{path}-wal").write_bytes(damaged(original["killed-wal"], kind, data.draw))
        before = sorted(p.name for p in folder.iterdir())
        for argv in (["report", str(path), "--format", "json", "--at", "peak"],
                     ["report", str(path), "--format", "html", "--at", "3"],
                     ["replay", str(path)]):
            code, err = run(argv)
            assert code in (0, 2), (argv, code, err)
            assert "Traceback" not in err and "internal error" not in err, err
            lines = err.splitlines()
            assert all(line.startswith("memtrace: ") for line in lines), err
            if code == 2:  # warnings about damage found on the way may come first
                assert not lines[-1].startswith("memtrace: warning:"), err
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        shutil.rmtree(folder)
