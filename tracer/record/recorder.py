"""The recorder sink: snapshots into an SQLite file, one transaction each.

While recording, the file is in WAL mode with a commit per interval: a
recorder killed with SIGKILL leaves every interval it committed in the file
and its `-wal` beside it, and the reader takes both. The WAL is folded into
the file every `CHECKPOINT_EVERY_S`, so the file alone holds nearly all of
it, and on close the file leaves WAL mode: a finished recording is one
self-contained file that can be copied, made read-only and read by anyone.
Only what changed since the previous snapshot is written (see
`memtrace.record.schema`), which keeps an hour of a busy process at 1 s well
under 100 MB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import memtrace
from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Snapshot, StackStats, ThreadStats
from memtrace.record import changes, listdelta, schema
from memtrace.record.seen import SeenStacks
from memtrace.record.codec import DERIVED_KEYS
from memtrace.record.timeline import time_point

# Parts of to_json() that are stored elsewhere than the `sections` table.
_NOT_SECTIONS = frozenset({"threads", "stacks", "elapsed_s"}) | DERIVED_KEYS

# A recorder killed mid-session leaves at most this much of it only in the
# -wal file (a checkpoint costs two fsyncs).
CHECKPOINT_EVERY_S = 10.0

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_REPEAT = object()  # marks the key of an identity repeated in one snapshot


def dumps(value: Any) -> str:
    # default=str: metadata may hold values JSON lacks (paths, enums).
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (a non-UTF-8 argv or path, decoded by Python)
            # cannot be stored as text; escaped, it reads back the same.
            text = json.dumps(value, separators=(",", ":"), default=str)
    return text


def encode_section(text: str) -> str | bytes:
    if len(text) >= schema.COMPRESS_MIN_BYTES:
        return zlib.compress(text.encode(), 6)
    return text


# The model's own orders (memtrace.model.snapshot.aggregate_*); the reader re-sorts
# with them, so files store an order only when a snapshot differs.
def stack_sort_key(s: StackStats) -> tuple:
    c = s.counters
    return (c.free_bytes - c.alloc_bytes, -c.alloc_bytes, s.frames)


def thread_sort_key(t: ThreadStats) -> tuple:
    c = t.counters
    return (c.free_bytes - c.alloc_bytes, -c.alloc_bytes, t.tid)


def _order_unless_canonical(by_id: dict[int, Any], items: tuple, key: Callable[[Any], Any]) -> Optional[str]:
    """The entity ids in snapshot order, or None when that order is the
    model's own sort, which the reader redoes: almost always. Strictly
    increasing keys also rule out ties, whose order a sort would not keep."""
    keys = [key(item) for item in items]
    if all(a < b for a, b in zip(keys, keys[1:])):
        return None
    return dumps(list(by_id))


def _frames_of(s: StackStats) -> tuple[str, ...]:
    return s.frames


def _tid_of(t: ThreadStats) -> int:
    return t.tid


def default_metadata() -> dict[str, Any]:
    uname = os.uname()
    meta: dict[str, Any] = {
        "host": socket.gethostname(),
        "kernel": uname.release,
        "machine": uname.machine,
        "memtrace_version": memtrace.__version__,
        "start_time": time.time(),
    }
    try:
        # The tracer's own glibc; the caller's "glibc" (the target's) wins.
        meta["glibc"] = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        pass
    return meta


def _create_private(path: str, overwrite: bool) -> None:
    # Created 0600 from the start: stacks and command lines can be sensitive,
    # and a chmod afterwards would leave a window.
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if overwrite:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise MemtraceError(f"{path} already exists: choose another file name or remove it") from None
    except OSError as e:
        raise MemtraceError(f"cannot create recording {path}: {e.strerror}") from None
    os.close(fd)


class Recorder:
    """Sink writing snapshots (and address-space events) to `path`.

    `metadata` holds what the caller knows (command line, pid, glibc version,
    start time, options); host, kernel and memtrace version are added here.
    """

    def __init__(self, path: str, metadata: Optional[Mapping[str, Any]] = None, *, overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        _create_private(self.path, overwrite)
        self._db: Optional[sqlite3.Connection] = None
        self._in_txn = False
        self._failed: Optional[str] = None
        self._next_snapshot_id = 1
        # Keyframe policy (schema.KEYFRAME_*): bytes of the last keyframe,
        # bytes written since, snapshots since.
        self._keyframe_bytes = 0
        self._bytes_since_keyframe = 0
        self._since_keyframe = 0
        self._frame_ids: dict[str, int] = {}
        # (innermost frame id, parent stack id) -> stack id: the call tree.
        self._nodes: dict[tuple[int, Optional[int]], int] = {}
        self._checkpointed_at = time.monotonic()
        # identity (frames, tid) -> entity id; repeats within a snapshot
        # are keyed (_REPEAT, identity, n).
        self._stack_ids: dict[Any, int] = {}
        self._thread_ids: dict[Any, int] = {}
        # The previous snapshot's entities by id, to write only changes.
        self._stacks: dict[int, StackStats] = {}
        self._seen: Optional[SeenStacks] = None  # the previous snapshot's stacks, by identity
        self._threads: dict[int, ThreadStats] = {}
        self._sections: dict[str, tuple[str, Any]] = {}  # name -> (JSON text, value)
        meta = default_metadata()
        meta.update(metadata or {})
        with self._errors("create"):
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            db.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
            # Exclusive before WAL: the WAL index lives in our memory, not in
            # a -shm file beside the recording, and no other process can
            # write to it or checkpoint it while we record. Readers read a
            # copy of a file being written (memtrace.record.reader).
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives the process being killed
            # (not a power cut), without an fsync per interval.
            db.execute("PRAGMA synchronous = NORMAL")
            # The script's BEGIN stays open: tables and meta land together.
            db.executescript("BEGIN;\n" + schema.DDL)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("format", dumps(schema.FORMAT_NAME)),
                    ("schema_version", dumps(schema.SCHEMA_VERSION)),
                    ("metadata", dumps(meta)),
                ],
            )
            db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
            db.execute("COMMIT")

    # ------------------------------------------------------------ sink API

    def write(self, snapshot: Snapshot) -> None:
        """Store one interval and commit it, together with the events
        written since the previous interval."""
        db = self._conn()
        with self._errors("write to"), self._stop_on_failure():
            self._begin()
            sid = self._next_snapshot_id
            full = self._keyframe_due()
            if full:
                # Written against an empty state: the keyframe stands alone.
                self._stacks, self._threads, self._sections = {}, {}, {}
            self._written = 0
            point = time_point(snapshot)
            thread_order = self._write_threads(db, sid, snapshot.threads)
            stack_order = self._write_stacks(db, sid, snapshot.stacks)
            db.execute(
                "INSERT INTO snapshots (id, elapsed_s, interval_s, rss_bytes, heap_live_bytes, gap_bytes,"
                " other_anon_bytes, full, thread_order, stack_order) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, snapshot.elapsed_s, snapshot.interval_s, point.rss_bytes, point.heap_live_bytes,
                 point.allocator_retained_bytes, point.other_anon_bytes, int(full), thread_order, stack_order),
            )
            self._write_sections(db, sid, snapshot)
            db.execute("COMMIT")
            self._in_txn = False
            self._next_snapshot_id += 1
            if full:
                self._keyframe_bytes, self._bytes_since_keyframe, self._since_keyframe = self._written, 0, 0
            else:
                self._bytes_since_keyframe += self._written
            self._since_keyframe += 1
            if time.monotonic() - self._checkpointed_at >= CHECKPOINT_EVERY_S:
                self._checkpointed_at = time.monotonic()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # the interval is committed; the WAL keeps it until a checkpoint succeeds

    def write_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Address-space events as dicts: ts, tid, kind, addr, length, prot,
        flags, result, in_malloc, and `frames` (innermost first) for the
        stack. Other keys are kept as they are. Committed with the next
        snapshot (or on close)."""
        db = self._conn()
        with self._errors("write to"), self._stop_on_failure():
            self._begin()
            rows = [self._event_row(db, e) for e in events]
            db.executemany(
                "INSERT INTO events (ts, tid, kind, addr, length, prot, flags, result, in_malloc,"
                " stack_id, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def close(self) -> None:
        """Mark the recording finished and make it one file. Raises (after
        closing) if that fails; what was committed stays readable."""
        db, self._db = self._db, None
        if db is None:
            return  # closed already, or stopped by a failed write
        with self._errors("finish"):
            try:
                if not self._in_txn:
                    db.execute("BEGIN")
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('end_time', ?)", (dumps(time.time()),)
                )
                db.execute("COMMIT")
                self._in_txn = False
                # Folds the WAL in and removes it: no file beside the recording.
                mode = db.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
                if str(mode).lower() != "delete":
                    raise sqlite3.OperationalError(f"its -wal file could not be folded in; keep it beside {self.path}")
            finally:
                _close_quietly(db)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _conn(self) -> sqlite3.Connection:
        if self._failed is not None:
            raise MemtraceError(f"recording {self.path} stopped after an earlier error ({self._failed})")
        if self._db is None:
            raise MemtraceError(f"recording {self.path} is already closed")
        return self._db

    @contextlib.contextmanager
    def _stop_on_failure(self) -> Iterator[None]:
        """A write that fails half-way is rolled back, and the recorder stops:
        its idea of what the file holds would no longer be true. What was
        committed before stays readable."""
        try:
            yield
        except BaseException as e:
            self._failed = str(e) or type(e).__name__
            db, self._db = self._db, None
            if db is not None:
                _close_quietly(db)
            raise

    def _begin(self) -> None:
        if not self._in_txn:
            self._conn().execute("BEGIN")
            self._in_txn = True

    def _errors(self, verb: str) -> "_SqliteErrors":
        return _SqliteErrors(f"cannot {verb} recording {self.path}")

    def _keyframe_due(self) -> bool:
        if self._next_snapshot_id == 1:
            return True
        if self._since_keyframe < schema.KEYFRAME_EVERY:
            return False
        return (self._since_keyframe >= schema.KEYFRAME_MAX_EVERY
                or self._bytes_since_keyframe >= schema.KEYFRAME_WEIGHT * self._keyframe_bytes)

    def _frame_id(self, db: sqlite3.Connection, text: str) -> int:
        fid = self._frame_ids.get(text)
        if fid is None:
            stored: str | bytes = text
            if not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    # A lone surrogate (a name that is not UTF-8, decoded by
                    # Python) is no SQLite text: its bytes as a BLOB.
                    stored = text.encode("utf-8", "surrogatepass")
            fid = self._frame_ids[text] = _rowid(db.execute("INSERT INTO frames (text) VALUES (?)", (stored,)))
        return fid

    def _new_stack(self, db: sqlite3.Connection, frames: tuple[str, ...], dup: int) -> int:
        """The stack's node in the call tree, with the nodes of its callers
        that are not there yet; a repeat (dup > 0) gets a node of its own."""
        if not frames:
            return _rowid(db.execute("INSERT INTO stacks (frame_id, parent, dup) VALUES (NULL, NULL, ?)", (dup,)))
        parent: Optional[int] = None
        last = len(frames) - 1
        for depth in range(last, -1, -1):
            key = (self._frame_id(db, frames[depth]), parent)
            node = self._nodes.get(key) if depth or not dup else None
            if node is None:
                node = _rowid(db.execute("INSERT INTO stacks (frame_id, parent, dup) VALUES (?, ?, ?)",
                                         (*key, 0 if depth else dup)))
                if depth or not dup:
                    self._nodes[key] = node
            parent = node
        assert parent is not None
        return parent

    def _new_thread(self, db: sqlite3.Connection, tid: int, dup: int) -> int:
        return _rowid(db.execute("INSERT INTO threads (tid, dup) VALUES (?, ?)", (tid, dup)))

    def _by_id(self, db, items: tuple, identity: Callable[[Any], Any], ids: dict, create) -> dict[int, Any]:
        """Entity id -> item, in snapshot order. An identity seen twice in one
        snapshot (the model never does this) gets ids of its own per repeat."""
        now: dict[int, Any] = {}
        for item in items:
            ident = identity(item)
            eid = ids.get(ident)
            if eid is None:
                eid = ids[ident] = create(db, ident, 0)
            if eid in now:
                break
            now[eid] = item
        else:
            return now
        now = {}
        seen: dict[Any, int] = {}
        for item in items:
            ident = identity(item)
            dup = seen.get(ident, 0)
            seen[ident] = dup + 1
            key = ident if dup == 0 else (_REPEAT, ident, dup)
            eid = ids.get(key)
            if eid is None:
                eid = ids[key] = create(db, ident, dup)
            now[eid] = item
        return now

    def _write_stacks(self, db: sqlite3.Connection, sid: int, stacks: tuple[StackStats, ...]) -> Optional[str]:
        # After a keyframe's reset (no stacks before), every stack is written.
        found = self._seen.since(stacks, stack_sort_key) if self._seen is not None and self._stacks else None
        if found is not None and self._write_new_stacks(db, sid, stacks, *found):
            return None
        now = self._by_id(db, stacks, _frames_of, self._stack_ids, self._new_stack)
        data = changes.encode_stacks(self._stacks, now)
        if data is not None:
            db.execute("INSERT INTO changes (snapshot_id, kind, data) VALUES (?, 'stacks', ?)", (sid, data))
            self._written += len(data)
        self._stacks = now
        order = _order_unless_canonical(now, stacks, stack_sort_key)
        self._seen = SeenStacks(stacks, order is None,
                                [(eid, st) for eid, st in now.items() if st.live_delta_bytes])
        return order

    def _write_new_stacks(self, db: sqlite3.Connection, sid: int, stacks: tuple[StackStats, ...],
                          fresh: Sequence[StackStats], gone: Sequence[StackStats],
                          places: Optional[dict[int, int]],
                          replaced: Optional[Sequence[Optional[StackStats]]] = None) -> bool:
        """The records of the stacks that are new objects, went, or still
        grow (memtrace.record.seen): the same records as encode_stacks
        over them all. False when two stacks share their frames: the caller
        then takes every stack."""
        if replaced is not None and len(replaced) == len(fresh):
            return self._write_replaced(db, sid, stacks, fresh, gone, places, replaced)
        before: dict[int, StackStats] = {}
        after: dict[int, StackStats] = {}
        went = set(map(id, gone))  # of the previous snapshot's stacks, those not kept
        for st in gone:
            eid = self._stack_ids.get(st.frames)
            if eid is None or self._stacks.get(eid) is not st:
                return False
            before[eid] = st
        moving, stilled = [], {}
        for eid, st in self._seen.moving:
            if id(st) not in went:  # the same object, growth and all: its record says it grew again
                before[eid] = after[eid] = st
                moving.append((eid, st))
        for st in fresh:
            eid = self._stack_ids.get(st.frames)
            if eid is None:
                eid = self._stack_ids[st.frames] = self._new_stack(db, st.frames, 0)
            else:
                old = self._stacks.get(eid)
                if eid in after or eid in stilled or (old is not None and id(old) not in went):
                    return False
                if old is not None and old.live_delta_bytes and not st.live_delta_bytes \
                        and changes.same_but_growth(old, st):
                    stilled[eid] = st  # it only stopped growing: no record says so
                    before.pop(eid, None)
                    continue
                if old is not None:
                    before[eid] = old
            after[eid] = st
            if st.live_delta_bytes:
                moving.append((eid, st))
        data = changes.encode_stacks(before, after)
        if data is not None:
            db.execute("INSERT INTO changes (snapshot_id, kind, data) VALUES (?, 'stacks', ?)", (sid, data))
            self._written += len(data)
        for eid in before:
            del self._stacks[eid]
        self._stacks.update(after)
        self._stacks.update(stilled)
        self._seen = SeenStacks(stacks, True, moving, places)
        return True

    def _write_replaced(self, db: sqlite3.Connection, sid: int, stacks: tuple[StackStats, ...],
                        fresh: Sequence[StackStats], gone: Sequence[StackStats],
                        places: Optional[dict[int, int]],
                        replaced: Sequence[Optional[StackStats]]) -> bool:
        """_write_new_stacks when the producer says which object each new one
        replaced: each pair is one lookup of its frames, where finding the
        gone ones' ids too, and a dictionary of each side, took as long
        again (4,000 stacks a snapshot at 2,000 changes a second). The
        same records. A pair whose replaced object is not its stack's
        current one, or a stack twice, and the caller takes every stack."""
        ids, current = self._stack_ids, self._stacks
        went = set(map(id, gone))
        kept_out = went.difference(map(id, replaced))  # of gone, those not replaced: they went
        changed: list[tuple[int, Optional[StackStats], Optional[StackStats]]] = []
        seen_ids: set[int] = set()
        moving: list[tuple[int, StackStats]] = []
        for eid, st in self._seen.moving:
            if id(st) not in went:  # the same object, growth and all: its record says it grew again
                changed.append((eid, st, st))
                seen_ids.add(eid)
                moving.append((eid, st))
        stilled: list[tuple[int, StackStats]] = []
        for st, old in zip(fresh, replaced):
            eid = ids.get(st.frames)
            if eid is None:
                if old is not None:
                    return False
                eid = ids[st.frames] = self._new_stack(db, st.frames, 0)
            elif eid in seen_ids or current.get(eid) is not old:
                return False
            seen_ids.add(eid)
            if old is not None and old.live_delta_bytes and not st.live_delta_bytes \
                    and changes.same_but_growth(old, st):
                stilled.append((eid, st))  # it only stopped growing: no record says so
                continue
            changed.append((eid, st, old))
            if st.live_delta_bytes:
                moving.append((eid, st))
        for st in gone:
            if id(st) in kept_out:
                eid = ids.get(st.frames)
                if eid is None or eid in seen_ids or current.get(eid) is not st:
                    return False
                seen_ids.add(eid)
                changed.append((eid, None, st))
        data = changes.encode_stack_changes(changed)
        if data is not None:
            db.execute("INSERT INTO changes (snapshot_id, kind, data) VALUES (?, 'stacks', ?)", (sid, data))
            self._written += len(data)
        for eid, st, _ in changed:
            if st is None:
                del current[eid]
            else:
                current[eid] = st
        current.update(stilled)
        self._seen = SeenStacks(stacks, True, moving, places)
        return True

    def _write_threads(self, db: sqlite3.Connection, sid: int, threads: tuple[ThreadStats, ...]) -> Optional[str]:
        now = self._by_id(db, threads, _tid_of, self._thread_ids, self._new_thread)
        data = changes.encode_threads(self._threads, now)
        if data is not None:
            db.execute("INSERT INTO changes (snapshot_id, kind, data) VALUES (?, 'threads', ?)", (sid, data))
            self._written += len(data)
        self._threads = now
        return _order_unless_canonical(now, threads, thread_sort_key)

    def _write_sections(self, db: sqlite3.Connection, sid: int, snapshot: Snapshot) -> None:
        # Threads and stacks are stored apart: leave them out of the JSON.
        parts = dataclasses.replace(snapshot, stacks=(), threads=()).to_json()
        now = {k: (dumps(v), v) for k, v in parts.items() if k not in _NOT_SECTIONS}
        rows: list[tuple[int, str, Any, int]] = []
        for name, (text, value) in now.items():
            before = self._sections.get(name)
            if before is not None and before[0] == text:
                continue
            stored, is_delta = text, 0
            ident = listdelta.KEYED_SECTIONS.get(name)
            if ident and before is not None:
                delta = listdelta.list_delta(before[1], value, ident)
                if delta is not None:
                    delta_text = dumps(delta)
                    if len(delta_text) < len(text):
                        stored, is_delta = delta_text, 1
            rows.append((sid, name, encode_section(stored), is_delta))
        rows += [(sid, name, None, 0) for name in self._sections.keys() - now.keys()]
        self._written += sum(len(r[2]) for r in rows if r[2] is not None)
        db.executemany("INSERT INTO sections (snapshot_id, name, value, delta) VALUES (?, ?, ?, ?)", rows)
        self._sections = now

    def _event_row(self, db: sqlite3.Connection, event: Mapping[str, Any]) -> tuple:
        values = []
        extra = {k: v for k, v in event.items() if k not in schema.EVENT_COLUMNS and k != "frames"}
        for col in schema.EVENT_COLUMNS:
            v = event.get(col)
            if isinstance(v, bool):
                v = int(v)
            elif isinstance(v, int) and not _INT64_MIN <= v <= _INT64_MAX:
                # SQLite integers are 64-bit signed; JSON keeps any size.
                extra[col], v = v, None
            values.append(v)
        frames = event.get("frames")
        stack_id = None
        if frames is not None:
            frames = tuple(frames)
            stack_id = self._stack_ids.get(frames)
            if stack_id is None:
                stack_id = self._stack_ids[frames] = self._new_stack(db, frames, 0)
        return (*values, stack_id, dumps(extra) if extra else None)


def _close_quietly(db: sqlite3.Connection) -> None:
    """Roll back what is open, and try to leave the file whole and alone.
    On a full disk folding the WAL in fails: the -wal file stays, holding
    the last commits, and the reader takes it in."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error:
        pass
    finally:
        db.close()


def _rowid(cursor: sqlite3.Cursor) -> int:
    rowid = cursor.lastrowid
    assert rowid is not None  # an INSERT always sets it
    return rowid


class _SqliteErrors:
    """Turns SQLite failures (disk full, I/O errors) into a one-line
    MemtraceError naming the file."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise MemtraceError(f"{self.what}: {exc}") from None
