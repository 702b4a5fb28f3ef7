"""The pprof report: a gzip-compressed profile.proto, for `go tool pprof`
and the tools that read it (Pyroscope, Parca, Speedscope, Grafana).

The profile carries the four values Go's own heap profiles have, under
Go's names, so pprof's usual flags work (`-sample_index=alloc_space`), and
retained_space where the arenas were measured; the default is the one
`--by` names. One Location per distinct frame (the full frame string as it
was symbolized), one Function per function and module.

`report --format pprof` and `--serve`'s /debug/pprof/heap are both this
profile: the server passes the snapshots of its targets, each sample
labelled with its pid and comm.
"""

from __future__ import annotations

import gzip
from typing import BinaryIO, Optional, Sequence

from memtrace.model.snapshot import Snapshot
from memtrace.output.reports.common import ReportData, check_by, command_line
from memtrace.model.frames import split_frame

# (type, unit) in sample order, as Go writes a heap profile.
SAMPLE_TYPES = (
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
)
RETAINED = ("retained_space", "bytes")
_DEFAULT_FOR = {"live": "inuse_space", "allocated": "alloc_space", "retained": "retained_space"}


class _Strings:
    """pprof's string table: index 0 is the empty string."""

    def __init__(self) -> None:
        self.table: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def __call__(self, text: Optional[str]) -> int:
        if not text:
            return 0
        i = self.index.get(text)
        if i is None:
            i = self.index[text] = len(self.table)
            self.table.append(text)
        return i


class _Builder:
    """One profile from one or more snapshots, sharing the tables."""

    def __init__(self, retained: bool, by: str) -> None:
        from memtrace.output.reports.profile_proto import Profile

        self.strings = _Strings()
        self.profile = Profile()
        self.retained = retained
        for type_name, unit in SAMPLE_TYPES + ((RETAINED,) if retained else ()):
            self.profile.sample_type.add(type=self.strings(type_name), unit=self.strings(unit))
        self.profile.default_sample_type = self.strings(_DEFAULT_FOR[by])
        self.profile.period_type.type = self.strings("space")
        self.profile.period_type.unit = self.strings("bytes")
        self.profile.period = 1
        self._mappings: dict[str, int] = {}
        self._functions: dict[tuple[str, str], int] = {}
        self._locations: dict[str, int] = {}

    def _mapping_id(self, module: Optional[str]) -> int:
        if not module:
            return 0
        mid = self._mappings.get(module)
        if mid is None:
            mid = self._mappings[module] = len(self._mappings) + 1
            self.profile.mapping.add(id=mid, filename=self.strings(module), has_functions=True)
        return mid

    def _location_id(self, frame: str) -> int:
        lid = self._locations.get(frame)
        if lid is None:
            func, module = split_frame(frame)
            name = func or (f"[{module}]" if module else frame.strip() or "[unknown]")
            fkey = (name, module or "")
            fid = self._functions.get(fkey)
            if fid is None:
                fid = self._functions[fkey] = len(self._functions) + 1
                self.profile.function.add(id=fid, name=self.strings(name),
                                          system_name=self.strings(frame),
                                          filename=self.strings(module))
            lid = self._locations[frame] = len(self._locations) + 1
            loc = self.profile.location.add(id=lid, mapping_id=self._mapping_id(module))
            loc.line.add(function_id=fid)
        return lid

    def add(self, s: Snapshot, labels: Sequence[tuple[str, str]] = ()) -> None:
        for st in s.stacks:
            c = st.counters
            values = [c.alloc_count, c.alloc_bytes, c.live_count, c.live_bytes]
            if self.retained:
                values.append(st.retained_bytes)
            if not any(values):
                continue
            sample = self.profile.sample.add(
                location_id=[self._location_id(f) for f in st.frames], value=values)
            for key, text in labels:
                sample.label.add(key=self.strings(key), str=self.strings(text))
            if st.tids:
                sample.label.add(key=self.strings("threads"),
                                 str=self.strings(",".join(str(t) for t in st.tids)))

    def comment(self, text: str) -> None:
        self.profile.comment.append(self.strings(text))

    def finish(self):  # -> profile_proto.Profile
        self.profile.string_table.extend(self.strings.table)
        return self.profile


def _target_labels(s: Snapshot) -> tuple[tuple[str, str], ...]:
    return (("pid", str(s.pid)), ("comm", s.comm))


def build_profile(data: ReportData):  # -> profile_proto.Profile
    check_by(data.snapshot, data.by)
    s = data.snapshot
    builder = _Builder(s.has_retained, data.by)
    builder.add(s, _target_labels(s))
    profile = builder.profile
    start = data.metadata.get("start_time")
    if isinstance(start, (int, float)):
        profile.time_nanos = int((start + s.elapsed_s) * 1e9)
    profile.duration_nanos = int(s.elapsed_s * 1e9)
    builder.comment(f"memtrace: pid {s.pid} ({s.comm}) at {s.elapsed_s:.1f}s")
    cmd = command_line(data.metadata)
    if cmd:
        builder.comment(f"command: {cmd}")
    return builder.finish()


def build_fleet_profile(snapshots: Sequence[Snapshot], time_nanos: int):
    """The live profile of several targets at once, each sample labelled
    with its target's pid and comm (`go tool pprof -tagfocus pid=1234`)."""
    builder = _Builder(any(s.has_retained for s in snapshots), "live")
    for s in snapshots:
        builder.add(s, _target_labels(s))
        builder.comment(f"memtrace: pid {s.pid} ({s.comm}) at {s.elapsed_s:.1f}s")
    builder.profile.time_nanos = time_nanos
    builder.profile.duration_nanos = int(max((s.elapsed_s for s in snapshots), default=0) * 1e9)
    return builder.finish()


def gzipped(profile) -> bytes:
    # mtime=0: the same snapshot gives the same bytes.
    return gzip.compress(profile.SerializeToString(), mtime=0)


class PprofReporter:
    binary = True

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: BinaryIO) -> None:
        out.write(gzipped(build_profile(self.data)))
