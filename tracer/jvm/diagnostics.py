"""What a HotSpot JVM says about itself through jcmd, for the trace: its
flags (is -XX:+PreserveFramePointer on: without it, a frame-pointer walk
stops at the first JIT-compiled frame) and its Native Memory Tracking
summary (NMT counts the mallocs the JVM itself makes; the heap memtrace
sees is those plus every other native library's).

jcmd runs in a background thread, at most every REFRESH_S, never in the
live view's path, and only for what the command line and the environment
cannot tell (NMT's figures; flags in @argfiles and -XX:Flags= files); its
answers are parsed as data."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from memtrace.jvm.perfmap import JCMD_TIMEOUT_S, PerfMap

REFRESH_S = 10.0  # between two NMT summaries, at least
RETRY_S = 1.0  # after jcmd got no answer (a JVM still starting cannot attach yet)
FRAME_POINTER_FLAG = "PreserveFramePointer"
NMT_OFF = "Native memory tracking is not enabled"
MAX_OUTPUT = 1 << 20
# Where the launcher and the JVM read options, in the order they apply
# (a later setting of a flag wins).
OPTION_VARIABLES = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS")
LATE_OPTION_VARIABLES = ("_JAVA_OPTIONS",)


def flag_in(words: Sequence[str], name: str) -> Optional[bool]:
    """The last -XX:+name / -XX:-name among `words`; None when unset."""
    value = None
    for word in words:
        if word == f"-XX:+{name}":
            value = True
        elif word == f"-XX:-{name}":
            value = False
    return value


def launch_words(cmdline: Sequence[str], environ: dict[str, str]) -> list[str]:
    """The JVM's options from its command line and the variables the
    launcher and the JVM read, in the order they apply."""
    words: list[str] = []
    for var in OPTION_VARIABLES:
        words += environ.get(var, "").split()
    words += cmdline
    for var in LATE_OPTION_VARIABLES:
        words += environ.get(var, "").split()
    return words


def option_value(words: Sequence[str], name: str) -> Optional[str]:
    """The last -XX:name=value among `words`."""
    prefix = f"-XX:{name}="
    found = [w[len(prefix):] for w in words if w.startswith(prefix)]
    return found[-1] if found else None


def options_elsewhere(words: Sequence[str]) -> bool:
    """Whether options may come from files the command line only names
    (@argfiles, -XX:Flags=, -XX:VMOptionsFile=): then only jcmd knows."""
    return any(w.startswith(("@", "-XX:Flags=", "-XX:VMOptionsFile=")) for w in words)


def vm_flags_flag(text: str, name: str) -> bool:
    """The flag as `jcmd PID VM.flags` lists it: only flags that differ
    from their default are listed, and these default to off."""
    return bool(flag_in(text.split(), name))


@dataclass(frozen=True)
class NmtSummary:
    malloc_bytes: int
    malloc_count: int


def parse_nmt_summary(text: str) -> Optional[NmtSummary]:
    """The malloc total of `jcmd PID VM.native_memory summary scale=b`:
    its Total's `malloc:` line, or the sum of the categories' `(malloc=`
    where a JDK prints no such line. None when NMT is off or the text is
    not a summary."""
    if NMT_OFF in text or "Native Memory Tracking" not in text:
        return None
    total = re.search(r"^\s*malloc:\s*(\d+)\s*#(\d+)", text, re.M)
    if total:
        return NmtSummary(int(total.group(1)), int(total.group(2)))
    parts = re.findall(r"\(malloc=(\d+) #(\d+)\)", text)
    if not parts:
        return None
    return NmtSummary(sum(int(b) for b, _ in parts), sum(int(n) for _, n in parts))


class JvmDiagnostics:
    """The flags and NMT summary of one JVM, kept fresh in the background."""

    def __init__(self, perf_map: PerfMap) -> None:
        self.perf_map = perf_map  # its jcmd and its attach checks
        self.pid = perf_map.pid
        words = self._launch_words()
        self.preserve_frame_pointer: Optional[bool] = (
            None if words is None else bool(flag_in(words, FRAME_POINTER_FLAG)))
        hidden = words is None or options_elsewhere(words)
        # jcmd starts a JVM of its own (about half a second of CPU): asked
        # only what the command line cannot tell.
        self._flags_asked = not hidden
        self.nmt_enabled: Optional[bool] = None  # None: not asked yet
        if not hidden and option_value(words, "NativeMemoryTracking") in (None, "off"):
            self.nmt_enabled = False
        self.nmt: Optional[NmtSummary] = None
        self.nmt_elapsed: Optional[float] = None  # time.monotonic() of the summary
        self._thread: Optional[threading.Thread] = None
        self._last_run = -REFRESH_S
        self._pause_s = REFRESH_S  # before the next round

    def _launch_words(self) -> Optional[list[str]]:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmdline = f.read(MAX_OUTPUT).decode(errors="replace").split("\0")
            with open(f"/proc/{self.pid}/environ", "rb") as f:
                pairs = f.read(MAX_OUTPUT).decode(errors="replace").split("\0")
        except OSError:
            return None
        return launch_words(cmdline, dict(p.split("=", 1) for p in pairs if "=" in p))

    def tick(self) -> None:
        """Start a jcmd round when one is due; never waits."""
        if self.perf_map.jcmd is None or (self._flags_asked and self.nmt_enabled is False):
            return
        if self._thread is not None and self._thread.is_alive():
            return
        if time.monotonic() - self._last_run < self._pause_s:
            return
        self._last_run = time.monotonic()
        self._thread = threading.Thread(target=self._refresh, name="memtrace-jcmd", daemon=True)
        self._thread.start()

    def settle(self, timeout_s: float) -> None:
        """At the end of a trace: a last NMT summary, within `timeout_s`."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.nmt_enabled is not False and self.perf_map.jcmd is not None:
            self._last_run = -REFRESH_S
            self.tick()
            if self._thread is not None:
                self._thread.join(timeout_s)

    def _jcmd(self, *command: str) -> Optional[str]:
        try:
            done = subprocess.run([self.perf_map.jcmd, str(self.pid), *command],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, timeout=JCMD_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout[:MAX_OUTPUT].decode(errors="replace") if done.returncode == 0 else None

    def _refresh(self) -> None:
        self._pause_s = RETRY_S
        if not self.perf_map.attach_is_safe():
            return
        if not self._flags_asked:
            text = self._jcmd("VM.flags")
            if text is not None and "-XX:" in text:
                self.preserve_frame_pointer = vm_flags_flag(text, FRAME_POINTER_FLAG)
                self._flags_asked = True
        if self.nmt_enabled is False:
            return
        text = self._jcmd("VM.native_memory", "summary", "scale=b")
        if text is None:
            return
        if NMT_OFF in text:
            self.nmt_enabled = False
            return
        summary = parse_nmt_summary(text)
        if summary is not None:
            self.nmt, self.nmt_elapsed, self.nmt_enabled = summary, time.monotonic(), True
            self._pause_s = REFRESH_S
