"""The pure parts of Python frames (memtrace.cpython): the 3.11 location
table against CPython's own co_lines, the frame's text and tag, and the
reading of code objects from a process's memory, tried on this very
interpreter (CPython 3.11 on Debian 12) through /proc/self/mem."""

from __future__ import annotations

import glob
import os
import sys
import types

import pytest

from memtrace.cpython import codes, runtime
from memtrace.cpython.linetable import line_of
from memtrace.model.frames import split_frame
from memtrace.output.reports.common import frame_label
from memtrace.output.view.fmt import short_frame
from memtrace.process import procfs

IS_311 = sys.version_info[:2] == (3, 11)
needs_311 = pytest.mark.skipif(not IS_311, reason="the 3.11 location table and layout")


def _codes_in(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes_in(const)


def multi_line(x):
    y = (x +
         1)
    return [y,
            x]


@needs_311
def test_line_of_every_code_unit_is_what_cpython_says():
    sources = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:6]
    checked = 0
    for path in sources + [__file__]:
        with open(path, "rb") as f:
            top = compile(f.read(), path, "exec")
        for code in _codes_in(top):
            for start, end, line in code.co_lines():
                for byte in range(start, end, 2):
                    assert line_of(code.co_linetable, code.co_firstlineno, byte // 2) == line, \
                        (path, code.co_name, byte)
                    checked += 1
    assert checked > 2000


@needs_311
def test_line_of_a_multi_line_function():
    code = multi_line.__code__
    lines = {line_of(code.co_linetable, code.co_firstlineno, i)
             for i in range(len(code.co_code) // 2)}
    first = code.co_firstlineno
    assert {first + 1, first + 2, first + 3, first + 4} <= lines


def test_line_of_beyond_or_broken_tables():
    assert line_of(b"", 10, 0) is None
    assert line_of(b"\x00\x01", 10, 0) is None  # not an entry's start
    # A no-column entry (kind 13) moving the line by +3, over 2 units, then
    # one without location (kind 15), then a truncated long form (kind 14).
    table = bytes([0x80 | 13 << 3 | 1, 6, 0x80 | 15 << 3, 0x80 | 14 << 3])
    assert [line_of(table, 10, i) for i in range(4)] == [13, 13, None, None]


def test_signed_varints_move_the_line_back():
    # kind 13, delta -2 (svarint 5), then kind 11 (one line on) with 2 column bytes.
    table = bytes([0x80 | 13 << 3, 5, 0x80 | 11 << 3, 0, 0])
    assert [line_of(table, 20, i) for i in range(2)] == [18, 19]


def test_frame_text_and_its_function():
    text = codes.frame_text("Holder.leak", "/srv/app.py", 42)
    assert text == "Holder.leak (/srv/app.py:42) [py]"
    assert split_frame(text) == ("Holder.leak (/srv/app.py)", "py")
    assert frame_label(text) == "Holder.leak (/srv/app.py)"
    assert short_frame(text) == "Holder.leak"
    assert codes.frame_text("<module>", "x.py", None) == "<module> (x.py) [py]"
    assert short_frame("<module> (x.py:3) [py]") == "<module>"


def test_tags_keep_python_and_java_frames_apart():
    code_at = 0x7F12_3456_7890
    stored = code_at | 0x1234 << codes.CODE_BITS | codes.PY_FRAME_TAG
    assert codes.is_python_frame(stored)
    assert codes.split_frame_value(stored) == (code_at, 0x1234)
    assert not codes.is_python_frame(code_at)
    assert not codes.is_python_frame((1 << 63) | code_at)  # a JVM Method*
    assert not codes.is_python_frame((1 << 63) | (1 << 62) | code_at)


def données():
    return 1


def 名前():
    return 2


@needs_311
def test_code_objects_read_from_a_live_process():
    pid = os.getpid()
    found = runtime.find(pid, procfs.maps(pid))
    assert found is not None, "this interpreter's runtime was not found"
    assert found.version[:2] == (3, 11)
    assert found.eval_lo < found.eval_hi
    namer = codes.PythonCodes(pid, found)
    try:
        for fn in (multi_line, données, 名前):
            code = fn.__code__
            index = 2  # past RESUME: the function's first line
            stored = id(code) | index << codes.CODE_BITS | codes.PY_FRAME_TAG
            line = line_of(code.co_linetable, code.co_firstlineno, index)
            assert namer.name(stored) == f"{code.co_qualname} ({code.co_filename}:{line}) [py]"
        unknown = id(données.__code__) | codes.INSTR_UNKNOWN << codes.CODE_BITS | codes.PY_FRAME_TAG
        assert namer.name(unknown) == f"données ({__file__}) [py]"
        assert namer.name(id(object()) | codes.PY_FRAME_TAG) is None  # not a code object
    finally:
        namer.close()


@needs_311
def test_an_announced_stack_keeps_the_names_read_then():
    pid = os.getpid()
    namer = codes.PythonCodes(pid, runtime.find(pid, procfs.maps(pid)))
    try:
        code = données.__code__
        stored = id(code) | 2 << codes.CODE_BITS | codes.PY_FRAME_TAG
        unreadable = id(object()) | codes.PY_FRAME_TAG
        checked: dict = {}
        namer.read_stack(7, [0x401000, stored, unreadable, stored], checked)
        line = line_of(code.co_linetable, code.co_firstlineno, 2)
        assert namer.stack_names(7) == {stored: f"données ({__file__}:{line}) [py]"}
        assert set(checked) == {id(code), unreadable & ~codes.PY_FRAME_TAG}  # one read each
        assert namer.stack_names(8) is None
    finally:
        namer.close()


def test_other_versions_are_left_alone():
    assert runtime.version_of(0x030B02F0) == (3, 11, 2)
    assert runtime.version_of(0x030C00F0)[:2] != runtime.SUPPORTED
    assert runtime.find(os.getpid(), []) is None


def test_another_cpython_is_named_for_its_note():
    """A process that runs a CPython whose frames are not read says which."""
    from types import SimpleNamespace

    def mapped(path, inode=1):
        return SimpleNamespace(path=path, inode=inode, offset=0, start=0)

    assert runtime.other_version([mapped("/usr/lib/libc.so.6"),
                                  mapped("/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0")]) == "3.12"
    assert runtime.other_version([mapped("/usr/bin/python3.13")]) == "3.13"
    assert runtime.other_version([mapped("/usr/bin/python3.11"),
                                  mapped("/opt/libpython3.11.so")]) is None
    assert runtime.other_version([mapped("[anon:python3.12]", inode=0),
                                  mapped("/usr/bin/python3-config")]) is None
