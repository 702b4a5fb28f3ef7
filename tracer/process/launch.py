"""Start a command held at its first instruction, so probes attach before it
runs: the child asks to be traced and execs; the kernel stops it right
after the exec, when only the executable and the loader are mapped. Probes
are attached then, and the child is released. No code of the command runs
untraced, and nothing of ours runs in its image."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from typing import Optional

from memtrace.errors import MemtraceError

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC = 4
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# How long a held command may take to reach its hold (collect/launchhold.py)
# before it is stopped by hand: ld.so maps hundreds of libraries in that.
HOLD_WAIT_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class Launched:
    """A child process stopped after exec, until `release()`.

    With `terminal` (a CommandOutput), the child writes to that
    pseudo-terminal, so its output stays off our screen; with `stdout_fd`,
    its stdout is that descriptor (ours is kept for JSON). It stays in our
    session and process group: the terminal's Ctrl-C reaches it as before,
    and nothing hangs it up when it or we exit (a session of its own would
    have the kernel send SIGHUP to whatever it left running)."""

    def __init__(self, argv: list[str], executable: str, terminal=None,
                 stdout_fd: Optional[int] = None) -> None:
        self.argv = argv
        self.terminal = terminal
        self.exit_status: Optional[int] = None  # shell convention: 128+N if killed by N
        self._following = None  # the hold, while we stay its tracer through an exec
        self._nudged = 0  # the hold's signal, sent by hand to stop it and detach
        if terminal is not None:
            fds = terminal.child_fds()
        elif stdout_fd is not None:
            fds = (0, stdout_fd, 2)
        else:
            fds = None
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe work until exec
            try:
                os.close(report_r)
                # Python ignores SIGPIPE and SIGXFSZ; exec keeps ignored signals.
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                if fds is not None:
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                if _libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
                    raise OSError(ctypes.get_errno(), "ptrace")
                os.execv(executable, argv)
            except OSError as e:
                os.write(report_w, str(e.errno or errno.EIO).encode())
            finally:
                os._exit(127)
        os.close(report_w)
        self.pid = pid
        if terminal is not None:
            terminal.started()
        _, status = os.waitpid(pid, 0)
        failure = os.read(report_r, 64)
        os.close(report_r)
        if failure or not os.WIFSTOPPED(status):
            if os.WIFSTOPPED(status):
                self.kill()
            code = int(failure or errno.EIO)
            raise MemtraceError(f"cannot run {argv[0]}: {os.strerror(code)}")

    def release(self, hold=None, wait_s: float = HOLD_WAIT_S) -> None:
        """Let the command run: detach with no signal delivered. With a
        hold (collect/launchhold.LibrariesHold, armed), run it on as its
        tracer until the hold's signal stops it, call hold.reached(), and
        detach with the signal cancelled; or, where hold.follows_exec(),
        stay its tracer through its next exec (poll() holds the new image).
        Any other signal first is passed on as we detach; an exit is kept
        for poll()."""
        if hold is None:
            self._detach(0)
            return
        _libc.ptrace(PTRACE_CONT, self.pid, None, None)
        deadline = time.monotonic() + wait_s
        stopped_by_hand = False
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                if time.monotonic() < deadline:
                    time.sleep(0.0002)
                elif not stopped_by_hand:
                    # It never reached ld.so's breakpoint: the same signal,
                    # by hand, to the thread we trace; the hold raises no
                    # other.
                    hold.disarm()
                    _libc.tgkill(self.pid, self.pid, hold.signal)
                    stopped_by_hand = True
                    deadline = time.monotonic() + 1.0
                else:
                    return  # poll() and wait() detach at its next stop
                continue
            if not os.WIFSTOPPED(status):
                self.exit_status = _shell_status(status)
                return
            sig = os.WSTOPSIG(status)
            if sig != hold.signal:
                self._detach(sig)
                return
            if stopped_by_hand:
                self._detach(0)
                return
            self._held(hold)
            return

    def _held(self, hold) -> None:
        """Stopped at the hold: the tables go in; then on, as its tracer
        through its next exec, or detached."""
        try:
            hold.reached()
            follow = hold.follows_exec()
        except BaseException:
            self._detach(0)
            raise
        if follow:
            self._following = hold
            _libc.ptrace(PTRACE_SETOPTIONS, self.pid, None, ctypes.c_void_p(PTRACE_O_TRACEEXEC))
            _libc.ptrace(PTRACE_CONT, self.pid, None, None)
        else:
            self._detach(0)

    def _stopped(self, status: int) -> None:
        """A stop reported to us, its tracer still: at an exec it is
        followed through, the hold is armed for the new image; at the
        hold, _held(); another signal goes on to it. Past the time to
        follow, or when the hold cannot be armed, detach."""
        hold, event, sig = self._following, status >> 16, os.WSTOPSIG(status)
        ours = hold is not None and sig == hold.signal or sig == self._nudged
        passed = 0 if event or ours else sig
        self._nudged = 0
        # A stop signal passed on as a tracer's would stop it (a group
        # stop) and be reported to us again: it goes on as we detach.
        if hold is None or not hold.following() or passed in _STOP_SIGNALS:
            self._following = None
            self._detach(passed)
            return
        if event == PTRACE_EVENT_EXEC:
            if hold.arm():
                _libc.ptrace(PTRACE_CONT, self.pid, None, None)
            else:
                self._following = None
                self._detach(0)
        elif sig == hold.signal and hold.armed:
            self._following = None
            self._held(hold)
        else:
            _libc.ptrace(PTRACE_CONT, self.pid, None, ctypes.c_void_p(passed or None))

    def stop_following(self) -> None:
        """No more holds (the probes are gone): the next stop detaches."""
        if self._following is not None:
            hold, self._following = self._following, None
            hold.disarm()
            self._nudged = hold.signal
            _libc.tgkill(self.pid, self.pid, hold.signal)

    def _detach(self, sig: int) -> None:
        _libc.ptrace(PTRACE_DETACH, self.pid, None, ctypes.c_void_p(sig or None))

    def kill(self) -> None:
        """Only for a child that never ran (probes failed to attach)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def poll(self) -> Optional[int]:
        """Reap the child if it has ended; its exit status, else None."""
        if self.exit_status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.exit_status
            if pid == self.pid:
                if os.WIFSTOPPED(status):  # still its tracer (a hold, an exec followed)
                    self._stopped(status)
                else:
                    self.exit_status = _shell_status(status)
            elif self._following is not None and not self._following.following():
                self.stop_following()  # stopped by hand, detached at that stop
        return self.exit_status

    def wait(self) -> int:
        while self.exit_status is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                if os.WIFSTOPPED(status):  # as in poll()
                    self._stopped(status)
                else:
                    self.exit_status = _shell_status(status)
            except ChildProcessError:
                self.exit_status = 0
        return self.exit_status

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _shell_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
