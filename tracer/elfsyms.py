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
from collections import OrderedDict
from typing import Optional

from memtrace.mappedfile import fd_path, open_path, read_regular

SHT_SYMTAB, SHT_DYNSYM, SHT_NOTE, SHT_GNU_VERSYM = 2, 11, 7, 0x6FFFFFFF
STT_FUNC, STT_GNU_IFUNC = 2, 10
PT_LOAD = 1
NT_GNU_BUILD_ID = 3
DEBUG_ROOT = "/usr/lib/debug/.build-id"


@dataclass(frozen=True)
class FunctionSymbol:
    name: str
    address: int  # st_value: its virtual address in the file
    size: int
    kind: int  # STT_FUNC or STT_GNU_IFUNC (a resolver, chosen at run time)
    default_version: bool  # what the dynamic linker binds the name to


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Sorted function symbols and load segments of one ELF file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.machine = 0
        self.segments: list[Segment] = []
        self.build_id: Optional[str] = None
        self.functions: list[FunctionSymbol] = []  # of the file itself, for probing
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._names: list[str] = []
        self._file = None  # kept open: read() must reach the same inode
        try:
            self._file, data = read_regular(path)
        except OSError:
            return
        parsed = _parse(data)
        del data
        if parsed is None:
            return
        self.machine, self.segments, self.build_id, self.functions = parsed
        named = self.functions
        if self.build_id:
            debug = f"{DEBUG_ROOT}/{self.build_id[:2]}/{self.build_id[2:]}.debug"
            try:
                debug_file, debug_data = read_regular(debug)
                debug_file.close()
                extra = _parse(debug_data)
                if extra and extra[3]:
                    named = extra[3]
            except OSError:
                pass
        for fn in sorted(named, key=lambda f: (f.address, f.size, f.name)):
            self._starts.append(fn.address)
            self._ends.append(fn.address + max(fn.size, 1))
            self._names.append(fn.name)

    def find(self, name: str) -> Optional[FunctionSymbol]:
        """The function the dynamic linker would bind `name` to."""
        matches = [f for f in self.functions if f.name == name]
        matches.sort(key=lambda f: (not f.default_version, f.size == 0))
        return matches[0] if matches else None

    def read(self, vaddr: int, size: int) -> Optional[bytes]:
        """Bytes at a virtual address, as the file holds them."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                if self._file is None:
                    return None
                try:
                    return os.pread(self._file.fileno(), min(size, seg.vaddr + seg.filesz - vaddr),
                                    seg.offset + vaddr - seg.vaddr)
                except (OSError, ValueError):
                    return None
        return None

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
    """(machine, load segments, build id, function symbols) of a 64-bit ELF
    file: .symtab's when present, else .dynsym's with their versions."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return None
    end = "<" if data[5] == 1 else ">"
    try:
        machine, = struct.unpack_from(end + "H", data, 0x12)
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
    tables = {sh[1]: (i, sh) for i, sh in enumerate(sections) if sh[1] in (SHT_SYMTAB, SHT_DYNSYM)}
    index, table = tables.get(SHT_SYMTAB) or tables.get(SHT_DYNSYM) or (None, None)
    # Version of each dynamic symbol: bit 15 marks a hidden (non-default) one.
    versym = next((sh for sh in sections if sh[1] == SHT_GNU_VERSYM and sh[6] == index), None)
    functions: list[FunctionSymbol] = []
    if table is not None and table[6] < len(sections):
        strtab = sections[table[6]]
        strings = data[strtab[4] : strtab[4] + strtab[5]]
        raw = data[table[4] : table[4] + table[5]]
        for n, (name_off, info, _other, shndx, value, size) in enumerate(
            struct.iter_unpack(end + "IBBHQQ", raw[: len(raw) // 24 * 24])
        ):
            kind = info & 0xF
            if kind not in (STT_FUNC, STT_GNU_IFUNC) or value == 0 or shndx == 0:
                continue
            stop = strings.find(b"\0", name_off)
            hidden = False
            if versym is not None and versym[4] + 2 * n + 2 <= len(data):
                hidden = bool(struct.unpack_from(end + "H", data, versym[4] + 2 * n)[0] & 0x8000)
            functions.append(FunctionSymbol(strings[name_off:stop].decode(errors="replace"),
                                            value, size, kind, not hidden))
    return machine, segments, build_id, functions


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


def imported_names(path: str) -> frozenset[str]:
    """The names a 64-bit ELF file takes from other objects (undefined
    .dynsym entries); empty when unreadable. Read once per file version."""
    return _per_file(_imported_cache, 256, path, _read_imported_names, frozenset())


def _read_imported_names(path: str) -> frozenset[str]:
    try:
        f, data = read_regular(path)
        f.close()
    except OSError:
        return frozenset()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return frozenset()
    end = "<" if data[5] == 1 else ">"
    try:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sections = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize)
                    for i in range(shnum)]
    except struct.error:
        return frozenset()
    names = set()
    for sh in sections:
        if sh[1] != SHT_DYNSYM or sh[6] >= len(sections):
            continue
        strtab = sections[sh[6]]
        strings = data[strtab[4] : strtab[4] + strtab[5]]
        raw = data[sh[4] : sh[4] + sh[5]]
        for name_off, _info, _other, shndx, _value, _size in struct.iter_unpack(
                end + "IBBHQQ", raw[: len(raw) // 24 * 24]):
            if shndx == 0 and name_off:
                names.add(strings[name_off : strings.find(b"\0", name_off)].decode(errors="replace"))
    return frozenset(names)


_symbols_cache: OrderedDict = OrderedDict()
_imported_cache: OrderedDict = OrderedDict()


def _per_file(cache: OrderedDict, size: int, path: str, build, unreadable):
    """build(name) once per file version (device, inode, mtime, size),
    whatever name leads to it: a mapping's path and a descriptor's share it.
    The name given to build reaches the very inode identified."""
    try:
        fd = open_path(path)
    except OSError:
        return unreadable
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = build(fd_path(fd))
        if len(cache) > size:
            cache.popitem(last=False)
        return value
    finally:
        os.close(fd)


def symbols_of(path: str) -> ElfSymbols:
    """The parsed image of the file at `path`, once per file version."""
    return _per_file(_symbols_cache, 64, path, ElfSymbols, None) or ElfSymbols(path)


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
