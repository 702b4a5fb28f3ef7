"""`memtrace agent`: follow processes as they start and exit, and put each
one's snapshot on the board that --serve's server reads.

Each process gets its own Collector, as a single trace does. In light
mode one BPF object, loaded when the agent starts, serves them all
(collect/shared.py): a process that starts costs its uprobes and its
entry in the targets map, and leaves nothing behind when it exits.
Without --light each process gets an object of its own (its heap tables
are per process), compiled for it: ~1.5 s of CPU per process. The loop
sleeps in select() on a self-pipe for signals, a pidfd per target
(readable once it exits) and the event buffers. Everything a target holds
is bounded: at most --max-targets of them, with small kernel maps
(agent_limits).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

from memtrace.collect.probes import Limits
from memtrace.errors import MemtraceError
from memtrace.process.follow import Selector
from memtrace.output.serve import Board
from memtrace.cli.session import EVENT_POLL_S, wait_ready

DISCOVER_S = 1.0  # how often the selector is asked for new processes


@dataclass(frozen=True)
class AgentOptions:
    light: bool
    interval_s: float
    max_targets: int
    limits: Limits
    duration_s: Optional[float] = None
    vm_probes: str = "tracepoint"


STACKS_PER_TARGET = 4096  # light mode: the stacks of mmap calls


def agent_limits(light: bool, max_allocs: int, event_buffer_bytes: int,
                 max_targets: int = 1) -> Limits:
    """Kernel maps: of the object every target shares in light mode, of
    each target's own without. Light mode probes no malloc, so its tables
    of blocks and counters stay tiny."""
    if light:
        return Limits(max_allocs=1024, max_stats=1024,
                      max_stacks=STACKS_PER_TARGET * min(max_targets, 16), max_threads=4096,
                      event_buffer_bytes=event_buffer_bytes, max_targets=max_targets)
    # Unwind rows as before the single trace's default grew (4 MiB, not 16,
    # per target): a fleet traces many.
    return Limits(max_allocs=max_allocs, max_stats=16384, max_stacks=16384, max_threads=4096,
                  event_buffer_bytes=event_buffer_bytes, unwind_rows=1 << 19)


def program_image(pid: int) -> Optional[tuple]:
    """What a process runs: its executable file and its name. Another
    value later means it exec'd (a wrapper script's `exec java ...`)."""
    from memtrace.process import procfs

    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return (st.st_dev, st.st_ino, procfs.comm(pid))


def _give_back_freed_memory() -> None:
    """A dropped target's maps, caches and model are freed, and glibc would
    keep most of it resident: the very retention memtrace shows in others.
    In a loop of attach, snapshot, detach: 370 KiB stayed resident per
    process without this, 50 KiB with it."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Traced:
    """One followed process, attached."""

    def __init__(self, pid: int, comm: str, probes, collector, events_fd: Optional[int]) -> None:
        self.pid = pid
        self.comm = comm
        self.probes = probes
        self.collector = collector
        self.events_fd = events_fd
        self.pidfd = os.pidfd_open(pid)
        self.image: Optional[tuple] = None  # program_image() read before the attach

    def close(self) -> None:
        self.probes.detach()
        os.close(self.pidfd)


def attach(pid: int, options: AgentOptions, sites_of: Callable[..., list],
           shared=None) -> Traced:
    """Probes on one process, as `memtrace -p PID` puts them (on the shared
    object, if given); nothing is left attached if any step fails."""
    from memtrace.process import target as targets
    from memtrace.collect.collector import Collector
    from memtrace.collect.probes import Probes

    target = targets.resolve_pid(pid)
    allocator = target.allocator
    kind = allocator.kind if allocator is not None else "glibc"
    prefix = allocator.prefix if allocator is not None else ""
    sites = sites_of(target.libc_path, kind, prefix)
    if shared is not None:
        probes = shared.target(pid, target.libc_path, sites, kind, prefix)
    else:
        probes = Probes(pid, target.libc_path, options.limits, sites, light=options.light,
                        vm_probes=options.vm_probes, allocator_kind=kind,
                        allocator_prefix=prefix)
    try:
        probes.load()
        probes.attach()
        collector = Collector(pid, target.comm, probes, light=options.light, attached=True)
        collector.allocator_path = allocator.path if allocator is not None else target.libc_path
        events_fd = collector.start()
        return Traced(pid, target.comm, probes, collector, events_fd)
    except BaseException:
        probes.detach()
        raise


class Agent:
    def __init__(self, selector: Selector, options: AgentOptions, board: Board,
                 log: TextIO = sys.stderr) -> None:
        self.selector = selector
        self.options = options
        self.board = board
        self.log = log
        self.targets: dict[int, Traced] = {}
        # pid -> the program it ran when it was refused (said once; tried
        # again if it execs another: a static wrapper's `exec java`)
        self._passed: dict[int, Optional[tuple]] = {}
        self._waiting: set[int] = set()  # pids beyond --max-targets
        self._sites: dict[tuple, list] = {}
        self._stop = False
        self.shared = None  # light mode: the one BPF object (SharedProbes)

    def say(self, text: str) -> None:
        print(f"memtrace agent: {text}", file=self.log, flush=True)

    # ------------------------------------------------------------ targets

    def _sites_of(self, libc_path: str, kind: str = "glibc", prefix: str = "") -> list:
        """The probe sites of one allocator file, found once per file."""
        from memtrace.collect.probes import resolve_sites

        st = os.stat(libc_path)
        key = (st.st_dev, st.st_ino, kind, prefix)
        if key not in self._sites:
            self._sites[key] = resolve_sites(libc_path, kind, prefix)
        return self._sites[key]

    def discover(self) -> None:
        present = self.selector.pids()
        # A new program in a traced process: new code, a new address space,
        # maybe another libc. Its probes are made again, as for a new process.
        for pid, traced in list(self.targets.items()):
            image = program_image(pid)
            if image is not None and image != traced.image:
                self.drop(pid, f"it exec'd {image[2]}")
        # Forget what we said of processes that are gone: the memory stays bounded.
        self._passed = {p: image for p, image in self._passed.items()
                        if p in present and program_image(p) == image}
        self._waiting &= present
        for pid in sorted(present - set(self.targets) - set(self._passed)):
            if self._stop:
                return
            if len(self.targets) >= self.options.max_targets:
                if pid not in self._waiting:  # said once; attached when a target exits
                    self._waiting.add(pid)
                    self.say(f"pid {pid}: waits for a free slot "
                             f"(--max-targets {self.options.max_targets})")
                continue
            self._waiting.discard(pid)
            started = time.monotonic()
            image = program_image(pid)
            try:
                traced = attach(pid, self.options, self._sites_of, self.shared)
            except MemtraceError as e:
                self._pass(pid, image, f"not traced: {e}")
                continue
            except OSError as e:  # it exited between the look and the attach
                self._pass(pid, image, f"not traced: {e.strerror or e}")
                continue
            except Exception as e:  # noqa: BLE001 - a bug of ours on one target
                if os.environ.get("MEMTRACE_DEBUG"):
                    raise
                self._pass(pid, image, f"not traced: internal error ({type(e).__name__}: {e})")
                continue
            traced.image = image
            self.targets[pid] = traced
            self.say(f"attached to pid {pid} ({traced.comm}) in {time.monotonic() - started:.1f} s")

    def _pass(self, pid: int, image: Optional[tuple], why: str) -> None:
        self._passed[pid] = image
        if os.path.exists(f"/proc/{pid}"):
            self.say(f"pid {pid}: {why}")

    def drop(self, pid: int, why: str) -> None:
        traced = self.targets.pop(pid)
        traced.close()
        self.board.forget(pid)
        self.say(f"detached from pid {pid} ({traced.comm}): {why}")
        del traced
        _give_back_freed_memory()

    def sample(self) -> None:
        for pid, traced in list(self.targets.items()):
            try:
                snapshot = traced.collector.snapshot()
            except Exception as e:  # noqa: BLE001 - one target must not end the others' trace
                if os.environ.get("MEMTRACE_DEBUG"):
                    raise
                self.drop(pid, f"internal error ({type(e).__name__}: {e})")
                continue
            if snapshot.target_alive:
                self.board.update(snapshot)

    # ------------------------------------------------------------ loop

    def _handler(self, signum, frame) -> None:
        self._stop = True

    def load(self) -> None:
        """Light mode: the BPF object every target shares, compiled once."""
        from memtrace.collect.shared import SharedProbes

        if self.options.light and self.shared is None:
            shared = SharedProbes(self.options.limits, self.options.vm_probes)
            shared.load()
            self.shared = shared

    def run(self) -> None:
        self.load()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {s: signal.signal(s, self._handler)
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self._loop(wake_r)
        finally:
            # Every way out: every probe of every target comes off.
            for pid in list(self.targets):
                self.drop(pid, "the agent stops")
            if self.shared is not None:
                self.shared.close()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _loop(self, wake_r: int) -> None:
        start = time.monotonic()
        deadline = start + self.options.duration_s if self.options.duration_s else None
        next_tick = start + self.options.interval_s
        next_look = start
        while not self._stop:
            now = time.monotonic()
            if now >= next_look:
                self.discover()
                if not self.targets and self.selector.ended():
                    self.say(f"nothing left to follow: {self.selector.describe()} exited")
                    break
                next_look = time.monotonic() + DISCOVER_S
                now = time.monotonic()
            by_fd = {t.pidfd: t.pid for t in self.targets.values()}
            watched = [wake_r, *by_fd, *{t.events_fd for t in self.targets.values()
                                         if t.events_fd is not None}]
            wake_at = min(t for t in (next_tick, next_look, now + EVENT_POLL_S, deadline)
                          if t is not None)
            ready = wait_ready(watched, wake_r, wake_at - now)
            for traced in self.targets.values():
                traced.collector.consume_events()
            for fd in ready:
                if fd in by_fd:
                    self.drop(by_fd[fd], "it exited")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_tick:
                self.sample()
                next_tick += self.options.interval_s * max(
                    1, int((now - next_tick) / self.options.interval_s) + 1)
