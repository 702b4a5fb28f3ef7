"""Reading a recording back as `Snapshot`s.

`open_recording(path)` validates the file and refuses, in one line, what is
not a recording, a newer format, or damage with nothing left to read. A
damaged file whose first snapshots still decode is kept up to the last good
one, with a warning on stderr saying how much was recovered.

A snapshot is rebuilt from the keyframe at or before it plus the change
records after that keyframe; reading forward reuses the previous state, so a
replay decodes each snapshot once. Nothing read from the file is executed:
values are JSON or plain SQLite integers and text, and the connection is
read-only with SQLite's untrusted-schema protection on.

Reading never creates or changes a file beside the recording. A finished
recording is one file, opened immutable. One with a `-wal` file beside it
(being written, or its recorder was killed) is read from a private copy of
both, so the intervals only the WAL holds are read without touching either.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import urllib.parse
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Snapshot, StackStats, ThreadStats
from memtrace.record import changes, listdelta, schema
from memtrace.record.codec import SnapshotFormatError, section_kwargs
from memtrace.record.recorder import stack_sort_key, thread_sort_key
from memtrace.record.timeline import TimePoint, peak_index

_SQLITE_MAGIC = b"SQLite format 3\x00"

When = Union[str, float, int]


def stderr_warning(message: str) -> None:
    print(f"memtrace: warning: {message}", file=sys.stderr)


def parse_when(text: When) -> Union[str, float]:
    """'end', 'peak', 'start', or seconds since the recording began
    ('12', '12.5', '12.5s')."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        word = str(text).strip().lower()
        if word in ("end", "peak", "start"):
            return word
        try:
            seconds = float(word[:-1] if word.endswith("s") else word)
        except ValueError:
            seconds = float("nan")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise MemtraceError(f"invalid time {text!r}: give seconds since the start, 'end' or 'peak'")
    return seconds


def when_arg(text: str) -> str:
    """argparse type for --at: checked here, kept as text for parse_when."""
    import argparse

    try:
        parse_when(text)
    except MemtraceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# SQLite's errors. One whose message quotes damaged bytes (a broken schema
# entry) reaches us as the UnicodeDecodeError of decoding that message.
_SQLITE_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)


def _sqlite_message(e: BaseException) -> str:
    """One short line: SQLite quotes a broken schema entry whole."""
    if isinstance(e, UnicodeDecodeError) and isinstance(e.object, bytes) and e.object.startswith(b"malformed"):
        text = e.object.decode("utf-8", errors="replace")
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


class _Damage(Exception):
    """A part of the file that cannot be read: (what, index of the first
    snapshot it spoils)."""


# What reading a damaged or tampered-with part can raise.
_DECODE_ERRORS = (
    _Damage,
    sqlite3.DatabaseError,
    SnapshotFormatError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    zlib.error,
)


@dataclass(frozen=True)
class _Row:
    elapsed_s: float
    interval_s: float
    full: bool
    thread_order: Optional[str]
    stack_order: Optional[str]


@dataclass
class _State:
    """What the file says after applying snapshots up to `index`."""

    index: int = -1
    stacks: dict[int, StackStats] = field(default_factory=dict)
    threads: dict[int, ThreadStats] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Snapshot kwargs
    plain: dict[str, Any] = field(default_factory=dict)  # name -> its JSON value, for list deltas
    moved: set[int] = field(default_factory=set)  # stacks that grew at `index`
    built: Optional[Snapshot] = None  # the snapshot at `index`, once asked for


class Recording:
    """An open recording. `points[i]` holds the plotted numbers of snapshot i
    without decoding it; `snapshot(i)` rebuilds the whole snapshot."""

    def __init__(self, path: str, *, warn: Callable[[str], None] = stderr_warning) -> None:
        self.path = os.fspath(path)
        self._warn = warn
        # Private copies (of a file with a -wal, of a truncated file) live
        # here; removed on close(), or when the object goes.
        self._workdir: Optional[str] = None
        self._db: Optional[sqlite3.Connection] = None
        self._db = self._connect()
        self._frames: dict[int, tuple[str, ...]] = {}
        self._frame_text: Optional[dict[int, str]] = None
        self._tids: dict[int, int] = {}
        self._state = _State()
        self._rows: list[_Row] = []
        self.points: list[TimePoint] = []
        try:
            try:
                self._open()
            except _SQLITE_ERRORS as e:
                # SQLite refuses a file shorter than its header says. A copy
                # whose header is made to agree with the file's length opens,
                # and the pages that are left can be read.
                fixed = _header_fixed_copy(self._main_file, self._private_dir())
                if fixed is None:
                    raise MemtraceError(
                        f"{self.path} is damaged and cannot be read ({_sqlite_message(e)})"
                    ) from None
                self._conn().close()
                self._db = _connect_file(fixed, immutable=False)
                self._open("the file is cut short")
        except _SQLITE_ERRORS as e:
            self.close()
            raise MemtraceError(f"{self.path} is damaged and cannot be read ({_sqlite_message(e)})") from None
        except BaseException:
            self.close()
            raise

    def _open(self, known_problem: Optional[str] = None) -> None:
        self._validate()
        problem = self._integrity_problem()
        problem = self._load_index() or problem
        if known_problem:
            problem = f"{known_problem}; {problem}" if problem else known_problem
        if problem:
            self._recover(problem)

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def complete(self) -> bool:
        """False when the recorder never closed the file (killed, crashed)."""
        return self.end_time is not None

    @property
    def duration_s(self) -> float:
        return self.points[-1].elapsed_s if self.points else 0.0

    def peak_index(self) -> Optional[int]:
        return peak_index(self.points)

    def index_at(self, when: When) -> int:
        """The snapshot for a time: 'end', 'peak', 'start', or the last
        snapshot taken at or before that many seconds (the first if earlier)."""
        if not self._rows:
            raise MemtraceError(f"{self.path} holds no snapshot: the recording ended before its first interval")
        w = parse_when(when)
        if w == "end":
            return len(self._rows) - 1
        if w == "start":
            return 0
        if w == "peak":
            return self.peak_index() or 0
        times = [p.elapsed_s for p in self.points]
        return max(0, bisect.bisect_right(times, float(w)) - 1)

    def snapshot(self, index: int) -> Snapshot:
        """Snapshot `index`. Should damage show up on the way there, the
        recording is cut before it (with a warning) and the last readable
        snapshot is returned: check len() afterwards."""
        if not 0 <= index < len(self._rows):
            raise IndexError(index)
        damage: Optional[_Damage] = None
        while True:
            try:
                built = self._snapshot(index)
                break
            except _Damage as e:
                # Going back can find more damage (snapshots on the way were
                # applied, not built): one warning, for where the cut ends.
                damage = e
                self._truncate_at(e)
                index = min(index, len(self._rows) - 1)
        if damage is not None:
            self._warn_cut(damage)
        return built

    def snapshot_at(self, when: When) -> tuple[int, Snapshot]:
        """(index, snapshot) for a time; see `index_at`."""
        while True:
            index = self.index_at(when)
            s = self.snapshot(index)
            if self.index_at(when) == index:
                return index, s

    def __iter__(self) -> Iterator[Snapshot]:
        i = 0
        while i < len(self._rows):
            s = self.snapshot(i)
            if i >= len(self._rows):
                return  # cut by damage: s repeats the last good one
            yield s
            i += 1

    def events(self, start_s: Optional[float] = None, end_s: Optional[float] = None) -> Iterator[dict[str, Any]]:
        """Address-space events as dicts, as written (`frames` restored,
        other fields as stored)."""
        where, args = [], []
        if start_s is not None:
            where.append("ts >= ?")
            args.append(start_s)
        if end_s is not None:
            where.append("ts <= ?")
            args.append(end_s)
        cols = schema.EVENT_COLUMNS
        query = f"SELECT {', '.join(cols)}, stack_id, extra FROM events"
        if where:
            query += " WHERE " + " AND ".join(where)
        try:
            for row in self._conn().execute(query + " ORDER BY id", args):
                event = {c: v for c, v in zip(cols, row) if v is not None}
                if row[-2] is not None:
                    event["frames"] = self._frames_of(row[-2])
                if row[-1]:
                    event.update(json.loads(row[-1]))
                yield event
        except _DECODE_ERRORS as e:
            self._warn(f"{self.path}: the event table is damaged ({_sqlite_message(e)}); later events are lost")

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ opening

    def _connect(self) -> sqlite3.Connection:
        _check_header(self.path)
        self._main_file = self.path
        wal = self.path + "-wal"
        try:
            has_wal = os.path.getsize(wal) > 0
        except OSError:
            has_wal = False
        if not has_wal:
            return _connect_file(self.path, immutable=True)
        try:
            copy = os.path.join(self._private_dir(), "recording")
            _copy_with_wal(self.path, copy)
        except OSError as e:
            self._warn(
                f"cannot read {wal} ({e.strerror or e}): its last intervals may be missing"
            )
            return _connect_file(self.path, immutable=True)
        self._main_file = copy
        return _connect_file(copy, immutable=False)

    def _private_dir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="memtrace-")  # mode 0700
            weakref.finalize(self, shutil.rmtree, self._workdir, ignore_errors=True)
        return self._workdir

    def _validate(self) -> None:
        db = self._conn()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if "meta" not in tables:
            raise MemtraceError(f"{self.path} is not a memtrace recording (an SQLite file without memtrace tables)")
        meta: dict[str, Any] = {}
        for key, value in db.execute("SELECT key, value FROM meta"):
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError):
                meta[key] = None
        if meta.get("format") != schema.FORMAT_NAME and app_id != schema.APPLICATION_ID:
            raise MemtraceError(f"{self.path} is not a memtrace recording")
        version = meta.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise MemtraceError(f"{self.path} is damaged: its format version is missing")
        if version > schema.SCHEMA_VERSION:
            raise MemtraceError(
                f"{self.path} was written by a newer memtrace (format {version}; this one reads up to "
                f"{schema.SCHEMA_VERSION}): upgrade memtrace to read it"
            )
        missing = [t for t in schema.tables(version) if t not in tables]
        if missing:
            raise MemtraceError(f"{self.path} is damaged: its table {missing[0]!r} is missing")
        self.schema_version: int = version
        metadata = meta.get("metadata")
        self.metadata: dict[str, Any] = metadata if isinstance(metadata, dict) else {}
        end_time = meta.get("end_time")
        self.end_time: Optional[float] = end_time if isinstance(end_time, (int, float)) else None

    def _integrity_problem(self) -> Optional[str]:
        # quick_check reads every page: truncation and broken pages are found
        # up front instead of in the middle of a replay.
        try:
            rows = self._conn().execute("PRAGMA quick_check(1)").fetchall()
        except _SQLITE_ERRORS as e:
            return _sqlite_message(e)
        first = str(rows[0][0]) if rows else "ok"
        return None if first == "ok" else _one_line(first)

    def _index_columns(self) -> str:
        # A file written before other_anon_bytes was stored lacks the column:
        # its rows read with that figure unknown.
        try:
            names = {r[1] for r in self._conn().execute("PRAGMA table_info(snapshots)")}
        except _SQLITE_ERRORS:
            names = set()
        other = "other_anon_bytes" if "other_anon_bytes" in names else "NULL"
        return ("id, elapsed_s, interval_s, rss_bytes, heap_live_bytes, gap_bytes, "
                f"{other}, full, thread_order, stack_order")

    def _load_index(self) -> Optional[str]:
        """Read the snapshots table; a problem found stops the index there."""
        db = self._conn()
        columns = self._index_columns()
        try:
            for row in db.execute(f"SELECT {columns} FROM snapshots ORDER BY id"):
                if not self._add_row(row):
                    return f"snapshot {len(self._rows) + 1} is missing or malformed"
            return None
        except _SQLITE_ERRORS as e:
            problem = _sqlite_message(e)
        # A broken page stopped the scan: look the next rows up one by one,
        # which only touches the pages on the way to each.
        while True:
            try:
                row = db.execute(
                    f"SELECT {columns} FROM snapshots WHERE id = ?", (len(self._rows) + 1,)
                ).fetchone()
            except _SQLITE_ERRORS:
                return problem
            if row is None or not self._add_row(row):
                return problem

    def _add_row(self, row: tuple) -> bool:
        sid, elapsed, interval, rss, live, gap, other, full, t_order, s_order = row
        ok = (
            sid == len(self._rows) + 1
            and isinstance(elapsed, (int, float))
            and isinstance(live, int)
            and (bool(full) or bool(self._rows))  # the first snapshot is always a keyframe
        )
        if ok:
            self._rows.append(_Row(float(elapsed), float(interval or 0.0), bool(full), t_order, s_order))
            # Damage can leave any type in a column SQLite types loosely: a
            # figure that is not an integer is unknown, never plotted.
            self.points.append(TimePoint(float(elapsed), live, _int_or_none(rss), _int_or_none(gap),
                                         _int_or_none(other)))
        return ok

    def _recover(self, problem: str) -> None:
        """Keep the snapshots that decode, up to the first that does not."""
        good = 0
        try:
            for i in range(len(self._rows)):
                self._snapshot(i)
                good = i + 1
        except _Damage as e:
            problem = f"{problem}; {e.args[0]}"
        if good == 0:
            self.close()
            raise MemtraceError(f"{self.path} is damaged and holds no readable snapshot ({problem})")
        self._truncate(good)
        self._warn(
            f"{self.path} is damaged ({problem}); using the first {good} snapshot(s),"
            f" up to {self.points[-1].elapsed_s:.1f}s"
        )

    def _truncate_at(self, damage: _Damage) -> None:
        what, bad = damage.args
        if bad == 0:
            raise MemtraceError(f"{self.path} is damaged and holds no readable snapshot ({what})")
        self._truncate(bad)

    def _warn_cut(self, damage: _Damage) -> None:
        what = damage.args[0]
        self._warn(
            f"{self.path} is damaged ({what}); using the first {len(self._rows)} snapshot(s),"
            f" up to {self.points[-1].elapsed_s:.1f}s"
        )

    def _truncate(self, count: int) -> None:
        del self._rows[count:]
        del self.points[count:]
        if self._state.index >= count:
            self._state = _State()

    # ------------------------------------------------------------ rebuilding

    def _snapshot(self, index: int) -> Snapshot:
        state = self._advance_to(index)
        if state.built is None:
            try:
                state.built = self._build(index, state)
            except _DECODE_ERRORS as e:
                raise _Damage(f"snapshot {index + 1} is unreadable: {_sqlite_message(e)}", index) from None
        return state.built

    def _advance_to(self, index: int) -> _State:
        keyframe = self._keyframe_at(index)
        state = self._state
        if not keyframe <= state.index <= index:
            state = self._state = _State(index=keyframe - 1)
        while state.index < index:
            nxt = state.index + 1
            try:
                self._apply(state, nxt)
            except _DECODE_ERRORS as e:
                # The state may be half-applied: start over next time.
                self._state = _State()
                raise _Damage(f"snapshot {nxt + 1} is unreadable: {_sqlite_message(e)}", nxt) from None
            state.index = nxt
        return state

    def _keyframe_at(self, index: int) -> int:
        i = index
        while not self._rows[i].full:
            i -= 1
        return i

    def _apply(self, state: _State, index: int) -> None:
        db = self._conn()
        sid = index + 1
        if self._rows[index].full:
            state.stacks, state.threads, state.sections, state.plain = {}, {}, {}, {}
            state.moved = set()
        touched: set[int] = set()
        for kind, data in db.execute("SELECT kind, data FROM changes WHERE snapshot_id = ?", (sid,)):
            if kind == "stacks":
                touched = changes.decode_stacks(data, state.stacks, self._frames_of)
            elif kind == "threads":
                changes.decode_threads(data, state.threads, self._tid_of)
        if self.schema_version > schema.FRAMES_AS_TEXT_UNTIL:
            state.moved = changes.settle_stacks(state.stacks, state.moved, touched)
        self._apply_sections(state, sid)
        state.built = None

    def _apply_sections(self, state: _State, sid: int) -> None:
        for name, value, delta in self._conn().execute(
            "SELECT name, value, delta FROM sections WHERE snapshot_id = ?", (sid,)
        ):
            if value is None:
                state.sections.pop(name, None)
                state.plain.pop(name, None)
                continue
            if isinstance(value, bytes):
                value = zlib.decompress(value).decode()
            plain = json.loads(value)
            if delta:
                plain = listdelta.apply_list_delta(state.plain[name], plain)
            state.plain[name] = plain
            state.sections[name] = section_kwargs(name, plain)

    def summary(self, index: int) -> Snapshot:
        """Snapshot `index` without its stacks and threads, read from its
        sections alone: what a report needs of the peak and of the end,
        without decoding 100,000 stacks twice more. Damage on the way is
        handled as snapshot() does."""
        if self._state.index == index and self._state.built is not None:
            return self._state.built
        try:
            state = _State()
            for i in range(self._keyframe_at(index), index + 1):
                self._apply_sections(state, i + 1)
            kwargs: dict[str, Any] = {}
            for part in state.sections.values():
                kwargs.update(part)
            row = self._rows[index]
            return Snapshot(**{**kwargs, "elapsed_s": row.elapsed_s, "interval_s": row.interval_s})
        except (*_DECODE_ERRORS, TypeError):
            return self.snapshot(index)

    def _build(self, index: int, state: _State) -> Snapshot:
        row = self._rows[index]
        kwargs: dict[str, Any] = {}
        for part in state.sections.values():
            kwargs.update(part)
        kwargs["elapsed_s"] = row.elapsed_s
        kwargs["interval_s"] = row.interval_s
        kwargs["threads"] = _ordered(state.threads, row.thread_order, thread_sort_key)
        kwargs["stacks"] = _ordered(state.stacks, row.stack_order, stack_sort_key)
        try:
            return Snapshot(**kwargs)
        except TypeError as e:
            raise SnapshotFormatError(f"sections are missing ({e})") from None

    def _frames_of(self, eid: int) -> tuple[str, ...]:
        frames = self._frames.get(eid)
        if frames is None:
            if self.schema_version <= schema.FRAMES_AS_TEXT_UNTIL:
                row = self._conn().execute("SELECT frames FROM stacks WHERE id = ?", (eid,)).fetchone()
                if row is None:
                    raise ValueError(f"stack {eid} is missing")
                value = json.loads(row[0])
                if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
                    raise ValueError(f"stack {eid} has malformed frames")
            else:
                self._load_stacks(eid)
                frames = self._frames.get(eid)
                if frames is None:
                    raise ValueError(f"stack {eid} is missing")
                return frames
            frames = self._frames[eid] = tuple(value)
        return frames

    def _load_stacks(self, eid: int) -> None:
        """Every stack up to the last one written, in one pass: a keyframe
        asks for all of them, one query each would be most of a report's
        time. A node's parent is written before it, so reading in id order
        finds each parent's frames already built."""
        db = self._conn()
        if self._frame_text is None:
            self._frame_text = {}
            for fid, text in db.execute("SELECT id, text FROM frames"):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "surrogatepass")  # the recorder's form of a non-UTF-8 name
                if not isinstance(fid, int) or not isinstance(text, str):
                    raise ValueError("the frames table is malformed")
                self._frame_text[fid] = text
        texts, frames = self._frame_text, self._frames
        start = max(frames, default=0)
        for sid, fid, parent in db.execute(
                "SELECT id, frame_id, parent FROM stacks WHERE id > ? ORDER BY id", (start,)):
            if fid is None:
                frames[sid] = ()
                continue
            try:
                frames[sid] = (texts[fid],) + (frames[parent] if parent is not None else ())
            except (KeyError, TypeError):
                raise ValueError(f"stack {sid} names a frame or a caller that is missing") from None

    def _tid_of(self, eid: int) -> int:
        tid = self._tids.get(eid)
        if tid is None:
            row = self._conn().execute("SELECT tid FROM threads WHERE id = ?", (eid,)).fetchone()
            if row is None or not isinstance(row[0], int):
                raise ValueError(f"thread {eid} is missing")
            tid = self._tids[eid] = row[0]
        return tid

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise MemtraceError(f"recording {self.path} is closed")
        return self._db


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) else None


def _ordered(entities: dict[int, Any], order: Optional[str], key: Callable[[Any], Any]) -> tuple:
    if order is None:
        return tuple(sorted(entities.values(), key=key))
    return tuple(entities[eid] for eid in json.loads(order))


def _wal_salts(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(32)[16:24]


def _copy_with_wal(path: str, copy: str) -> None:
    """Copy a file and its -wal that a recorder may be writing. The file
    first: a checkpoint meanwhile only moves pages into it that the WAL
    still holds. Unless the WAL started over (new salts in its header):
    then the copy mixes two moments, and it is made again."""
    for _ in range(5):
        salts = _wal_salts(path + "-wal")
        shutil.copyfile(path, copy)
        shutil.copyfile(path + "-wal", copy + "-wal")
        if _wal_salts(copy + "-wal") == salts:
            return


def _check_header(path: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        raise MemtraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MemtraceError(f"{path} is a directory, not a recording") from None
    except OSError as e:
        raise MemtraceError(f"cannot read {path}: {e.strerror}") from None
    if not head:
        raise MemtraceError(f"{path} is empty: the recording was cut off before its first write")
    if head != _SQLITE_MAGIC:
        raise MemtraceError(f"{path} is not a memtrace recording (not an SQLite file)")


def _connect_file(path: str, *, immutable: bool) -> sqlite3.Connection:
    """Read-only; `immutable` for a file nobody writes, which SQLite then
    reads without locks, journals or a -wal/-shm file of any kind. A
    private copy is opened normally so SQLite can take its WAL in."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path))
    if immutable:
        uri += "?mode=ro&immutable=1"
    try:
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        # Damage can put any bytes where text was: read them as text with
        # U+FFFD in place of the bad ones. Names then fail to match, JSON to
        # parse, and the damage is reported as such.
        db.text_factory = _text
        # Views or triggers in a crafted file must not reach functions with
        # side effects; we only ever read.
        db.execute("PRAGMA trusted_schema = OFF")
        db.execute("PRAGMA query_only = ON")
    except _SQLITE_ERRORS as e:
        raise MemtraceError(f"cannot open {path}: {_sqlite_message(e)}") from None
    return db


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _one_line(text: str) -> str:
    """SQLite's first finding, without its '*** in database main ***' banner."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("***")]
    return lines[0] if lines else text.strip()


def _header_fixed_copy(path: str, workdir: str) -> Optional[str]:
    """A copy in `workdir` of a truncated SQLite file with its header's page
    count set to the pages actually there; None if not truncated."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 100:
        return None
    page_size = int.from_bytes(data[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return None
    pages = len(data) // page_size
    claimed = int.from_bytes(data[28:32], "big")
    if pages == 0 or claimed <= pages:
        return None
    header = bytearray(data[: pages * page_size])
    header[28:32] = pages.to_bytes(4, "big")
    header[92:96] = header[24:28]  # marks the page count as valid
    copy = os.path.join(workdir, "cut-short")
    with open(copy, "wb") as f:
        f.write(header)
    return copy


def open_recording(path: str, *, warn: Callable[[str], None] = stderr_warning) -> Recording:
    return Recording(path, warn=warn)
