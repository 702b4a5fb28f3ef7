"""Load the BPF programs, attach them to one process, and read the kernel's
maps: heap aggregates, per-bucket flows and address-space events. The only
module that talks to bcc."""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import Collection, Iterable, Iterator, Optional, Sequence

from memtrace.process import procfs
from memtrace.model.accounting import BucketBook
from memtrace.collect.bpfsource import bpf_dir, program_text
from memtrace.collect.probesite import ProbeSite, choose_site
from memtrace.collect.rows import RowBook
from memtrace.collect.unwind import UnwindTables, warm
from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Counters, DropStats, Flow, HeapRow
from memtrace.symbols.symbolizer import code_modules, read_mapped

# Counter indexes: keep in step with enum counter in bpf/memtrace.h.
(CNT_UNTRACKED_FREE, CNT_DROP_ALLOCS, CNT_DROP_STATS, CNT_DROP_PENDING, CNT_STACK_LOST,
 CNT_VM_LOST, CNT_VM_SENT) = range(7)

LAYERS = ["jvm", "python", "go", "common", "vm", "heap", "launch"]  # jvm, python, go: the frame walk calls into them
VM_SYSCALLS = ("mmap", "munmap", "brk", "mprotect", "mremap", "madvise")  # --vm-probes kprobe
# Attached only by watch_rss().
RSS_PROGRAM = b"tracepoint__kmem__rss_stat"

# bcc's compiler, in the shared libraries bcc is linked with.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
MADV_DONTNEED = 4


@dataclass(frozen=True)
class Hook:
    symbol: str
    entry: str  # BPF function run at the probe site
    ret: Optional[str]  # BPF function run at return, if any
    macro: str  # prefix of the -D<MACRO>_SP_ADJUST knob


# Order matters: where an allocator aliases two names to one address
# (memalign and aligned_alloc in glibc 2.36, malloc and tc_malloc in
# tcmalloc), the first name is probed and the others skipped, so a call is
# never counted twice.
COMMON_HOOKS = (
    Hook("malloc", "malloc_enter", "alloc_return", "MALLOC"),
    Hook("calloc", "calloc_enter", "alloc_return", "CALLOC"),
    Hook("realloc", "realloc_enter", "alloc_return", "REALLOC"),
    Hook("free", "free_enter", None, "FREE"),
    Hook("posix_memalign", "posix_memalign_enter", "alloc_return", "POSIX_MEMALIGN"),
    Hook("memalign", "memalign_enter", "alloc_return", "MEMALIGN"),
    Hook("aligned_alloc", "aligned_alloc_enter", "alloc_return", "ALIGNED_ALLOC"),
    Hook("valloc", "valloc_enter", "alloc_return", "VALLOC"),
    Hook("pvalloc", "pvalloc_enter", "alloc_return", "PVALLOC"),
)
GLIBC_HOOKS = COMMON_HOOKS + (Hook("malloc_trim", "trim_enter", "trim_return", "TRIM"),)

# The other allocators' own entry points: their sized and flagged calls,
# and C++'s operators, which they define themselves (libstdc++'s go through
# malloc, theirs do not). A block's size comes first in every new, its
# address first in every delete and free. Functions with a return probe
# are probed at +0 (see resolve_sites), so sharing malloc_enter's
# MALLOC_SP_ADJUST (0) is right; free_enter reads no stack.
_NEW = ("_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t", "_ZnwmSt11align_val_t",
        "_ZnamSt11align_val_t", "_ZnwmSt11align_val_tRKSt9nothrow_t",
        "_ZnamSt11align_val_tRKSt9nothrow_t")
_DELETE = ("_ZdlPv", "_ZdaPv", "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t", "_ZdlPvm", "_ZdaPvm",
           "_ZdlPvSt11align_val_t", "_ZdaPvSt11align_val_t",
           "_ZdlPvSt11align_val_tRKSt9nothrow_t", "_ZdaPvSt11align_val_tRKSt9nothrow_t",
           "_ZdlPvmSt11align_val_t", "_ZdaPvmSt11align_val_t")
OTHER_HOOKS = COMMON_HOOKS + (
    Hook("mallocx", "malloc_enter", "alloc_return", "MALLOC"),  # jemalloc (size, flags)
    Hook("rallocx", "realloc_enter", "alloc_return", "REALLOC"),  # jemalloc (p, size, flags)
    Hook("reallocarray", "reallocarray_enter", "alloc_return", "REALLOC"),  # mimalloc
    Hook("dallocx", "free_enter", None, "FREE"),  # jemalloc (p, flags)
    Hook("sdallocx", "free_enter", None, "FREE"),  # jemalloc (p, size, flags)
    Hook("free_sized", "free_enter", None, "FREE"),  # C23
    Hook("free_aligned_sized", "free_enter", None, "FREE"),
    Hook("cfree", "free_enter", None, "FREE"),
) + tuple(Hook(n, "malloc_enter", "alloc_return", "MALLOC") for n in _NEW) \
  + tuple(Hook(n, "free_enter", None, "FREE") for n in _DELETE)


def hooks_for(kind: str, prefix: str = "") -> tuple[Hook, ...]:
    """prefix: a copy linked into the program under its own names (je_):
    C++'s operators keep theirs."""
    hooks = GLIBC_HOOKS if kind == "glibc" else OTHER_HOOKS
    if not prefix:
        return hooks
    return tuple(h if h.symbol.startswith("_Z") else replace(h, symbol=prefix + h.symbol)
                 for h in hooks)


@dataclass
class Limits:
    max_allocs: int = 1 << 20
    max_stats: int = 65536
    max_stacks: int = 65536
    max_threads: int = 16384
    event_buffer_bytes: int = 16 << 20
    max_targets: int = 1  # processes one loaded object traces at once
    # Unwind rows of the code built without frame pointers (8 bytes each,
    # allocated at start). Debian's qemu-system-x86_64 maps 52 such files
    # with 646,000 rows: at 1 << 19 the libraries it dlopens found the
    # tables full, and every stack through them stopped there.
    unwind_rows: int = 1 << 21


# -DALLOCATOR_KIND: keep in step with ALLOCATOR_* in bpf/memtrace.h.
ALLOCATOR_KINDS = {"glibc": 0, "jemalloc": 1, "tcmalloc": 2, "mimalloc": 3}

TGID_LIMIT = 1 << 22  # keep in step with bpf/memtrace.h
# Slots of the walk programs: keep in step with enum walk_kind in bpf/common.bpf.c.
WALK_HEAP, WALK_VM = 0, 1

# kmem:rss_stat's members: keep in step with enum rss_member in bpf/memtrace.h.
RSS_MEMBERS = ("file", "anon", "swap", "shmem")


@dataclass(frozen=True)
class PeakReading:
    """The traced heap's live bytes now and at their highest (kernel-side,
    at every call), and when that was (bpf_ktime_get_ns, CLOCK_MONOTONIC)."""

    live_bytes: int = 0
    peak_bytes: int = 0
    peak_ns: int = 0


@dataclass(frozen=True)
class RssReading:
    """RSS counters in bytes by member name (only those reported since the
    attach), and when the last report came (CLOCK_MONOTONIC ns)."""

    bytes_by_member: dict
    ts_ns: int


class _Flows:
    """The flows of a read, each time they are iterated: the arena
    accounting reads the sums per bucket instead, and a list of every flow
    made each interval went unused. Valid until the next read."""

    def __init__(self, rows: list[Optional[Flow]], folded: dict) -> None:
        self._rows, self._folded = rows, folded

    def __iter__(self) -> Iterator[Flow]:
        return itertools.chain(filter(None, self._rows), self._folded.values())


@dataclass
class HeapReading:
    rows: Collection[HeapRow]
    flows: Iterable[Flow]
    untracked_free_count: int
    trim_calls: int
    trim_released_calls: int
    drops: DropStats
    thread_names: dict[int, str] = field(default_factory=dict)
    peak: PeakReading = PeakReading()
    rss: Optional[RssReading] = None
    exec_generation: int = 0
    # Kept up to date from the flows that changed (memtrace.collect.rows):
    # the keys of the rows that changed since the last read (None: take
    # every row as new), and the sums of all rows.
    changed_rows: Optional[set] = None
    rows_by_key: dict = field(default_factory=dict)
    totals: Optional[Counters] = None
    per_tid: dict[int, Counters] = field(default_factory=dict)
    live_chunk_bytes: Optional[int] = None
    # The flows per 64 MiB bucket, kept like the rows: what the arena
    # accounting reads instead of the flows.
    buckets: Optional[BucketBook] = None


def _quiet_compile(into: Optional[int] = None):
    """bcc prints clang's warnings about kernel headers to stderr; keep them
    for MEMTRACE_BPF_VERBOSE only (else into the file `into`)."""
    if os.environ.get("MEMTRACE_BPF_VERBOSE"):
        return contextlib.nullcontext()
    return redirect_fd2(into)


# The option that sizes each map, for a map the kernel refuses.
MAP_OPTIONS = {
    "allocs": "--max-allocs",
    "stacks": "--stack-storage-size",
    "vm_events": "--event-buffer",
    "heap_index": "--max-stats",
    "heap_counts": "--max-stats",
    "heap_keys": "--max-stats",
}
_MAP_REFUSED = re.compile(r"could not open bpf map: (\w+), error: ([^\n]+)")


def refused_map(bcc_output: str) -> Optional[str]:
    """What to say when bcc reports a map the kernel would not create."""
    found = _MAP_REFUSED.findall(bcc_output)
    if not found:
        return None
    name, reason = found[-1]
    option = MAP_OPTIONS.get(name)
    fix = f"give a smaller {option}" if option else "check the kernel's BPF support"
    return f"the kernel refused the BPF map {name} ({reason.strip()}): {fix}"


@contextlib.contextmanager
def redirect_fd2(into: Optional[int] = None) -> Iterator[None]:
    """fd 2, where libbcc and clang write, sent into the file `into`
    (default /dev/null) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    sink = os.open(os.devnull, os.O_WRONLY) if into is None else os.dup(into)
    os.dup2(sink, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


def _relays(path: str, addr: int, probed: set[int]) -> bool:
    """The function at addr only jumps on: to another function we probe,
    or through the PLT (jemalloc's operator delete calls free that way).
    Probing it too would see each call twice (a free of an unknown block
    the second time)."""
    from memtrace.collect.probesite import function_code
    from memtrace.symbols.elf import symbols_of

    try:
        code = function_code(path, addr, 9)
    except MemtraceError:
        return False
    if code[:4] == b"\xf3\x0f\x1e\xfa":  # endbr64
        code, addr = code[4:], addr + 4
    if code[:1] == b"\xe9" and len(code) >= 5:
        target = addr + 5 + int.from_bytes(code[1:5], "little", signed=True)
    elif code[:1] == b"\xeb" and len(code) >= 2:
        target = addr + 2 + int.from_bytes(code[1:2], "little", signed=True)
    else:
        return False
    if target in probed:
        return True
    image = symbols_of(path)  # never realpath: /proc/self/fd/N names the verified file
    return image.lookup(target) is None  # no function there: a PLT stub


def resolve_sites(libc_path: str, kind: str = "glibc", prefix: str = "") -> list[ProbeSite]:
    """One site per distinct address of the allocator's entry points:
    aliases are probed once. Kept in the cache (cachefiles) per allocator
    file and per version of the code that chooses: the choice disassembles
    every entry point (~0.1 s)."""
    import dataclasses
    import json

    from memtrace import cachefiles
    from memtrace.collect import bpfcache

    key = _sites_key(libc_path, kind, prefix) if bpfcache.usable() else None
    if key is not None:
        data, _ = cachefiles.read_trusted(f"sites-{key}.json", "probe sites")
        try:
            doc = json.loads(data) if data is not None else None
            if doc is not None and doc["key"] == key:
                return [ProbeSite(**{**s, "instructions": tuple(s["instructions"])})
                        for s in doc["sites"]]
        except (ValueError, TypeError, KeyError):
            pass  # chosen again, and written anew
    sites = _choose_sites(libc_path, kind, prefix)
    if key is not None:
        cachefiles.write_trusted(f"sites-{key}.json", json.dumps(
            {"key": key, "sites": [dataclasses.asdict(s) for s in sites]}))
    return sites


def _sites_key(libc_path: str, kind: str, prefix: str) -> Optional[str]:
    """The allocator file as it is now (its inode and times: a file
    rewritten in place gets new ones) and the code that chooses its sites."""
    import hashlib

    from memtrace.collect import probesite

    try:
        st = os.stat(libc_path)
        h = hashlib.sha256(repr((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                 st.st_ctime_ns, kind, prefix)).encode())
        for module in (probesite.__file__, __file__):
            with open(module, "rb") as f:
                h.update(f.read())
    except OSError:
        return None
    return h.hexdigest()


def _choose_sites(libc_path: str, kind: str, prefix: str) -> list[ProbeSite]:
    from bcc import BPF

    hooks = hooks_for(kind, prefix)
    pattern = "^(" + "|".join(h.symbol for h in hooks) + ")$"
    found: dict[str, int] = {}
    for name, addr in BPF.get_user_functions_and_addresses(libc_path, pattern):
        found.setdefault(name.decode(), addr)
    sites, seen = [], set()
    probed = set(found.values())
    for hook in hooks:
        addr = found.get(hook.symbol)
        if addr is None or addr in seen or _relays(libc_path, addr, probed):
            continue
        seen.add(addr)
        site = choose_site(libc_path, hook.symbol)
        if hook.ret and site.offset:
            # A uretprobe traps at +0 and swaps the return address for its
            # trampoline there: an entry probe further in would read the
            # trampoline as the caller. Sharing the +0 trap costs nothing
            # more, since the uretprobe's trap is paid anyway.
            site = replace(site, offset=0, sp_adjust=0, emulated=False,
                           note=f"+0: shares the uretprobe's trap (+{site.offset} would be emulated)")
        sites.append(site)
    if not any(s.symbol == prefix + "malloc" for s in sites):
        raise MemtraceError(f"{libc_path} defines no malloc: memtrace probes the object that "
                            "defines the process's malloc; trace a program that has one")
    return sites


class Probes:
    """The loaded BPF object and its attachments for one process. In light
    mode only malloc_trim is probed in libc; the syscall tracepoints and the
    RSS counter are always on."""

    def __init__(self, pid: int, libc_path: str, limits: Limits, sites: list[ProbeSite],
                 light: bool = False, vm_probes: str = "tracepoint",
                 allocator_kind: str = "glibc", allocator_prefix: str = "") -> None:
        """libc_path: the object that defines the process's malloc (glibc's
        libc, or the allocator that replaces it), allocator_kind its kind."""
        self.pid = pid
        self.libc_path = libc_path
        self.allocator_kind = allocator_kind
        self.hooks = hooks_for(allocator_kind, allocator_prefix)
        self.limits = limits
        self.sites = [s for s in sites if s.symbol == "malloc_trim"] if light else sites
        self.light = light
        self.vm_probes = vm_probes
        self.event_error: Optional[Exception] = None
        self.new_python_stacks: list[int] = []  # keys announced by bpf/python.bpf.c
        self.attached: list[str] = []
        self._bpf = None
        self.unwind: Optional[UnwindTables] = None  # once loaded
        self._maps: dict = {}  # name -> mmap of a BPF_F_MMAPABLE array
        # by row: its bytes, its Flow, whether it is folded into _folded (a
        # list: an index reads one slot, where a lookup hashes and compares)
        self._flow_cache: list[Optional[tuple[bytes, Optional[Flow], bool]]] = []
        self._retired: set[int] = set()  # tids whose rows are folded
        self._folded: dict[tuple, list[int]] = {}  # (stack key, bucket) -> sums under tid 0
        self._folded_flows: dict[tuple, Flow] = {}  # the same as flows
        self._folded_dirty: set[tuple] = set()
        self._row_flows: list[Optional[Flow]] = []  # map index -> its flow
        # Each row's key and counts as last decoded (the cache's bytes, in
        # place), for the reads that compare every row.
        self._decoded = (bytearray(), bytearray())
        self._epoch = 0  # heap_epoch: what rows changed since the last read are marked with
        self._reads = 0
        self._read_used = 0  # rows there were at the last read
        self._retire_pending = False
        self._book = RowBook()
        self._book_reset = True
        self._flow_generation = 0
        self._names: dict[int, str] = {}  # tid -> name caught at its first allocation
        self.watching_rss = False
        self.object_note = ""  # where the BPF object came from (--verbose)
        self.attach_note = ""  # how the uprobes are attached (--verbose)
        self._links: list[int] = []  # uprobe_multi link fds

    def cflags(self) -> list[str]:
        flags = [
            f"-I{bpf_dir()}",
            f"-DTARGET_PAGE_SIZE={os.sysconf('SC_PAGE_SIZE')}",
            f"-DALLOC_BUCKET_BITS={alloc_bucket_bits(self.limits.max_allocs)}",
            f"-DMAX_STATS={self.limits.max_stats}",
            f"-DMAX_STACKS={self.limits.max_stacks}",
            f"-DMAX_THREADS={self.limits.max_threads}",
            f"-DMAX_TARGETS={self.limits.max_targets}",
            f"-DMAX_UNWIND_ROWS={self.limits.unwind_rows}",
            f"-DVM_RINGBUF_PAGES={_ring_pages(self.limits.event_buffer_bytes)}",
        ]
        if self.vm_probes == "kprobe":
            flags.append("-DVM_KPROBES")
        if self.light:
            flags.append("-DLIGHT_SCAN")
        # Experiments and benchmarks only (e.g. -DNO_STACKS): never needed to trace.
        flags += os.environ.get("MEMTRACE_BPF_CFLAGS", "").split()
        if self.allocator_kind != "glibc":
            flags.append("-DREALLOC_ZERO_FREES")
        flags.append(f"-DALLOCATOR_KIND={ALLOCATOR_KINDS.get(self.allocator_kind, 0)}")
        # One knob per entry program: hooks that share a program share its
        # site's shape (return-probed ones are all at +0).
        by_symbol = {s.symbol: s for s in self.sites}
        adjust: dict[str, int] = {}
        for hook in GLIBC_HOOKS + self.hooks:  # every macro the BPF text uses
            site = by_symbol.get(hook.symbol)
            if site is not None and hook.macro not in adjust:
                adjust[hook.macro] = site.sp_adjust
        for hook in GLIBC_HOOKS + self.hooks:
            adjust.setdefault(hook.macro, 0)
        flags += [f"-D{macro}_SP_ADJUST={value}" for macro, value in adjust.items()]
        return flags

    def load(self) -> None:
        from memtrace.collect.bcccompat import pass_zero_ref_ctr_offset

        pass_zero_ref_ctr_offset()
        # The code the process runs now: its unwind rows are read while
        # the program compiles, and loaded before any probe fires.
        code = code_modules(procfs.maps(self.pid) or [])
        warming = warm(m.path for m in code)
        text = program_text(LAYERS)
        said = tempfile.TemporaryFile()
        try:
            with _quiet_compile(said.fileno()):
                try:
                    self._bpf = self._compiled(text, self.cflags() + ["-DCALLS_IN_TASK_STORAGE"])
                    self.calls_in = "task storage"
                except Exception:
                    # Before task storage was allowed in uprobe programs
                    # (Linux 5.19 era kernels): the hash map.
                    self._bpf = self._compiled(text, self.cflags())
                    self.calls_in = "hash map"
            if b"kmem:rss_stat" in self._bpf.tracepoint_fds:
                # it waits for watch_rss(): bcc attached it with the rest
                self._bpf.detach_tracepoint(b"kmem:rss_stat")
            self._load_walks()
            self.unwind = UnwindTables(self._bpf)
            warming.join()
            self.unwind.add(code, lambda module, read: read_mapped(self.pid, module, read), wait=True)
        except Exception as e:  # bcc raises bare Exceptions on compile/load errors
            said.seek(0)
            refused = refused_map(said.read(1 << 20).decode(errors="replace") + str(e))
            if refused:
                raise MemtraceError(refused) from None
            raise MemtraceError(
                f"the BPF program failed to load ({str(e).splitlines()[0]}): "
                "run with MEMTRACE_BPF_VERBOSE=1 to see the compiler output"
            ) from None
        finally:
            said.close()

    def _compiled(self, text: str, cflags: list[str]):
        """The BPF object for text and cflags: from the cache when it holds
        one, else compiled by bcc and cached. self.object_note says which."""
        from bcc import BPF

        from memtrace.collect import bpfcache

        if not bpfcache.usable():
            self.object_note = f"compiled (no cache on {os.uname().machine})"
            return BPF(text=text, cflags=cflags)
        key = bpfcache.cache_key(text, cflags)
        cached, why = bpfcache.read_cached(key)
        if cached is not None:
            try:
                bpf = bpfcache.loaded_object(cached, hold=(RSS_PROGRAM,),
                                             preload=self._programs_to_attach())
                self.object_note = why
                return bpf
            except Exception as e:
                if refused_map(str(e)):
                    raise
                why = f"{why} failed to load ({e})"  # compiled afresh below
        bpf = BPF(text=text, cflags=cflags)
        try:
            note = bpfcache.write_cached(bpfcache.extract(bpf, key))
        except bpfcache.Uncacheable as e:
            note = f"compiled, not cached: {e}"
        self.object_note = f"{note}; {why}"
        _give_back_compiler_memory()
        return bpf

    def _programs_to_attach(self) -> tuple:
        """(name, program type, attach type) of what attach() and
        watch_rss() will load."""
        from bcc import BPF

        from memtrace.collect import bpfcache

        hooks = {h.symbol: h for h in self.hooks}
        names = [n for s in self.sites for n in (hooks[s.symbol].entry, hooks[s.symbol].ret) if n]
        multi = bpfcache.BPF_TRACE_UPROBE_MULTI if bpfcache.uprobe_multi_possible() else -1
        wanted = [(n.encode(), BPF.KPROBE, multi) for n in dict.fromkeys(names)]
        if self.vm_probes == "kprobe":
            wanted += [(f"syscall__{c}".encode(), BPF.KPROBE, -1) for c in VM_SYSCALLS]
            wanted.append((b"vm_syscall_return", BPF.KPROBE, -1))
        if not self.light:
            wanted.append((RSS_PROGRAM, BPF.TRACEPOINT, -1))
        # The stack walks the probes tail-call (_load_walks).
        wanted += [(name, prog_type, attach) for name, prog_type, attach, _, _ in self._walk_programs()]
        return tuple(wanted)

    def _walk_programs(self) -> tuple:
        """(name, program type, attach type, prog array, slot) of the stack
        walks the probes tail-call (common.bpf.c). A tail call's target must
        be loaded for the caller's attach type: the uprobes' walk for
        uprobe_multi links where they will be used, the syscall kprobes'
        walk (perf events) in an array of its own."""
        from bcc import BPF

        from memtrace.collect import bpfcache

        multi = bpfcache.BPF_TRACE_UPROBE_MULTI if bpfcache.uprobe_multi_possible() else -1
        if self.vm_probes == "kprobe":
            vm = (b"walk_vm_stack", BPF.KPROBE, -1, "walk_kprobe", WALK_VM)
        else:
            vm = (b"walk_vm_stack", BPF.TRACEPOINT, -1, "walk_tracepoint", WALK_VM)
        return ((b"walk_heap_stack", BPF.KPROBE, multi, "walk_uprobe", WALK_HEAP), vm)

    def _load_walks(self) -> None:
        """The stack walk programs, into the slots the probes tail-call."""
        import ctypes

        for name, prog_type, attach_type, array, slot in self._walk_programs():
            fn = self._bpf.load_func(name, prog_type, attach_type=attach_type)
            self._bpf[array][ctypes.c_int(slot)] = ctypes.c_int(fn.fd)

    def attach(self) -> None:
        """Every return probe before any entry probe. The target keeps
        running while bcc attaches them one by one: an entry seen before its
        function's return probe was in place would open a call that never
        closes. This way a call that fires its entry probe always fires its
        return probe; one already under way when the entry probe came
        fires only its return, which finds no open call and is ignored."""
        if self.vm_probes == "kprobe":
            self._attach_vm_kprobes()
        self.follow()
        self.attach_uprobes()
        if not self.light:
            # Full mode keeps the RSS counters' last values: the process as
            # it was at its exit, when /proc has nothing left to say.
            self.watch_rss()

    def follow(self) -> None:
        """The process joins the traced set: the programs loaded act for it
        from now on."""
        set_traced(self._bpf, self.pid, True)

    def attach_uprobes(self) -> None:
        """This process's uprobes, on its allocator's file: one uprobe_multi
        link per program where the kernel has them, else a perf event each."""
        if not self._attach_links():
            self._attach_perf_events()

    def _link_groups(self) -> dict[tuple[str, bool], list[ProbeSite]]:
        """(program, at return) -> its sites; return programs first."""
        hooks = {h.symbol: h for h in self.hooks}
        groups: dict[tuple[str, bool], list[ProbeSite]] = {}
        for site in self.sites:
            if hooks[site.symbol].ret:
                groups.setdefault((hooks[site.symbol].ret, True), []).append(site)
        for site in self.sites:
            groups.setdefault((hooks[site.symbol].entry, False), []).append(site)
        return groups

    def _attach_links(self) -> bool:
        """One uprobe_multi link per program (Linux 6.6): False, with
        nothing attached, where the kernel has none."""
        from bcc import BPF

        from memtrace.collect import bpfcache

        if not bpfcache.uprobe_multi_possible():
            self.attach_note = ("a perf event per uprobe (no uprobe_multi link on "
                                f"{os.uname().machine} {os.uname().release})")
            return False
        groups = self._link_groups()
        for (program, returns), sites in groups.items():
            offsets = [self._file_offset(site, 0 if returns else site.offset) for site in sites]
            try:
                fn = self._bpf.load_func(program.encode(), BPF.KPROBE,
                                         attach_type=bpfcache.BPF_TRACE_UPROBE_MULTI)
                self._links.append(bpfcache.attach_uprobe_multi(
                    fn.fd, self.libc_path, offsets, self.pid, returns))
            except Exception as e:  # bcc raises bare Exceptions; bpf(2) OSErrors
                reason = e.strerror if isinstance(e, OSError) else str(e)
                # The process is gone (ESRCH), not the kernel's links: a
                # perf event each would fail as well, and bcc leaves the
                # tracefs event of each failed one behind.
                if self._links or (isinstance(e, OSError) and e.errno == errno.ESRCH):
                    raise MemtraceError(
                        f"cannot attach uprobes to {', '.join(s.symbol for s in sites)} in "
                        f"{self.libc_path} ({reason}): check that the process still runs"
                    ) from None
                # None made: this kernel has no uprobe_multi links
                bpfcache.forget_programs(self._bpf, [p.encode() for p, _ in groups])
                self.attach_note = f"a perf event per uprobe (no uprobe_multi link: {reason})"
                return False
        self.attached = [s.symbol for s in self.sites]
        self.attach_note = f"{len(self._links)} uprobe_multi links"
        return True

    def _file_offset(self, site: ProbeSite, sym_off: int) -> int:
        from bcc import BPF

        try:
            _, offset = BPF._check_path_symbol(self.libc_path.encode(), site.symbol.encode(), 0,
                                               self.pid, sym_off)
        except Exception as e:  # bcc raises bare Exceptions
            raise MemtraceError(f"cannot find {site.symbol} in {self.libc_path} ({e})") from None
        return offset

    def _attach_perf_events(self) -> None:
        hooks = {h.symbol: h for h in self.hooks}
        lib = self.libc_path.encode()
        for site in self.sites:
            hook = hooks[site.symbol]
            if hook.ret:
                self._attach_one(site, lambda: self._bpf.attach_uretprobe(
                    name=lib, sym=site.symbol.encode(), fn_name=hook.ret.encode(), pid=self.pid))
        for site in self.sites:
            hook = hooks[site.symbol]
            self._attach_one(site, lambda: self._bpf.attach_uprobe(
                name=lib, sym=site.symbol.encode(), sym_off=site.offset,
                fn_name=hook.entry.encode(), pid=self.pid))
            self.attached.append(site.symbol)

    def _attach_one(self, site: ProbeSite, attach) -> None:
        try:
            attach()
        except Exception as e:  # bcc raises bare Exceptions
            raise MemtraceError(
                f"cannot attach a uprobe to {site.symbol} in {self.libc_path} ({e}): "
                "check that the process still runs and the kernel supports uprobes"
            ) from None

    def watch_rss(self) -> None:
        """Follow the target's anonymous RSS (kmem:rss_stat), which
        malloc_trim's measure needs. It fires on every page fault of every
        process, so it is attached only for a target that can call
        malloc_trim."""
        if self.watching_rss or self._bpf is None:
            return
        try:
            self._bpf.attach_tracepoint(tp=b"kmem:rss_stat", fn_name=RSS_PROGRAM)
        except Exception as e:  # bcc raises bare Exceptions
            raise MemtraceError(f"cannot attach to the tracepoint kmem:rss_stat ({e}): "
                                "check that tracefs is mounted") from None
        self.watching_rss = True

    def set_jvm_interpreter(self, start: int, end: int) -> None:
        """Where a HotSpot JVM's interpreter is (bpf/jvm.bpf.c): the walk
        records its frames' methods from now on."""
        import ctypes

        if self._bpf is not None:
            table = self._bpf["jvm_interpreter"]
            table[ctypes.c_int(0)] = table.Leaf(start, end)

    def set_go(self, tgid: int, cgocall_lo: int, cgocall_hi: int) -> None:
        """Where a Go program's runtime.asmcgocall is in process tgid
        (bpf/go.bpf.c): the walk goes on from C into its Go callers."""
        import ctypes

        if self._bpf is not None:
            table = self._bpf["go_runtime"]
            table[ctypes.c_int(0)] = table.Leaf(cgocall_lo, cgocall_hi, tgid, 0)

    def set_python(self, tgid: int, eval_lo: int, eval_hi: int, tstate_at: int) -> None:
        """Where CPython 3.11's interpreter loop and GIL holder are in
        process tgid (bpf/python.bpf.c): the walk shows its Python frames
        from now on."""
        import ctypes

        if self._bpf is not None:
            table = self._bpf["py_runtime"]
            table[ctypes.c_int(0)] = table.Leaf(eval_lo, eval_hi, tstate_at, tgid, 0)
            self._bpf["py_tstates"].clear()  # the thread states of the interpreter before

    def watch_loader(self, path: str) -> bool:
        """A uprobe on ld.so's _dl_debug_state in `path`, for this process
        (bpf/launch.bpf.c); False where the file has none. It stays until
        detach(): disarmed, it costs a dlopen one trap. A uprobe_multi link
        where the kernel has them: its removal overlaps the others', where
        a perf event's took 0.08 s more at the end of every launch."""
        from bcc import BPF

        from memtrace.collect import bpfcache

        name, symbol = b"launch_objects_listed", b"_dl_debug_state"
        try:
            if not bpfcache.uprobe_multi_possible():
                self._bpf.attach_uprobe(name=path.encode(), sym=symbol, fn_name=name, pid=self.pid)
                return True
            _, offset = BPF._check_path_symbol(path.encode(), symbol, 0, self.pid, 0)
            fn = self._bpf.load_func(name, BPF.KPROBE, attach_type=bpfcache.BPF_TRACE_UPROBE_MULTI)
            self._links.append(bpfcache.attach_uprobe_multi(fn.fd, path, [offset], self.pid, False))
        except Exception:  # bcc raises bare Exceptions: no such symbol
            return False
        return True

    def set_launch_hold(self, r_state_at: int, sig: int) -> None:
        """Arm (sig) or disarm (0) the launch hold of bpf/launch.bpf.c."""
        import ctypes

        if self._bpf is not None:
            table = self._bpf["launch_hold"]
            table[ctypes.c_int(0)] = table.Leaf(r_state_at, sig, 0)

    def set_jvm_code(self, heaps, fields: dict[str, int], generation: int) -> None:
        """Where a JVM's compiled code is (jvm.codecache.CodeHeap each) and
        the offsets of what the walk reads there (bpf/jvm.bpf.c); a new
        generation drops what the walk found before."""
        import ctypes

        if self._bpf is None:
            return
        head = self._bpf["jvm_code_head"]
        value = head.Leaf()
        for i, heap in enumerate(heaps[: len(value.heaps)]):
            value.heaps[i].lo, value.heaps[i].hi = heap.lo, heap.hi
            value.heaps[i].segmap, value.heaps[i].log2_segment = heap.segmap, heap.log2_segment
        for name, offset in fields.items():
            setattr(value, name, offset)
        value.generation = generation
        head[ctypes.c_int(0)] = value

    def _attach_vm_kprobes(self) -> None:
        for call in VM_SYSCALLS:
            event = self._bpf.get_syscall_fnname(call)
            try:
                self._bpf.attach_kprobe(event=event, fn_name=f"syscall__{call}".encode())
                self._bpf.attach_kretprobe(event=event, fn_name=b"vm_syscall_return")
            except Exception as e:
                raise MemtraceError(
                    f"--vm-probes kprobe: cannot attach to {event.decode()} ({e}); "
                    "use the default --vm-probes tracepoint"
                ) from None

    def detach(self) -> None:
        """Remove every probe. Safe to call more than once."""
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            links, self._links = self._links, []
            _detach_at_once(bpf, links)
            bpf.cleanup()  # whatever is left, and the maps and programs
            _remove_failed_uprobe_events(self.pid)
            # bcc's exit hook holds the object: a long-lived agent drops many.
            atexit.unregister(bpf.cleanup)

    # ---------------------------------------------------------- reading

    def read(self, whole: bool = False) -> HeapReading:
        """One pass over the aggregates: per (thread, stack), and per 64 MiB
        bucket for the arena accounting. whole: every row's bytes are
        looked at, not only the rows marked as changed (the last read)."""
        b = self._bpf
        used = min(int(b["heap_next_index"][0].value), self.limits.max_stats)
        generation = int(b["exec_generation"][0].value)
        flows = self._flows(used, generation, whole)
        book = self._book
        changed: Optional[set] = book.settle()
        if self._book_reset:
            changed, self._book_reset = None, False
        rows = book.rows.values()  # the book's own, as rows_by_key
        counters = b["counters"]
        total = lambda i: int(counters.sum(i).value)  # noqa: E731
        names = self._thread_names(book.per_tid)
        state = self._state()
        return HeapReading(
            rows=rows,
            flows=flows,
            untracked_free_count=total(CNT_UNTRACKED_FREE),
            trim_calls=int(state.trim_calls) if state else 0,
            trim_released_calls=int(state.trim_released_calls) if state else 0,
            drops=DropStats(
                allocs_map_full=total(CNT_DROP_ALLOCS),
                stats_map_full=total(CNT_DROP_STATS),
                pending_map_full=total(CNT_DROP_PENDING),
                stack_lost=total(CNT_STACK_LOST),
            ),
            thread_names=names,
            peak=self._peak(),
            rss=self._rss(state),
            exec_generation=generation,
            changed_rows=changed,
            rows_by_key=book.rows,  # the book's own: read before the next read()
            buckets=book.buckets,
            totals=book.totals,
            per_tid=dict(book.per_tid),
            live_chunk_bytes=book.live_chunk_bytes,
        )

    def _flows(self, used: int, generation: int, whole: bool = False) -> "_Flows":
        """The rows up to `used`, a Flow each. Only rows whose bytes changed
        since the last read are decoded again: a service whose threads come
        and go leaves many rows that never change."""
        import ctypes

        ks, cs = _checked_layouts(self._bpf["heap_keys"].Leaf, self._bpf["heap_counts"].Leaf)
        # From now on, changes mark their rows with the next epoch: those
        # marked with this one (or the one before: a probe that read it
        # just before it moved on) are the rows to read.
        epoch = self._epoch
        self._epoch += 1
        self._bpf["heap_epoch"][ctypes.c_int(0)] = ctypes.c_ulonglong(self._epoch)
        book = self._book
        if generation != self._flow_generation:
            self._flow_cache = []  # before_exec changes with it
            self._folded.clear()
            self._folded_flows.clear()
            self._folded_dirty.clear()
            self._row_flows = []
            self._decoded = (bytearray(), bytearray())
            book.clear()
            self._book_reset = True
            self._flow_generation = generation
        cache, retired, row_flows = self._flow_cache, self._retired, self._row_flows
        if len(row_flows) < used:
            row_flows.extend([None] * (used - len(row_flows)))
        if len(cache) < used:
            cache.extend([None] * (used - len(cache)))
        # Rows a newly retired thread holds are folded even if unchanged:
        # then every row is looked at.
        every_row, self._retire_pending = self._retire_pending, False
        keys, counts = self._mapped("heap_keys"), self._mapped("heap_counts")
        self._reads += 1
        decoded_keys, decoded_counts = self._decoded
        compare = whole or not decoded_counts or self._reads % WHOLE_READ_EVERY == 0
        if len(decoded_counts) < used * cs:
            decoded_keys.extend(bytes(used * ks - len(decoded_keys)))
            decoded_counts.extend(bytes(used * cs - len(decoded_counts)))
        if every_row:
            moved: Iterable[int] = range(used)
        else:
            with memoryview(counts) as whole_map, whole_map[:used * cs] as rows, \
                    rows.cast("Q") as words, words[MARK_WORD::cs // 8] as mark_words:
                marks = mark_words.tobytes()
            marked = marked_rows(marks, [e for e in (epoch, epoch - 1) if e > 0])
            marked.update(range(self._read_used, used))  # rows made since: marked or not yet

            def not_as_decoded() -> Iterator[int]:
                yield from _moved_rows(keys[:used * ks], bytes(decoded_keys[:used * ks]), ks,
                                       counts[:used * cs], bytes(decoded_counts[:used * cs]), cs, used)

            # Then, now and then, the rows whose bytes are not the ones last
            # decoded, compared run by run once the marked ones are read:
            # only what changed without a mark, or since, is left to find,
            # where comparing with the last such read found every row
            # changed since, eight intervals' worth.
            moved = itertools.chain(marked, not_as_decoded()) if compare else marked
        self._read_used = used
        for i in moved:
            key_raw, counts_raw = keys[i * ks:(i + 1) * ks], counts[i * cs:(i + 1) * cs]
            raw = key_raw + counts_raw
            hit = cache[i]
            if hit is not None and hit[0] == raw:
                flow, folded = hit[1], hit[2]
                if flow is None or folded:
                    continue
                if flow.tid in retired:
                    self._fold(flow, 1)
                    cache[i] = (raw, None, True)  # its bytes say all it was
                    row_flows[i] = None
                    book.put(i, flow, None)
                continue
            if hit is not None and hit[2]:
                # changed: taken out as it was, put back as it is now
                self._fold(_decode(hit[0], generation), -1)
            old = hit[1] if hit is not None else None
            flow = _decode(raw, generation)
            folded = flow is not None and flow.tid in retired
            if folded:
                self._fold(flow, 1)
                flow = None
            cache[i] = (raw, flow, folded)
            decoded_keys[i * ks:(i + 1) * ks] = key_raw
            decoded_counts[i * cs:(i + 1) * cs] = counts_raw
            row_flows[i] = flow
            book.put(i, old, flow)
        for key in self._folded_dirty:
            old = self._folded_flows.pop(key, None)
            (stack_key, bucket), (a, f, ac, fc, chunk) = key, self._folded[key]
            new = self._folded_flows[key] = Flow(0, stack_key, bucket, a, f, ac, fc, alloc_chunk_bytes=chunk)
            book.put(("folded", key), old, new)
        self._folded_dirty.clear()
        return _Flows(row_flows, self._folded_flows)

    def retire(self, tids) -> None:
        """From the next read on, these threads' rows (threads that exited)
        are added into one row per stack and bucket under tid 0: a service
        whose threads come and go would otherwise have every row it ever
        had handled at every interval."""
        new = set(tids) - self._retired
        if new:
            self._retired.update(new)
            self._retire_pending = True

    def _fold(self, flow: Flow, sign: int) -> None:
        c = flow.counters
        key = (flow.stack_key, flow.bucket)
        self._folded_dirty.add(key)
        sums = self._folded.setdefault(key, [0, 0, 0, 0, 0])
        for j, value in enumerate((c.alloc_bytes, c.free_bytes, c.alloc_count, c.free_count,
                                   flow.live_chunk_bytes)):
            sums[j] += sign * value

    def _thread_names(self, tids) -> dict[int, str]:
        """Names of the threads in the rows, each looked up once (the map
        holds every thread ever seen: walking it is two syscalls a key)."""
        import ctypes

        table = self._bpf["thread_names"]
        for tid in tids:
            if tid not in self._names:
                try:
                    self._names[tid] = table[ctypes.c_uint(tid)].comm.decode(errors="replace")
                except KeyError:
                    continue
        return self._names

    def _peak(self) -> PeakReading:
        p = self._bpf["heap_peak"][0]
        return PeakReading(max(0, int(p.live_bytes)), max(0, int(p.peak_bytes)), int(p.peak_ns))

    def _state(self):
        """The process's struct target_state; None once it left the set."""
        import ctypes

        try:
            return self._bpf["targets"][ctypes.c_uint(self.pid)]
        except KeyError:
            return None

    def _rss(self, state) -> Optional[RssReading]:
        """The RSS counters as kmem:rss_stat last gave them; None while it
        is not watched or has said nothing."""
        if not self.watching_rss or state is None:
            return None
        v = state.rss
        if not v.seen:
            return None
        known = {name: int(v.bytes[i]) for i, name in enumerate(RSS_MEMBERS) if v.seen >> i & 1}
        return RssReading(known, int(v.ts_ns))

    def _mapped(self, name: str):
        """A BPF_F_MMAPABLE array's mapping (a lookup per index would be a
        syscall each): read its rows by slicing."""
        import ctypes
        import mmap

        if name not in self._maps:
            table = self._bpf[name]
            size = ctypes.sizeof(table.Leaf) * self.limits.max_stats
            length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            self._maps[name] = mmap.mmap(table.map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
        return self._maps[name]

    def vm_lost(self) -> int:
        return int(self._bpf["counters"].sum(CNT_VM_LOST).value)

    def open_events(self, handle) -> Optional[int]:
        """Deliver address-space events to handle(raw) on consume_events().
        Returns a file descriptor that becomes readable when events wait, or
        None where this bcc hides it (then poll)."""
        import ctypes

        layout = self._bpf["vm_event_layout"].Leaf
        pointer = ctypes.POINTER(layout)
        scan_pointer = ctypes.POINTER(self._bpf["vm_scan_layout"].Leaf)
        event_size = ctypes.sizeof(layout)

        def callback(ctx, data, size):
            # An exception here would only be printed by ctypes: keep the
            # first one for the caller, and keep consuming.
            try:
                if size > event_size:  # light mode's mmap, with the stack's top
                    scan = ctypes.cast(data, scan_pointer).contents
                    handle(scan.event, tuple(scan.words))
                else:
                    handle(ctypes.cast(data, pointer).contents)
            except Exception as e:  # noqa: BLE001
                if self.event_error is None:
                    self.event_error = e
            return 0

        self._bpf["vm_events"].open_ring_buffer(callback)

        def python_stack(ctx, data, size):
            self.new_python_stacks.append(ctypes.cast(data, ctypes.POINTER(ctypes.c_uint64))[0])
            return 0

        self._bpf["py_new_stacks"].open_ring_buffer(python_stack)  # bpf/python.bpf.c
        return _ring_buffer_fd(self._bpf)

    def consume_events(self) -> None:
        if self._bpf is not None:
            self._bpf.ring_buffer_consume()

    def stack_addresses(self, stack: int) -> list[int]:
        if not stack:
            return []
        import ctypes

        try:
            frames = self._bpf["stacks"][ctypes.c_ulonglong(stack)]
        except KeyError:
            return []
        out = []
        for ip in frames.ip:
            if not ip:
                break
            out.append(ip)
        return out


def set_traced(bpf, pid: int, traced: bool) -> None:
    """pid in or out of the traced set: its bit in traced_tgids and its
    entry in targets, the entry there whenever the bit is."""
    import ctypes

    if not 0 < pid < TGID_LIMIT:
        raise MemtraceError(f"pid {pid} is beyond what memtrace can trace (below {TGID_LIMIT})")
    bits, targets = bpf["traced_tgids"], bpf["targets"]
    word, bit = ctypes.c_uint(pid // 64), 1 << pid % 64
    value = int(bits[word].value)
    if traced:
        targets[ctypes.c_uint(pid)] = targets.Leaf()
        bits[word] = ctypes.c_ulonglong(value | bit)
        return
    bits[word] = ctypes.c_ulonglong(value & ~bit)
    try:
        del targets[ctypes.c_uint(pid)]
    except KeyError:
        pass


# struct heap_key and struct heap_counts (bpf/memtrace.h), read with struct
# where ctypes objects cost two allocations and a call per field; checked
# against bcc's layouts at the first read (_checked_layouts) and against the
# header by tests/unit/test_bpf_header.py.
HEAP_KEY = struct.Struct("=QQIIII")  # stack, caller, tid, bucket, generation, unused
HEAP_COUNTS = struct.Struct("=8Q")  # alloc_bytes, free_bytes, alloc_count, free_count,
# alloc_chunk_bytes, free_chunk_bytes, mark, unused
HEAP_KEY_FIELDS = ("stack", "caller", "tid", "bucket", "generation", "unused")
HEAP_COUNTS_FIELDS = ("alloc_bytes", "free_bytes", "alloc_count", "free_count",
                      "alloc_chunk_bytes", "free_chunk_bytes", "mark", "unused")
MARK_WORD = HEAP_COUNTS_FIELDS.index("mark")  # in 8-byte words
# Every this many reads, and when asked (the last one), the rows are also
# compared with their bytes as last decoded: a change whose mark came
# later than the read after it (a probe held up for a whole interval
# between reading the epoch and marking) is not lost.
WHOLE_READ_EVERY = 8


def marked_rows(marks: bytes, epochs: Iterable[int]) -> set[int]:
    """Indexes of the 8-byte little-endian words of `marks` equal to one of
    `epochs`. The words' low bytes are looked through with bytes.find (C's
    memchr), and only the words whose low byte is an epoch's are compared
    whole: ~4,000 rows found among 100,000 in about a millisecond. A
    search for the whole word was three times that: an epoch's high bytes
    are zeros, as are most bytes of every mark, and the search stalled on
    each of them."""
    low = marks[::8]
    find, whole = low.find, marks.startswith
    found: set[int] = set()
    for epoch in epochs:
        pattern = epoch.to_bytes(8, "little")
        byte = pattern[:1]
        at = find(byte)
        while at >= 0:
            if whole(pattern, at * 8):
                found.add(at)
            at = find(byte, at + 1)
    return found


def _checked_layouts(keys_type, counts_type) -> tuple[int, int]:
    """The sizes of a key and of its counts, once their layouts in the
    loaded object are known to be the ones HEAP_KEY and HEAP_COUNTS read."""
    import ctypes

    for leaf, layout, names in ((keys_type, HEAP_KEY, HEAP_KEY_FIELDS),
                                (counts_type, HEAP_COUNTS, HEAP_COUNTS_FIELDS)):
        if ctypes.sizeof(leaf) != layout.size or [f[0] for f in leaf._fields_] != list(names):
            raise MemtraceError(f"the BPF object's {leaf.__name__} is not the layout memtrace "
                                "reads: reinstall memtrace (its BPF source and Python disagree)")
    return HEAP_KEY.size, HEAP_COUNTS.size


def _decode(raw: bytes, generation: int) -> Optional[Flow]:
    """The Flow of one row: its key's bytes, then its counts'."""
    stack, caller, tid, bucket, gen, _ = HEAP_KEY.unpack_from(raw)
    if not tid:  # 0: an index not named yet, or lost to a race
        return None
    a, f, ac, fc, ach, fch, _, _ = HEAP_COUNTS.unpack_from(raw, HEAP_KEY.size)
    return Flow(tid, (stack, caller), bucket, a, f, ac, fc, ach, fch, gen != generation)


# Rows compared as one run of bytes, then in smaller runs, then one by one.
_RUN_ROWS = (64, 16, 4, 1)


def _moved_rows(keys: bytes, seen_keys: bytes, ks: int, counts: bytes, seen_counts: bytes,
                cs: int, used: int) -> list[int]:
    """Indexes of the rows whose key or counts differ from the last read's
    bytes (shorter when rows were added since). Each comparison of a run
    is one memcmp: with 100,000 rows and 2,000 changed, ~20,000 of them
    instead of 100,000 rows decoded. A row's key is written once, when it
    is made: when none changed, only the counts are compared run by run."""
    seen = min(len(seen_keys) // ks, len(seen_counts) // cs, used)
    keys_same = keys[:seen * ks] == seen_keys[:seen * ks]
    runs = [(0, seen)]
    for size in _RUN_ROWS:
        inner = []
        for start, end in runs:
            for s in range(start, end, size):
                e = min(end, s + size)
                if counts[s * cs:e * cs] != seen_counts[s * cs:e * cs] \
                        or not keys_same and keys[s * ks:e * ks] != seen_keys[s * ks:e * ks]:
                    inner.append((s, e))
        runs = inner
    return [s for s, _ in runs] + list(range(seen, used))


def _detach_at_once(bpf, links: Sequence[int] = (), uprobes: Optional[list] = None) -> None:
    """Every probe's removal waits out a grace period in the kernel (~0.1 s
    a uprobe as a perf event, ~0.04 s a tracepoint, and the kernel takes
    them one at a time: 2 s for all of ours, most of a short command's
    trace). A uprobe_multi link waits once for all its probes, and links
    closed side by side overlap their waits; bcc's calls release the GIL.
    What fails here is left to cleanup().
    uprobes: only these uprobe events (one process's, of a shared object)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(os.close, fd) for fd in links]
    if uprobes is not None:
        jobs += [(bpf.detach_uprobe_event, k) for k in uprobes if k in bpf.uprobe_fds]
    else:
        jobs += ([(bpf.detach_uprobe_event, k) for k in list(bpf.uprobe_fds)]
                 + [(bpf.detach_kprobe_event, k) for k in list(bpf.kprobe_fds)]
                 + [(bpf.detach_tracepoint, k) for k in list(bpf.tracepoint_fds)])
    if not jobs:
        return
    # The kernel removes tracepoints one at a time: a few threads overlap
    # what overlaps, where a thread each cost more to start than they save.
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        for future in [pool.submit(detach, key) for detach, key in jobs]:
            future.exception()  # waited for; a failure is retried by cleanup()


def _remove_failed_uprobe_events(pid: int) -> None:
    """The tracefs events bcc made for this process's uprobes and left
    behind when their perf event could not be opened (the process gone
    mid-attach): bcc names each after the target's pid and its own. One
    still in use is refused by the kernel (EBUSY), and stays."""
    from memtrace.cli.preflight import tracefs_dir

    events = os.path.join(tracefs_dir(), "uprobe_events")
    mark = f"_{pid}_bcc_{os.getpid()}"
    try:
        with open(events) as f:
            names = [line.split(None, 1)[0].split(":", 1)[1] for line in f
                     if line.split(None, 1)[0].endswith(mark)]
    except (OSError, IndexError):
        return
    for name in names:
        try:
            with open(events, "a") as f:
                f.write(f"-:{name}\n")
        except OSError:
            pass


def alloc_bucket_bits(max_allocs: int) -> int:
    """log2 of the live-block table's buckets: 8 slots each, twice max_allocs
    slots in all, so that the table is at most half full."""
    slots = 2 * max_allocs
    return max(1, (slots - 1).bit_length() - 3)


def _ring_pages(size_bytes: int) -> int:
    """A ring buffer is a power of two of pages."""
    pages = max(1, size_bytes // os.sysconf("SC_PAGE_SIZE"))
    return 1 << (pages.bit_length() - 1)


def _give_back_compiler_memory() -> None:
    """clang frees ~30 MB after compiling, and glibc keeps it resident: the
    very retention memtrace shows others. Hand it back once, here. And
    LLVM's and clang's code, ~75 MB resident after one compile and not run
    again: unmapped from this process (the page cache keeps it, and a later
    call faults it back in). Code pages only: never written, nothing lost."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    try:
        mappings = procfs.read_smaps(os.getpid())
    except OSError:
        return
    for m in mappings:
        if (m.perms == "r-xp" and m.anonymous_bytes == 0
                and os.path.basename(m.path).startswith(COMPILER_LIBRARIES)):
            libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.size), MADV_DONTNEED)


def _ring_buffer_fd(bpf) -> Optional[int]:
    """bcc keeps libbpf's ring_buffer to itself; libbpf can tell its epoll
    fd, which select() can wait on like any other."""
    import ctypes

    manager = getattr(bpf, "_ringbuf_manager", None)
    if not manager:
        return None
    try:
        libbpf = ctypes.CDLL("libbpf.so.1")
        epoll_fd = libbpf.ring_buffer__epoll_fd
    except (OSError, AttributeError):
        return None
    epoll_fd.argtypes = [ctypes.c_void_p]
    epoll_fd.restype = ctypes.c_int
    fd = epoll_fd(manager)
    return fd if fd >= 0 else None
