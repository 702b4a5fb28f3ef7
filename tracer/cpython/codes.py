"""Names of the Python frames the walk stores (bpf/python.bpf.c): a code
object's address tagged with PY_FRAME_TAG, and the index of the
instruction its frame ran, read from outside the process.

`outer_alloc (/srv/app/jobs.py:42) [py]`: co_qualname, co_filename and
the line from co_linetable. Everything is the target's data, read through
/proc/PID/mem: the object must be a code object (its ob_type is
PyCode_Type) and each string and length must hold together, else the
frame is not named. Code objects are freed and their memory reused: a
name is kept per address together with what it was read from (the
pointers and first line), which is read again before the name is given
again. A name is given only while the object can be read: the names of a
new stack's frames are read as soon as the walk announces it, and kept for
that stack, for when it is named after the process is gone (an address's
last name could be another object's, freed and replaced since)."""

from __future__ import annotations

import os
import struct
from typing import Optional

from memtrace.cpython.linetable import line_of
from memtrace.cpython.runtime import PythonRuntime
from memtrace.model.frames import PYTHON_MODULE

PY_FRAME_TAG = 1 << 62  # bpf/memtrace.h PY_FRAME_TAG_BIT
CODE_BITS = 47  # PY_CODE_BITS
INSTR_UNKNOWN = 0x7FFF  # PY_INSTR_MAX
MODULE = PYTHON_MODULE  # what Python frames show as their module
MAX_STRING = 4096  # characters of a name or path
MAX_LINETABLE = 1 << 20
MAX_CODES = 100000  # code objects whose names are kept, at most
MAX_STACKS = 65536  # stacks whose frames' names are kept (bpf/common.bpf.c MAX_STACKS)

# CPython 3.11's PyCodeObject (Include/cpython/code.h): ob_type, then
# co_firstlineno, co_filename, co_qualname, co_linetable.
_CODE_HEADER = 144
_OB_TYPE, _FIRSTLINENO, _FILENAME, _QUALNAME, _LINETABLE = 8, 72, 112, 128, 136
# PyASCIIObject / PyCompactUnicodeObject: length, state; data follows.
_UNICODE_LENGTH, _UNICODE_STATE, _ASCII_DATA, _COMPACT_DATA = 16, 32, 48, 72
_BYTES_SIZE, _BYTES_DATA = 16, 32
_KIND_CODECS = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}


def is_python_frame(addr: int) -> bool:
    return addr >> CODE_BITS >> 15 == 1  # bit 62 alone: 63 is the JVM's tag


def split_frame_value(addr: int) -> tuple[int, int]:
    """(code object address, instruction index) of a stored frame."""
    return addr & ((1 << CODE_BITS) - 1), addr >> CODE_BITS & INSTR_UNKNOWN


def frame_text(qualname: str, filename: str, line: Optional[int]) -> str:
    """`qualname (file:line) [py]`; `qualname (file) [py]` without a line."""
    where = f"{filename}:{line}" if line is not None else filename
    return f"{qualname} ({where}) [{MODULE}]"


def decode_unicode(header: bytes, read) -> Optional[str]:
    """A compact str object (every name and path CPython makes is one),
    from its 48-byte header; read(offset, size) reads the object."""
    if len(header) < _ASCII_DATA:
        return None
    length, = struct.unpack_from("<q", header, _UNICODE_LENGTH)
    state, = struct.unpack_from("<I", header, _UNICODE_STATE)
    kind, compact, ascii_only = state >> 2 & 7, state >> 5 & 1, state >> 6 & 1
    if not compact or not 0 <= length <= MAX_STRING:
        return None
    if length == 0:
        return ""
    if ascii_only:
        data = read(_ASCII_DATA, length)
        codec = "ascii"
    elif kind in _KIND_CODECS:
        data = read(_COMPACT_DATA, length * kind)
        codec = _KIND_CODECS[kind]
    else:
        return None
    if data is None:
        return None
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return None


class _Code:
    __slots__ = ("fingerprint", "qualname", "filename", "first_line", "linetable", "texts")

    def __init__(self, fingerprint, qualname, filename, first_line, linetable) -> None:
        self.fingerprint = fingerprint
        self.qualname, self.filename = qualname, filename
        self.first_line, self.linetable = first_line, linetable
        self.texts: dict[int, str] = {}  # by instruction index


class PythonCodes:
    """Names for one process's Python frames."""

    def __init__(self, pid: int, runtime: PythonRuntime) -> None:
        self.pid = pid
        self.runtime = runtime
        self._fd: Optional[int] = None
        self._codes: dict[int, _Code] = {}
        self._stack_names: dict[int, dict[int, str]] = {}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, address: int, size: int) -> Optional[bytes]:
        if not 0 < address < 1 << CODE_BITS or size <= 0:
            return None
        if self._fd is None:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        try:
            data = os.pread(self._fd, size, address)
        except (OSError, OverflowError, ValueError):
            return None
        return data if len(data) == size else None

    def name(self, addr: int, checked: Optional[dict] = None) -> Optional[str]:
        """The frame's text; None when its code object cannot be read now
        (the process gone, or the object freed). checked: code objects
        already read in this batch, by address."""
        code_at, index = split_frame_value(addr)
        if checked is not None and code_at in checked:
            code = checked[code_at]
        else:
            code = self._code(code_at)
            if checked is not None:
                checked[code_at] = code
        if code is None:
            return None
        text = code.texts.get(index)
        if text is None:
            line = None
            if index != INSTR_UNKNOWN:
                line = line_of(code.linetable, code.first_line, index)
            text = code.texts[index] = frame_text(code.qualname, code.filename, line)
        return text

    def read_stack(self, stack: int, addrs: list[int], checked: dict) -> None:
        """Names for the Python frames of a stack the walk just stored,
        read now and kept for it (stack_names). checked: the code objects
        read in this batch (a few ms: one read each, where a thousand new
        stacks of thirty frames share a few hundred)."""
        names = {}
        for addr in addrs:
            if is_python_frame(addr):
                text = self.name(addr, checked)
                if text is not None:
                    names[addr] = text
        if names and len(self._stack_names) < MAX_STACKS:
            self._stack_names[stack] = names

    def stack_names(self, stack: int) -> Optional[dict[int, str]]:
        """Frame value -> name, as read when the stack was new."""
        return self._stack_names.get(stack)

    def _code(self, address: int) -> Optional[_Code]:
        header = self._read(address, _CODE_HEADER)
        if header is None:
            return None  # the process is gone
        ob_type, = struct.unpack_from("<Q", header, _OB_TYPE)
        if ob_type != self.runtime.code_type:
            self._codes.pop(address, None)  # freed: its name no longer holds
            return None
        first_line, = struct.unpack_from("<i", header, _FIRSTLINENO)
        strings = struct.unpack_from("<QQ", header, _FILENAME)[0], \
            struct.unpack_from("<Q", header, _QUALNAME)[0]
        linetable_at, = struct.unpack_from("<Q", header, _LINETABLE)
        fingerprint = (first_line, *strings, linetable_at)
        known = self._codes.get(address)
        if known is not None and known.fingerprint == fingerprint:
            return known
        filename, qualname = (self._string(a) for a in strings)
        linetable = self._bytes(linetable_at)
        if filename is None or qualname is None:
            self._codes.pop(address, None)
            return None
        code = _Code(fingerprint, qualname, filename, first_line, linetable or b"")
        if len(self._codes) >= MAX_CODES:
            self._codes.clear()
        self._codes[address] = code
        return code

    def _string(self, address: int) -> Optional[str]:
        header = self._read(address, _ASCII_DATA)
        if header is None:
            return None
        return decode_unicode(header, lambda offset, size: self._read(address + offset, size))

    def _bytes(self, address: int) -> Optional[bytes]:
        header = self._read(address, _BYTES_DATA)
        if header is None:
            return None
        size, = struct.unpack_from("<q", header, _BYTES_SIZE)
        if not 0 <= size <= MAX_LINETABLE:
            return None
        return self._read(address + _BYTES_DATA, size) if size else b""


def for_process(pid: int, mappings) -> Optional[PythonCodes]:
    """A namer for the process when it runs CPython 3.11."""
    from memtrace.cpython import runtime

    found = runtime.find(pid, mappings)
    return PythonCodes(pid, found) if found is not None else None
