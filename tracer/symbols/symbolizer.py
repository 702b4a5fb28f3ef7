"""Addresses of one process to `function+0xoff [module]` strings.

The module map comes from /proc/PID/maps, re-read when an address falls
outside it (a library loaded late: the JVM loads libz long after start)
and kept after the process exits, so stacks seen in the last interval are
still named. Names are cached per address; a name that may still come
(a debug file being fetched, generated code not in the JVM's perf map
yet) is provisional: when it comes, `generation` moves on and those
addresses are named again. A JVM's compiled code is named from its code
heap each time (code is freed and the address reused), and an address's
last name from there is kept for when the code is gone."""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from memtrace.symbols import debuginfo

from memtrace.jvm import methods as jvm_methods
from memtrace.cpython import codes as python_codes
from memtrace.cpython import runtime as python_runtime

from memtrace.process import procfs
from memtrace.symbols.elf import ElfSymbols, demangle, imported_names, symbols_of
from memtrace.jvm.perfmap import MODULE as JVM_MODULE, PerfMap, is_hotspot
from memtrace.process.mappedfile import fd_path, open_mapped
from memtrace.model.frames import UNNAMED_FUNCTION

MAX_JIT_SEEN = 200_000  # compiled code's last names from the code heap, at most

# What code mapped from no file shows as its module, outside a JVM.
GENERATED_MODULE = "generated code"


@dataclass(frozen=True)
class Module:
    start: int
    end: int
    file_offset: int
    path: str  # as the process sees it: a name, not what we open
    mapping: procfs.Mapping  # what opening it checks against


def read_mapped(pid: int, module: Module, read):
    """read(path) of the very file a module of process pid maps; None when
    it cannot be opened."""
    try:
        fd = open_mapped(pid, module.mapping)
    except OSError:
        return None
    try:
        return read(fd_path(fd))
    finally:
        os.close(fd)


def code_modules(mappings) -> list[Module]:
    """One executable, file-backed mapping per file, of /proc/PID/maps."""
    code = {}
    for m in mappings:
        if "x" in m.perms and m.path.startswith("/") and m.inode:
            code.setdefault((m.device, m.inode),
                            Module(m.start, m.end, m.offset, m.path.removesuffix(" (deleted)"), m))
    return list(code.values())


class Symbolizer:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._modules: list[Module] = []
        self._starts: list[int] = []
        self._names: dict[int, str] = {}
        self._code: list[tuple[int, int]] = []  # executable ranges, JIT code included
        self._is_code: dict[int, bool] = {}  # addresses asked since the ranges were read
        self._code_files: list[Module] = []
        self._images: dict[tuple, Optional[ElfSymbols]] = {}  # by the mapping's (device, inode)
        self._refreshed_this_round = False
        self.generation = 0  # moves on when names came for provisional frames
        self._provisional: set[int] = set()  # addresses whose name may still come
        self._provisional_frames: set[str] = set()  # the text they were given
        # What provisional frames read as when `generation` last moved on:
        # a stack with none of them is named as before.
        self.stale_frames: frozenset[str] = frozenset()
        self._fetching: dict[str, list[ElfSymbols]] = {}  # build id -> images waiting for it
        self.perf_map: Optional[PerfMap] = None  # when the process is a HotSpot JVM
        self._jit_asked: set[int] = set()  # generated code the perf map was asked for
        self._jit_seen: dict[int, str] = {}  # the last name the code heap gave an address
        self._jit_this_round: dict[int, str] = {}  # read in the heap this snapshot: not again
        self.java: Optional[jvm_methods.JavaMethods] = None  # interpreted frames' methods
        self.python: Optional[python_codes.PythonCodes] = None  # CPython 3.11's frames
        self.python_unread: Optional[str] = None  # another CPython's version: C frames only

    def new_round(self) -> None:
        """Once per snapshot: allows one re-read of the module map, and
        takes the names that came in the background."""
        self._refreshed_this_round = False
        self._jit_this_round.clear()
        self._names_came()

    def refresh(self) -> bool:
        mappings = procfs.maps(self.pid)
        if not mappings:
            return False  # gone: keep what we knew
        modules = []
        self._code = [(m.start, m.end) for m in mappings if "x" in m.perms]
        self._is_code = {}
        for m in mappings:
            if not m.path.startswith("/") or not m.inode:
                continue
            modules.append(Module(m.start, m.end, m.offset, m.path.removesuffix(" (deleted)"), m))
        self._modules = modules
        self._starts = [m.start for m in modules]
        self._code_files = code_modules(mappings)
        if self.perf_map is None and is_hotspot(m.path for m in modules):
            self.perf_map = PerfMap(self.pid)
        if self.java is None:
            self.java = jvm_methods.for_process(self.pid, mappings)
        if self.python is None:
            self.python = python_codes.for_process(self.pid, mappings)
            if self.python is None:  # another CPython: the notes say so
                self.python_unread = python_runtime.other_version(mappings)
        return True

    def image(self, module: Module) -> Optional[ElfSymbols]:
        """The ELF image of the file a module maps: only ever that inode
        (mappedfile), parsed once; None when it cannot be opened."""
        key = (module.mapping.device, module.mapping.inode)
        if key not in self._images:
            elf = self._images[key] = self._read_mapped(module, symbols_of)
            if elf is not None:
                self._find_names(elf, module)
        return self._images[key]

    def _find_names(self, elf: ElfSymbols, module: Module) -> None:
        """Names from a debug file: a local one now, else from debuginfod
        in the background, for a stripped file only."""
        if elf.debug_checked or elf.has_symtab:
            return
        if debuginfo.attach_debug_names(elf, module.path, f"/proc/{self.pid}/root"):
            return
        fetcher = debuginfo.client()
        if fetcher is None or not elf.build_id or ".gnu_debugdata" in elf.names_from:
            return
        path = fetcher.request(elf.build_id)
        if path is not None:
            elf.add_names(debuginfo.read_fetched(path, elf.build_id), path)
        else:
            self._fetching.setdefault(elf.build_id, []).append(elf)

    def settle(self, timeout_s: float) -> None:
        """Before the last snapshot: let fetches and a perf-map refresh
        under way end, within `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        if self.perf_map is not None:
            self.perf_map.wait(timeout_s)
        fetcher = debuginfo.client()
        for build_id in list(self._fetching):
            if fetcher is not None:
                fetcher.wait(build_id, max(0.0, deadline - time.monotonic()))

    def _names_came(self) -> None:
        """Debug files fetched and perf maps rewritten since the last look:
        provisional names are made again."""
        came = False
        fetcher = debuginfo.client()
        if self._fetching and fetcher is not None:
            for build_id in list(self._fetching):
                done, path = fetcher.result(build_id)
                if not done:
                    continue
                images = self._fetching.pop(build_id)
                if path is not None:
                    names = debuginfo.read_fetched(path, build_id)
                    for elf in images:
                        elf.add_names(names, path)
                    came = came or bool(names)
        if self.perf_map is not None:
            self.perf_map.tick()
            came = self.perf_map.take_update() or came
        if came and self._provisional:
            for addr in self._provisional:
                self._names.pop(addr, None)
            self.stale_frames = frozenset(self._provisional_frames)
            self._provisional.clear()
            self._provisional_frames.clear()
            self.generation += 1

    def _mark_provisional(self, addr: int, text: str) -> None:
        self._provisional.add(addr)
        self._provisional_frames.add(text)

    def new_image(self) -> None:
        """The process exec'd: the old image's names, its JVM and what was
        asked of it no longer hold."""
        self._names.clear()
        self._is_code.clear()
        self._provisional.clear()
        self._provisional_frames.clear()
        self._jit_asked.clear()
        self._jit_seen.clear()
        self._jit_this_round.clear()
        self.perf_map = self.java = None
        if self.python is not None:
            self.python.close()
            self.python = None
        self.python_unread = None
        self._refreshed_this_round = False

    def code_modules(self) -> list[Module]:
        """One executable mapping per file the process runs code from."""
        return list(self._code_files)

    def read_mapped(self, module: Module, read):
        """read(path) of the very file a module maps (None if it cannot be
        opened)."""
        return self._read_mapped(module, read)

    def _read_mapped(self, module: Module, read):
        return read_mapped(self.pid, module, read)

    def code_imports(self, name: str) -> bool:
        """Whether a file the process runs code from takes `name` from
        another object (read once per file and version)."""
        return any(name in (self._read_mapped(module, imported_names) or ())
                   for module in self._code_files)

    def _module_of(self, addr: int) -> Optional[Module]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._modules[i].end:
            return self._modules[i]
        return None

    def is_code(self, addr: int) -> bool:
        """Whether a return address can be real: a frame-pointer walk through
        code built without frame pointers yields data addresses."""
        known = self._is_code.get(addr)
        if known is not None:
            return known  # 100,000 new stacks ask for the same ~30 addresses each
        if addr & jvm_methods.JVM_METHOD_TAG:
            return self.java is not None  # an interpreted frame's method (bpf/jvm.bpf.c)
        if python_codes.is_python_frame(addr):
            return self.python is not None  # a Python frame's code (bpf/python.bpf.c)
        if not self._code:
            self.refresh()
        i = bisect.bisect_right(self._code, (addr, float("inf"))) - 1
        known = self._is_code[addr] = i >= 0 and addr < self._code[i][1]
        return known

    def frame(self, addr: int) -> str:
        known = self._names.get(addr)
        if known is not None:
            return known
        if addr & jvm_methods.JVM_METHOD_TAG:
            return self._java_method(addr)
        if python_codes.is_python_frame(addr):
            return self._python_frame(addr)
        module = self._module_of(addr)
        if module is None and not self._refreshed_this_round:
            self._refreshed_this_round = True
            if self.refresh():
                module = self._module_of(addr)
        if module is None:
            return self._generated_code(addr)
        elf = self.image(module)
        text, named = _describe(module, elf, addr)
        self._names[addr] = text
        if not named and elf is not None and elf.build_id in self._fetching:
            self._mark_provisional(addr, text)
        return text

    def _generated_code(self, addr: int) -> str:
        """An address outside every mapped file: the JVM's generated code.
        Named from the code heap while the JVM runs: what is there now
        (the perf map may be seconds old, and code it listed freed and
        reused since); where the heap holds nothing now (code freed, the
        JVM gone), by the last name the heap gave the address; else from
        the perf map, still asked for new code as a fallback (code the
        heap cannot name, a JVM that exited before its stacks were named).
        Else a bare address, not cached (a region we never saw). In a
        process that is not a JVM, code in an executable mapping of no
        file is generated code (qemu's translated guest code, another
        JIT, a trampoline): said, for the stacks that end in it."""
        if self.perf_map is None:
            return f"0x{addr:x} [{GENERATED_MODULE}]" if self.is_code(addr) else f"0x{addr:x}"
        known = self._jit_this_round.get(addr)
        if known is not None:
            return known  # a snapshot's new stacks share their frames' code
        if addr not in self._jit_asked:  # new code: once per address
            self._jit_asked.add(addr)
            self.perf_map.want_refresh()
        heap = self.java is not None and self.java.blob_layout is not None
        found = self.java.compiled_code(addr) if heap else None
        if found is not None and found[0] is not None:
            text = f"{found[0]}+0x{found[1]:x} [{JVM_MODULE}]"
            if addr in self._jit_seen or len(self._jit_seen) < MAX_JIT_SEEN:
                self._jit_seen[addr] = text
            self._jit_this_round[addr] = text
            return text
        if found is None and addr in self._jit_seen:
            return self._jit_seen[addr]
        mapped = self.perf_map.lookup(addr)
        if mapped is None:
            text = f"0x{addr:x} [{JVM_MODULE}]"
            self._mark_provisional(addr, text)
        else:
            text = f"{mapped[0]}+0x{mapped[1]:x} [{JVM_MODULE}]"
        if not heap:
            self._names[addr] = text
        return text

    def _java_method(self, addr: int) -> str:
        """An interpreted frame: `Class.method(args) [Interpreter]`; a
        method not readable yet (its class being loaded) is asked again."""
        method = addr & ~jvm_methods.JVM_METHOD_TAG
        name = self.java.name(method) if self.java is not None else None
        if name is None:
            text = f"Method* 0x{method:x} [{jvm_methods.MODULE}]"
            self._mark_provisional(addr, text)
            return text
        text = self._names[addr] = f"{name} [{jvm_methods.MODULE}]"
        return text

    def _python_frame(self, addr: int) -> str:
        """A Python frame: `qualname (file:line) [py]`, its code object's
        header read each time (code objects are freed and replaced). One not readable is not asked again: its
        code object ran when the frame was stored, so it is freed now, or
        the process is gone."""
        name = self.python.name(addr) if self.python is not None else None
        if name is None:
            code, _ = python_codes.split_frame_value(addr)
            return f"code at 0x{code:x} [{python_codes.MODULE}]"
        return name

    def frames(self, addrs: Iterable[int]) -> tuple[str, ...]:
        if self.java is None:
            return tuple(self.frame(a) for a in addrs)
        with self.java.batch():  # one open reader of the JVM's memory per stack
            return tuple(self.frame(a) for a in addrs)

    def return_addresses(self, words: Iterable[int]) -> list[int]:
        """The words of a raw stack that are return addresses: inside a
        module's code, right after a call instruction. A scan, for code
        without frame pointers: it can also find stale ones of returned
        calls, so callers label the result."""
        out = []
        for word in words:
            if word < 4096 or not self.is_code(word):
                continue
            module = self._module_of(word)
            if module is not None and _follows_call(_code_before(module, self.image(module),
                                                                  word, 7)):
                out.append(word)
        return out

    def module_name(self, addr: int) -> str:
        module = self._module_of(addr)
        return os.path.basename(module.path) if module else ""


def _describe(module: Module, elf: Optional[ElfSymbols], addr: int) -> tuple[str, bool]:
    """The frame's text, and whether it names its function. A function
    known only by where it starts (.eh_frame of a stripped file) shows as
    `function at 0x<start>+0x<offset> [module]`: one name per function,
    as reports group frames, with the start as `nm` and `objdump` show it."""
    base = os.path.basename(module.path)
    file_offset = addr - module.start + module.file_offset
    vaddr = elf.vaddr_of_offset(file_offset) if elf is not None else None
    found = elf.lookup(vaddr) if vaddr is not None else None
    if found is None:
        return f"0x{file_offset:x} [{base}]", False
    if found.name is None:
        return f"{UNNAMED_FUNCTION}0x{found.start:x}+0x{found.offset:x} [{base}]", False
    return f"{demangle(found.name)}+0x{found.offset:x} [{base}]", True


def _code_before(module: Module, elf: Optional[ElfSymbols], addr: int, n: int) -> bytes:
    if elf is None:
        return b""
    vaddr = elf.vaddr_of_offset(addr - module.start + module.file_offset)
    if vaddr is None or vaddr < n:
        return b""
    return elf.read(vaddr - n, n) or b""


def _follows_call(before: bytes) -> bool:
    """Whether the bytes before an address end with a call instruction:
    call rel32 (e8), or call through a register or memory (ff /2) with no,
    8-bit or 32-bit displacement."""
    if len(before) < 7:
        return False

    def call_modrm(at: int, mod: tuple[int, ...]) -> bool:
        return before[at] == 0xFF and (before[at + 1] >> 3) & 7 == 2 and before[at + 1] >> 6 in mod

    return (before[-5] == 0xE8 or call_modrm(-2, (3, 0)) or call_modrm(-3, (1,))
            or call_modrm(-6, (0, 2)) or call_modrm(-7, (2,)))
