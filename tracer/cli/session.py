"""One trace from attach to detach: the loop that waits, collects and feeds
the sinks, and the guarantee that every probe is removed on every way out.

The loop sleeps in select() on: a self-pipe the signal handlers write to
(SIGINT, SIGTERM, SIGCHLD, SIGWINCH), a pidfd of an attached target (it
becomes readable when the process exits), and the terminal when keys are
read. Nothing polls faster than the interval."""

from __future__ import annotations

import gc
import os
import select
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

from memtrace.model.snapshot import Snapshot

# How long a launched command may take to exit after Ctrl-C or SIGTERM
# while we keep tracing its shutdown.
LAUNCH_GRACE_S = 3.0
# Address-space events waiting in the ring buffer are read at least this often.
EVENT_POLL_S = 0.1
FULL_GC_EVERY_S = 600.0


class Sink(Protocol):
    def update(self, snapshot: Snapshot) -> None: ...

    def close(self, final: Snapshot) -> None: ...


class Keys(Protocol):
    def fileno(self) -> int: ...

    def read_keys(self) -> list[str]: ...


class EarlySignals:
    """Before the session's loop runs (while the probes compile, load and
    attach, which can take seconds on a loaded host): SIGINT, SIGTERM and
    SIGHUP are kept, not acted on, and the session takes them as its first
    signals. A Ctrl-C then still ends the trace the one way (a snapshot,
    the summary or the JSON); a second Ctrl-C gives up at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "EarlySignals":
        self.received: list[int] = []
        self._previous = {sig: signal.signal(sig, self._keep) for sig in self.SIGNALS}
        return self

    def _keep(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Outcome:
    final: Snapshot
    reason: str  # "duration", "quit", "signal", "target-exit"


class Session:
    def __init__(
        self,
        pid: int,
        snapshot: Callable[..., Snapshot],
        detach: Callable[[], None],
        sinks: list,
        interval_s: float,
        duration_s: Optional[float] = None,
        launched=None,
        keys: Optional[Keys] = None,
        on_key: Optional[Callable[[str], None]] = None,
        on_resize: Optional[Callable[[], None]] = None,
        events_fd: Optional[int] = None,
        on_events: Optional[Callable[[], None]] = None,
        watch_fds: Optional[list[int]] = None,
        on_watch: Optional[Callable[[], None]] = None,
        output=None,
        on_output: Optional[Callable[[], None]] = None,
        on_quit: Optional[Callable[[], None]] = None,
        early_signals: Sequence[int] = (),
    ) -> None:
        self.pid = pid
        self.snapshot = snapshot
        self.detach = detach
        self.sinks = sinks
        self.interval_s = interval_s
        self.duration_s = duration_s
        self.launched = launched
        self.keys = keys
        self.on_key = on_key
        self.on_resize = on_resize
        self.events_fd = events_fd
        self.on_events = on_events
        self.watch_fds = watch_fds or []  # netlink: exec events and peak RSS
        self.on_watch = on_watch
        self._full_gc_at: Optional[float] = None
        self.output = output  # a launched command's pty (CommandOutput)
        self.on_output = on_output  # called after its output was read
        self.on_quit = on_quit  # called at once when the trace is to end
        self._early = early_signals  # received before the loop ran (EarlySignals)
        self._signals: list[int] = []

    # ------------------------------------------------------------ signals

    def _handler(self, signum, frame) -> None:
        self._signals.append(signum)

    def _install(self) -> tuple[int, int, dict]:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGWINCH, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._handler)
        previous["wakeup"] = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        return wake_r, wake_w, previous

    @staticmethod
    def _restore(wake_r: int, wake_w: int, previous: dict) -> None:
        signal.set_wakeup_fd(previous.pop("wakeup"))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)

    # ------------------------------------------------------------ loop

    def run(self) -> Outcome:
        wake_r, wake_w, previous = self._install()
        if self._early:
            # Handled first, and at once: no waiting out an interval.
            self._signals[:0] = self._early
            os.write(wake_w, b"\0")
        pidfd = None
        if self.launched is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except (ProcessLookupError, OSError):
                pidfd = None
        try:
            return self._loop(wake_r, pidfd)
        finally:
            # Every way out: the probes go first, then the terminal.
            self.detach()
            if pidfd is not None:
                os.close(pidfd)
            self._restore(wake_r, wake_w, previous)

    def _target_exit(self, pidfd) -> tuple[bool, Optional[int]]:
        if self.launched is not None:
            status = self.launched.poll()
            return status is not None, status
        if pidfd is not None:
            ready, _, _ = select.select([pidfd], [], [], 0)
            return bool(ready), None
        return not os.path.exists(f"/proc/{self.pid}"), None

    def _loop(self, wake_r: int, pidfd) -> Outcome:
        start = time.monotonic()
        deadline = start + self.duration_s if self.duration_s else None
        next_tick = start + self.interval_s
        grace_until: Optional[float] = None
        watched = [wake_r] + ([pidfd] if pidfd is not None else [])
        if self.events_fd is not None:
            watched.append(self.events_fd)
        watched += self.watch_fds
        # The kernel wakes the fd only once per many events (an interrupt
        # per event costs the target); the rest are read at this pace.
        event_poll_s = EVENT_POLL_S if self.on_events else None
        if self.keys is not None:
            watched.append(self.keys.fileno())
        reason = None
        while reason is None:
            now = time.monotonic()
            poll_at = now + event_poll_s if event_poll_s else None
            wake_at = min(t for t in (next_tick, deadline, grace_until, poll_at) if t is not None)
            output_fd = self.output.fileno() if self.output is not None else -1
            ready = wait_ready(watched + ([output_fd] if output_fd >= 0 else []), wake_r, wake_at - now)
            if output_fd in ready and self.output.drain() and self.on_output:
                self.on_output()
            if self.on_events and (event_poll_s or self.events_fd in ready):
                self.on_events()
            if self.on_watch and any(fd in ready for fd in self.watch_fds):
                self.on_watch()
            reason, grace_until = self._handle_signals(grace_until)
            if self.keys is not None and self.keys.fileno() in ready:
                for key in self.keys.read_keys():
                    if key in ("q", "Q"):
                        reason = "quit"
                    elif self.on_key:
                        self.on_key(key)
            exited, status = self._target_exit(pidfd)
            if exited:
                if self.output is not None:
                    self.output.drain()  # its last words, before the final frame
                return Outcome(self.snapshot(target_alive=False, exit_status=status), "target-exit")
            now = time.monotonic()
            if reason is None and grace_until is not None and now >= grace_until:
                reason = "signal"
            if reason is None and deadline is not None and now >= deadline:
                reason = "duration"
            if reason is None and now >= next_tick:
                with self._garbage_out_of_sight(now):
                    snap = self.snapshot()
                    for sink in self.sinks:
                        sink.update(snap)
                # Keep the cadence; after a stall, skip the missed ticks.
                next_tick += self.interval_s * max(1, int((now - next_tick) / self.interval_s) + 1)
        if self.on_quit:
            self.on_quit()
        return Outcome(self.snapshot(fresh=True), reason)

    @contextmanager
    def _garbage_out_of_sight(self, now: float) -> Iterator[None]:
        """Python's cyclic collector walks every object it tracks in its full
        collections: with 100,000 stacks, a million objects, over a second
        each, several times a minute, for objects that hold no cycles and
        that reference counting frees. What lives once the sinks have a
        snapshot is frozen out of its sight; every FULL_GC_EVERY_S it is all
        looked at once more, so that cycles among it cannot pile up. A
        session's: the agent's collectors come and go, and what a gone one
        left in cycles must not wait ten minutes.

        While a snapshot is made and handed to the sinks the collector does
        not run at all: its young passes walked each object made (tens of
        thousands at 2,000 changed stacks a second) once or more before the
        freeze, and one pass over them at the end took 10-15 ms, for no
        cycles: none was found in a snapshot's objects, with the JSON,
        recording or live view sinks. What the loop made since the last
        snapshot (pyroute2's netlink messages hold cycles) is collected
        first."""
        enabled = gc.isenabled()
        gc.collect(1)
        gc.disable()
        try:
            yield
        finally:
            if self._full_gc_at is None:
                self._full_gc_at = now
            elif now - self._full_gc_at >= FULL_GC_EVERY_S:
                self._full_gc_at = now
                gc.unfreeze()
                gc.collect()
            gc.freeze()
            if enabled:
                gc.enable()

    def _handle_signals(self, grace_until: Optional[float]) -> tuple[Optional[str], Optional[float]]:
        reason = None
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGWINCH:
                if self.on_resize:
                    self.on_resize()
            elif sig == signal.SIGCHLD:
                pass  # _target_exit reaps
            elif self.launched is None:
                reason = "signal"  # attach: stop now; the target keeps running
            elif grace_until is not None:
                reason = "signal"  # a second one: stop waiting for the command
            else:
                # Launch: Ctrl-C reached the command through the terminal
                # (its output may go to a pty; it is still in our process
                # group); SIGTERM was meant for both. Trace its shutdown a little.
                if sig in (signal.SIGTERM, signal.SIGHUP):
                    self.launched.signal(sig)
                grace_until = time.monotonic() + LAUNCH_GRACE_S
        return reason, grace_until


def wait_ready(watched: list[int], wake_r: int, timeout_s: float) -> list[int]:
    """select() on watched for up to timeout_s; the signal self-pipe
    (wake_r) is emptied when it woke us."""
    try:
        ready, _, _ = select.select(watched, [], [], max(0.0, timeout_s))
    except InterruptedError:
        return []
    if wake_r in ready:
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass
    return ready


def wait_for_command(launched) -> int:
    """After the trace: the command runs on untraced; wait for it and pass
    SIGTERM/SIGHUP on. Ctrl-C reaches it through the terminal. Output it
    writes to a pty of its own goes on to our stdout (and its log)."""
    output = launched.terminal
    if launched.poll() is None:
        print(
            f"memtrace: probes removed; waiting for {launched.argv[0]} (pid {launched.pid}) to exit",
            file=sys.stderr,
        )
    forward = lambda sig, frame: launched.signal(sig)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if output is None:
            return launched.wait()
        output.pass_through()
        while launched.poll() is None:
            fd = output.fileno()
            try:
                select.select([fd] if fd >= 0 else [], [], [], 0.2)
            except InterruptedError:
                pass
            output.drain()
        return launched.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
