"""The pprof report: a gzip-compressed profile.proto, for `go tool pprof`
and the tools that read it (Pyroscope, Speedscope, Grafana).

The profile carries the four values Go's own heap profiles have, so pprof's
usual flags work (`-sample_index=alloc_space`); the default is the one
`--by` names. One Location per distinct frame (the full frame string as it
was symbolized), one Function per function and module.
"""

from __future__ import annotations

import gzip
from typing import BinaryIO, Optional

from memtrace.reporters.common import ReportData, check_by, command_line, stack_weight
from memtrace.view.fmt import split_frame

# (type, unit) in sample order; --by picks the default.
SAMPLE_TYPES = (
    ("alloc_objects", "count"),
    ("alloc_space", "bytes"),
    ("inuse_objects", "count"),
    ("inuse_space", "bytes"),
)
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


def build_profile(data: ReportData):  # -> profile_proto.Profile
    from memtrace.reporters.profile_proto import Profile

    check_by(data.snapshot, data.by)
    s = data.snapshot
    strings = _Strings()
    profile = Profile()
    sample_types = list(SAMPLE_TYPES)
    if data.by == "retained":
        sample_types.append(("retained_space", "bytes"))
    for type_name, unit in sample_types:
        profile.sample_type.add(type=strings(type_name), unit=strings(unit))
    profile.default_sample_type = strings(_DEFAULT_FOR[data.by])
    profile.period_type.type = strings("space")
    profile.period_type.unit = strings("bytes")
    profile.period = 1

    mappings: dict[str, int] = {}
    functions: dict[tuple[str, str], int] = {}
    locations: dict[str, int] = {}

    def mapping_id(module: Optional[str]) -> int:
        if not module:
            return 0
        mid = mappings.get(module)
        if mid is None:
            mid = mappings[module] = len(mappings) + 1
            profile.mapping.add(id=mid, filename=strings(module), has_functions=True)
        return mid

    def location_id(frame: str) -> int:
        lid = locations.get(frame)
        if lid is None:
            func, module = split_frame(frame)
            name = func or (f"[{module}]" if module else frame.strip() or "[unknown]")
            fkey = (name, module or "")
            fid = functions.get(fkey)
            if fid is None:
                fid = functions[fkey] = len(functions) + 1
                profile.function.add(id=fid, name=strings(name), system_name=strings(frame), filename=strings(module))
            lid = locations[frame] = len(locations) + 1
            loc = profile.location.add(id=lid, mapping_id=mapping_id(module))
            loc.line.add(function_id=fid)
        return lid

    for st in s.stacks:
        c = st.counters
        values = [c.alloc_count, c.alloc_bytes, c.live_count, c.live_bytes]
        if data.by == "retained":
            values.append(stack_weight(st, "retained"))
        if not any(values):
            continue
        sample = profile.sample.add(location_id=[location_id(f) for f in st.frames], value=values)
        if st.tids:
            lab = sample.label.add(key=strings("threads"))
            lab.str = strings(",".join(str(t) for t in st.tids))
    start = data.metadata.get("start_time")
    if isinstance(start, (int, float)):
        profile.time_nanos = int((start + s.elapsed_s) * 1e9)
    profile.duration_nanos = int(s.elapsed_s * 1e9)
    profile.comment.append(strings(f"memtrace: pid {s.pid} ({s.comm}) at {s.elapsed_s:.1f}s"))
    cmd = command_line(data.metadata)
    if cmd:
        profile.comment.append(strings(f"command: {cmd}"))
    profile.string_table.extend(strings.table)
    return profile


class PprofReporter:
    binary = True

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: BinaryIO) -> None:
        payload = build_profile(self.data).SerializeToString()
        # mtime=0: the same recording gives the same bytes.
        out.write(gzip.compress(payload, mtime=0))
