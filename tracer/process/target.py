"""Which process to trace and which allocator it runs on.

The uprobes go on the file the target really maps: for a running process,
the inode its mapping names, opened through mappedfile (never a path that
may have been swapped for a link since the process started); for a
command, the dynamic loader named by the executable resolves it before the
command runs. Either way the file is held open, and bcc and the kernel are
given /proc/self/fd/N: every probe lands on that inode.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from memtrace.process import mappedfile

from memtrace.process import procfs
from memtrace.process.allocators import Allocator, first_definer, link_map_paths, parse_loader_list
from memtrace.errors import MemtraceError

_GLIBC_NAME = re.compile(r"/libc(\.so\.6|-2\.\d+\.so)$")
_MUSL_NAME = re.compile(r"musl")

PT_INTERP = 3


@dataclass(frozen=True)
class Target:
    pid: int
    comm: str
    libc_path: str  # /proc/self/fd/N of the allocator's verified object, open while held is
    libc_shown: str  # its name, for messages
    launched: bool = False
    allocator: Optional[Allocator] = None
    held: Optional[mappedfile.HeldFile] = field(default=None, repr=False, compare=False)


# ------------------------------------------------------------ running process


def _is_shared_object(path: str) -> bool:
    return path.endswith(".so") or ".so." in path


def _without_glibc(mappings) -> str:
    """What a process that maps no glibc is, in words."""
    musl = next((m.path for m in mappings if _MUSL_NAME.search(m.path)), None)
    if musl:
        return f"is linked with musl ({musl})"
    if not any(_is_shared_object(m.path) for m in mappings):
        return "is statically linked (it maps no shared library)"
    return "does not map glibc (libc.so.6)"


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
    if not any(_is_shared_object(m.path) for m in mappings):
        raise MemtraceError(
            f"pid {pid} ({name}) {_without_glibc(mappings)}: memtrace traces the malloc of "
            "dynamically linked programs"
        )
    opener = _MappedOpener(pid, mappings)
    allocator = first_definer(_lookup_order(pid, mappings), opener.path_of)
    if allocator is None or _MUSL_NAME.search(allocator.path):
        libc = next((m for m in mappings
                     if _GLIBC_NAME.search(m.path.removesuffix(" (deleted)"))), None)
        if libc is None:
            raise MemtraceError(
                f"pid {pid} ({name}) {_without_glibc(mappings)}: memtrace traces glibc's "
                "malloc and the allocators that replace it; trace a dynamically linked program"
            )
        allocator = Allocator("glibc", libc.path.removesuffix(" (deleted)"))
    try:
        held = opener.keep(allocator.path)
    except mappedfile.NotTheFile:
        raise MemtraceError(
            f"pid {pid} ({name}): {allocator.path} now leads to another file than the one it "
            "maps (replaced or linked elsewhere since it started); memtrace probes only the "
            "mapped file itself, which needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE to open: "
            "run it as root"
        ) from None
    except OSError as e:
        if process_ended(pid):
            raise gone from None
        raise MemtraceError(
            f"cannot open {allocator.path}, which pid {pid} ({name}) maps "
            f"({e.strerror or e}): run memtrace as root"
        ) from None
    return Target(pid=pid, comm=name, libc_path=held.path, libc_shown=allocator.path,
                  allocator=allocator, held=held)


def allocator_now(pid: int) -> Optional[Allocator]:
    """The allocator a running process's malloc reaches now (after an exec,
    say), or None where that cannot be told."""
    try:
        mappings = procfs.read_maps(pid)
        return first_definer(_lookup_order(pid, mappings), _MappedOpener(pid, mappings).path_of)
    except (OSError, MemtraceError):
        return None


def _lookup_order(pid: int, mappings) -> list[str]:
    """The objects in the order the dynamic linker searches them; where its
    list cannot be read, the executable and then what is mapped."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    order = link_map_paths(pid)
    if order is None:
        order = [""] + [m.path for m in mappings if m.path.startswith("/")]
    paths = [exe if i == 0 and not p else p for i, p in enumerate(order)]
    seen: set[str] = set()
    return [p for p in paths if p.startswith("/") and not (p in seen or seen.add(p))]


class _MappedOpener:
    """Files of one process by the names it gives them (its maps, its
    dynamic linker's list), opened only as the very files it maps
    (mappedfile): a name that leads elsewhere is not read."""

    def __init__(self, pid: int, mappings) -> None:
        self.pid = pid
        self.mappings = [m for m in mappings if m.inode and m.path.startswith("/")]
        self.identities = {mappedfile.identity_of(m) for m in self.mappings}
        self._held: dict[str, mappedfile.HeldFile] = {}

    def _open(self, path: str) -> int:
        named = next((m for m in self.mappings if m.path.removesuffix(" (deleted)") == path),
                     None)
        if named is not None:
            return mappedfile.open_mapped(self.pid, named)
        # A name the linker keeps (not canonical): the file it leads to
        # inside the process's root, if the process maps that file.
        fd = mappedfile.open_path(f"/proc/{self.pid}/root{path}")
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) not in self.identities:
            os.close(fd)
            raise mappedfile.NotTheFile(f"{path} is not a file the process maps")
        return fd

    def keep(self, path: str) -> mappedfile.HeldFile:
        """The file for good (the others close when the opener goes)."""
        if path not in self._held:
            self._held[path] = mappedfile.HeldFile(self._open(path))
        return self._held.pop(path)

    def path_of(self, path: str) -> str:
        """For first_definer: a name to read it by; OSError when the name is
        not to be read."""
        if path not in self._held:
            self._held[path] = mappedfile.HeldFile(self._open(path))
        return self._held[path].path


# ------------------------------------------------------------ a command to launch


def find_executable(name: str) -> str:
    path = name if "/" in name else shutil.which(name)
    if not path or not os.path.exists(path):
        raise MemtraceError(f"command not found: {name}: give a path or a name on PATH")
    # A regular file only: reading a FIFO's "#!" line would block.
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
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
        raise MemtraceError(f"cannot open {path} ({e.strerror or e}): check the command's "
                            "libraries") from None


def allocator_of_command(argv: list[str]) -> tuple[str, Allocator]:
    """The object whose malloc the command's calls will reach (its path,
    and what it is): glibc's libc, or an allocator that replaces it (by
    LD_PRELOAD, a library it links, or its own copy). `env VAR=... CMD`
    is seen through: CMD, with env's LD_PRELOAD, is what allocates (the
    probes, on the allocator's file, take hold when CMD maps it)."""
    argv, preload = _through_env(argv)
    binary = program_binary(argv[0])
    libc = libc_of_command(argv[0])
    order = [binary] + parse_loader_list(_loader_list(binary, preload))
    allocator = first_definer(order)
    if allocator is None or _MUSL_NAME.search(allocator.path):
        return libc, Allocator("glibc", os.readlink(libc))
    return _hold(os.path.realpath(allocator.path)), allocator


def objects_of_command(argv: list[str]) -> list[str]:
    """The program's binary and the objects the loader will map for it
    (`ld.so --list`), in load order; what dlopen brings later is not known."""
    argv, preload = _through_env(argv)
    binary = program_binary(argv[0])
    return [binary] + parse_loader_list(_loader_list(binary, preload))


def objects_of_image(pid: int, preload: Optional[str] = None) -> list[str]:
    """The objects ld.so maps for the program process pid has just exec'd,
    as `ld.so --list` says (under LD_PRELOAD=preload, if given); [] in
    another mount namespace (names are resolved in ours) or for a program
    of another loader. The program may be anyone's (an attached process):
    its PT_INTERP could name any file, so only the loader memtrace itself
    runs under is ever run."""
    exe = f"/proc/{pid}/exe"  # the very file, whatever its path leads to now
    try:
        if (os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                or not os.path.samestat(os.stat(f"/proc/{pid}/root"), os.stat("/"))):
            return []
        ours = _elf_interpreter("/proc/self/exe")
        theirs = _elf_interpreter(exe)
        if ours is None or theirs is None or not os.path.samefile(ours, theirs):
            return []
        # The path, not /proc/PID/exe: $ORIGIN in its run paths is its folder.
        env = dict(os.environ) if preload is None else dict(os.environ, LD_PRELOAD=preload)
        out = subprocess.run([ours, "--list", os.readlink(exe)], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL, env=env).stdout
    except (ValueError, struct.error, OSError, subprocess.SubprocessError):
        return []
    return parse_loader_list(out)


def allocator_of_image(pid: int) -> Optional[Allocator]:
    """The allocator the program process pid has just exec'd will call,
    told from its files as its loader lists them (with the LD_PRELOAD of
    its environment), before that loader has run: a program that exits
    within an interval of its exec is never seen with its own link map
    (allocator_now). None where it cannot be told (objects_of_image)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    preload = next((v.decode(errors="replace") for k, _, v in
                    (entry.partition(b"=") for entry in environ.split(b"\0"))
                    if k == b"LD_PRELOAD"), None)
    order = objects_of_image(pid, preload)
    if not order:
        return None
    very = lambda path: f"/proc/{pid}/exe" if path == exe else path  # noqa: E731 (the file it runs)
    try:
        return first_definer([exe] + order, very)
    except (OSError, MemtraceError):
        return None


def _through_env(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """(the command env runs, the LD_PRELOAD it sets) for `env [-i]
    VAR=VALUE... CMD ARGS`; argv itself otherwise."""
    if not argv or os.path.basename(argv[0]) != "env":
        return argv, None
    preload = None
    for i, word in enumerate(argv[1:], start=1):
        if word == "-i" or word == "--ignore-environment":
            continue
        if word.startswith("-"):
            return argv, None  # an option we do not follow: trace env itself
        if "=" in word:
            name, _, value = word.partition("=")
            if name == "LD_PRELOAD":
                preload = value
            continue
        return argv[i:], preload
    return argv, None


def _loader_list(binary: str, preload: Optional[str] = None) -> str:
    try:
        interp = _elf_interpreter(binary)
    except (ValueError, struct.error, OSError):
        return ""
    if interp is None:
        return ""
    env = dict(os.environ)
    if preload is not None:
        env["LD_PRELOAD"] = preload
    try:
        return subprocess.run([interp, "--list", binary], capture_output=True, text=True,
                              timeout=10, env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


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
