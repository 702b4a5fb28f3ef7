"""Which allocator a process's malloc calls reach, and what it is.

The dynamic linker binds malloc to the first object in its lookup order
that defines it: the executable, then what LD_PRELOAD (or
/etc/ld.so.preload) adds, then the libraries in load order. A running
process's order is read from the linker's own list (r_debug's link_map
chain, found through the executable's DT_DEBUG, read-only through
/proc/PID/mem); a command's is what its loader prints with --list. The
object found is named by what else it defines."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from memtrace.symbols.elf import symbols_of

KINDS = ("glibc", "jemalloc", "tcmalloc", "mimalloc")

# Symbols that only one allocator defines, beside malloc; glibc's last.
# glibc is known by its program entry, not by __libc_malloc: tcmalloc,
# mimalloc and Chromium's allocator shim (PartitionAlloc, in the chromium
# executable) define __libc_malloc too, for programs that call glibc's
# internal names, and Chromium's was taken for glibc's.
_MARKS = (
    ("jemalloc", ("mallocx", "je_mallocx", "sdallocx")),
    ("tcmalloc", ("tc_malloc", "tc_new")),
    ("mimalloc", ("mi_malloc", "mi_free")),
    ("glibc", ("__libc_start_main",)),
)

AT_PHDR, AT_PHENT, AT_PHNUM = 3, 4, 5
PT_DYNAMIC, PT_PHDR = 2, 6
DT_NULL, DT_DEBUG = 0, 21
MAX_OBJECTS = 4096  # link_map entries followed, at most
MAX_DYNAMIC = 512  # dynamic entries read, at most


@dataclass(frozen=True)
class Allocator:
    kind: str  # one of KINDS, or "other"
    path: str  # the object that defines malloc, as the process names it
    prefix: str = ""  # "je_" for a prefixed copy linked into the executable


def kind_of(names: Iterable[str]) -> str:
    """An allocator's kind from the functions its object defines."""
    defined = set(names)
    for kind, marks in _MARKS:
        if defined & set(marks):
            return kind
    return "other"


def first_definer(paths: Sequence[str], open_path: Callable[[str], str] = lambda p: p
                  ) -> Optional[Allocator]:
    """The first object of paths (in lookup order) that defines malloc.
    open_path gives the path to read a named object at (through the
    target's root, say). A copy of jemalloc linked into the executable under
    its je_ prefix is taken when nothing defines malloc itself."""
    prefixed = None
    for index, path in enumerate(paths):
        try:
            image = symbols_of(open_path(path), os.stat(open_path(path)).st_mtime_ns)
        except OSError:
            continue
        names = [f.name for f in image.functions]
        if image.find("malloc") is not None:
            return Allocator(kind_of(names), path)
        if index == 0 and "je_malloc" in names and prefixed is None:
            prefixed = Allocator("jemalloc", path, "je_")
    return prefixed


# ------------------------------------------------------------ a command


def parse_loader_list(text: str) -> list[str]:
    """The objects `ld.so --list` prints, in load order (preloads first)."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if "=>" in words:
            i = words.index("=>")
            if i + 1 < len(words) and words[i + 1].startswith("/"):
                out.append(words[i + 1])
        elif words and words[0].startswith("/"):
            out.append(words[0])
    return out


# ------------------------------------------------------------ a running process


def _read(mem_fd: int, address: int, size: int) -> Optional[bytes]:
    try:
        data = os.pread(mem_fd, size, address)
    except (OSError, OverflowError, ValueError):
        return None
    return data if len(data) == size else None


def _c_string(mem_fd: int, address: int, limit: int = 4096) -> str:
    data = _read(mem_fd, address, 256) or b""
    while b"\0" not in data and len(data) < limit:
        more = _read(mem_fd, address + len(data), 256)
        if not more:
            break
        data += more
    return data.split(b"\0", 1)[0].decode(errors="replace")


def _auxv(pid: int) -> dict[int, int]:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        raw = f.read(8192)
    pairs = struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16])
    return {key: value for key, value in pairs if key}


def link_map_paths(pid: int) -> Optional[list[str]]:
    """The process's loaded objects in the dynamic linker's order (the
    executable first, as ""), or None where the list cannot be read (a
    static program, no permission, or the loader has not run yet)."""
    try:
        aux = _auxv(pid)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        phdr, phent, phnum = aux.get(AT_PHDR), aux.get(AT_PHENT, 56), aux.get(AT_PHNUM, 0)
        if not phdr or phent < 56 or not 0 < phnum < 256:
            return None
        headers = _read(fd, phdr, phent * phnum)
        if headers is None:
            return None
        base, dynamic = None, None
        for i in range(phnum):
            p_type, _flags, _offset, p_vaddr = struct.unpack_from("<IIQQ", headers, i * phent)
            if p_type == PT_PHDR:
                base = phdr - p_vaddr
            elif p_type == PT_DYNAMIC:
                dynamic = p_vaddr
        if dynamic is None:
            return None
        if base is None:
            base = 0
        r_debug = None
        for i in range(MAX_DYNAMIC):
            entry = _read(fd, base + dynamic + 16 * i, 16)
            if entry is None:
                return None
            tag, value = struct.unpack("<qQ", entry)
            if tag == DT_NULL:
                break
            if tag == DT_DEBUG:
                r_debug = value
        if not r_debug:
            return None
        head = _read(fd, r_debug + 8, 8)
        if head is None:
            return None
        node, = struct.unpack("<Q", head)
        paths, seen = [], set()
        while node and node not in seen and len(paths) < MAX_OBJECTS:
            seen.add(node)
            entry = _read(fd, node, 40)  # l_addr, l_name, l_ld, l_next, l_prev
            if entry is None:
                return None
            _addr, name_at, _ld, node, _prev = struct.unpack("<QQQQQ", entry)
            paths.append(_c_string(fd, name_at) if name_at else "")
        return paths
    finally:
        os.close(fd)
