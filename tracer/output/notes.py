"""The words of the notes and hints (memtrace.model.notes): every view,
report and JSON document says them with these."""

from __future__ import annotations

import os
from typing import Callable

from memtrace.model import notes as n
from memtrace.model.notes import Note
from memtrace.output.view.fmt import fmt_bytes


def _percent(part: int, whole: int) -> int:
    return 100 * part // max(1, whole)


def _allocator_named(kind, path) -> str:
    """An allocator as a note names it: its kind, or for one memtrace does
    not know (Chromium's PartitionAlloc), the object whose malloc it is."""
    if kind != "other":
        return str(kind)
    return f"the malloc in {os.path.basename(str(path))}" if path else "another allocator"


def _allocator_opaque(note: Note) -> str:
    before = " (mappings made before the attach are not known)" if note.get("attached") else ""
    named = _allocator_named(note.get("allocator"), note.get("path"))
    return (f"{named}: its statistics are kept where only its own code reads them, "
            "so arenas and trim estimates are not available; retained is the resident memory it "
            f"mapped while traced, less the live heap{before}")


def _mapped_more_than_once(note: Note) -> str:
    rss, pss = note.get("rss_bytes") or 0, note.get("pss_bytes") or 0
    return (f"RSS counts {note.get('path')} once per address it is mapped at "
            f"({note.get('views')} views of the same memory, as the JVM's ZGC maps its heap): "
            f"{fmt_bytes(rss)} of the RSS is {fmt_bytes(pss)} of memory (its PSS)")


def _children_not_traced(note: Note) -> str:
    count, pid, argv = note.get("count"), note.get("pid"), note.get("argv")
    started = "a child process" if count == 1 else f"{count} child processes"
    alive = note.get("alive", True)
    which = [] if count == 1 else ["the latest"]
    if not alive:
        which.append("exited")
    said = f" ({', '.join(which)})" if which else ""
    command = f" `{argv}`" if argv else ""
    if alive:
        advice = f"to see its memory, trace it with -p {pid}, or have the command exec it (sh -c 'exec ...')"
    else:
        advice = "to see a child's memory, trace that command itself, or -p its pid while it runs"
    return f"the process started {started} that memtrace does not trace: {pid}{said}{command}; {advice}"


def _recording_stopped(note: Note) -> str:
    return (f"the recording stopped at {note.get('at_s', 0.0):.1f} s ({note.get('reason')});"
            f" it holds the {note.get('snapshots')} snapshot(s) before")


_WORDS: dict[str, Callable[[Note], str]] = {
    n.UNWIND_TABLES_FULL: lambda note: (
        "the unwind tables are full: stacks through some libraries stop at their "
        "first frame without a frame pointer"
        + (f"; trace again with --unwind-rows {2 * note.get('rows')} (now {note.get('rows')})"
           if isinstance(note.get("rows"), int) else "")),
    n.STACKS_UNNAMED: lambda note: (
        f"{note.get('count')} new stacks are still being named: they join the stacks over the "
        "next snapshots"),
    n.ARENAS_UNREADABLE: lambda note: f"cannot read the arenas: {note.get('reason')}",
    n.EXEC: lambda note: f"the process exec'd: {note.get('argv')}",
    n.CHILDREN_NOT_TRACED: _children_not_traced,
    n.MAPPED_MORE_THAN_ONCE: _mapped_more_than_once,
    n.ALLOCATOR_CHANGED: lambda note: (
        "after the exec, malloc is "
        + ("the program's own" if note.get("allocator") == "other" else f"{note.get('allocator')}'s")
        + f" ({note.get('path')}), which memtrace "
        f"did not probe ({note.get('probed_path')}): its calls are not counted; trace the new "
        "program itself"),
    n.LIGHT_ESTIMATES: lambda _: (
        "light mode: no malloc probes; heap live and retained are estimates "
        "from glibc's own arena structures"),
    n.LIGHT_NO_HEAP: lambda note: (
        f"light mode: no malloc probes, and {note.get('allocator')}'s own books "
        "cannot be read from outside: no heap figures"),
    n.ALLOCATOR_OPAQUE: _allocator_opaque,
    n.JVM_NO_JCMD: lambda _: "jcmd not found: JIT frames stay unnamed",
    n.JVM_ATTACH_DISABLED: lambda _: (
        "-XX:+DisableAttachMechanism: jcmd cannot attach, JIT frames stay unnamed"),
    n.JVM_NO_SIGQUIT: lambda _: (
        "the JVM does not catch SIGQUIT (-Xrs): jcmd cannot attach, JIT frames stay unnamed"),
    n.JVM_NOT_HOTSPOT: lambda _: "libjvm.so is not HotSpot's: interpreted frames stay unnamed",
    n.JVM_METHODS_UNREADABLE: lambda note: f"{note.get('reason')}: interpreted frames stay unnamed",
    n.PYTHON_FRAMES_UNREAD: lambda note: (
        f"Python {note.get('version')}: its stacks show the interpreter's C frames, not the "
        "Python functions (those are read in CPython 3.11)"),
    n.RECORDING_STOPPED: _recording_stopped,
    n.RECORDING_UNFINISHED: lambda note: (
        f"the recording was not finished ({note.get('reason')}); what it holds stays readable"),
    n.TEXT: lambda note: str(note.get("text", "")),
    n.THREAD_ARENAS_RETAIN: lambda note: (
        f"{note.get('arenas')} thread arenas keep {fmt_bytes(note.get('retained_bytes'))} freed but "
        f"resident ({_percent(note.get('retained_bytes'), note.get('resident_bytes'))} % of their "
        f"{fmt_bytes(note.get('resident_bytes'))}): MALLOC_ARENA_MAX=2 caps the arenas (it "
        "concentrates retention, it does not remove it)"),
    n.MAIN_ARENA_TRIMMABLE: lambda note: (
        f"the main arena keeps {fmt_bytes(note.get('retained_bytes'))} freed but resident, "
        f"{fmt_bytes(note.get('trimmable_bytes'))} of it in free pages: call malloc_trim(0) after "
        "load peaks, or lower M_TRIM_THRESHOLD (MALLOC_TRIM_THRESHOLD_=...) so free() "
        "gives the top back sooner"),
    n.MAIN_ARENA_FRAGMENTED: lambda note: (
        f"the main arena keeps {fmt_bytes(note.get('retained_bytes'))} freed but resident, mostly "
        "in pages that still hold live blocks (fragmentation): malloc_trim(0) would give back "
        f"only about {fmt_bytes(note.get('trimmable_bytes'))}"),
    n.TRIM_WOULD_RETURN: lambda note: (
        f"malloc_trim(0) would return about {fmt_bytes(note.get('bytes'))} now (estimate)"),
    n.JVM_NO_FRAME_POINTER: lambda _: (
        "the JVM runs without -XX:+PreserveFramePointer and its code heaps could not be read: "
        "stacks stop at the first JIT-compiled Java method (interpreted methods are still "
        "named); restart it with that flag to see every Java caller"),
}


_ALLOCATOR_HINTS = frozenset({n.THREAD_ARENAS_RETAIN, n.MAIN_ARENA_TRIMMABLE, n.MAIN_ARENA_FRAGMENTED,
                              n.TRIM_WOULD_RETURN})


def about_allocator(note: Note) -> bool:
    """A hint that foretells what the allocator would do: an estimate."""
    return note.kind in _ALLOCATOR_HINTS


def note_text(note: Note) -> str:
    """The sentence for a note or a hint. A kind this version does not know
    (a newer recording) is shown by its kind and fields."""
    words = _WORDS.get(note.kind)
    if words is not None:
        text = words(note)
    else:
        fields = ", ".join(f"{k}={v}" for k, v in note.fields)
        text = f"{note.kind.replace('_', ' ')}" + (f" ({fields})" if fields else "")
    # One line, whatever a field holds (an argv with a newline in `python3 -c`).
    return text.translate(_ONE_LINE)


_ONE_LINE = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": " "})


def note_json(note: Note) -> dict:
    """A note as the JSON output gives it: its kind and fields, and its words."""
    return {**note.to_json(), "text": note_text(note)}
