"""Whether a process runs CPython 3.11, and where the frame walk finds its
Python frames (bpf/python.bpf.c): the interpreter loop's code and the
GIL holder's thread state, from the symbols python3.11 or libpython3.11
exports. Another version lays its frames out otherwise: nothing is found
for it, and its stacks stay native."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Optional

from memtrace.process.mappedfile import fd_path, open_mapped
from memtrace.symbols.elf import exported_objects, symbols_of

# The files that hold the interpreter: the program built statically
# (Debian's /usr/bin/python3.11) or the shared library (pyenv, --enable-shared).
_INTERPRETER = re.compile(r"^(?:python3\.11|libpython3\.11\.so(?:\.[0-9.]*)?)$")
EVAL_LOOP = "_PyEval_EvalFrameDefault"
# _PyRuntime.gilstate.tstate_current in 3.11 (pycore_runtime.h,
# pycore_gil.h; checked with gdb on 3.11.2 and 3.11.7).
TSTATE_CURRENT_OFFSET = 576
SUPPORTED = (3, 11)


# Any CPython interpreter file, by its version in the name.
_ANY_INTERPRETER = re.compile(r"^(?:python|libpython)(3\.[0-9]+)(?:\.so(?:\.[0-9.]*)?)?$")


def other_version(mappings) -> Optional[str]:
    """The version of a CPython interpreter the process maps whose frames
    the walk cannot read ("3.12"), if any: its stacks show the
    interpreter's C frames only."""
    for m in mappings:
        found = _ANY_INTERPRETER.match(os.path.basename(m.path)) if m.inode else None
        if found and tuple(int(x) for x in found.group(1).split(".")) != SUPPORTED:
            return found.group(1)
    return None


@dataclass(frozen=True)
class PythonRuntime:
    """Addresses in one process."""

    version: tuple[int, int, int]
    path: str           # the file that holds the interpreter
    eval_lo: int        # the interpreter loop's code: [eval_lo, eval_hi)
    eval_hi: int
    tstate_at: int      # &_PyRuntime.gilstate.tstate_current
    code_type: int      # &PyCode_Type: what a code object's ob_type holds


def version_of(hexversion: int) -> tuple[int, int, int]:
    """(3, 11, 2) from PY_VERSION_HEX (0x030b02f0)."""
    return hexversion >> 24 & 0xFF, hexversion >> 16 & 0xFF, hexversion >> 8 & 0xFF


def find(pid: int, mappings) -> Optional[PythonRuntime]:
    """The CPython 3.11 interpreter process `pid` maps, if any."""
    for m in mappings:
        if m.offset == 0 and m.inode and _INTERPRETER.match(os.path.basename(m.path)):
            found = _runtime_in(pid, m, mappings)
            if found is not None:
                return found
    return None


def _runtime_in(pid: int, mapping, mappings) -> Optional[PythonRuntime]:
    try:
        fd = open_mapped(pid, mapping)
    except OSError:
        return None
    try:
        path = fd_path(fd)
        exported = exported_objects(path)
        elf = symbols_of(path)
        if not all(n in exported for n in ("_PyRuntime", "Py_Version", "PyCode_Type")):
            return None
        raw = elf.read(exported["Py_Version"], 4)
        loop = elf.find(EVAL_LOOP)
        first = min(elf.segments, key=lambda s: s.offset, default=None)
    finally:
        os.close(fd)
    if raw is None or len(raw) != 4 or loop is None or not loop.size or first is None:
        return None
    version = version_of(struct.unpack("<I", raw)[0])
    if version[:2] != SUPPORTED:
        return None
    # The file's first segment (offset 0) is mapped at its page's start.
    base = mapping.start - (first.vaddr & ~0xFFF)
    loop_at = base + loop.address
    return PythonRuntime(version, mapping.path, loop_at, loop_at + loop.size,
                         base + exported["_PyRuntime"] + TSTATE_CURRENT_OFFSET,
                         base + exported["PyCode_Type"])
