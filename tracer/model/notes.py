"""What a snapshot says besides its figures: notes (why a figure is missing
or partial) and hints (what the figures suggest doing), as a kind and plain
fields. The output words them (memtrace.output.words); nothing before it
writes a sentence for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

# Notes: what limits the figures.
UNWIND_TABLES_FULL = "unwind_tables_full"
STACKS_UNNAMED = "stacks_unnamed"  # count: new stacks not named yet
ARENAS_UNREADABLE = "arenas_unreadable"  # reason
EXEC = "exec"  # argv
CHILDREN_NOT_TRACED = "children_not_traced"  # count; pid, argv and alive of the latest
ALLOCATOR_CHANGED = "allocator_changed"  # allocator, path, probed_path
LIGHT_ESTIMATES = "light_estimates"
LIGHT_NO_HEAP = "light_no_heap"  # allocator
ALLOCATOR_OPAQUE = "allocator_opaque"  # allocator, attached
JVM_NO_JCMD = "jvm_no_jcmd"
JVM_ATTACH_DISABLED = "jvm_attach_disabled"
JVM_NO_SIGQUIT = "jvm_no_sigquit"
JVM_NOT_HOTSPOT = "jvm_not_hotspot"
JVM_METHODS_UNREADABLE = "jvm_methods_unreadable"  # reason
PYTHON_FRAMES_UNREAD = "python_frames_unread"  # version: a CPython whose frames are not read
# path, views, rss_bytes, pss_bytes: a shared file mapped at several
# addresses, which the RSS counts once per address (memtrace.model.multimapped)
MAPPED_MORE_THAN_ONCE = "mapped_more_than_once"
RECORDING_STOPPED = "recording_stopped"  # at_s, reason, snapshots
RECORDING_UNFINISHED = "recording_unfinished"  # reason
TEXT = "text"  # text: a note from a recording made before notes had kinds

# Hints: what the figures suggest.
THREAD_ARENAS_RETAIN = "thread_arenas_retain"  # arenas, retained_bytes, resident_bytes
MAIN_ARENA_TRIMMABLE = "main_arena_trimmable"  # retained_bytes, trimmable_bytes
MAIN_ARENA_FRAGMENTED = "main_arena_fragmented"  # retained_bytes, trimmable_bytes
TRIM_WOULD_RETURN = "trim_would_return"  # bytes
JVM_NO_FRAME_POINTER = "jvm_no_frame_pointer"

FieldValue = Union[str, int, float, bool, None]


@dataclass(frozen=True)
class Note:
    kind: str
    fields: tuple[tuple[str, FieldValue], ...] = ()

    @classmethod
    def of(cls, kind: str, **fields: FieldValue) -> "Note":
        return cls(kind, tuple(fields.items()))

    def get(self, name: str, default: FieldValue = None) -> FieldValue:
        for key, value in self.fields:
            if key == name:
                return value
        return default

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.fields)}

    @classmethod
    def from_json(cls, d: Union[str, Mapping[str, Any]]) -> "Note":
        if isinstance(d, str):
            return cls.of(TEXT, text=d)
        kind = str(d.get("kind", TEXT))
        # "text" is the output's wording, except in a TEXT note where it is all there is.
        derived = ("kind",) if kind == TEXT else ("kind", "text")
        return cls(kind, tuple((k, v) for k, v in d.items() if k not in derived))
