"""The unwind tables the BPF stack walk reads (common.bpf.c): per code
module built without frame pointers, its .eh_frame rows placed where the
process maps it, written into mmapped BPF arrays.

Tables go in before the probes see the module's code run where that can
be (a launched program's own image, at exec; every module, at an attach)
and for a library mapped later as soon as its mapping is seen (dlopen:
the calls it makes before are walked by frame pointers only); after an
exec of the traced process, as ld.so maps each (follow_image). The rows
come from an earlier run's cache when it kept them (symbols/unwindfile),
in ms, else from .eh_frame, parsed in tenths of a second. Modules
built with frame pointers get no table: their frame-pointer steps are
exact and cheaper than a table search."""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from memtrace.process import procfs
from memtrace.process.target import objects_of_image
from memtrace.symbols.elf import UnwindInfo, unwind_info_of, unwind_info_ready
from memtrace.symbols.symbolizer import code_modules, read_mapped

PAGE_BYTES = 4096
# How long at most, and how often, an exec'd image's maps are read for
# the libraries ld.so maps.
IMAGE_FOLLOW_S = 0.02
IMAGE_POLL_S = 0.001
MAX_ROWS_PER_PAGE = 1 << 12  # ROW_SEARCH_STEPS in common.bpf.c
ROW_BYTES = 8  # struct unwind_row (bpf/memtrace.h): a u32 offset and its step
_MODULE = struct.Struct("<QQII")


def warm(paths: Iterable[str]) -> threading.Thread:
    """Read the unwind rows of files the process will map, in the
    background (the BPF compile takes seconds): a library then gets its
    table a few ms after it is mapped, not after its rows are parsed
    (libc: 0.1 s the first time, in which its first calls are walked by
    frame pointers; then read from the cache)."""
    def read() -> None:
        for path in paths:
            unwind_info_of(path)

    thread = threading.Thread(target=read, name="memtrace-unwind-warm", daemon=True)
    thread.start()
    return thread


def follow_image(tables: "UnwindTables", pid: int) -> None:
    """After an exec: place each module's table as soon as /proc/PID/maps
    shows it, where the events that name its mapping are read up to 100 ms
    later while the program runs; and read, on a thread, the rows of the
    new program and of the libraries ld.so is about to map for it (a pyenv
    shim execs bash, then bash the Python that maps libpython: each image
    starts with nothing). The maps are read on the caller's thread, until
    they stop changing or for IMAGE_FOLLOW_S: a thread of its own would
    wait up to 5 ms a turn for the interpreter lock, while malloc runs
    unwalkable."""
    read = lambda module, fn: read_mapped(pid, module, fn)  # noqa: E731
    until = time.monotonic() + IMAGE_FOLLOW_S
    mapped: Optional[set] = None
    while True:
        modules = code_modules(procfs.maps(pid))
        tables.add(modules, read)
        if mapped is None:
            warm(_image_objects(pid))  # once what is mapped has its table
        now = {(m.mapping.device, m.mapping.inode) for m in modules}
        # The program and ld.so first; ld.so then maps the libraries at once.
        if not now or (now == mapped and len(now) > 2) or time.monotonic() >= until:
            return
        mapped = now
        time.sleep(IMAGE_POLL_S)


def _image_objects(pid: int) -> Iterator[str]:
    yield f"/proc/{pid}/exe"  # the very file, in whatever mount namespace
    yield from objects_of_image(pid)


class UnwindTables:
    """The tables of one traced process, in one loaded BPF object."""

    def __init__(self, bpf) -> None:
        self._bpf = bpf
        self._lock = threading.Lock()  # add() from the collector and from parsing threads
        self._generation = 0
        self._maps: dict[str, mmap.mmap] = {}
        self._capacity = {name: bpf[name].max_entries for name in
                          ("unwind_rows", "unwind_pages", "unwind_modules")}
        self._reset()

    def reset(self) -> None:
        """A new address space (an exec): nothing of the old one holds."""
        with self._lock:  # not while a parsing thread places a module of the old one
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
        self.full: Optional[str] = None  # the table a module found full first
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

    def add(self, modules: Iterable, read_mapped: Callable, wait: bool = False) -> int:
        """Tables for the code modules (symbols.Module) not seen yet;
        read_mapped(module, fn) reads the very file mapped. A module whose
        rows are not parsed yet is parsed on a thread, which places it when
        done, unless `wait`: a snapshot never waits a second for libjvm.so
        (its calls meanwhile are walked by frame pointers). Returns how
        many modules got one."""
        with self._lock:
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
            layout = _layout_of(info, module.end - module.start, module.file_offset)
            if layout is not None and self._write(module.start, module.end, layout):
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

    def _write(self, lo: int, hi: int, layout: "_Layout") -> bool:
        pages = len(layout.first_rows)
        needs = {"unwind_rows": self._next_row + layout.count, "unwind_pages": self._next_page + pages,
                 "unwind_modules": len(self._modules) + 1}
        short = next((name for name, n in needs.items() if n > self._capacity[name]), None)
        if short is not None:
            self.full = self.full or short
            return False
        at = self._next_row * ROW_BYTES
        self._map("unwind_rows")[at : at + len(layout.rows)] = layout.rows
        # An array map keeps each value in 8 bytes: the u32 and 4 of padding.
        data = struct.pack(f"<{pages}Q", *[self._next_row + i for i in layout.first_rows])
        self._map("unwind_pages")[self._next_page * 8 : self._next_page * 8 + len(data)] = data
        self._modules.append((lo, hi, self._next_page))
        self._next_row += layout.count
        self._next_page += pages
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


@dataclass(frozen=True)
class _Layout:
    """A module's table as the BPF arrays hold it, wherever it is mapped:
    its rows (offset from the mapping's start: u32, then the step), and
    for each 4 KiB page the row holding at its start, counted from the
    module's first row. The same file mapped alike after every exec (libc)
    is laid out once."""
    rows: bytes
    count: int
    first_rows: list[int]


_layouts: OrderedDict = OrderedDict()  # (id(info), size, file offset) -> (info, layout)
_layouts_lock = threading.Lock()
LAYOUTS_KEPT = 16  # a few MB: libc and the other libraries of a chain of execs


def _layout_of(info: UnwindInfo, size: int, file_offset: int) -> Optional[_Layout]:
    """The layout of the mapping of `size` bytes from file_offset; None
    when no row falls in it, or a page holds more rows than the BPF search
    reaches (frame pointers only there)."""
    key = (id(info), size, file_offset)
    with _layouts_lock:
        known = _layouts.get(key)
        if known is not None and known[0] is info:
            _layouts.move_to_end(key)
            return known[1]
    layout = None
    placed = _place(info, 0, size, file_offset)
    if placed is not None:
        offsets, steps = placed
        last = offsets[-1]
        first_rows = [max(bisect.bisect_right(offsets, min(p * PAGE_BYTES, last)) - 1, 0)
                      for p in range(-(-size // PAGE_BYTES) + 1)]
        if all(b - a < MAX_ROWS_PER_PAGE for a, b in zip(first_rows, first_rows[1:])):
            rows = bytearray(ROW_BYTES * len(offsets))
            words = memoryview(rows).cast("I")  # little-endian, as the walk reads them
            words[0::2] = offsets
            words[1::2] = steps
            layout = _Layout(bytes(rows), len(offsets), first_rows)
    with _layouts_lock:
        _layouts[key] = (info, layout)  # info held: its id is not reused meanwhile
        if len(_layouts) > LAYOUTS_KEPT:
            _layouts.popitem(last=False)
    return layout


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
