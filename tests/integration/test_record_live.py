"""--record on a real trace: the file matches the live snapshot, survives
SIGKILL of memtrace up to the last interval, and never harms the target."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest


pytestmark = pytest.mark.bpf


def report(memtrace_cmd, path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*memtrace_cmd, "report", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_live_json_equals_report_of_the_recording(programs, run_memtrace, memtrace_cmd, tmp_path):
    rec = tmp_path / "trace.memtrace"
    truth = tmp_path / "truth.json"
    rc, live, stderr = run_memtrace(["--json", "--interval", "0.2", "--record", str(rec), "--",
                                     str(programs["threads"]), str(truth), "--hold-ms", "600"])
    assert rc == 0, stderr
    assert stat.S_IMODE(os.stat(rec).st_mode) == 0o600
    out = report(memtrace_cmd, rec, "--format", "json", "--at", "end")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == live
    text = report(memtrace_cmd, rec)
    assert text.returncode == 0 and "worker" in text.stdout, text.stderr
    # the address-space events are in the file, readable with sqlite
    import sqlite3

    with sqlite3.connect(rec) as db:
        kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM events")}
    assert {"mmap", "mprotect"} <= kinds, kinds


def test_sigkill_keeps_everything_up_to_the_last_interval(
    programs, spawn, wait_file, start_memtrace, probes, memtrace_cmd, tmp_path
):
    truth = tmp_path / "truth.json"
    target = spawn([programs["threads"], truth, "--wait"])
    wait_file(tmp_path / "truth.json.ready", target)
    rec = tmp_path / "killed.memtrace"
    tracer = start_memtrace(["--json", "--interval", "0.2", "--record", str(rec),
                             "-p", str(target.pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)
    expected = json.loads(wait_file(truth, target))
    time.sleep(1.0)  # several intervals recorded after the allocations
    tracer.proc.send_signal(signal.SIGKILL)
    tracer.proc.wait(10)

    out = report(memtrace_cmd, rec, "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    by_tid = {t["tid"]: t["live_bytes"] for t in doc["threads"]}
    for worker in expected["threads"]:
        assert by_tid.get(worker["tid"]) == worker["live_bytes"], (worker, by_tid)
    # the kernel removed the probes with memtrace's file descriptors
    assert not probes.perf([tracer.pid]), "uprobes survived memtrace's SIGKILL"
    assert target.poll() is None
    target.send_signal(signal.SIGUSR1)
    assert target.wait(30) == 0


def test_many_stacks_replay_and_report_as_they_were_live(programs, run_memtrace, memtrace_cmd, tmp_path):
    # 3000 distinct stacks appearing over 1 s, then churning: the recording
    # (frames once, stacks as call-tree nodes, changes only) gives back the
    # live document, and --top bounds the report from the same ranking.
    rec = tmp_path / "many.memtrace"
    rc, live, stderr = run_memtrace(["--json", "--interval", "0.3", "--record", str(rec), "--",
                                     str(programs["manystacks"]), "3000", "3", "3000", "1", "4"])
    assert rc == 0, stderr
    assert len(live["stacks"]) >= 3000, len(live["stacks"])
    out = report(memtrace_cmd, rec, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == live
    top = report(memtrace_cmd, rec, "--format", "json", "--top", "50")
    assert top.returncode == 0, top.stderr
    doc = json.loads(top.stdout)
    assert doc["stacks"] == live["stacks"][:50]
    assert doc["stacks_left_out"]["count"] == len(live["stacks"]) - 50
    left = live["stacks"][50:]
    assert doc["stacks_left_out"]["live_bytes"] == sum(s["live_bytes"] for s in left)
    from memtrace.output.reports.jsonreport import snapshot_document
    from memtrace.record.reader import open_recording

    with open_recording(str(rec)) as recording:
        snaps = list(recording)
    assert len(snaps) >= 5 and snapshot_document(snaps[-1]) == live
    import sqlite3

    with sqlite3.connect(rec) as db:
        frames = db.execute("SELECT count(*) FROM frames").fetchone()[0]
        nodes = db.execute("SELECT count(*) FROM stacks").fetchone()[0]
    # A few dozen functions make every stack. The call tree shares the
    # callers: stacks of 15 frames that part ways 4 frames from the top take
    # at most 4 nodes each.
    assert frames < 200 and nodes <= 4.5 * len(live["stacks"]), (frames, nodes)


def test_the_index_holds_the_gap_parts_of_each_snapshot(programs, run_memtrace, tmp_path):
    # The over-time chart plots allocator retained and other from the
    # snapshots table, without decoding a snapshot: each row must carry the
    # figures of its own snapshot's gap.
    rec = tmp_path / "gap.memtrace"
    rc, live, stderr = run_memtrace(["--json", "--interval", "0.2", "--record", str(rec), "--",
                                     str(programs["threads"]), str(tmp_path / "truth.json"), "--hold-ms", "600"])
    assert rc == 0, stderr
    import sqlite3

    with sqlite3.connect(rec) as db:
        columns = [c[1] for c in db.execute("PRAGMA table_info(snapshots)")]
        rows = db.execute("SELECT gap_bytes, other_anon_bytes FROM snapshots ORDER BY id").fetchall()
    db.close()
    assert "other_anon_bytes" in columns, columns
    from memtrace.record.reader import open_recording

    with open_recording(str(rec)) as recording:
        gaps = [s.gap for s in recording]
        points = list(recording.points)
    assert len(rows) == len(gaps) == len(points) >= 3
    assert all(g is not None for g in gaps)
    assert rows == [(g.allocator_retained_bytes, g.other_anon_bytes) for g in gaps]
    assert [(p.allocator_retained_bytes, p.other_anon_bytes) for p in points] == rows
    # Thread stacks and the like: anonymous memory that is neither heap nor retained.
    assert max(other for _, other in rows) > 0, rows
    assert rows[-1] == (live["gap"]["allocator_retained_bytes"], live["gap"]["other_anon_bytes"])
