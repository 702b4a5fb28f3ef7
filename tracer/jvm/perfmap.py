"""Names for the code a HotSpot JVM generates: its JIT-compiled methods,
its interpreter and stubs live in anonymous executable memory, which no
ELF file describes. The JVM lists them in its perf map, /tmp/perf-PID.map
(`start size name` a line), written on `jcmd PID Compiler.perfmap` (JDK 17
and later). memtrace runs that jcmd itself, in a background thread, again
while new code appears (at most every REFRESH_S), and keeps the last map
after the JVM has exited, so reports still name its frames, and what older
maps named of code freed since.

The map is written by the target: it is read as data only, from the
target's own /tmp (its root: a container's), never through a symlink,
only a regular file owned by the target's user, of bounded size, each
line parsed on its own. jcmd is ours (from our PATH), never the target's."""

from __future__ import annotations

import bisect
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Iterable, Optional

from memtrace.process.mappedfile import open_in_root
from memtrace.model import notes
from memtrace.model.notes import Note

REFRESH_S = 5.0  # between two jcmd runs, at least
JCMD_TIMEOUT_S = 30.0
MAX_MAP_BYTES = 64 << 20
MAX_NAME_CHARS = 1000
MAX_KEPT_ENTRIES = 500_000  # the map's and freed code's, at most
# What frames of generated code show as their module, as perf shows them:
# not a file name ("java" is the launcher's).
MODULE = "JIT"


def is_hotspot(module_paths: Iterable[str]) -> bool:
    return any(os.path.basename(p) == "libjvm.so" for p in module_paths)


def method_name(text: str) -> str:
    """'void java.util.zip.Inflater.<init>(boolean)' ->
    'java.util.zip.Inflater.<init>(boolean)': the return type says little."""
    text = text.strip()[:MAX_NAME_CHARS]
    paren = text.find("(")
    head = text if paren < 0 else text[:paren]
    if paren > 0 and " " in head and not head.endswith(" "):  # not 'StubRoutines (1)'
        return text[head.rindex(" ") + 1 :]
    return text


def parse_perf_map(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, name) of each well-formed line, sorted; a later line
    for the same start wins (code recompiled in place)."""
    by_start: dict[int, tuple[int, str]] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        parts = line.split(None, 2)
        if len(parts) != 3:
            continue
        try:
            start, size = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            continue
        name = method_name(parts[2])
        if 0 < start < 1 << 64 and 0 < size < 1 << 32 and name:
            by_start[start] = (start + size, name)
    return sorted((start, end, name) for start, (end, name) in by_start.items())


def _status_fields(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


class PerfMap:
    """The perf map of one JVM, kept fresh in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        status = _status_fields(pid)
        try:
            self.uid: Optional[int] = int(status["Uid"].split()[1])  # effective: the map's owner
            self.nspid = int(status.get("NSpid", str(pid)).split()[-1])  # its own /tmp names it so
        except (KeyError, ValueError, IndexError):
            self.uid, self.nspid = None, pid
        self.jcmd = shutil.which("jcmd") or _jdk_tool("jcmd")
        self.problem: Optional[Note] = None if self.jcmd else Note.of(notes.JVM_NO_JCMD)
        self._entries: list[tuple[int, int, str]] = []
        self._starts: list[int] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._last_run = -REFRESH_S
        self._updated = False
        self._wanted = False

    def lookup(self, addr: int) -> Optional[tuple[str, int]]:
        """(name, offset into it) of generated code at `addr`."""
        with self._lock:
            entries, starts = self._entries, self._starts
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < entries[i][1]:
            return entries[i][2], addr - entries[i][0]
        return None

    def want_refresh(self) -> None:
        """Code the map does not name yet was seen: have the JVM write its
        map again, now or, if it did lately or is doing so, at a later
        tick()."""
        self._wanted = True
        self.tick()

    def tick(self) -> None:
        if not self._wanted or self.jcmd is None:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        if time.monotonic() - self._last_run < REFRESH_S:
            return
        self._wanted = False
        self._last_run = time.monotonic()
        self._thread = threading.Thread(target=self._refresh, name="memtrace-perfmap", daemon=True)
        self._thread.start()

    def take_update(self) -> bool:
        """Whether the map changed since the last call."""
        with self._lock:
            updated, self._updated = self._updated, False
        return updated

    def wait(self, timeout: float) -> None:
        """Let a refresh under way end (the end of a trace)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def attach_is_safe(self) -> bool:
        """Whether jcmd may attach: it connects to the JVM's attach socket,
        else it first sends SIGQUIT, which a JVM that does not catch it
        (-Xrs) dies of, and one without the attach mechanism answers with a
        thread dump on its output."""
        if _attach_disabled(self.pid):
            self.problem = Note.of(notes.JVM_ATTACH_DISABLED)
            return False
        # The socket counts only when this process holds it: one left by a
        # JVM that died names a pid the kernel may have given to another.
        if _holds_socket(self.pid, f"/tmp/.java_pid{self.nspid}"):
            return True
        status = _status_fields(self.pid)
        try:
            catches_quit = bool(int(status["SigCgt"], 16) & (1 << (signal.SIGQUIT - 1)))
        except (KeyError, ValueError):
            catches_quit = False
        if not catches_quit:
            self.problem = Note.of(notes.JVM_NO_SIGQUIT)
            return False
        return True

    def _refresh(self) -> None:
        if not self.attach_is_safe():
            self.load()  # a map the JVM wrote itself (-XX:+DumpPerfMapAtExit) may still be there
            return
        try:
            subprocess.run([self.jcmd, str(self.pid), "Compiler.perfmap"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=JCMD_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
        self.load()

    def load(self) -> bool:
        """Read the map the JVM wrote; whether it named anything."""
        if self.uid is None:
            return False
        try:
            with open_in_root(f"/proc/{self.pid}/root", f"/tmp/perf-{self.nspid}.map",
                              no_symlinks=True, limit=MAX_MAP_BYTES, owner=self.uid) as f:
                data = f.read(MAX_MAP_BYTES)
        except OSError:
            return False  # gone with the JVM, or not ours to trust: keep the last
        entries = parse_perf_map(data)
        if not entries:
            return False
        with self._lock:
            entries = with_freed_code(entries, self._entries)
            self._entries, self._starts = entries, [e[0] for e in entries]
            self._updated = True
        return True


def with_freed_code(new: list[tuple[int, int, str]],
                    old: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The new map and, up to MAX_KEPT_ENTRIES, the entries of the old one
    that no new entry overlaps: code freed since (a method compiled again,
    C1's code replaced by C2's), whose frames stacks recorded before still
    hold."""
    starts = [e[0] for e in new]
    out = list(new)
    for start, end, name in old:
        if len(out) >= MAX_KEPT_ENTRIES:
            break
        i = bisect.bisect_right(starts, start) - 1
        if (i >= 0 and new[i][1] > start) or (i + 1 < len(new) and new[i + 1][0] < end):
            continue  # the address holds other code now
        out.append((start, end, name))
    out.sort()
    return out


def _attach_disabled(pid: int) -> bool:
    """Whether the JVM's options, on its command line or in the variables
    the launcher reads them from, turn the attach mechanism off."""
    texts = []
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                texts.append(f.read(1 << 20))
        except OSError:
            return True  # unknown: do not risk it
    for text in texts:
        for word in text.split(b"\0"):
            if b"-XX:+DisableAttachMechanism" in word:
                return True
    return False


def _holds_socket(pid: int, path: str) -> bool:
    """Whether the process has the unix socket bound at path open."""
    inodes = set()
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path:
                    inodes.add(f"socket:[{fields[6]}]")
        if not inodes:
            return False
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def _jdk_tool(name: str) -> Optional[str]:
    home = os.environ.get("JAVA_HOME")
    path = os.path.join(home, "bin", name) if home else None
    return path if path and os.access(path, os.X_OK) else None
