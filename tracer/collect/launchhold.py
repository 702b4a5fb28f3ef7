"""A launched command held once at the end of ld.so's startup work, while
memtrace is still its ptrace tracer (process/launch.py): bpf/launch.bpf.c
raises HOLD_SIGNAL in it when ld.so has mapped every library the program
needs, the kernel stops it for us, the libraries' unwind tables go in, and
it is released with the signal cancelled. Its first calls are then walked
whole, however soon it starts threads.

A command that only sets things up and execs the real program (a shell
script, env, nice, taskset...) is followed through that exec, for at most
FOLLOW_EXEC_S: the new program is held the same way. Without that, a
short program run by `sh -c 'exec prog'` was gone before its maps could
be read, and its stacks were bare addresses."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional

from memtrace.process import procfs
from memtrace.symbols.elf import exported_objects, symbols_of
from memtrace.symbols.symbolizer import code_modules, read_mapped

# Ignored unless a handler is set, and none is at startup: should memtrace
# die while the command is held, the kernel delivers it, to no effect.
HOLD_SIGNAL = signal.SIGURG
# struct r_debug (glibc's <link.h>): int r_version, then the pointers
# r_map and r_brk, then enum r_state.
R_STATE_OFFSET = 24
# Programs whose job is to exec another: memtrace stays their tracer until
# they do (their signals pass through it meanwhile), at most this long.
EXEC_WRAPPERS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "busybox", "env", "nice",
                           "nohup", "stdbuf", "taskset", "chrt", "ionice", "setpriv", "numactl",
                           "prlimit", "setsid", "unshare", "chroot"})
FOLLOW_EXEC_S = 10.0


class LibrariesHold:
    """What the launcher needs to hold the command (Launched.release)."""

    signal = HOLD_SIGNAL

    def __init__(self, probes, pid: int, then: Callable[[], None]) -> None:
        self._probes = probes
        self._pid = pid
        self._then = then
        self._loaders: set[tuple] = set()  # the ld.so files probed, by (device, inode)
        self._follow_until = time.monotonic() + FOLLOW_EXEC_S
        self.armed = False
        self.held_s: Optional[float] = None  # how long the command stood still, the first time

    def arm(self) -> bool:
        """For the image the process runs now, stopped after its exec (the
        launch, or one it is followed through: then() learns of that exec
        at the hold). False where there is nothing to hold for (a static
        program, an ld.so that is not glibc's)."""
        for module in code_modules(procfs.maps(self._pid)):
            exported = read_mapped(self._pid, module, exported_objects) or {}
            if "_r_debug" not in exported:
                continue
            elf = read_mapped(self._pid, module, symbols_of)
            vaddr = elf.vaddr_of_offset(module.file_offset) if elf is not None else None
            if vaddr is None:
                return False
            loader = (module.mapping.device, module.mapping.inode)
            if loader not in self._loaders:
                if not read_mapped(self._pid, module, self._probes.watch_loader):
                    return False
                self._loaders.add(loader)
            self._probes.set_launch_hold(module.start - vaddr + exported["_r_debug"] + R_STATE_OFFSET,
                                         HOLD_SIGNAL)
            self.armed = True
            return True
        return False

    def disarm(self) -> None:
        self.armed = False
        self._probes.set_launch_hold(0, 0)

    def reached(self) -> None:
        """The command is stopped with its libraries mapped: then()."""
        self.armed = False  # the probe disarmed itself
        started = time.monotonic()
        try:
            self._then()
        except Exception:  # noqa: BLE001 — the command runs on; its first stacks may be cut
            return
        if self.held_s is None:
            self.held_s = time.monotonic() - started

    def follows_exec(self) -> bool:
        """Whether to stay the tracer through the process's next exec: it
        runs a program whose job is to exec another, and not for long yet."""
        if time.monotonic() >= self._follow_until:
            return False
        try:
            exe = os.path.basename(os.readlink(f"/proc/{self._pid}/exe"))
        except OSError:
            return False
        return exe in EXEC_WRAPPERS

    def following(self) -> bool:
        return time.monotonic() < self._follow_until


def hold_at_libraries(probes, pid: int, then: Callable[[], None]) -> Optional[LibrariesHold]:
    """The hold, armed for launched process pid, stopped after its exec:
    then() once ld.so has mapped the libraries of each image held. None
    where there is nothing to hold for, or no unwind tables."""
    if probes.unwind is None:
        return None
    hold = LibrariesHold(probes, pid, then)
    return hold if hold.arm() else None
