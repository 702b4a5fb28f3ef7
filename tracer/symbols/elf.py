"""Function symbols of an ELF file, for turning addresses into names.

Read straight from the file (and from its debug files: memtrace.symbols.debuginfo),
so that stacks can be named after the process has exited, and on another
machine from a recording. Only the parts needed are read, within bounds."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import lzma
import os
import struct
import threading
from array import array
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Callable, Iterable, Optional

from memtrace.symbols import unwindfile
from memtrace.symbols.ehframe import function_ranges, keeps_frame_pointers, unwind_rows
from memtrace.symbols.gopclntab import go_functions
from memtrace.process.mappedfile import fd_path, open_path, open_regular, read_regular

SHT_SYMTAB, SHT_DYNSYM, SHT_NOTE, SHT_NOBITS, SHT_GNU_VERSYM = 2, 11, 7, 8, 0x6FFFFFFF
STT_OBJECT, STT_FUNC, STT_GNU_IFUNC = 1, 2, 10
PT_LOAD = 1
PT_INTERP = 3
EM_X86_64 = 62
NT_GNU_BUILD_ID = 3
# Bounds on what is read on the target's behalf: a section (a debug file's
# .symtab can be tens of MiB) and MiniDebugInfo, compressed.
MAX_SECTION_BYTES = 256 << 20
MAX_DEBUGDATA_BYTES = 16 << 20


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
    """Function symbols and load segments of one ELF file, and the names
    of its functions from wherever they can be found: its .symtab and
    .dynsym, its MiniDebugInfo (.gnu_debugdata), a separate debug file
    (add_names), and the start of every function from .eh_frame."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.machine = 0
        self.segments: list[Segment] = []
        self.build_id: Optional[str] = None
        self.functions: list[FunctionSymbol] = []  # of the file itself, for probing
        self.has_symtab = False  # not stripped: a debug file would add little
        self.debuglink: Optional[tuple[str, int]] = None  # (file name, CRC-32)
        self.is_go = False  # a Go program (it has .gopclntab, named or not)
        self.debug_checked = False  # a separate debug file was looked for
        self.names_from: list[str] = []  # where the names came from, for people
        self._named: dict[tuple[int, str], int] = {}  # (start, name) -> end
        self._unnamed: list[tuple[int, int]] = []  # (start, end), from .eh_frame
        self._index: list[tuple[int, int, Optional[str]]] = []
        self._starts: list[int] = []
        self._file = None  # kept open: read() must reach the same inode
        try:
            self._file = open_regular(path)
        except OSError:
            return
        parsed = _parse(_file_reader(self._file), os.fstat(self._file.fileno()).st_size)
        if parsed is None:
            return
        self.machine, self.segments, self.build_id = parsed.machine, parsed.segments, parsed.build_id
        self.functions = parsed.functions
        self.has_symtab = parsed.has_symtab
        self.debuglink = parsed.debuglink
        self.is_go = parsed.is_go
        self._unnamed = parsed.eh_frame_ranges
        named = parsed.named
        entry = parsed.entry
        if entry and not any(f.address == entry for f in named) and self._clears_rbp(entry):
            # A stripped program's entry point: named, so that a whole stack
            # (the unwinder reaches it) does not read as cut short.
            named = named + [FunctionSymbol("_start", entry, 0, STT_FUNC, True)]
        self.add_names(named, ".symtab" if parsed.has_symtab else ".dynsym")
        if parsed.debugdata:
            self.add_names(_mini_debug_names(parsed.debugdata), ".gnu_debugdata")
        if parsed.go_named:
            self.add_names(parsed.go_named, ".gopclntab")

    def _clears_rbp(self, vaddr: int) -> bool:
        """Whether code starts by zeroing rbp, as the x86-64 ABI asks of a
        program's entry point (libc.so.6, runnable too, enters elsewhere)."""
        code = self.read(vaddr, 6) or b""
        return code.removeprefix(b"\xf3\x0f\x1e\xfa").startswith(b"\x31\xed")

    def add_names(self, functions: Iterable[FunctionSymbol], source: str) -> None:
        """More names for the file's functions: a debug file's, once found."""
        before = len(self._named)
        for fn in functions:
            key = (fn.address, fn.name)
            self._named[key] = max(self._named.get(key, 0), fn.address + max(fn.size, 1))
        if len(self._named) > before:
            self.names_from.append(source)
        named_starts = {start for start, _ in self._named}
        # A symbol without a size (hand-written assembly) spans its FDE.
        fde_ends = dict(self._unnamed)
        entries = [(start, end if end > start + 1 else max(end, fde_ends.get(start, end)), name)
                   for (start, name), end in self._named.items()]
        entries += [(start, end, None) for start, end in self._unnamed if start not in named_starts]
        entries.sort(key=lambda e: (e[0], e[1], e[2] or ""))
        self._index = entries
        self._starts = [e[0] for e in entries]

    def named_range(self, *names: str) -> Optional[tuple[int, int]]:
        """[start, end) of a function named by the first of `names` found,
        from any table its names came from (.symtab, .gopclntab, ...); of
        several under that name, the largest (Go's table gives an
        assembly function's ABI wrapper the same name)."""
        for name in names:
            found = []
            for start, end, known in self._index:
                if known == name:
                    if end <= start + 1:  # no size (assembly): up to the next function
                        later = bisect.bisect_right(self._starts, start)
                        end = self._starts[later] if later < len(self._starts) else end
                    found.append((end - start, start, end))
            if found:
                _, start, end = max(found)
                return start, end
        return None

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

    def lookup(self, vaddr: int) -> Optional[Found]:
        """The function an address is in: named when any source names it,
        else known by its start alone (.eh_frame)."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        unnamed = None
        # Aliases share a start; symbols may nest: look back a few entries.
        for j in range(i, max(i - 8, -1), -1):
            start, end, name = self._index[j]
            if start <= vaddr < end:
                if name is not None:
                    return Found(name, start, vaddr - start)
                unnamed = unnamed or Found(None, start, vaddr - start)
        return unnamed


@dataclass(frozen=True)
class Found:
    name: Optional[str]  # None: a function known by its start only
    start: int  # its virtual address in the file
    offset: int  # of the address looked up, into the function


@dataclass
class _Parsed:
    machine: int
    segments: list[Segment]
    build_id: Optional[str]
    functions: list[FunctionSymbol]  # .symtab's, else .dynsym's
    named: list[FunctionSymbol]  # .symtab's and .dynsym's
    has_symtab: bool
    debuglink: Optional[tuple[str, int]]
    debugdata: Optional[bytes]
    eh_frame_ranges: list[tuple[int, int]]
    entry: int = 0  # a program's entry point
    go_named: list[FunctionSymbol] = field(default_factory=list)  # a stripped Go program's, from .gopclntab
    is_go: bool = False  # a Go program (it has .gopclntab)


def _file_reader(f) -> Callable[[int, int], bytes]:
    def read(offset: int, size: int) -> bytes:
        try:
            return os.pread(f.fileno(), min(size, MAX_SECTION_BYTES), offset)
        except (OSError, OverflowError, ValueError):
            return b""
    return read


def _bytes_reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, size: data[offset : offset + min(size, MAX_SECTION_BYTES)]


def _headers(read: Callable[[int, int], bytes], file_size: int):
    """(byte order, machine, load segments, section headers, section
    headers by name, body reader, the program's entry point (0 for a
    library: no PT_INTERP)) of a 64-bit ELF file, or None."""
    head = read(0, 64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
        return None
    end = "<" if head[5] == 1 else ">"
    try:
        machine, = struct.unpack_from(end + "H", head, 0x12)
        entry, = struct.unpack_from(end + "Q", head, 0x18)
        interp = False
        (phoff, shoff) = struct.unpack_from(end + "QQ", head, 0x20)
        (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from(end + "HHHHH", head, 0x36)
        segments = []
        table = read(phoff, phentsize * phnum) if phentsize >= 56 else b""
        for i in range(len(table) // phentsize if phentsize else 0):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                end + "IIQQQQ", table, i * phentsize)
            if p_type == PT_LOAD:
                segments.append(Segment(p_offset, p_vaddr, p_filesz))
            interp = interp or p_type == PT_INTERP
        table = read(shoff, shentsize * shnum) if shentsize >= 64 else b""
        sections = [struct.unpack_from(end + "IIQQQQIIQQ", table, i * shentsize)
                    for i in range(len(table) // shentsize if shentsize else 0)]
    except struct.error:
        return None

    def body(sh) -> bytes:
        if sh[1] == SHT_NOBITS or sh[4] + sh[5] > file_size:
            return b""
        return read(sh[4], sh[5])

    names = body(sections[shstrndx]) if shstrndx < len(sections) else b""

    def name_of(sh) -> bytes:
        return names[sh[0] : names.find(b"\0", sh[0])] if sh[0] < len(names) else b""

    return (end, machine, segments, sections, {name_of(sh): sh for sh in sections}, body,
            entry if interp else 0)


def _parse(read: Callable[[int, int], bytes], file_size: int, symbols_only: bool = False) -> Optional[_Parsed]:
    """What a 64-bit ELF file (read through `read(offset, size)`, only the
    parts needed) says about its functions. symbols_only: a debug file,
    whose symbols are all that is wanted from it."""
    headers = _headers(read, file_size)
    if headers is None:
        return None
    end, machine, segments, sections, by_name, body, entry = headers
    build_id = None
    for sh in sections:
        if sh[1] == SHT_NOTE and not build_id:
            build_id = _build_id(body(sh), end)
    tables = {sh[1]: (i, sh) for i, sh in enumerate(sections) if sh[1] in (SHT_SYMTAB, SHT_DYNSYM)}
    symtab = _functions(read, body, sections, tables.get(SHT_SYMTAB), end)
    dynsym = [] if symbols_only else _functions(read, body, sections, tables.get(SHT_DYNSYM), end)
    parsed = _Parsed(machine, segments, build_id, symtab or dynsym, symtab + dynsym,
                     SHT_SYMTAB in tables, None, None, [], entry)
    if symbols_only:
        return parsed
    link = by_name.get(b".gnu_debuglink")
    if link is not None:
        raw = body(link)
        stop = raw.find(b"\0")
        crc_at = (stop + 4) & ~3
        if stop > 0 and crc_at + 4 <= len(raw):
            parsed.debuglink = (raw[:stop].decode(errors="replace"),
                                struct.unpack_from(end + "I", raw, crc_at)[0])
    mini = by_name.get(b".gnu_debugdata")
    if mini is not None and mini[5] <= MAX_DEBUGDATA_BYTES:
        parsed.debugdata = body(mini)
    eh = by_name.get(b".eh_frame")
    if eh is not None and eh[1] != SHT_NOBITS:
        parsed.eh_frame_ranges = function_ranges(body(eh), eh[3], end == "<")
    go = by_name.get(b".gopclntab")
    parsed.is_go = go is not None
    if go is not None and not parsed.has_symtab:
        # A stripped Go program: its own runtime's table names its functions.
        text = by_name.get(b".text")
        parsed.go_named = [FunctionSymbol(name, start, stop - start, STT_FUNC, True)
                           for name, start, stop in go_functions(body(go), text[3] if text else 0, end == "<")]
    return parsed


def _functions(read, body, sections, entry, end: str) -> list[FunctionSymbol]:
    """The function symbols of one symbol table (index, header), with the
    version of each dynamic one: bit 15 marks a hidden (non-default) one."""
    if entry is None:
        return []
    index, table = entry
    if table[6] >= len(sections):
        return []
    versym_sh = next((sh for sh in sections if sh[1] == SHT_GNU_VERSYM and sh[6] == index), None)
    versym = body(versym_sh) if versym_sh is not None else b""
    strings = body(sections[table[6]])
    raw = body(table)
    functions: list[FunctionSymbol] = []
    for n, (name_off, info, _other, shndx, value, size) in enumerate(
        struct.iter_unpack(end + "IBBHQQ", raw[: len(raw) // 24 * 24])
    ):
        kind = info & 0xF
        if kind not in (STT_FUNC, STT_GNU_IFUNC) or value == 0 or shndx == 0:
            continue
        stop = strings.find(b"\0", name_off)
        hidden = False
        if 2 * n + 2 <= len(versym):
            hidden = bool(struct.unpack_from(end + "H", versym, 2 * n)[0] & 0x8000)
        functions.append(FunctionSymbol(strings[name_off:stop].decode(errors="replace"),
                                        value, size, kind, not hidden))
    return functions


def debug_file_names(f) -> tuple[Optional[str], list[FunctionSymbol]]:
    """(build id, function symbols) of a separate debug file, open for
    reading: its .symtab, read alone however large the file."""
    parsed = _parse(_file_reader(f), os.fstat(f.fileno()).st_size, symbols_only=True)
    return (parsed.build_id, parsed.functions) if parsed else (None, [])


def _mini_debug_names(compressed: bytes) -> list[FunctionSymbol]:
    """The .symtab of MiniDebugInfo: an xz-compressed ELF file inside
    .gnu_debugdata (Fedora's way of naming static functions of stripped
    files), decompressed up to a bound."""
    try:
        inner = lzma.LZMADecompressor().decompress(compressed, max_length=MAX_DEBUGDATA_BYTES * 8)
    except lzma.LZMAError:
        return []
    parsed = _parse(_bytes_reader(inner), len(inner), symbols_only=True)
    return parsed.functions if parsed else []


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


def exported_objects(path: str) -> dict[str, int]:
    """The data a 64-bit ELF file exports (defined STT_OBJECT .dynsym
    entries): name -> virtual address in the file. Read once per file
    version; empty when unreadable."""
    return _per_file(_objects_cache, 16, path, _read_exported_objects, {})


def is_go_program(path: str) -> bool:
    """Whether a 64-bit ELF file has Go's .gopclntab: its headers only, read
    once per file version, where symbols_of parses the whole file."""
    return _per_file(_go_cache, 256, path, _read_is_go, False)


def _read_is_go(path: str) -> bool:
    try:
        with open_regular(path) as f:
            headers = _headers(_file_reader(f), os.fstat(f.fileno()).st_size)
    except OSError:
        return False
    return headers is not None and b".gopclntab" in headers[4]


def _read_imported_names(path: str) -> frozenset[str]:
    return frozenset(name for name, shndx, _info, _value in _dynamic_symbols(path)
                     if shndx == 0 and name)


def _read_exported_objects(path: str) -> dict[str, int]:
    return {name: value for name, shndx, info, value in _dynamic_symbols(path)
            if shndx != 0 and info & 0xF == STT_OBJECT and value and name}


def _dynamic_symbols(path: str) -> list[tuple[str, int, int, int]]:
    """(name, section index, st_info, value) of each .dynsym entry."""
    try:
        f, data = read_regular(path)
        f.close()
    except OSError:
        return []
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    end = "<" if data[5] == 1 else ">"
    try:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sections = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize)
                    for i in range(shnum)]
    except struct.error:
        return []
    out = []
    for sh in sections:
        if sh[1] != SHT_DYNSYM or sh[6] >= len(sections):
            continue
        strtab = sections[sh[6]]
        strings = data[strtab[4] : strtab[4] + strtab[5]]
        raw = data[sh[4] : sh[4] + sh[5]]
        for name_off, info, _other, shndx, value, _size in struct.iter_unpack(
                end + "IBBHQQ", raw[: len(raw) // 24 * 24]):
            name = strings[name_off : strings.find(b"\0", name_off)] if name_off else b""
            out.append((name.decode(errors="replace"), shndx, info, value))
    return out


_symbols_cache: OrderedDict = OrderedDict()
_imported_cache: OrderedDict = OrderedDict()
_objects_cache: OrderedDict = OrderedDict()
_go_cache: OrderedDict = OrderedDict()


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


def symbols_of(path: str, mtime_ns: int = 0) -> ElfSymbols:
    """The parsed image of the file at `path`, once per file version (the
    version is read from the file itself: mtime_ns is not needed)."""
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


@dataclass(frozen=True)
class UnwindInfo:
    """How to unwind through one file's code: its load segments and the
    rows of its .eh_frame (ehframe.unwind_rows), in two columns: where each
    row starts (file addresses, sorted) and its step (pack_step). Columns
    of machine words are read from the cache, cut and placed in a few ms
    where tuples took tens."""
    segments: list[Segment]
    addresses: array  # 'Q'
    steps: array  # 'I'
    frame_pointers: bool  # built with them: a frame-pointer walk is exact

    @classmethod
    def of_rows(cls, segments: list[Segment], rows: Iterable[tuple[int, int, int, int]],
                frame_pointers: bool) -> "UnwindInfo":
        rows = list(rows)
        return cls(segments, array("Q", [r[0] for r in rows]),
                   array("I", [pack_step(rule, off, slot) for _, rule, off, slot in rows]),
                   frame_pointers)

    @property
    def rows(self) -> list[tuple[int, int, int, int]]:
        """(address, rule, cfa offset, rbp slot), as ehframe.unwind_rows made them."""
        return [(a, *unpack_step(step)) for a, step in zip(self.addresses, self.steps)]


def pack_step(rule: int, cfa_offset: int, rbp_slot: int) -> int:
    """A row's unwind step in 32 bits: the cfa offset (16), the rule (8)
    and the rbp slot (8), from the low bits up, as the BPF row holds them."""
    return cfa_offset | rule << 16 | rbp_slot << 24


def unpack_step(step: int) -> tuple[int, int, int]:
    """(rule, cfa offset, rbp slot)."""
    return step >> 16 & 0xFF, step & 0xFFFF, step >> 24


_unwind_cache: OrderedDict = OrderedDict()  # file version -> Optional[UnwindInfo]
_unwind_lock = threading.Lock()  # the collector, warming and parsing threads share it
_unwind_parsing: dict[tuple, threading.Lock] = {}  # file version -> held while parsed
UNWIND_VERSIONS_KEPT = 64


def _read_unwind(path: str, parse: bool) -> tuple[Optional[UnwindInfo], bool]:
    """(the unwind info of the file at path, whether it is known): rows an
    earlier run kept (unwindfile), else, when `parse`, made from .eh_frame
    and kept for the next run. Not known: kept by no run, and not parsed."""
    try:
        f = open_regular(path)
    except OSError:
        return None, True
    with f:
        headers = _headers(_file_reader(f), os.fstat(f.fileno()).st_size)
        if headers is None or headers[1] != EM_X86_64:
            return None, True
        end, machine, segments, _sections, by_name, body, _entry = headers
        eh = by_name.get(b".eh_frame")
        if eh is None or eh[1] == SHT_NOBITS:
            return None, True
        section = body(eh)
    shape = [(s.offset, s.vaddr, s.filesz) for s in segments]
    key = unwindfile.key_of(machine, shape, eh[3], section)
    kept = unwindfile.load(key)
    if kept is not None and kept[0] == shape:
        return UnwindInfo(segments, *kept[1:]), True
    if not parse:
        return None, False
    rows = unwind_rows(section, eh[3], end == "<")
    frame_pointers = keeps_frame_pointers(rows)
    # Rows of a frame-pointer build are not kept: libjvm.so's are 20 MB of tuples.
    info = UnwindInfo.of_rows(segments, [] if frame_pointers else rows, frame_pointers)
    unwindfile.save(key, shape, info.addresses, info.steps, frame_pointers)
    return info, True


def _unwind_info(path: str, parse: bool) -> tuple[Optional[UnwindInfo], bool]:
    """_read_unwind once per file version (device, inode, mtime, size),
    whatever name leads to it; a version is parsed by one thread at a time
    (warming and a mapping seen may ask for the same library at once)."""
    try:
        fd = open_path(path)
    except OSError:
        return None, True
    try:
        st = os.fstat(fd)
        version = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with _unwind_lock:
            if version in _unwind_cache:
                _unwind_cache.move_to_end(version)
                return _unwind_cache[version], True
            parsing = _unwind_parsing.setdefault(version, threading.Lock()) if parse else None
        if parsing is None:
            info, known = _read_unwind(fd_path(fd), False)
        else:
            with parsing:
                with _unwind_lock:
                    if version in _unwind_cache:  # parsed while this thread waited
                        return _unwind_cache[version], True
                info, known = _read_unwind(fd_path(fd), True)
        with _unwind_lock:
            if known:
                _unwind_cache[version] = info
                if len(_unwind_cache) > UNWIND_VERSIONS_KEPT:
                    _unwind_cache.popitem(last=False)
            if parsing is not None:
                _unwind_parsing.pop(version, None)
        return info, known
    finally:
        os.close(fd)


def unwind_info_of(path: str) -> Optional[UnwindInfo]:
    """The unwind rows of the file at `path`, once per file version; parsed
    when no earlier run kept them."""
    return _unwind_info(path, parse=True)[0]


def unwind_info_ready(path: str) -> bool:
    """Whether unwind_info_of(path) answers at once: read already, kept
    by an earlier run (read now, in a few ms), or the file has no rows or
    cannot be opened. A library seen by no run takes up to a second to
    parse (libjvm.so)."""
    return _unwind_info(path, parse=False)[1]
