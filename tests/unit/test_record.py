"""Recording and replaying: the codec, the SQLite file (round trip, change
storage, damage handling) and the replay player. No root, no BPF."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pty
import random
import select
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from memtrace.errors import MemtraceError
from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.output.notes import note_text
from memtrace.model.snapshot import Counters, Snapshot, StackStats, ThreadStats
from memtrace.record import listdelta, schema
from memtrace.record.codec import snapshot_from_json
from memtrace.record.reader import open_recording, parse_when
from memtrace.record.recorder import Recorder
from memtrace.record.synthetic import session

COUNT = 150  # a little over two keyframes


@pytest.fixture(scope="module")
def snapshots() -> list[Snapshot]:
    return list(session(COUNT))


def record(path: Path, snaps, metadata=None) -> Path:
    with Recorder(str(path), metadata or {"command_line": ["java", "-jar", "app.jar"], "pid": 4242}) as rec:
        for s in snaps:
            rec.write(s)
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory, snapshots) -> Path:
    return record(tmp_path_factory.mktemp("rec") / "session.rec", snapshots)


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


# ---------------------------------------------------------------- codec


def test_codec_inverts_to_json_for_every_section(snapshots):
    for s in snapshots[::7] + snapshots[-2:]:
        d = s.to_json()
        back = snapshot_from_json(d)
        assert back.to_json() == d
        # Everything to_json carries comes back as the same objects.
        assert back == dataclasses.replace(s, interval_s=0.0, elapsed_s=round(s.elapsed_s, 3))


def test_codec_survives_a_json_text_round_trip(snapshots):
    d = json.loads(json.dumps(snapshots[-1].to_json()))
    assert snapshot_from_json(d).to_json() == snapshots[-1].to_json()


def test_codec_ignores_unknown_sections_and_refuses_malformed_ones(snapshots):
    d = snapshots[3].to_json()
    assert snapshot_from_json({**d, "from_the_future": {"x": 1}}).to_json() == d
    broken = {**d, "heap": {"alloc_bytes": 1}}
    with pytest.raises(MemtraceError, match="heap"):
        snapshot_from_json(broken)
    with pytest.raises(MemtraceError):
        snapshot_from_json([1, 2])


# ---------------------------------------------------------------- recorder + reader


def test_round_trip_is_exact(recording, snapshots):
    with open_recording(str(recording)) as rec:
        assert len(rec) == COUNT
        assert list(rec) == snapshots
        assert rec.complete
        assert [p.elapsed_s for p in rec.points] == [s.elapsed_s for s in snapshots]


def test_random_access_in_any_order(recording, snapshots):
    with open_recording(str(recording)) as rec:
        for i in (COUNT - 1, 0, 63, 64, 65, 128, 5, 127, 64, COUNT - 1):
            assert rec.snapshot(i) == snapshots[i]


def test_times_end_and_peak(recording, snapshots):
    with open_recording(str(recording)) as rec:
        assert rec.index_at("end") == COUNT - 1
        assert rec.index_at("start") == 0
        assert rec.index_at(0) == 0
        assert rec.index_at("12.5") == 12  # last snapshot at or before 12.5 s
        assert rec.index_at("12.5s") == 12
        assert rec.index_at(10_000) == COUNT - 1
        rss = [s.process.rss_bytes for s in snapshots]
        assert rec.index_at("peak") == rss.index(max(rss))
        index, s = rec.snapshot_at("peak")
        assert s == snapshots[index]


def test_peak_falls_back_to_heap_live_without_rss(tmp_path, snapshots):
    snaps = [dataclasses.replace(s, process=dataclasses.replace(s.process, rss_bytes=0)) for s in snapshots[:40]]
    with open_recording(str(record(tmp_path / "r.rec", snaps))) as rec:
        live = [s.heap.live_bytes for s in snaps]
        assert rec.index_at("peak") == live.index(max(live))


@pytest.mark.parametrize("text", ["soon", "-1", "nan", "inf", ""])
def test_bad_times_are_refused(text):
    with pytest.raises(MemtraceError, match="invalid time"):
        parse_when(text)


def test_metadata_is_kept_and_completed(recording, tmp_path, snapshots):
    with open_recording(str(recording)) as rec:
        meta = rec.metadata
    assert meta["command_line"] == ["java", "-jar", "app.jar"] and meta["pid"] == 4242
    for key in ("host", "kernel", "memtrace_version", "start_time", "glibc"):
        assert key in meta
    # The caller's values win; values JSON lacks are kept as text.
    path = record(tmp_path / "m.rec", snapshots[:2], {"glibc": "2.31", "options": {"out": tmp_path}})
    with open_recording(str(path)) as rec:
        assert rec.metadata["glibc"] == "2.31"
        assert rec.metadata["options"] == {"out": str(tmp_path)}


def test_names_that_are_not_utf8_are_kept(tmp_path, snapshots):
    # Python decodes a non-UTF-8 argv or path with lone surrogates.
    odd = "caf\udce9"
    s = snapshots[1]
    stack = dataclasses.replace(s.stacks[0], frames=(f"{odd}+0x1 [lib{odd}.so]",) + s.stacks[0].frames[1:])
    s = dataclasses.replace(s, comm=odd, stacks=(stack,) + s.stacks[1:])
    path = record(tmp_path / "odd.rec", [snapshots[0], s], {"command_line": ["prog", odd]})
    with open_recording(str(path)) as rec:
        assert rec.metadata["command_line"] == ["prog", odd]
        assert list(rec) == [snapshots[0], s]


def test_file_is_private_from_creation(tmp_path, snapshots):
    old = os.umask(0)
    try:
        path = record(tmp_path / "p.rec", snapshots[:2])
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_existing_file_is_not_overwritten_unless_asked(tmp_path, snapshots):
    path = record(tmp_path / "x.rec", snapshots[:2])
    with pytest.raises(MemtraceError, match="already exists"):
        Recorder(str(path), {})
    record_again = Recorder(str(path), {}, overwrite=True)
    record_again.write(snapshots[5])
    record_again.close()
    with open_recording(str(path)) as rec:
        assert list(rec) == [snapshots[5]]


def test_unwritable_place_is_a_clear_error(tmp_path):
    with pytest.raises(MemtraceError, match="cannot create recording"):
        Recorder(str(tmp_path / "no" / "such" / "dir.rec"), {})


def test_write_after_close_is_an_error(tmp_path, snapshots):
    rec = Recorder(str(tmp_path / "c.rec"), {})
    rec.close()
    rec.close()  # twice is fine
    with pytest.raises(MemtraceError, match="closed"):
        rec.write(snapshots[0])


def test_a_failed_write_stops_the_recorder_and_keeps_what_was_committed(tmp_path, snapshots, monkeypatch):
    from memtrace.record import changes

    path = tmp_path / "full.rec"
    rec = Recorder(str(path), {})
    rec.write(snapshots[0])
    rec.write(snapshots[1])
    real = changes.encode_stacks

    def disk_full(*args):
        real(*args)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(changes, "encode_stacks", disk_full)
    with pytest.raises(MemtraceError, match="disk is full"):
        rec.write(snapshots[2])
    monkeypatch.setattr(changes, "encode_stacks", real)
    with pytest.raises(MemtraceError, match="stopped after an earlier error"):
        rec.write(snapshots[3])
    rec.close()
    with open_recording(str(path)) as back:
        assert list(back) == snapshots[:2]


class Collected:
    def __init__(self) -> None:
        self.updates: list[Snapshot] = []
        self.final: Snapshot | None = None

    def update(self, snapshot: Snapshot) -> None:
        self.updates.append(snapshot)

    def close(self, final: Snapshot) -> None:
        self.final = final


def test_a_failing_recording_stops_with_a_note_and_the_snapshots_go_on(tmp_path, snapshots, monkeypatch):
    from memtrace.output.sinks.record import RecordSink

    path = tmp_path / "stops.rec"
    after = Collected()
    sink = RecordSink(str(path), {}, then=[after])
    for s in snapshots[:3]:
        sink.update(s)
    assert after.updates == snapshots[:3]

    def disk_full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Recorder, "_write_sections", disk_full)
    for s in snapshots[3:6]:
        sink.update(s)
    sink.close(snapshots[6])
    note = Note.of(notes.RECORDING_STOPPED, at_s=round(snapshots[3].elapsed_s, 1),
                   reason=f"cannot write to recording {path}: database or disk is full", snapshots=3)
    assert note_text(note) == f"the recording stopped at {snapshots[3].elapsed_s:.1f} s (cannot write to " \
        f"recording {path}: database or disk is full); it holds the 3 snapshot(s) before"
    assert [s.notes for s in after.updates[3:]] == [(*s.notes, note) for s in snapshots[3:6]]
    assert after.final is not None and after.final.notes == (*snapshots[6].notes, note)
    assert [s.elapsed_s for s in after.updates] == [s.elapsed_s for s in snapshots[:6]]
    with open_recording(str(path)) as rec:
        assert list(rec) == snapshots[:3] and not rec.complete


def test_a_recording_sink_closes_the_file_whole(tmp_path, snapshots):
    from memtrace.output.sinks.record import RecordSink

    path = tmp_path / "whole.rec"
    after = Collected()
    sink = RecordSink(str(path), {}, then=[after])
    for s in snapshots[:5]:
        sink.update(s)
    sink.close(snapshots[5])
    assert after.final == snapshots[5] and after.updates == snapshots[:5]
    assert [p.name for p in tmp_path.iterdir()] == ["whole.rec"]
    with open_recording(str(path)) as rec:
        assert list(rec) == snapshots[:6] and rec.complete


def test_only_changes_are_stored(tmp_path, snapshots):
    s = snapshots[20]
    # The next interval as the model makes it: nothing moved, so nothing grew.
    still = dataclasses.replace(s, elapsed_s=s.elapsed_s + 1, stacks=tuple(
        dataclasses.replace(st, live_delta_bytes=0) for st in s.stacks))
    path = record(tmp_path / "same.rec", [s, still])
    with open_recording(str(path)) as rec:
        assert list(rec) == [s, still]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM changes WHERE snapshot_id = 2").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM sections WHERE snapshot_id = 2").fetchone()[0] == 0
    # Each stack once, as a node of the call tree with its callers' nodes.
    nodes = {st.frames[i:] for st in s.stacks for i in range(len(st.frames))}
    assert db.execute("SELECT count(*) FROM stacks").fetchone()[0] == len(nodes)


def test_a_stack_that_stops_growing_needs_no_record_but_one_that_keeps_growing_does(tmp_path):
    grow = StackStats(("a",), (1,), Counters(100, 0, 1, 0), live_delta_bytes=100)
    snaps = [Snapshot(1, "x", float(k), 1.0, stacks=(st,)) for k, st in enumerate([
        grow,
        dataclasses.replace(grow, live_delta_bytes=0),  # implied: no record
        dataclasses.replace(grow, live_delta_bytes=7),  # not the model's, but kept
        dataclasses.replace(grow, live_delta_bytes=7),
        dataclasses.replace(grow, live_delta_bytes=0),
    ])]
    path = record(tmp_path / "still.rec", snaps)
    with open_recording(str(path)) as rec:
        assert list(rec) == snaps
    db = sqlite3.connect(path)
    with_records = [sid for (sid,) in db.execute("SELECT snapshot_id FROM changes WHERE kind = 'stacks'")]
    assert with_records == [1, 3, 4]


def test_keyframes_make_every_jump_short(recording):
    db = sqlite3.connect(recording)
    full = [sid for (sid,) in db.execute("SELECT id FROM snapshots WHERE full = 1")]
    assert full == list(range(1, COUNT + 1, schema.KEYFRAME_EVERY))


def test_keyframes_of_a_large_quiet_state_come_when_the_changes_weigh_as_much(tmp_path):
    # 3000 stacks of which 20 move a second: a keyframe every 64 snapshots
    # would be most of the file. The changes since a keyframe weigh at
    # least KEYFRAME_WEIGHT of it before the next, unless KEYFRAME_MAX_EVERY.
    path = record(tmp_path / "quiet.rec", busy_session(200, stacks=3000, changes=20))
    db = sqlite3.connect(path)
    full = [sid for (sid,) in db.execute("SELECT id FROM snapshots WHERE full = 1")]
    assert full[0] == 1 and len(full) < 200 // schema.KEYFRAME_EVERY
    weight = dict(db.execute("SELECT snapshot_id, sum(length(data)) FROM changes GROUP BY snapshot_id"))
    for a, b in zip(full, full[1:]):
        between = sum(weight.get(i, 0) for i in range(a + 1, b))
        assert between >= schema.KEYFRAME_WEIGHT * weight[a] or b - a >= schema.KEYFRAME_MAX_EVERY
    with open_recording(str(path)) as rec:
        last = list(busy_session(200, stacks=3000, changes=20))[-1]
        assert rec.snapshot(199).stacks == last.stacks


def test_each_frame_is_stored_once_and_stacks_share_their_callers(tmp_path):
    # 4 x 4 x 4 stacks over a shared outer part: the call tree has 1 + 4 +
    # 16 + 64 nodes below the shared part, one row each.
    shared = tuple(f"outer_{d}+0x10 [app]" for d in range(10)) + ("start_thread+0x7d [libc.so.6]",)
    stacks = [StackStats((f"leaf_{a}_{b}_{c}", f"mid_{a}_{b}", f"top_{a}") + shared, (1,), Counters(10 + a, 0, 1, 0))
              for a in range(4) for b in range(4) for c in range(4)]
    snap = Snapshot(1, "x", 1.0, 1.0, stacks=tuple(stacks))
    path = record(tmp_path / "tree.rec", [snap])
    db = sqlite3.connect(path)
    distinct = {f for st in stacks for f in st.frames}
    assert db.execute("SELECT count(*) FROM frames").fetchone()[0] == len(distinct)
    assert db.execute("SELECT count(*) FROM stacks").fetchone()[0] == len(shared) + 4 + 16 + 64
    # The view for the sqlite3 shell gives a stack's frames back, in order.
    with open_recording(str(path)) as rec:
        first = rec.snapshot(0).stacks[0]
    sid = db.execute("SELECT s.id FROM stacks s JOIN frames f ON f.id = s.frame_id WHERE f.text = ?",
                     (first.frames[0],)).fetchone()[0]
    texts = tuple(t for (t,) in db.execute("SELECT frame FROM stack_frames WHERE stack_id = ? ORDER BY depth", (sid,)))
    assert texts == first.frames


def test_a_format_1_recording_is_still_read(tmp_path):
    # Written by format 1's recorder (memtrace before stacks became call-tree
    # nodes) from session(70, stacks=12, regions=4): frames as text in
    # stacks.frames, every change spelled out.
    import gzip
    import shutil

    path = tmp_path / "format1.memtrace"
    with gzip.open(Path(__file__).parent / "data" / "format1.memtrace.gz") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with open_recording(str(path)) as rec:
        assert rec.schema_version == 1
        # Its notes and hints were sentences: they come back as text notes.
        old_words = {notes.UNWIND_TABLES_FULL: "attach took 0.4 s",
                     notes.TRIM_WOULD_RETURN: "arena retention: call malloc_trim(0) or set MALLOC_ARENA_MAX=2"}

        def as_format_1(s):
            def text(ns):
                return tuple(Note.of(notes.TEXT, text=old_words[n.kind]) for n in ns)
            return dataclasses.replace(s, notes=text(s.notes), hints=text(s.hints))

        assert list(rec) == [as_format_1(s) for s in session(70, stacks=12, regions=4)]


def test_unusual_order_and_repeated_identities_survive(tmp_path, snapshots):
    s = snapshots[30]
    reordered = dataclasses.replace(s, stacks=tuple(reversed(s.stacks)), threads=tuple(reversed(s.threads)))
    twin = StackStats(("same",), (1,), Counters(10, 0, 1, 0))
    dup = dataclasses.replace(
        s,
        stacks=(twin, dataclasses.replace(twin, counters=Counters(5, 0, 1, 0))),
        threads=(ThreadStats(7, "a", Counters(1, 0, 1, 0)), ThreadStats(7, "b", Counters(2, 0, 1, 0))),
    )
    snaps = [reordered, dup, s]
    with open_recording(str(record(tmp_path / "o.rec", snaps))) as rec:
        assert list(rec) == snaps


def test_events_round_trip(tmp_path, snapshots):
    path = tmp_path / "e.rec"
    events = [
        {"ts": 0.5, "tid": 10, "kind": "mmap", "addr": 0x7F00_0000_0000, "length": 1 << 26, "prot": 3,
         "flags": 0x22, "result": 0x7F00_0000_0000, "in_malloc": 1, "frames": ["new_heap", "arena_get2"]},
        {"ts": 1.5, "tid": 11, "kind": "munmap", "addr": 2**64 - 4096, "length": 4096, "reason": "trim"},
    ]
    with Recorder(str(path), {}) as rec:
        rec.write_events(events[:1])
        rec.write(snapshots[0])
        rec.write_events(events[1:])
    with open_recording(str(path)) as rec:
        got = list(rec.events())
        assert got[0] == {**events[0], "frames": ("new_heap", "arena_get2")}
        assert got[1] == events[1]
        assert [e["kind"] for e in rec.events(start_s=1.0)] == ["munmap"]


def busy_session(count: int, stacks: int, changes: int, threads: int = 50):
    """A process moving `changes` of its `stacks` call sites per interval,
    built directly (the model's aggregation would be the slow part)."""
    rng = random.Random(3)
    frames = [tuple(f"Java_java_util_zip_Inflater_init_{i}_{d}+0x1a [libzip.so]" for d in range(16)) for i in range(stacks)]
    stats = [StackStats(frames[i], (1000 + i % threads,), Counters(1 << 30, (1 << 30) - (1 << 20), 10**6, 10**6 - 999)) for i in range(stacks)]
    grew: list[int] = []
    for k in range(count):
        for i in grew:  # as the model: what did not move did not grow
            stats[i] = dataclasses.replace(stats[i], live_delta_bytes=0)
        grew = rng.sample(range(stacks), changes)
        for i in grew:
            a = rng.randint(1, 1 << 17)
            f = rng.randint(0, a)
            old = stats[i]
            stats[i] = StackStats(old.frames, old.tids, old.counters + Counters(a, f, 3, 2), False, a - f)
        yield Snapshot(4242, "java", float(k), 1.0, stacks=tuple(sorted(stats, key=lambda s: (-s.counters.live_bytes, -s.counters.alloc_bytes, s.frames))))


def test_a_busy_hour_stays_small(tmp_path):
    # A minute of a process whose 2000 call sites see 500 counter changes a
    # second, scaled to an hour, must stay under the 100 MB target with room.
    minute = tmp_path / "busy.rec"
    record(minute, busy_session(60, stacks=2000, changes=500))
    db = sqlite3.connect(minute)
    stacks_once = (db.execute("SELECT count(*) * 12 FROM stacks").fetchone()[0]
                   + db.execute("SELECT sum(length(text)) FROM frames").fetchone()[0])
    per_interval = (minute.stat().st_size - stacks_once) / 60
    assert stacks_once + per_interval * 3600 < 100e6 * 0.6


# ---------------------------------------------------------------- list deltas


def test_list_delta_rebuilds_the_list():
    old = [{"id": 1, "v": 1}, {"id": 2, "v": 2}, {"id": 3, "v": 3}]
    new = [{"id": 3, "v": 30}, {"id": 1, "v": 1}, {"id": 4, "v": 4}]
    delta = listdelta.list_delta(old, new, ("id",))
    assert delta is not None and listdelta.apply_list_delta(old, delta) == new
    assert listdelta.list_delta(old, [{"id": 1}, {"id": 1}], ("id",)) is None


# ---------------------------------------------------------------- bad files


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(MemtraceError, match="no such file"):
        open_recording(str(tmp_path / "nope.rec"))
    empty = tmp_path / "empty.rec"
    empty.write_bytes(b"")
    with pytest.raises(MemtraceError, match="empty"):
        open_recording(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    with pytest.raises(MemtraceError, match="not a memtrace recording"):
        open_recording(str(text))
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(MemtraceError, match="not a memtrace recording"):
        open_recording(str(other))


def test_newer_format_is_refused(tmp_path, snapshots):
    path = record(tmp_path / "new.rec", snapshots[:2])
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(schema.SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(MemtraceError, match="newer memtrace .*upgrade"):
        open_recording(str(path))


def open_damaged(path: Path) -> tuple[list[Snapshot], list[str]] | str:
    """The snapshots and warnings, or the error message."""
    warnings = Warnings()
    try:
        with open_recording(str(path), warn=warnings) as rec:
            return list(rec), warnings
    except MemtraceError as e:
        return str(e)


def test_truncated_file_gives_the_readable_part_or_a_clear_error(tmp_path, recording, snapshots):
    data = recording.read_bytes()
    cut = tmp_path / "cut.rec"
    cut.write_bytes(data[: len(data) * 95 // 100])
    got, warnings = open_damaged(cut)
    assert 0 < len(got) < COUNT and got == snapshots[: len(got)]
    assert len(warnings) == 1 and "cut short" in warnings[0] and "\n" not in warnings[0]
    cut.write_bytes(data[:1000])
    error = open_damaged(cut)
    assert isinstance(error, str) and "damaged" in error and "\n" not in error


def test_corrupted_pages_give_the_readable_part_or_a_clear_error(tmp_path, recording, snapshots):
    data = recording.read_bytes()
    page = 4096
    rng = random.Random(5)
    recovered = 0
    for victim in range(1, len(data) // page, 9):
        bad = bytearray(data)
        bad[victim * page : (victim + 1) * page] = bytes(rng.randrange(256) for _ in range(page))
        path = tmp_path / f"bad{victim}.rec"
        path.write_bytes(bytes(bad))
        result = open_damaged(path)
        if isinstance(result, str):
            assert "\n" not in result and "bad" in result
            continue
        got, warnings = result
        assert got == snapshots[: len(got)]
        assert all("\n" not in w for w in warnings)
        recovered += bool(warnings)
    assert recovered > 0


def test_tampered_change_records_cut_the_recording_there(tmp_path, snapshots):
    path = record(tmp_path / "t.rec", snapshots[:30])
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE changes SET data = ? WHERE snapshot_id = 20 AND kind = 'stacks'",
        (zlib.compress(b'[[1,"x","y",0,0]]'),),
    )
    db.commit()
    db.close()
    warnings = Warnings()
    with open_recording(str(path), warn=warnings) as rec:
        assert rec.snapshot_at("end")[1] == snapshots[18]
        assert len(rec) == 19
        assert list(rec) == snapshots[:19]
    assert len(warnings) == 1 and "snapshot 20" in warnings[0]


def files_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_closed_recording_is_one_file(tmp_path, snapshots):
    path = record(tmp_path / "one.rec", snapshots[:20])
    assert [p.name for p in tmp_path.iterdir()] == ["one.rec"]
    assert path.read_bytes()[18:20] == b"\x01\x01"  # a rollback journal: no WAL to carry
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    (alone / "copy.rec").write_bytes(path.read_bytes())
    with open_recording(str(alone / "copy.rec")) as rec:
        assert list(rec) == snapshots[:20] and rec.complete


def test_reading_creates_and_changes_nothing_beside_the_recording(tmp_path, recording, snapshots, capsys):
    from memtrace.cli import main

    (tmp_path / "r.rec").write_bytes(recording.read_bytes())
    before = files_in(tmp_path)
    with open_recording(str(tmp_path / "r.rec")) as rec:
        assert list(rec) == snapshots
        list(rec.events())
    assert main(["report", str(tmp_path / "r.rec"), "--at", "peak"]) == 0
    assert main(["replay", str(tmp_path / "r.rec"), "--at", "145"]) == 0
    capsys.readouterr()
    assert files_in(tmp_path) == before


KILLED_WRITER = (
    "import os, sys\n"
    "from memtrace.record import recorder\n"
    "from memtrace.record.synthetic import session\n"
    "recorder.CHECKPOINT_EVERY_S = float(sys.argv[2])\n"
    "rec = recorder.Recorder(sys.argv[1], {})\n"
    "for s in session(10): rec.write(s)\n"
    "os._exit(0)\n"
)


def test_a_killed_recorder_leaves_a_readable_file(tmp_path, snapshots):
    # Commits reach the WAL file; a process that dies without close() leaves
    # it there, and the reader takes it in, without touching either file.
    path = tmp_path / "k.rec"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), "3600"], check=True, timeout=60)
    before = files_in(tmp_path)
    assert set(before) == {"k.rec", "k.rec-wal"}  # no -shm: the WAL index was private
    with open_recording(str(path)) as rec:
        assert list(rec) == list(session(10))
        assert not rec.complete
    assert files_in(tmp_path) == before


def test_a_killed_recorder_left_most_of_it_in_the_file_itself(tmp_path):
    # Checkpoints fold the WAL in as the recording goes (here after every
    # interval): the file copied without its -wal still holds them.
    path = tmp_path / "k.rec"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), "0"], check=True, timeout=60)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "k.rec").write_bytes(path.read_bytes())
    with open_recording(str(alone / "k.rec")) as rec:
        assert list(rec) == list(session(10))[: len(rec)] and len(rec) >= 9


def test_a_recording_being_written_reads_from_a_copy(tmp_path):
    # Checkpoints every interval: the reader's copy of file and WAL must not
    # mix two moments, and the writer must not notice the reader.
    path = tmp_path / "live.rec"
    code = (
        "import sys, time\n"
        "from memtrace.record import recorder\n"
        "from memtrace.record.synthetic import session\n"
        "recorder.CHECKPOINT_EVERY_S = 0\n"
        "rec = recorder.Recorder(sys.argv[1], {})\n"
        "for n, s in enumerate(session(150), start=1):\n"
        "    rec.write(s)\n"
        "    print(n, flush=True)\n"
        "    time.sleep(0.01)\n"
        "rec.close()\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    expected = list(session(150))
    try:
        assert writer.stdout.readline()
        reads = 0
        while writer.poll() is None and reads < 20:
            warnings = Warnings()
            with open_recording(str(path), warn=warnings) as rec:
                got = list(rec)
            assert not warnings and got == expected[: len(got)] and got
            reads += 1
        assert reads >= 3
        assert writer.wait(60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["live.rec"]
    with open_recording(str(path)) as rec:
        assert list(rec) == expected and rec.complete


def test_an_unreadable_wal_leaves_what_the_file_holds_with_a_warning(tmp_path, snapshots):
    path = tmp_path / "k.rec"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), "0"], check=True, timeout=60)
    wal = Path(str(path) + "-wal")
    wal.unlink()
    wal.mkdir()  # cannot be copied
    warnings = Warnings()
    with open_recording(str(path), warn=warnings) as rec:
        assert len(rec) >= 9
    assert len(warnings) == 1 and "k.rec-wal" in warnings[0] and "missing" in warnings[0]


# ---------------------------------------------------------------- replay


def player(times=(0.0, 1.0, 2.0, 3.0, 10.0), peak=3):
    from memtrace.cli.replay import Player

    return Player(times=list(times), peak=peak)


def test_player_keys():
    from memtrace.cli.replay import QUIT

    p = player()
    assert p.playing and p.wait_s() == 1.0
    p.handle(" ")
    assert not p.playing and p.wait_s() is None
    p.handle("right")
    p.handle("n")
    assert p.index == 2
    p.handle("left")
    assert p.index == 1
    p.handle("p")
    p.handle("p")
    assert p.index == 0
    p.handle("P")
    assert p.index == 3 and "peak" in p.status()
    for key in "g2.5":
        p.handle(key)
    assert "go to: 2.5_" in p.status()
    p.handle("\r")
    assert p.index == 2 and p.entry is None
    p.handle("g")
    p.handle("9")
    p.handle("esc")
    assert p.index == 2 and p.entry is None
    p.handle("g")
    p.handle("end")  # any other key ends typing and does its own thing
    assert p.index == 4 and p.entry is None
    assert p.handle("q") == QUIT


def test_player_speed_and_end():
    p = player()
    p.handle("+")
    p.handle("+")
    assert p.wait_s() == 0.25 and "x4" in p.status()
    for _ in range(10):
        p.handle("-")
    assert "x1/16" in p.status()
    p.index = 3
    p.playing = True
    assert p.wait_s() == 5.0  # a 7 s gap at 1/16 is capped
    p.advance()
    assert p.index == 4 and not p.playing and "end of the recording" in p.status()
    p.handle(" ")
    assert p.index == 0 and p.playing  # plays again from the start


def replay_args(path, *extra):
    from memtrace.cli.replay import ReplayCommand

    parser = argparse.ArgumentParser()
    ReplayCommand().prepare_parser(parser)
    return parser.parse_args([str(path), *extra])


def test_replay_without_a_terminal_prints_plain_snapshots(recording, capsys):
    from memtrace.cli.replay import ReplayCommand

    assert ReplayCommand().run(replay_args(recording, "--at", "140")) == 0
    out = capsys.readouterr().out
    with open_recording(str(recording)) as rec:
        start = rec.index_at(140)
    assert out.count("=== replay ") == COUNT - start
    assert "\x1b[" not in out and "STACKS" in out


def test_replay_on_a_terminal_takes_keys(recording):
    # The real loop on a pseudo-terminal: it must draw, obey P and q, and
    # leave promptly with exit status 0.
    code = (
        "import sys, argparse\n"
        "from memtrace.cli.replay import ReplayCommand\n"
        "p = argparse.ArgumentParser(); ReplayCommand().prepare_parser(p)\n"
        "sys.exit(ReplayCommand().run(p.parse_args(sys.argv[1:])))\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.environ.update(COLUMNS="120", LINES="40", TERM="xterm")
        os.execv(sys.executable, [sys.executable, "-c", code, str(recording), "--speed", "4"])
    out = b""

    def read_for(seconds: float) -> None:
        nonlocal out
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        read_for(2.0)
        assert b"replay" in out and b"playing" in out
        os.write(fd, b"P")
        read_for(0.7)
        assert b"at the peak" in out
        os.write(fd, b"q")
        read_for(1.0)
    finally:
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert done and os.waitstatus_to_exitcode(status) == 0
