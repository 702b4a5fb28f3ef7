"""One loaded BPF object for every process the agent follows in light mode.

A program compiled per process cost the agent ~1.5 s of CPU and left
~50 KiB in it for every process that started (bcc's compiler and the
ctypes types of each object's maps). Light mode's programs need nothing
of a process when they are compiled: which processes are traced is the
targets map, each process's uprobes attach the same loaded functions with
its pid, its address-space events carry its tgid, and what the kernel
keeps for it goes with its entry in the map.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional

from memtrace.collect.probes import Limits, Probes, _detach_at_once, set_traced
from memtrace.collect.probesite import ProbeSite


class SharedProbes:
    """The loaded object, its tracepoints and its ring buffer; each process
    followed is a TargetProbes of it."""

    def __init__(self, limits: Limits, vm_probes: str = "tracepoint") -> None:
        self.host = Probes(0, "", limits, [], light=True, vm_probes=vm_probes)
        self.events_fd: Optional[int] = None
        # tgid -> where its events go (None: not open yet, kept in _early)
        self._handlers: dict[int, Optional[Callable]] = {}
        self._early: dict[int, list] = {}
        # tgid -> the stack keys its events named: deleted from the shared
        # stack map with it, unless another process's events name them too
        self._stacks: dict[int, set[int]] = {}
        self._rss_watchers: set[int] = set()

    @property
    def bpf(self):
        return self.host._bpf

    def load(self) -> None:
        self.host.load()
        try:
            if self.host.vm_probes == "kprobe":
                self.host._attach_vm_kprobes()
            self.events_fd = self.host.open_events(self._dispatch)
        except BaseException:
            self.close()
            raise

    def target(self, pid: int, libc_path: str, sites: list[ProbeSite],
               allocator_kind: str = "glibc", allocator_prefix: str = "") -> "TargetProbes":
        return TargetProbes(self, pid, libc_path, sites, allocator_kind, allocator_prefix)

    def close(self) -> None:
        """Every probe off, the object freed (after its targets)."""
        self.host.detach()

    # ------------------------------------------------------------ per tgid

    def add(self, pid: int) -> None:
        self._handlers[pid] = None
        self._early[pid] = []
        self._stacks[pid] = set()

    def listen(self, pid: int, handle: Callable) -> None:
        """Events of pid go to handle from now on, those that came since
        its attach first."""
        self._handlers[pid] = handle
        for event, words in self._early.pop(pid, []):
            handle(event, words) if words is not None else handle(event)

    def remove(self, pid: int) -> None:
        """pid's entry, events and stacks go: a fleet's comings and goings
        leave nothing behind."""
        # Events under way first: another process's may name a stack too.
        self.consume()
        self._handlers.pop(pid, None)
        self._early.pop(pid, None)
        mine = self._stacks.pop(pid, set())
        bpf = self.bpf
        if bpf is None:
            return
        set_traced(bpf, pid, False)
        stacks = bpf["stacks"]
        if not self._handlers:
            stacks.clear()  # also those whose events were lost
        else:
            for key in mine.difference(*self._stacks.values()):
                try:
                    del stacks[ctypes.c_ulonglong(key)]
                except KeyError:
                    pass
        self._rss_watchers.discard(pid)
        if not self._rss_watchers and self.host.watching_rss:
            # It fires on every page fault of every process.
            bpf.detach_tracepoint(b"kmem:rss_stat")
            self.host.watching_rss = False

    def watch_rss(self, pid: int) -> None:
        self._rss_watchers.add(pid)
        self.host.watch_rss()

    def consume(self) -> None:
        self.host.consume_events()

    def _dispatch(self, event, words=None) -> None:
        pid = event.tgid
        if pid not in self._handlers:
            return  # a process removed since
        stacks = self._stacks[pid]
        if event.stack:
            stacks.add(event.stack)
        if event.in_malloc and event.malloc_key.stack:
            stacks.add(event.malloc_key.stack)
        handle = self._handlers[pid]
        if handle is None:
            # The ring buffer's memory is reused once this returns.
            self._early[pid].append((type(event).from_buffer_copy(event), words))
        elif words is not None:
            handle(event, words)
        else:
            handle(event)


class TargetProbes(Probes):
    """One process's part of a SharedProbes: its entry in the targets map,
    its uprobes and its events. The collector reads it as the Probes of a
    trace of its own."""

    def __init__(self, shared: SharedProbes, pid: int, libc_path: str, sites: list[ProbeSite],
                 allocator_kind: str, allocator_prefix: str) -> None:
        host = shared.host
        super().__init__(pid, libc_path, host.limits, sites, light=True, vm_probes=host.vm_probes,
                         allocator_kind=allocator_kind, allocator_prefix=allocator_prefix)
        if any(s.sp_adjust for s in self.sites):
            # Light mode probes malloc_trim at +0 (it has a return probe):
            # nothing of a site is compiled into the shared programs.
            raise ValueError(f"a shared object cannot serve the probe sites of {libc_path}")
        self.shared = shared
        self._bpf = shared.bpf
        self.calls_in = host.calls_in
        self._uprobe_events: list = []
        self._lost_before = 0

    def load(self) -> None:
        """Loaded once, by SharedProbes."""

    def attach(self) -> None:
        self._lost_before = super().vm_lost()
        self.shared.add(self.pid)
        self.follow()
        before = set(self._bpf.uprobe_fds)
        try:
            self.attach_uprobes()
        finally:
            self._uprobe_events = [k for k in self._bpf.uprobe_fds if k not in before]

    def watch_rss(self) -> None:
        if self._bpf is not None and not self.watching_rss:
            self.shared.watch_rss(self.pid)
            self.watching_rss = True

    def set_jvm_interpreter(self, start: int, end: int) -> None:
        """Not on a shared object: the walk reads one interpreter range for
        every process, and another process's addresses could fall in this
        one's. Interpreted Java frames stay unnamed here."""

    def open_events(self, handle) -> Optional[int]:
        self.shared.listen(self.pid, handle)
        return self.shared.events_fd

    def consume_events(self) -> None:
        if self._bpf is not None:
            self.shared.consume()

    def vm_lost(self) -> int:
        """Lost since the attach, of every process's events: the buffer is
        shared."""
        return super().vm_lost() - self._lost_before

    def detach(self) -> None:
        """This process's probes off and its entry gone; the object stays
        for the others. Safe to call more than once."""
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()
        if self._bpf is None:
            return
        bpf, self._bpf = self._bpf, None
        links, self._links = self._links, []
        _detach_at_once(bpf, links, self._uprobe_events)
        for event in self._uprobe_events:
            if event in bpf.uprobe_fds:
                try:
                    bpf.detach_uprobe_event(event)
                except Exception:  # noqa: BLE001 - bcc raises bare Exceptions; the next goes on
                    pass
        self.shared.remove(self.pid)
