"""Function symbols of an ELF file, for turning addresses into names.

Read straight from the file (.symtab, else .dynsym; a separate debug file
found by build id is preferred when installed), so that stacks can be named
after the process has exited, and on another machine from a recording."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

SHT_SYMTAB, SHT_DYNSYM, SHT_NOTE = 2, 11, 7
STT_FUNC, STT_GNU_IFUNC = 2, 10
PT_LOAD = 1
NT_GNU_BUILD_ID = 3
DEBUG_ROOT = "/usr/lib/debug/.build-id"


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Sorted function symbols and load segments of one ELF file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.segments: list[Segment] = []
        self.build_id: Optional[str] = None
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._names: list[str] = []
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return
        parsed = _parse(data)
        if parsed is None:
            return
        self.segments, self.build_id, symbols = parsed
        if self.build_id:
            debug = f"{DEBUG_ROOT}/{self.build_id[:2]}/{self.build_id[2:]}.debug"
            if os.path.exists(debug):
                try:
                    with open(debug, "rb") as f:
                        extra = _parse(f.read())
                    if extra and extra[2]:
                        symbols = extra[2]
                except OSError:
                    pass
        symbols.sort()
        for start, size, name in symbols:
            self._starts.append(start)
            self._ends.append(start + max(size, 1))
            self._names.append(name)

    def vaddr_of_offset(self, file_offset: int) -> Optional[int]:
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + seg.filesz:
                return file_offset - seg.offset + seg.vaddr
        return None

    def lookup(self, vaddr: int) -> Optional[tuple[str, int]]:
        """(name, offset into it) for an address inside a known function."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        # Aliases share a start; symbols may nest: look back a few entries.
        for j in range(i, max(i - 8, -1), -1):
            if self._starts[j] <= vaddr < self._ends[j]:
                return self._names[j], vaddr - self._starts[j]
        return None


def _parse(data: bytes):
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return None
    end = "<" if data[5] == 1 else ">"
    try:
        (phoff, shoff) = struct.unpack_from(end + "QQ", data, 0x20)
        (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from(end + "HHHHH", data, 0x36)
        segments = []
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                end + "IIQQQQ", data, phoff + i * phentsize
            )
            if p_type == PT_LOAD:
                segments.append(Segment(p_offset, p_vaddr, p_filesz))
        sections = [
            struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
        ]
    except struct.error:
        return None
    build_id = None
    for sh in sections:
        if sh[1] == SHT_NOTE:
            build_id = build_id or _build_id(data[sh[4] : sh[4] + sh[5]], end)
    tables = {sh[1]: sh for sh in sections if sh[1] in (SHT_SYMTAB, SHT_DYNSYM)}
    table = tables.get(SHT_SYMTAB) or tables.get(SHT_DYNSYM)
    symbols: list[tuple[int, int, str]] = []
    if table is not None and table[6] < len(sections):
        strtab = sections[table[6]]
        strings = data[strtab[4] : strtab[4] + strtab[5]]
        raw = data[table[4] : table[4] + table[5]]
        for name_off, info, _other, shndx, value, size in struct.iter_unpack(end + "IBBHQQ", raw[: len(raw) // 24 * 24]):
            if (info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC) or value == 0 or shndx == 0:
                continue
            stop = strings.find(b"\0", name_off)
            symbols.append((value, size, strings[name_off:stop].decode(errors="replace")))
    return segments, build_id, symbols


def _build_id(notes: bytes, end: str) -> Optional[str]:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(end + "III", notes, pos)
        pos += 12
        name_end = pos + ((namesz + 3) & ~3)
        desc = notes[name_end : name_end + descsz]
        if ntype == NT_GNU_BUILD_ID and notes[pos : pos + namesz].rstrip(b"\0") == b"GNU":
            return desc.hex()
        pos = name_end + ((descsz + 3) & ~3)
    return None


@lru_cache(maxsize=64)
def symbols_of(path: str, mtime_ns: int = 0) -> ElfSymbols:
    return ElfSymbols(path)


def _load_demangler():
    name = ctypes.util.find_library("stdc++")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        fn = lib.__cxa_demangle
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    free = ctypes.CDLL(None).free
    free.argtypes = [ctypes.c_void_p]

    def demangle(name: str) -> str:
        status = ctypes.c_int()
        out = fn(name.encode(), None, None, ctypes.byref(status))
        if not out or status.value != 0:
            return name
        try:
            return ctypes.string_at(out).decode(errors="replace")
        finally:
            free(out)

    return demangle


_demangler = None


def demangle(name: str) -> str:
    global _demangler
    if not name.startswith("_Z"):
        return name
    if _demangler is None:
        _demangler = _load_demangler() or (lambda n: n)
    return _demangler(name)
