"""Recordings end to end through the real CLI, in separate processes: a
recorder killed with SIGKILL mid-session, damaged files, and the JSON round
trip. The recorder runs alone here (no BPF needed); the live tracer's own
end-to-end recording test sits with the trace tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from memtrace.output.reports.jsonreport import snapshot_document
from memtrace.record.synthetic import session

# Writes synthetic snapshots forever, one per 20 ms, and says after each
# commit how many are in the file.
WRITER = """
import sys, time
from memtrace.record.recorder import Recorder
from memtrace.output.reports.jsonreport import snapshot_document
from memtrace.record.synthetic import session
rec = Recorder(sys.argv[1], {"command_line": ["writer"], "pid": 1})
for n, s in enumerate(session(100000), start=1):
    rec.write(s)
    print(n, flush=True)
    time.sleep(0.02)
"""


def memtrace(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memtrace", *args], capture_output=True, text=True, timeout=timeout
    )


def write_recording(path: Path, snaps) -> Path:
    from memtrace.record.recorder import Recorder

    with Recorder(str(path), {}) as rec:
        for s in snaps:
            rec.write(s)
    return path


def test_sigkill_mid_recording_keeps_every_committed_interval(tmp_path):
    path = tmp_path / "killed.rec"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        deadline = time.monotonic() + 60
        while committed < 12 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            committed = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert committed >= 12, "the writer did not get going"
    assert writer.returncode == -signal.SIGKILL

    result = memtrace("report", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    last = json.loads(result.stdout)
    expected = list(session(committed + 1))
    # Everything committed is there; the one being written may be too.
    assert last in (snapshot_document(expected[committed - 1]), snapshot_document(expected[committed]))

    text = memtrace("report", str(path))
    assert text.returncode == 0 and "was not closed" in text.stdout
    replay = memtrace("replay", str(path))
    assert replay.returncode == 0 and replay.stdout.count("=== replay ") >= committed


def test_json_round_trip_through_the_cli(tmp_path):
    snaps = list(session(25))
    path = write_recording(tmp_path / "r.rec", snaps)
    for at, index in (("end", 24), ("0", 0), ("10.5", 10)):
        result = memtrace("report", str(path), "--format", "json", "--at", at)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == snapshot_document(snaps[index])


def test_damaged_files_give_one_line_or_the_readable_part(tmp_path):
    data = write_recording(tmp_path / "good.rec", session(150)).read_bytes()

    cut = tmp_path / "cut.rec"
    cut.write_bytes(data[: len(data) * 95 // 100])
    result = memtrace("report", str(cut), "--format", "json")
    assert result.returncode == 0
    assert result.stderr.startswith("memtrace: warning:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr

    for name, content in (
        ("head.rec", data[:3000]),
        ("text.rec", b"not a recording\n" * 64),
        ("zero.rec", bytes(len(data))),
    ):
        bad = tmp_path / name
        bad.write_bytes(content)
        for command in (["report", str(bad)], ["replay", str(bad)]):
            result = memtrace(*command)
            assert result.returncode == 2, (name, result.stdout[-500:], result.stderr)
            assert result.stderr.startswith("memtrace: ") and result.stderr.count("\n") == 1, result.stderr
            assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="checks that root's recording is private to root")
def test_recording_is_not_readable_by_others():
    from memtrace.record.recorder import Recorder

    # A directory others can enter, unlike pytest's tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="memtrace-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = folder / "private.rec"
        with Recorder(str(path), {}) as rec:
            rec.write(next(session(1)))
        control = folder / "public.txt"
        control.write_text("x")
        control.chmod(0o644)

        def read_as_nobody(p: Path) -> int:
            return subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(p)],
                capture_output=True,
                timeout=30,
            ).returncode

        assert read_as_nobody(control) == 0
        assert read_as_nobody(path) != 0
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user")
def test_a_read_only_copy_reads_as_another_user_and_nothing_appears_beside_it(tmp_path):
    snaps = list(session(30))
    original = write_recording(tmp_path / "r.rec", snaps)
    folder = Path(tempfile.mkdtemp(prefix="memtrace-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = folder / "copy.rec"
        shutil.copyfile(original, path)  # the file alone: nothing beside it
        path.chmod(0o444)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for prefix in (as_nobody, []):
            for command in (["report", "--format", "json"], ["replay"]):
                result = subprocess.run(
                    [*prefix, sys.executable, "-m", "memtrace", command[0], str(path), *command[1:]],
                    capture_output=True, text=True, timeout=120,
                )
                assert result.returncode == 0 and result.stderr == "", (prefix, command, result.stderr)
                if command[0] == "report":
                    assert json.loads(result.stdout) == snapshot_document(snaps[-1])
                else:
                    assert result.stdout.count("=== replay ") == len(snaps)
                assert sorted(p.name for p in folder.iterdir()) == ["copy.rec"]
    finally:
        shutil.rmtree(folder)
