"""Which process to trace and which glibc it runs on.

The uprobes go on the libc file the target really maps: for a running
process, the inode its mapping names, opened through mappedfile (never a
path that may have been swapped for a link since the process started);
for a command, the dynamic loader named by the executable resolves it
before the command runs. Either way the file is held open, and bcc and
the kernel are given /proc/self/fd/N: every probe lands on that inode.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from typing import Optional

from memtrace import mappedfile, procfs
from memtrace.errors import MemtraceError

_GLIBC_NAME = re.compile(r"/libc(\.so\.6|-2\.\d+\.so)$")
_MUSL_NAME = re.compile(r"musl")

PT_INTERP = 3


@dataclass(frozen=True)
class Target:
    pid: int
    comm: str
    libc_path: str  # /proc/self/fd/N of the verified libc, held open for the whole run
    libc_shown: str  # its name, for messages
    launched: bool = False


# ------------------------------------------------------------ running process


def _state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("" when unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] if fields else ""


def process_ended(pid: int) -> bool:
    """Gone, or a zombie: nothing of it runs any more."""
    return not procfs.exists(pid) or _state(pid) in ("Z", "X", "")


def resolve_pid(pid: int) -> Target:
    if pid <= 0 or not procfs.exists(pid):
        raise MemtraceError(f"no process with pid {pid}: check the pid (ps -e) and try again")
    if procfs.is_kernel_thread(pid):
        raise MemtraceError(
            f"pid {pid} is a kernel thread: it has no user-space heap to trace; pick a user process"
        )
    owner = procfs.tgid(pid)
    if owner is not None and owner != pid:
        raise MemtraceError(f"pid {pid} is a thread of process {owner}: use -p {owner}")
    name = procfs.comm(pid) or "?"
    gone = MemtraceError(f"pid {pid} ({name}) has exited: nothing left to trace")
    if process_ended(pid):
        if not procfs.exists(pid):
            raise gone
        raise MemtraceError(
            f"pid {pid} ({name}) is a zombie: it has exited and waits for its parent to reap it; "
            "there is no heap left to trace"
        )
    try:
        mappings = procfs.read_maps(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise gone from None
    except OSError as e:
        raise MemtraceError(
            f"cannot read /proc/{pid}/maps ({e.strerror}): memtrace needs root, or "
            f"CAP_SYS_PTRACE and the right to trace pid {pid} ({name})"
        ) from None
    if not mappings:
        if process_ended(pid):
            raise gone
        raise MemtraceError(f"pid {pid} ({name}) maps no memory (it is exiting): nothing to trace")
    libc = next((m for m in mappings
                 if _GLIBC_NAME.search(m.path.removesuffix(" (deleted)"))), None)
    if libc is None:
        musl = next((m.path for m in mappings if _MUSL_NAME.search(m.path)), None)
        if musl:
            kind = f"is linked with musl ({musl})"
        elif not any(m.path.endswith(".so") or ".so." in m.path for m in mappings):
            kind = "is statically linked (it maps no shared library)"
        else:
            kind = "does not map glibc (libc.so.6)"
        raise MemtraceError(
            f"pid {pid} ({name}) {kind}: memtrace traces glibc's malloc; "
            "trace a dynamically linked glibc program"
        )
    shown = libc.path.removesuffix(" (deleted)")
    try:
        fd = mappedfile.open_mapped(pid, libc)
    except mappedfile.NotTheFile:
        raise MemtraceError(
            f"pid {pid} ({name}): {shown} now leads to another file than the libc it maps "
            "(replaced or linked elsewhere since it started); memtrace probes only the mapped "
            "file itself, which needs CAP_SYS_ADMIN to open: run it as root"
        ) from None
    except OSError as e:
        if not procfs.exists(pid):
            raise gone from None
        raise MemtraceError(
            f"cannot open the libc pid {pid} ({name}) maps, {shown} ({e.strerror or e}): "
            "run memtrace as root"
        ) from None
    return Target(pid=pid, comm=name, libc_path=mappedfile.fd_path(fd), libc_shown=shown)


# ------------------------------------------------------------ a command to launch


def find_executable(name: str) -> str:
    path = name if "/" in name else shutil.which(name)
    if not path or not os.path.exists(path):
        raise MemtraceError(f"command not found: {name}: give a path or a name on PATH")
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise MemtraceError(f"{path} is not an executable file: check the command")
    return os.path.realpath(path)


def _elf_interpreter(path: str) -> Optional[str]:
    """The PT_INTERP of a 64- or 32-bit ELF file, or None for a static one."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF":
            raise ValueError("not ELF")
        is64 = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(order + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
        else:
            phoff, = struct.unpack_from(order + "I", ident, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x2A)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if struct.unpack_from(order + "I", ph, 0)[0] != PT_INTERP:
                continue
            if is64:
                offset, = struct.unpack_from(order + "Q", ph, 8)
                size, = struct.unpack_from(order + "Q", ph, 32)
            else:
                offset, = struct.unpack_from(order + "I", ph, 4)
                size, = struct.unpack_from(order + "I", ph, 16)
            f.seek(offset)
            return f.read(size).rstrip(b"\0").decode()
    return None


def _script_interpreter(path: str) -> Optional[list[str]]:
    with open(path, "rb") as f:
        head = f.read(256)
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    return words or None


def program_binary(argv0: str) -> str:
    """The ELF file that will run: the executable, or a script's interpreter."""
    path = find_executable(argv0)
    for _ in range(4):  # a script may name another script as its interpreter
        words = _script_interpreter(path)
        if words is None:
            return path
        interp = words[0]
        if os.path.basename(interp) == "env" and len(words) > 1:
            interp = next((w for w in words[1:] if not w.startswith("-")), interp)
        path = find_executable(interp)
    return path


def _hold(path: str) -> str:
    """/proc/self/fd/N of the regular file at `path`, held open for the run."""
    try:
        return mappedfile.fd_path(mappedfile.open_path(path))
    except OSError as e:
        raise MemtraceError(f"cannot open the libc {path} ({e.strerror or e}): "
                            "check the glibc installation") from None


def libc_of_command(argv0: str) -> str:
    """/proc/self/fd/N of the libc the command will load (see _hold)."""
    binary = program_binary(argv0)
    try:
        interp = _elf_interpreter(binary)
    except (ValueError, struct.error):
        raise MemtraceError(f"{binary} is not an ELF executable or script: check the command")
    if interp is None:
        raise MemtraceError(
            f"{binary} is statically linked: memtrace traces glibc's malloc in dynamically "
            "linked programs"
        )
    if _MUSL_NAME.search(interp):
        raise MemtraceError(
            f"{binary} is linked with musl ({interp}): memtrace traces glibc's malloc"
        )
    # glibc's loader lists what it would map, without running the program
    try:
        out = subprocess.run(
            [interp, "--list", binary], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        m = re.search(r"=>\s*(\S+)", line)
        if m and _GLIBC_NAME.search(m.group(1)):
            return _hold(os.path.realpath(m.group(1)))
    raise MemtraceError(
        f"{binary} does not load glibc (libc.so.6) through {interp}: "
        "memtrace traces glibc's malloc"
    )
