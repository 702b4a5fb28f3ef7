"""The unwind tables the BPF stack walk reads (common.bpf.c): per code
module built without frame pointers, its .eh_frame rows placed where the
process maps it, written into mmapped BPF arrays.

Tables go in before the probes see the module's code run where that can
be (a launched program's own image, at exec; every module, at an attach)
and for a library mapped later as soon as its mapping is seen (dlopen:
the calls it makes before are walked by frame pointers only). Modules
built with frame pointers get no table: their frame-pointer steps are
exact and cheaper than a table search."""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import threading
import time
from array import array
from typing import Callable, Iterable, Iterator, Optional

from memtrace.errors import MemtraceError
from memtrace.process import procfs
from memtrace.process.target import objects_of_command
from memtrace.symbols.elf import UnwindInfo, unwind_info_of, unwind_info_ready
from memtrace.symbols.symbolizer import code_modules, read_mapped

PAGE_BYTES = 4096
# How long, and how often, an exec'd image's maps are read for the
# libraries ld.so maps: the session reads the events every 100 ms.
IMAGE_FOLLOW_S = 0.1
IMAGE_POLL_S = 0.002
MAX_ROWS_PER_PAGE = 1 << 12  # ROW_SEARCH_STEPS in common.bpf.c
_ROW_BYTES = 8
_MODULE = struct.Struct("<QQII")


def warm(paths: Iterable[str]) -> threading.Thread:
    """Read the unwind rows of files the process will map, in the
    background (the BPF compile takes seconds): a library then gets its
    table a few ms after it is mapped, not after its rows are parsed
    (libc: 0.14 s, in which its first calls are walked by frame pointers)."""
    def read() -> None:
        for path in paths:
            unwind_info_of(path)

    thread = threading.Thread(target=read, name="memtrace-unwind-warm", daemon=True)
    thread.start()
    return thread


def follow_image(tables: "UnwindTables", pid: int) -> None:
    """After an exec: read the rows of the new program and of the libraries
    ld.so is about to map for it, and place each as soon as /proc/PID/maps
    shows it mapped, where the events that name the mapping are read up to
    EVENT_POLL_S later while the program runs (a pyenv shim execs bash, then
    bash the Python that maps libpython: each image starts with nothing)."""
    warm(_image_objects(pid))
    image = tables.image

    def place() -> None:
        until = time.monotonic() + IMAGE_FOLLOW_S
        read = lambda module, fn: read_mapped(pid, module, fn)  # noqa: E731
        while time.monotonic() < until and tables.image == image:
            mappings = procfs.maps(pid)
            if not mappings:
                return  # gone
            tables.add(code_modules(mappings), read, image=image)
            time.sleep(IMAGE_POLL_S)

    threading.Thread(target=place, name="memtrace-unwind-exec", daemon=True).start()


def _image_objects(pid: int) -> Iterator[str]:
    yield f"/proc/{pid}/exe"  # the very file, in whatever mount namespace
    # ld.so resolves names in our mount namespace: only when it is the process's.
    try:
        if (os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                or not os.path.samestat(os.stat(f"/proc/{pid}/root"), os.stat("/"))):
            return
        objects = objects_of_command([os.readlink(f"/proc/{pid}/exe")])
    except (OSError, MemtraceError):
        return
    yield from objects[1:]


class UnwindTables:
    """The tables of one traced process, in one loaded BPF object."""

    def __init__(self, bpf) -> None:
        self._bpf = bpf
        self._lock = threading.Lock()  # add() from the collector and from parsing threads
        self._generation = 0
        self.image = 0  # moves on at every exec
        self._maps: dict[str, mmap.mmap] = {}
        self._capacity = {name: bpf[name].max_entries for name in
                          ("unwind_rows", "unwind_pages", "unwind_modules")}
        self._reset()

    def reset(self) -> None:
        """A new address space (an exec): nothing of the old one holds."""
        with self._lock:  # not while a parsing thread places a module of the old one
            self.image += 1
            self._reset()

    def _reset(self) -> None:
        self._seen: set[tuple] = set()
        # Modules whose rows are parsed on a thread (_parsing), and those
        # not placed yet (_deferred): a later add() places them, and the
        # collector calls it at every snapshot while there are some.
        self._parsing: set[tuple] = set()
        self._deferred: set[tuple] = set()
        self._modules: list[tuple[int, int, int]] = []  # (lo, hi, first page)
        self._next_row = 0
        self._next_page = 0
        self.rows = 0  # in use, for people
        self.full = False
        self._set_head()

    def _map(self, name: str) -> mmap.mmap:
        if name not in self._maps:
            table = self._bpf[name]
            size = -(-ctypes.sizeof(table.Leaf) // 8) * 8 * self._capacity[name]
            length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            self._maps[name] = mmap.mmap(table.map_fd, length, mmap.MAP_SHARED,
                                         mmap.PROT_READ | mmap.PROT_WRITE)
        return self._maps[name]

    @property
    def pending(self) -> bool:
        return bool(self._deferred)

    def add(self, modules: Iterable, read_mapped: Callable, wait: bool = False,
            image: Optional[int] = None) -> int:
        """Tables for the code modules (symbols.Module) not seen yet;
        read_mapped(module, fn) reads the very file mapped. A module whose
        rows are not parsed yet is parsed on a thread, which places it when
        done, unless `wait`: a snapshot never waits a second for libjvm.so
        (its calls meanwhile are walked by frame pointers). image: the
        modules were read in that image (self.image), and are dropped if
        an exec came since. Returns how many modules got one."""
        with self._lock:
            if image is not None and image != self.image:
                return 0
            return self._add(modules, read_mapped, wait)

    def _add(self, modules: Iterable, read_mapped: Callable, wait: bool) -> int:
        added = 0
        for module in modules:
            key = (module.start, module.end, module.mapping.device, module.mapping.inode)
            if key in self._seen or key in self._parsing:
                continue
            if not wait and not read_mapped(module, unwind_info_ready):
                self._deferred.add(key)
                self._parse_later(key, module, read_mapped)
                continue
            self._deferred.discard(key)
            self._seen.add(key)
            info = read_mapped(module, unwind_info_of)
            if info is None or info.frame_pointers or not info.addresses:
                continue
            placed = _place(info, module.start, module.end, module.file_offset)
            if placed and self._write(module.start, module.end, placed):
                added += 1
        if added:
            self._publish()
        return added

    def _parse_later(self, key: tuple, module, read_mapped: Callable) -> None:
        parsing = self._parsing
        parsing.add(key)

        def parse() -> None:
            try:
                read_mapped(module, unwind_info_of)
            finally:
                parsing.discard(key)
            with self._lock:
                if parsing is self._parsing:  # no exec meanwhile
                    self._add([module], read_mapped, False)

        threading.Thread(target=parse, name="memtrace-unwind-parse", daemon=True).start()

    def _write(self, lo: int, hi: int, placed: tuple[array, array]) -> bool:
        offsets, steps = placed
        pages = -(-(hi - lo) // PAGE_BYTES)
        if (self._next_row + len(offsets) > self._capacity["unwind_rows"]
                or self._next_page + pages + 1 > self._capacity["unwind_pages"]
                or len(self._modules) >= self._capacity["unwind_modules"]):
            self.full = True
            return False
        last = offsets[-1]
        first_rows = []
        for p in range(pages + 1):
            i = bisect.bisect_right(offsets, min(p * PAGE_BYTES, last)) - 1
            first_rows.append(self._next_row + max(i, 0))
        if any(b - a >= MAX_ROWS_PER_PAGE for a, b in zip(first_rows, first_rows[1:])):
            return False  # not found by the BPF search: frame pointers only there
        # A row (common.bpf.c) is its offset (u32) then its step (elf.pack_step).
        data = bytearray(_ROW_BYTES * len(offsets))
        words = memoryview(data).cast("I")
        words[0::2] = offsets
        words[1::2] = steps
        at = self._next_row * _ROW_BYTES
        self._map("unwind_rows")[at : at + len(data)] = data
        # An array map keeps each value in 8 bytes: the u32 and 4 of padding.
        data = struct.pack(f"<{len(first_rows)}Q", *first_rows)
        self._map("unwind_pages")[self._next_page * 8 : self._next_page * 8 + len(data)] = data
        self._modules.append((lo, hi, self._next_page))
        self._next_row += len(offsets)
        self._next_page += pages + 1
        self.rows = self._next_row
        return True

    def _publish(self) -> None:
        """The module list, sorted, then its count: a walk under way reads
        at worst a list one module short."""
        self._modules.sort()
        data = b"".join(_MODULE.pack(lo, hi, page, 0) for lo, hi, page in self._modules)
        self._map("unwind_modules")[: len(data)] = data
        self._set_head()

    def _set_head(self) -> None:
        """The module count and a new generation (the walk's cache of rows
        found drops what it found in older tables)."""
        self._generation += 1
        head = self._bpf["unwind_head"]
        value = head.Leaf()
        value.modules = len(self._modules)
        value.generation = self._generation
        head[ctypes.c_int(0)] = value


def _place(info: UnwindInfo, start: int, end: int, file_offset: int) -> Optional[tuple[array, array]]:
    """(offsets from the mapping's start, steps) of the rows of the part of
    a file that one mapping holds; the row holding at the start comes first."""
    segment = next((s for s in info.segments
                    if s.offset <= file_offset < s.offset + max(s.filesz, 1)), None)
    if segment is None:
        return None
    delta = segment.offset - segment.vaddr - file_offset  # file address -> mapping offset
    addresses = info.addresses
    first = bisect.bisect_left(addresses, -delta)
    stop = bisect.bisect_left(addresses, end - start - delta, first)
    if first == stop:
        return None
    offsets = array("I", map(delta.__add__, addresses[first:stop]))
    steps = info.steps[first:stop]
    if first > 0 and offsets[0] > 0:  # the row before holds at the start
        offsets.insert(0, 0)
        steps.insert(0, info.steps[first - 1])
    return offsets, steps
