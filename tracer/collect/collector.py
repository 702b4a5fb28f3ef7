"""Kernel maps and /proc in, one `Snapshot` out, once per interval."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Optional

from memtrace.model import accounting

from memtrace.process import procfs
from memtrace.collect.aggregate import StackAggregator
from memtrace.collect.probes import Probes
from memtrace.collect.unwind import follow_image
from memtrace.collect.vm import HOLD_LIMIT_NS, VmTracker
from memtrace.collect.walks import ArenaWalks
from memtrace.model.addrspace import ALLOCATOR_MAPPING, HEAP, MMAPPED_CHUNK
from memtrace.model.multimapped import MappedMoreThanOnce, mapped_more_than_once
from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.model.snapshot import (
    Counters,
    HeapRow,
    HeapTotals,
    OsStats,
    ProcessStats,
    RegionStats,
    Snapshot,
    StackKey,
    ThreadStats,
    TrimStats,
    EXITED_THREADS_KEPT,
    EXITED_THREADS_NAME,
    aggregate_stacks,
    aggregate_threads,
    rates_between,
)
from memtrace.collect.jvm_watch import JvmWatch
from memtrace.symbols.symbolizer import Symbolizer

MAX_STACK_DEPTH = 127  # kernel.perf_event_max_stack's default
TOP_REGIONS = 12
FINAL_NAMES_WAIT_S = 5.0  # for a debug file or perf map under way, at the end
# Per snapshot, naming new stacks (a stack-map read and symbols each) and
# placing them; the others join at the next snapshots, the last one takes all.
NAMING_BUDGET_S = 0.15
NAMES_READ_AGAIN_EVERY = 4  # snapshots: each known thread's name is read again this often
MAX_CHILDREN_COUNTED = 100_000  # a build tool's children: counted up to here
PYTHON_NAMING_BUDGET_S = 0.05  # per look at the events (every 0.1 s): half a core at most


class Collector:
    _python_told = None  # the CPython runtime the walk was given (bpf/python.bpf.c)
    _go_told = False  # a Go runtime's asmcgocall was given to the walk (bpf/go.bpf.c)

    def __init__(self, pid: int, comm: str, probes: Probes, light: bool = False,
                 attached: bool = False) -> None:
        """attached: the process was running before the trace (-p), so its
        heap holds blocks no probe saw allocated."""
        self.pid = pid
        self.comm = comm
        self.probes = probes
        self.light = light
        self.attached = attached
        self.symbols = Symbolizer(pid)
        self.vm = VmTracker(pid, on_code_mapped=self._code_mapped,
                            on_unwatched_trim=self.probes.watch_rss)
        self.vm.space.malloc_seen = not light
        self.allocator_kind = probes.allocator_kind
        self.allocator_path = ""  # the probed allocator, as the process names it
        self._check_allocator = False  # after an exec: is it still the one probed?
        self._allocator_note: Optional[Note] = None
        self.glibc = self.allocator_kind == "glibc"
        self.vm.space.glibc = self.glibc
        self.started = time.monotonic()
        self.jvm = JvmWatch(self.symbols, probes, self.started)
        self.previous: Optional[Snapshot] = None
        self._frames: dict[StackKey, tuple[str, ...]] = {}
        self._frames_generation = 0
        self._stacks = StackAggregator(MAX_STACK_DEPTH)
        self._names: dict[int, str] = {}
        self._process = ProcessStats()
        self._rss_by_member: dict[str, int] = {}  # of the last /proc read
        self._mapped_again: list[MappedMoreThanOnce] = []  # shared files the RSS counts twice or more
        self._memory_read_s: Optional[float] = None  # when smaps and arenas were
        self._live_tids: list[int] = []
        self._names_round = 0  # snapshots read: whose names are read again (_names_to_read)
        self._arena_inputs: list[accounting.ArenaInput] = []
        self._arena_problem: Optional[str] = None
        self._walks = ArenaWalks()
        self._activity = None  # what changes when the heap does, at the last snapshot
        self.watch = None  # netlink.ProcessWatch, when it could be opened
        self._execs: list[str] = []
        self._children: set[int] = set()  # processes it started (netlink), none of them traced
        self._not_go: set[tuple] = set()  # files it runs code from that are not Go programs
        self._last_child_seen: tuple = ()  # (pid, command line) of the latest

    def start(self) -> Optional[int]:
        """Before the probes fire: the address space as it is, and where the
        process's code lives. Returns an fd that wakes the loop for events."""
        self._seed()
        return self.probes.open_events(self.vm.handle)

    def _seed(self, exec_ns: Optional[int] = None) -> None:
        """The address space as it is now: from the maps (after an exec at
        exec_ns, with the new image's events seen so far), and glibc's large
        blocks already mapped, found by their chunk headers."""
        from memtrace.process.glibc.chunks import mark_mmapped_chunks

        if exec_ns is None:
            self.vm.seed()
        else:
            self.vm.reseed_after_exec(exec_ns)
        if self.glibc:
            mark_mmapped_chunks(self.pid, self.vm.space)
        self._code_mapped()

    def consume_events(self) -> None:
        # An exec first: the events after it are the new image's, which its
        # seed must not drop (the caller now known at malloc's entry, they
        # are applied at once, not held until its return).
        self.read_watch()
        self.probes.consume_events()
        self._name_python_stacks()

    def _name_python_stacks(self) -> None:
        """The code objects of new stacks with Python frames, read now, while
        the process lives (memtrace.cpython.codes keeps them)."""
        keys, self.probes.new_python_stacks = self.probes.new_python_stacks, []
        python = self.symbols.python
        if python is None or not keys:
            return
        deadline = time.monotonic() + PYTHON_NAMING_BUDGET_S
        checked: dict = {}
        for i, key in enumerate(keys):
            if time.monotonic() > deadline:  # the rest at the next look
                self.probes.new_python_stacks[:0] = keys[i:]
                return
            python.read_stack(key, self.probes.stack_addresses(key), checked)

    def libraries_mapped(self) -> None:
        """A launched program, held once ld.so has mapped the libraries it
        needs (collect/launchhold.py): their names, unwind tables and
        runtimes, all in place before any of their code runs, the tables
        parsed now where no earlier run kept them. A program gone within
        the first interval is named from these maps. The news first: the
        kernel tells of an exec the hold followed only once the process
        has gone on from the exec, and the exec starts the model again."""
        self.read_watch()
        self._code_mapped(wait=True)

    def _code_mapped(self, wait: bool = False) -> None:
        """New code in the process: learn where it lives, and whether it
        can call malloc_trim, whose effect needs the RSS counter watched (a
        tracepoint on every page fault of every process, not paid for a
        program that never trims)."""
        self.symbols.refresh()
        self.jvm.tick()  # a JVM's interpreter, for the frame walk, as soon as it exists
        python = self.symbols.python
        if python is not None and python.runtime is not self._python_told:
            self._python_told = python.runtime  # CPython's frames, for the walk
            r = python.runtime
            self.probes.set_python(self.pid, r.eval_lo, r.eval_hi, r.tstate_at)
        if self.probes.unwind is not None:
            self.probes.unwind.add(self.symbols.code_modules(), self.symbols.read_mapped, wait=wait)
        if not self._go_told:  # after the unwind tables: those are what startup's stacks wait for
            self._tell_go()
        if not self.probes.watching_rss and self.symbols.code_imports("malloc_trim"):
            self.probes.watch_rss()

    def _tell_go(self) -> None:
        """A Go program's runtime.asmcgocall, for the walk to go on from C
        code into the Go functions that called it (bpf/go.bpf.c)."""
        from memtrace.symbols.elf import is_go_program, symbols_of

        for module in self.symbols.code_modules():
            # Each file's headers once: a JVM maps dozens of libraries as it
            # starts, this runs at each, and its stacks wait meanwhile.
            seen = (module.mapping.device, module.mapping.inode)
            if seen in self._not_go:
                continue
            if not self.symbols.read_mapped(module, is_go_program):
                self._not_go.add(seen)
                continue
            elf = self.symbols.read_mapped(module, symbols_of)
            if elf is None or not elf.is_go:
                continue
            found = elf.named_range("runtime.asmcgocall.abi0", "runtime.asmcgocall")
            vaddr = elf.vaddr_of_offset(module.file_offset)
            if found is None or vaddr is None:
                continue
            bias = module.start - vaddr
            self.probes.set_go(self.pid, found[0] + bias, found[1] + bias)
            self._go_told = True
            return

    def read_watch(self) -> None:
        """Netlink news of the process. An exec brings a new address space
        and new code: start the model again from its maps."""
        if self.watch is None:
            return
        for event in self.watch.read():
            if event.kind == "child":
                # A process it started: not traced (its heap is its own).
                if event.tid not in self._children and len(self._children) < MAX_CHILDREN_COUNTED:
                    self._children.add(event.tid)
                argv = " ".join(event.argv)
                if not argv and self._last_child_seen[:1] == (event.tid,):
                    argv = self._last_child_seen[1]  # it was gone by the exec's read
                self._last_child_seen = (event.tid, argv)
                continue
            if event.kind != "exec":
                continue
            if self.probes.unwind is not None:
                self.probes.unwind.reset()  # the old image's code is gone
                follow_image(self.probes.unwind, self.pid)  # the new one's, as ld.so maps it
            self.symbols.new_image()
            self.jvm.reset()  # its JVM's interpreter and code heaps too
            if self._python_told is not None:  # and its Python's, until the new one's is found
                self._python_told = None
                self.probes.set_python(0, 0, 0, 0)
            if self._go_told:  # and its Go runtime's
                self._go_told = False
                self.probes.set_go(0, 0, 0)
            self._seed(exec_ns=event.ts_ns)
            self._arena_inputs = []  # the old image's arenas are gone
            self._walks.reset()
            # From its files now, for a program gone within an interval;
            # from its loader's own list at the next snapshot, if it lives.
            from memtrace.process.target import allocator_of_image

            self._say_allocator(allocator_of_image(self.pid))
            self._check_allocator = True
            if event.argv:
                self.comm = (event.argv[0].rsplit("/", 1)[-1] or self.comm)[:15]
                argv = " ".join(event.argv)
                # Read when the news is read: two execs in a row (a script that
                # execs java) may both show the last command line.
                if not self._execs or self._execs[-1] != argv:
                    self._execs.append(argv)

    # ---------------------------------------------------------- stacks

    def _frames_current(self) -> None:
        if self._frames_generation != self.symbols.generation:
            # Names came for some frames (symbols.Symbolizer): the stacks
            # that hold one are named again, the others keep theirs (a JIT
            # frame's code may have been replaced since).
            stale = self.symbols.stale_frames
            self._frames = {k: f for k, f in self._frames.items() if stale.isdisjoint(f)}
            self._frames_generation = self.symbols.generation

    def frames_of(self, key: StackKey) -> tuple[str, ...]:
        self._frames_current()
        frames = self._frames.get(key)
        if frames is None:
            stack_id, caller = key
            walk = self.probes.stack_addresses(stack_id)
            # At a malloc entry the walk starts inside malloc and skips the
            # immediate caller: that one comes from the return address read
            # on entry (caller). A syscall's walk (caller 0) is whole.
            if caller:
                walk = walk[1:]
            deeper = []
            for addr in walk:
                if not self.symbols.is_code(addr):
                    break  # the walk left the frame chain (no frame pointers)
                deeper.append(addr)
            addrs = ([caller] if caller else []) + deeper
            frames = self.symbols.frames(addrs)
            python = self.symbols.python
            named = python.stack_names(stack_id) if python is not None else None
            if named:  # read when the walk announced the stack (_name_python_stacks)
                frames = tuple(named.get(a, f) for a, f in zip(addrs, frames))
            self._frames[key] = frames
        return frames

    # ---------------------------------------------------------- /proc

    def _refresh_process(self, last: bool = False) -> Optional[list]:
        """RSS, thread names and smaps; None once the process is gone.
        last: the final snapshot of a live process (every name read)."""
        from memtrace.process.procfs import read_smaps

        mem = procfs.memory(self.pid)
        # No RSS (a zombie), or none left (its address space being torn
        # down): gone, as far as figures go. The last reading stands.
        if mem is None or not mem.get("rss_bytes"):
            return None
        try:
            smaps = read_smaps(self.pid)
        except OSError:
            return None
        self._process = ProcessStats(
            rss_bytes=mem.get("rss_bytes", 0),
            rss_anon_bytes=mem.get("rss_anon_bytes", 0),
            peak_rss_bytes=mem.get("peak_rss_bytes"),
        )
        self._rss_by_member = {name: mem.get(f"rss_{name}_bytes", 0)
                               for name in ("file", "anon", "shmem")}
        self._mapped_again = mapped_more_than_once(smaps)
        tids = procfs.thread_ids(self.pid)
        self._names.update(procfs.thread_names(self.pid, self._names_to_read(tids, every=last)))
        self._live_tids = tids
        return smaps

    def _names_to_read(self, tids: list[int], every: bool) -> list[int]:
        """The threads whose names are read this snapshot: those new, and of
        the others a share in turn (a thread named after it started, as a
        JVM's are, shows its name within NAMES_READ_AGAIN_EVERY snapshots);
        every one at the last. A comm file is ~16 us: 2,000 threads took
        32 ms of every snapshot."""
        self._names_round += 1
        if every:
            return tids
        known, turn = self._names, self._names_round % NAMES_READ_AGAIN_EVERY
        return [t for t in tids if t not in known or t % NAMES_READ_AGAIN_EVERY == turn]

    def _read_arenas(self, smaps, idle: bool, reading) -> None:
        """Arenas and their heaps every interval: cheap, and a heap made
        just before the process exits must be known. Their free lists, which
        can take a good part of a second to walk in a fragmented heap, only
        when memtrace.collect.walks says: in between, each arena's free
        bytes are its last walk's, moved by what the probes saw."""
        from memtrace.process.glibc.inspect import inspect_arenas
        from memtrace.process.glibc.procfs import ProcessMemory

        now = time.monotonic()
        book = None if self.light else reading.buckets
        walk = self._walks.due(now, idle, book, reading.untracked_free_count)
        try:
            memory = ProcessMemory(self.pid)
        except OSError as e:
            if procfs.memory(self.pid) is not None:  # gone: the last reading stands
                self._arena_problem = f"/proc/{self.pid}/mem: {e.strerror}"
            return
        with memory:
            report = inspect_arenas(self.pid, memory, smaps, max_chunks=(
                (200_000 if self.light else 50_000) if walk else 0),
                between=self.consume_events)
        self.consume_events()  # the read can take a while: keep the ring buffer drained
        if procfs.memory(self.pid) is None:
            return  # it exited while we read: keep the last whole reading
        walks = self._walks
        if walk:
            walks.done(now, time.monotonic(), report.arenas, idle, reading.untracked_free_count)
        elif any(a.address not in walks.walked for a in report.arenas):
            walks.ask()  # a new arena: walk it at the next interval
        self._arena_problem = report.error
        self._arena_inputs = walks.carried(
            [self._arena_input(a, walks.walked.get(a.address, a)) for a in report.arenas], book)
        if report.error is None and report.arenas:
            self.vm.space.confirm_arena_heaps(
                {h.address for a in report.arenas if a.kind == "thread" for h in a.heaps})

    def _arena_input(self, arena, walked) -> accounting.ArenaInput:
        return accounting.ArenaInput(
            address=arena.address,
            kind=arena.kind,
            heaps=tuple(
                accounting.HeapSpan(h.address, h.reserved_size, h.mprotect_size,
                                    h.resident_bytes or 0)
                for h in arena.heaps
            ),
            system_mem_bytes=arena.system_mem,
            free_bytes=walked.top_bytes + walked.fastbin_bytes + walked.unsorted_bytes
            + walked.smallbin_bytes + walked.largebin_bytes,
            trimmable_bytes=walked.trimmable_bytes,
            reliable=walked.reliable,
            existed_before_trace=arena.kind == "main" or any(
                self._mapped_before_trace(h.address) for h in arena.heaps),
        )

    def _mapped_before_trace(self, address: int) -> bool:
        region = self.vm.space.region_at(address)
        return region is None or region.origin.pre_existing

    # ---------------------------------------------------------- snapshot

    def snapshot(self, target_alive: bool = True, exit_status: Optional[int] = None,
                 fresh: bool = False) -> Snapshot:
        """Read everything once. With the target gone, the process is as
        the kernel last saw it before the exit (RSS counters, heap counters),
        its arenas and regions as last read, and names as they were."""
        self.consume_events()
        unwind = self.probes.unwind
        if unwind is not None and unwind.pending:
            # Rows parsed on a thread since the module was mapped: placed now.
            unwind.add(self.symbols.code_modules(), self.symbols.read_mapped)
        last = fresh or not target_alive
        if last:
            self.symbols.settle(FINAL_NAMES_WAIT_S)  # the last word: names under way may come
            if target_alive:
                self.jvm.settle(FINAL_NAMES_WAIT_S)
        self.vm.release(before_ns=None if last else time.monotonic_ns() - HOLD_LIMIT_NS)
        self.read_watch()
        if not target_alive and self.watch is not None:
            self._await_exit_record()
        reading = self.probes.read(whole=last)
        rows = [] if self.light else reading.rows
        smaps = self._refresh_process(last) if target_alive else None
        alive = smaps is not None
        if alive:
            self.vm.space.update_resident(smaps)
            if fresh:
                self._walks.ask()  # the last word is a whole reading
            activity = (self._calls(reading), self.vm.events)
            if self._check_allocator:
                self._after_exec_allocator()
            if self.glibc:
                self._read_arenas(smaps, activity == self._activity, reading)
            self._activity = activity
            self.jvm.tick()
            self._memory_read_s = time.monotonic() - self.started
        live_tids = self._live_tids if alive else []
        for tid, name in reading.thread_names.items():
            self._names.setdefault(tid, name)
        self.symbols.new_round()
        elapsed = time.monotonic() - self.started
        heap = self._heap_totals(rows, reading)
        if self.glibc:
            account = accounting.account_allocator(
                self._arena_inputs,
                None if self.light else reading.buckets if reading.buckets is not None
                else reading.flows,
                heap.live_bytes,
                self._chunk_spans(),
                attached=self.attached,
            )
        else:
            # What it mapped inside its calls, and the brk heap (tcmalloc
            # grows it with sbrk; glibc's malloc, which would share it, is
            # not the one called).
            mapped = [self.vm.space.totals(k) for k in (ALLOCATOR_MAPPING, HEAP)]
            account = accounting.account_mappings(
                self.allocator_kind, sum(m.committed_bytes for m in mapped),
                sum(m.anon_bytes for m in mapped), heap.live_bytes, attached=self.attached)
        if self.attached and not self.light:
            heap = replace(heap, live_before_trace_bytes=account.allocator.live_before_trace_bytes)
        process = self._process if alive else self._process_at_exit(reading)
        trim_estimate = sum(a.trimmable_bytes for a in account.arenas)
        totals = self.vm.space.totals()
        jvm = self.jvm.stats()
        snap = Snapshot(
            pid=self.pid,
            comm=self.comm,
            elapsed_s=elapsed,
            interval_s=elapsed - self.previous.elapsed_s if self.previous else elapsed,
            process=process,
            heap=heap,
            threads=self._threads(self._thread_rows(reading) if not self.light else [], live_tids),
            stacks=self._aggregate_stacks(rows, reading, account.stack_retained, last),
            rates=rates_between(self.previous, heap, elapsed),
            target_alive=alive,
            exit_status=exit_status,
            notes=self._notes(reading),
            light=self.light,
            os=OsStats(totals.mapped_bytes, totals.reserved_bytes, totals.committed_bytes,
                       totals.resident_bytes, totals.returned_bytes),
            allocator=account.allocator,
            arenas=account.arenas,
            regions=self._regions(),
            trim=TrimStats(heap.trim_calls, self.vm.trim_returned_bytes, trim_estimate,
                           tuple(self.vm.trims)),
            gap=accounting.gap(process.rss_anon_bytes, account.allocator),
            hints=accounting.hints(account.arenas, trim_estimate, process.rss_anon_bytes)
            + accounting.jvm_hints(jvm),
            jvm=jvm,
            memory_read_elapsed_s=self._memory_read_s,
            vm_events=self._recent_events(),
        )
        self.previous = snap
        return snap

    @staticmethod
    def _calls(reading) -> int:
        if reading.totals is not None:
            return reading.totals.alloc_count + reading.totals.free_count
        return sum(r.counters.alloc_count + r.counters.free_count for r in reading.rows)

    @staticmethod
    def _thread_rows(reading) -> list[HeapRow]:
        """One row per thread: what aggregate_threads adds up, added up
        already by the probes' reader."""
        if reading.totals is None:
            return reading.rows
        return [HeapRow(tid, (0, 0), c) for tid, c in reading.per_tid.items()]

    def _aggregate_stacks(self, rows, reading, retained, last: bool):
        if self.light or reading.totals is None:
            return aggregate_stacks(rows, self.frames_of, MAX_STACK_DEPTH, self.previous, retained)
        self._frames_current()
        by_key = {(r.tid, r.stack_key): r for r in rows} if reading.changed_rows is None else \
            reading.rows_by_key
        return self._stacks.update(by_key, reading.changed_rows, self.frames_of,
                                   self._frames_generation, retained,
                                   naming_budget_s=None if last else NAMING_BUDGET_S)

    def _heap_totals(self, rows, reading) -> HeapTotals:
        peak = reading.peak
        peak_at = None
        if peak.peak_ns:
            peak_at = max(0.0, peak.peak_ns / 1e9 - self.started)
        if self.light:
            counters = Counters()
        elif reading.totals is not None:
            counters = reading.totals
        else:
            counters = sum((r.counters for r in rows), start=Counters())
        return HeapTotals(
            counters=counters,
            untracked_free_count=reading.untracked_free_count,
            trim_calls=reading.trim_calls,
            trim_released_calls=reading.trim_released_calls,
            drops=replace(reading.drops, vm_events_lost=self.probes.vm_lost()),
            peak_live_bytes=0 if self.light else peak.peak_bytes,
            live_allocator_bytes=0 if self.light else (
                reading.live_chunk_bytes if reading.live_chunk_bytes is not None
                else sum(f.live_chunk_bytes for f in reading.flows)),
            peak_live_elapsed_s=None if self.light else peak_at,
        )

    def _process_at_exit(self, reading) -> ProcessStats:
        """The process at its last moment: the RSS counters the kernel
        reported while its address space was still whole (each one not
        reported since the attach keeps its last /proc value), and the
        peak taskstats gave at exit."""
        process = self._process
        peak = self.watch.peak_rss_bytes if self.watch is not None else None
        if reading.rss is not None and "anon" in reading.rss.bytes_by_member:
            by = dict(self._rss_by_member)
            by.update(reading.rss.bytes_by_member)
            process = ProcessStats(
                rss_bytes=by.get("file", 0) + by.get("anon", 0) + by.get("shmem", 0),
                rss_anon_bytes=by.get("anon", 0),
                peak_rss_bytes=process.peak_rss_bytes,
                at_exit=True,
            )
        # The high-water mark is at least the last RSS (taskstats' figure
        # may not have come, and /proc's is as of the last read).
        peak = max(peak or 0, process.peak_rss_bytes or 0, process.rss_bytes)
        return replace(process, peak_rss_bytes=peak or None)

    def _chunk_spans(self) -> accounting.ChunkSpans:
        traced = [r for r in self.vm.space.regions(MMAPPED_CHUNK) if not r.origin.pre_existing]
        before = [r for r in self.vm.space.regions(MMAPPED_CHUNK) if r.origin.pre_existing]
        return accounting.ChunkSpans(
            count=len(traced),
            committed_bytes=sum(r.committed_bytes for r in traced),
            resident_bytes=sum(r.resident_bytes for r in traced),
            before_trace_count=len(before),
            before_trace_bytes=sum(r.committed_bytes for r in before),
            before_trace_resident_bytes=sum(r.resident_bytes for r in before),
        )

    def _recent_events(self) -> tuple[dict, ...]:
        started_ns = self.vm.started_ns
        out = []
        for e in self.vm.take_recent():
            key = e.malloc_stack_key if e.in_malloc and e.malloc_stack_key else e.stack_key
            out.append({
                "ts": (e.ts_ns - started_ns) / 1e9, "tid": e.tid, "kind": e.kind,
                "addr": e.addr, "length": e.length, "prot": e.prot, "flags": e.flags,
                "result": e.result, "in_malloc": e.in_malloc,
                "frames": list(self.frames_of(key)) if key else [],
            })
        return tuple(out)

    def _scanned_frames(self, words: tuple[int, ...]) -> tuple[str, ...]:
        """Light mode: the callers found by scanning the stack, from the
        first one outside libc (the allocator's own frames say little)."""
        found = self.symbols.return_addresses(words)
        while len(found) > 1 and self.symbols.module_name(found[0]).startswith("libc."):
            found.pop(0)
        return self.symbols.frames(found)

    def _threads(self, rows, live_tids) -> tuple[ThreadStats, ...]:
        if not self.light:
            self._retire_threads(rows, live_tids)
            return aggregate_threads(rows, self._names, live_tids)
        # No heap counts without probes; names still label arenas and regions.
        return tuple(ThreadStats(tid, self._names.get(tid, "?"), Counters(), True)
                     for tid in sorted(live_tids))

    def _after_exec_allocator(self) -> None:
        """Once the new image's loader has run: a program whose malloc is
        another allocator's would be traced as all zeros, silently."""
        from memtrace.process.allocators import link_map_paths
        from memtrace.process.target import allocator_now

        order = link_map_paths(self.pid)
        if order is None or len(order) < 3:
            return  # the loader has not mapped the libraries yet
        self._check_allocator = False
        self._say_allocator(allocator_now(self.pid))

    def _say_allocator(self, now) -> None:
        """The note, when `now` (memtrace.process.allocators.Allocator) is
        not the allocator probed."""
        if now is None or not self.allocator_path:
            return
        if now.kind != self.allocator_kind or \
                os.path.basename(now.path) != os.path.basename(self.allocator_path):
            self._allocator_note = Note.of(notes.ALLOCATOR_CHANGED, allocator=now.kind,
                                           path=now.path, probed_path=self.allocator_path)
        else:
            self._allocator_note = None

    def _retire_threads(self, rows, live_tids) -> None:
        """Past the EXITED_THREADS_KEPT latest exited threads, the rows of
        the others are folded by the probes' reader (tid 0), so an
        interval's work follows the threads alive, not all there ever were."""
        if not live_tids:
            return  # the process is gone: nothing changes any more
        alive = set(live_tids)
        exited = sorted({r.tid for r in rows if r.tid and r.tid not in alive})
        if len(exited) > EXITED_THREADS_KEPT:
            self.probes.retire(exited[: len(exited) - EXITED_THREADS_KEPT])
        self._names.setdefault(0, EXITED_THREADS_NAME)

    def _await_exit_record(self, timeout_s: float = 0.3) -> None:
        """taskstats sends the peak RSS as the last thread exits, a moment
        after the exit itself may have woken us."""
        import select

        deadline = time.monotonic() + timeout_s
        while self.watch.peak_rss_bytes is None and time.monotonic() < deadline:
            fds = self.watch.filenos()
            if not fds:
                return
            select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
            self.read_watch()

    def _regions(self) -> tuple[RegionStats, ...]:
        out = []
        for r in self.vm.space.largest_unreturned(TOP_REGIONS):
            o = r.origin
            key = o.malloc_stack_key if o.in_malloc and o.malloc_stack_key else o.stack_key
            frames = self.frames_of(key) if key else ()
            if o.scanned:
                frames = self._scanned_frames(o.scanned) or frames
            out.append(RegionStats(
                start=r.start, end=r.end, kind=r.kind,
                origin_frames=frames,
                origin_tid=o.tid, in_malloc=o.in_malloc,
                committed_bytes=r.committed_bytes, resident_bytes=r.resident_bytes,
            ))
        return tuple(out)

    def _notes(self, reading) -> tuple[Note, ...]:
        # Drops are not notes: they travel as heap.drops, worded by the output.
        out = []
        if self._stacks.unnamed:
            out.append(Note.of(notes.STACKS_UNNAMED, count=self._stacks.unnamed))
        if self.probes.unwind is not None and self.probes.unwind.full:
            # Rows are what a large program runs out of; pages and modules
            # are sized for hundreds of libraries.
            short = {"rows": self.probes.limits.unwind_rows} if self.probes.unwind.full == "unwind_rows" else {}
            out.append(Note.of(notes.UNWIND_TABLES_FULL, **short))
        if self._arena_problem:
            out.append(Note.of(notes.ARENAS_UNREADABLE, reason=self._arena_problem))
        out += [Note.of(notes.MAPPED_MORE_THAN_ONCE, path=m.path, views=m.views,
                        rss_bytes=m.rss_bytes, pss_bytes=m.pss_bytes) for m in self._mapped_again[:3]]
        out += [Note.of(notes.EXEC, argv=argv) for argv in self._execs[-3:]]
        if self._children:
            pid, argv = self._last_child_seen
            out.append(Note.of(notes.CHILDREN_NOT_TRACED, count=len(self._children),
                               pid=pid, argv=argv, alive=os.path.exists(f"/proc/{pid}")))
        out += self.jvm.problems()
        if self.symbols.python_unread:
            out.append(Note.of(notes.PYTHON_FRAMES_UNREAD, version=self.symbols.python_unread))
        if self._allocator_note:
            out.append(self._allocator_note)
        if self.light and self.glibc:
            out.append(Note.of(notes.LIGHT_ESTIMATES))
        elif self.light:
            out.append(Note.of(notes.LIGHT_NO_HEAP, allocator=self.allocator_kind))
        if not self.glibc:
            out.append(Note.of(notes.ALLOCATOR_OPAQUE, allocator=self.allocator_kind,
                               attached=bool(self.attached), path=self.allocator_path))
        return tuple(out)

