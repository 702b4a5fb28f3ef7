"""A full disk during --record stops the recording, not the trace: memtrace
traces a busy program into a 256 KiB tmpfs, which fills up a few seconds in.
The trace runs to its --duration and exits 0, the final snapshot carries a
note saying where the recording stopped, and the recording holds what was
written until then."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

SOAK_TARGET = Path(__file__).resolve().parents[2] / "bench" / "soak_target.c"
DURATION_S = 8.0


@pytest.fixture(scope="module")
def busy_target(tmp_path_factory) -> Path:
    """bench/soak.py's target: threads that come and go, malloc, realloc,
    free and mmap churn, and a recording that grows fast."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc not found: apt-get install gcc", pytrace=False)
    binary = tmp_path_factory.mktemp("soak") / "soak_target"
    cmd = ["gcc", "-O2", "-g", "-fno-builtin", "-fno-omit-frame-pointer", "-pthread", "-o", str(binary),
           str(SOAK_TARGET)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr}", pytrace=False)
    return binary


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs: {done.stderr.strip()}", pytrace=False)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_stops_the_recording_not_the_trace(busy_target, small_disk, run_memtrace, memtrace_cmd, tmp_path):
    rec = small_disk / "trace.memtrace"
    results = tmp_path / "target.jsonl"
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.1", "--duration", str(DURATION_S), "--record", str(rec), "--",
         str(busy_target), str(DURATION_S + 1), "0", str(results)]
    )
    assert rc == 0, stderr
    assert doc is not None and doc["elapsed_s"] >= DURATION_S - 0.5, doc and doc["elapsed_s"]
    notes = [n for n in (x["text"] for x in doc["notes"]) if "recording stopped" in n]
    assert len(notes) == 1, doc["notes"]
    assert "disk is full" in notes[0] and str(rec) in notes[0], notes[0]
    stopped_at = float(re.search(r"stopped at ([0-9.]+) s", notes[0]).group(1))
    kept = int(re.search(r"holds the ([0-9]+) snapshot", notes[0]).group(1))
    assert 0 < stopped_at < DURATION_S - 1, "the disk should fill up well before the end"
    assert kept > 0
    # The target ran to its end untouched.
    assert [json.loads(line)["mismatches"] for line in results.read_text().splitlines()] == [0]

    # Readable up to where it stopped, from a copy on a disk with room.
    out = subprocess.run([*memtrace_cmd, "report", str(rec), "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    last = json.loads(out.stdout)
    assert 0 < last["elapsed_s"] < stopped_at
    from memtrace.record.reader import open_recording

    with open_recording(str(rec)) as recording:
        assert len(recording) == kept
        assert not recording.complete
