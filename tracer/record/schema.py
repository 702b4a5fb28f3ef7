"""The recording file: an SQLite database, described once for writer and reader.

Layout, and why:
- `meta`: key -> JSON value. `format` names the file as ours,
  `schema_version` is checked on open, `metadata` holds the session facts.
- `snapshots`: one row per interval, with the few numbers the reader needs
  without decoding anything (time, RSS, heap live, and the gap's allocator
  retained and other parts) for `--at`, `peak` and the over-time chart.
- `sections`: every top-level part of `Snapshot.to_json()` other than threads
  and stacks (`process`, `heap`, `os`, `arenas`, `regions`, `gap`, ...), as
  JSON, written only when it changed; lists of items with an identity
  (arenas, regions) as per-item changes. A new section needs no change here.
- `frames`: each distinct symbolized frame once, as text, by id.
- `stacks` / `threads`: each entity once, with a stable id. A stack is its
  innermost frame's id and the id of the stack of its callers (`parent`,
  the same frames without the innermost): the stacks form the call tree,
  and a stack's outer frames, shared with its siblings, are stored once.
  A service has tens of thousands of stacks of dozens of frames each, made
  of a few thousand distinct frames: stored as text (format 1) the stacks
  took 200 MB; as tree nodes, about ten bytes each.
- `changes`: per snapshot and entity kind, the entities whose counters
  changed, as one zlib-compressed JSON list (see `memtrace.record.changes`).
  A busy process changes thousands of (thread, stack) counters a second; one
  row each would pass 100 MB an hour, packed they take a third of that. The
  reader carries each entity's last record forward. Now and then the whole
  state is written instead (`full`, a keyframe): at least `KEYFRAME_EVERY`
  snapshots apart, and only once the changes written since the last one
  weigh `KEYFRAME_WEIGHT` times that keyframe, or `KEYFRAME_MAX_EVERY`
  snapshots have passed. Reaching any time then decodes at most about
  (1 + KEYFRAME_WEIGHT) keyframes' worth of records, and keyframes cost at
  most 1 / KEYFRAME_WEIGHT of the changes: with 50,000 stacks a keyframe a
  minute would be half of an hour's file.
- `events`: address-space events, one row each.

An older file stays readable by a newer memtrace (format 1 stored each
stack's frames as a JSON list of text in `stacks.frames`, and had no
`frames` table; a file without `snapshots.other_anon_bytes` has that figure
unknown); a file with a newer `schema_version` is refused with a request to
upgrade.
"""

from __future__ import annotations

FORMAT_NAME = "memtrace-recording"
SCHEMA_VERSION = 2
# Format 1: stacks.frames held the frames as text; no frames table.
FRAMES_AS_TEXT_UNTIL = 1

# SQLite header field that marks the file as ours before any table is read
# ('mTrc').
APPLICATION_ID = 0x6D547263

# Section values at least this long are stored zlib-compressed (a BLOB);
# shorter ones as JSON text. Address-space sections can be large.
COMPRESS_MIN_BYTES = 1024

# Keyframes: at least this many snapshots apart (a minute at 1 s) ...
KEYFRAME_EVERY = 64
# ... once the changes since the last one weigh this many times it ...
KEYFRAME_WEIGHT = 2.0
# ... or after this many snapshots whatever they weigh (10 min at 1 s).
KEYFRAME_MAX_EVERY = 600

TABLES = ("meta", "snapshots", "sections", "frames", "stacks", "threads", "changes", "events")


def tables(version: int) -> tuple[str, ...]:
    """The tables a file of this format version has."""
    if version <= FRAMES_AS_TEXT_UNTIL:
        return tuple(t for t in TABLES if t != "frames")
    return TABLES

DDL = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE snapshots (
    id              INTEGER PRIMARY KEY,
    elapsed_s       REAL NOT NULL,
    interval_s      REAL NOT NULL,
    rss_bytes       INTEGER,
    heap_live_bytes INTEGER NOT NULL,
    gap_bytes       INTEGER,  -- the gap's allocator retained part (named before the gap had parts)
    -- The gap's other part: anonymous RSS neither heap live nor retained.
    -- Files written before it have no such column; their readers plot no
    -- 'other' series.
    other_anon_bytes INTEGER,
    -- 1: a keyframe. Its changes and sections hold the whole state, so a
    -- reader jumping to a time starts at the keyframe before it.
    full            INTEGER NOT NULL DEFAULT 0,
    -- JSON list of entity ids when the snapshot's order is not the model's
    -- own sort order; NULL otherwise (nearly always).
    thread_order    TEXT,
    stack_order     TEXT
);
CREATE TABLE sections (
    snapshot_id INTEGER NOT NULL,
    name        TEXT NOT NULL,
    value,      -- JSON text, zlib(JSON) blob, or NULL: section gone
    delta       INTEGER NOT NULL DEFAULT 0,  -- 1: a list delta (memtrace.record.listdelta)
    PRIMARY KEY (snapshot_id, name)
) WITHOUT ROWID;
CREATE TABLE frames (
    id   INTEGER PRIMARY KEY,
    text NOT NULL  -- 'function+0x1a [module]', as symbolized; a BLOB (UTF-8 with
                   -- surrogates) for a name that is not UTF-8
);
CREATE TABLE stacks (
    id       INTEGER PRIMARY KEY,
    frame_id INTEGER,  -- frames.id of the innermost frame; NULL: no frames
    parent   INTEGER,  -- stacks.id of the callers' frames; NULL: the outermost
    dup      INTEGER NOT NULL DEFAULT 0  -- >0 only if one snapshot repeats frames
);
-- For the sqlite3 shell: each stack's frames as text, depth 0 innermost.
CREATE VIEW stack_frames AS
    WITH RECURSIVE walk(stack_id, depth, node) AS (
        SELECT id, 0, id FROM stacks
        UNION ALL
        SELECT w.stack_id, w.depth + 1, s.parent FROM walk w JOIN stacks s ON s.id = w.node
        WHERE s.parent IS NOT NULL
    )
    SELECT w.stack_id, w.depth, f.text AS frame
    FROM walk w JOIN stacks s ON s.id = w.node JOIN frames f ON f.id = s.frame_id;
CREATE TABLE threads (
    id  INTEGER PRIMARY KEY,
    tid INTEGER NOT NULL,
    dup INTEGER NOT NULL DEFAULT 0  -- >0 only if one snapshot repeats a tid
);
CREATE TABLE changes (
    snapshot_id INTEGER NOT NULL,
    kind        TEXT NOT NULL,  -- 'stacks' or 'threads'
    data        BLOB NOT NULL,  -- zlib(JSON list of change records)
    PRIMARY KEY (snapshot_id, kind)
) WITHOUT ROWID;
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    ts        REAL,
    tid       INTEGER,
    kind      TEXT,
    addr      INTEGER,
    length    INTEGER,
    prot      INTEGER,
    flags     INTEGER,
    result    INTEGER,
    stack_id  INTEGER,  -- stacks.id
    in_malloc INTEGER,
    extra     TEXT      -- JSON object of any other fields
);
CREATE INDEX events_by_ts ON events (ts);
"""

EVENT_COLUMNS = ("ts", "tid", "kind", "addr", "length", "prot", "flags", "result", "in_malloc")
