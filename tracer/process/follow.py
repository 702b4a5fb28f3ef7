"""Which processes the agent follows now: a list of pids, the members of a
cgroup (a systemd unit, a container), or the processes of one command name.

Each answer is read from /proc or /sys/fs/cgroup when asked: the agent asks
once a second, so a process that starts is seen within that second.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Protocol

from memtrace.process import procfs
from memtrace.errors import MemtraceError

CGROUP_ROOT = "/sys/fs/cgroup"
COMM_LEN = 15  # the kernel keeps this much of a command's name


class Selector(Protocol):
    def pids(self) -> set[int]: ...

    def describe(self) -> str: ...

    def ended(self) -> bool: ...


def _processes(pids: Iterable[int]) -> set[int]:
    """User processes among pids: no kernel threads, nothing of ours."""
    me = os.getpid()
    return {p for p in pids if p != me and procfs.exists(p) and not procfs.is_kernel_thread(p)}


class PidList:
    """Given pids, for as long as they live."""

    def __init__(self, pids: Iterable[int]) -> None:
        from memtrace.process.target import resolve_pid

        self.given = sorted(set(pids))
        for pid in self.given:
            resolve_pid(pid)  # a pid that cannot be traced is an error now, not a silent skip

    def pids(self) -> set[int]:
        return _processes(self.given)

    def describe(self) -> str:
        return "pid " + ", ".join(map(str, self.given))

    def ended(self) -> bool:
        """No new process can join a list of pids."""
        return not self.pids()


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a host that also mounts the v1 hierarchies."""
    try:
        with open(mounts) as f:
            found = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
    except OSError:
        found = []
    return min(found, key=len) if found else CGROUP_ROOT


# A container's cgroup as its runtime names it: docker-<id>.scope (systemd
# driver), <id> under a docker/ or kubepods/ directory (cgroupfs driver),
# libpod-, cri-containerd-, crio- scopes. The id is 64 hex digits; users
# type the 12 that `docker ps` shows, or fewer.
_CONTAINER_DIR = re.compile(r"^(?:[a-z][a-z-]*-)?([0-9a-f]{64})(?:\.scope)?$")
_UNIT_SUFFIXES = (".service", ".scope", ".slice")
_MIN_ID_PREFIX = 4


def _is_cgroup(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cgroup.procs"))


def _names_it(directory: str, name: str) -> bool:
    """Whether a cgroup directory's own name is what a user called it: the
    name itself, a systemd unit without its suffix, or a container id."""
    if directory == name or directory in (name + s for s in _UNIT_SUFFIXES):
        return True
    found = _CONTAINER_DIR.match(directory)
    return bool(found and len(name) >= _MIN_ID_PREFIX and found.group(1).startswith(name.lower()))


def find_cgroup(name: str, root: str) -> str:
    """The cgroup a user means by `name`: a path (absolute, or under the
    cgroup v2 root), else the one cgroup in the tree named so (a unit such
    as nginx or nginx.service, or a container id or its prefix)."""
    path = os.path.normpath(name if os.path.isabs(name) else os.path.join(root, name))
    if _is_cgroup(path) or "/" in name:
        if not _is_cgroup(path):
            raise MemtraceError(f"{path} is not a cgroup directory (no cgroup.procs): give a path "
                                f"under {root}, e.g. system.slice/NAME.service, or a unit name")
        return path
    found = []
    for directory, subdirs, _ in os.walk(root):
        for sub in list(subdirs):
            if _names_it(sub, name):
                found.append(os.path.join(directory, sub))
                subdirs.remove(sub)  # its own cgroups are followed with it
    if not found:
        raise MemtraceError(f"no cgroup named {name!r} under {root}: give a systemd unit "
                            f"(NAME.service), a container id, or a path such as "
                            f"system.slice/NAME.service")
    if len(found) > 1:
        shown = ", ".join(os.path.relpath(f, root) for f in found[:3])
        raise MemtraceError(f"{name!r} names {len(found)} cgroups ({shown}"
                            f"{', ...' if len(found) > 3 else ''}): give one as a path under {root}")
    return found[0]


class CgroupMembers:
    """The processes of a cgroup and of the cgroups below it."""

    def __init__(self, name: str, root: str | None = None) -> None:
        self.path = find_cgroup(name, root or cgroup2_root())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory, _, _ in os.walk(self.path):
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    found.update(int(line) for line in f if line.strip())
            except (OSError, ValueError):
                continue  # removed while we walked
        return _processes(found)

    def describe(self) -> str:
        return f"cgroup {self.path}"

    def ended(self) -> bool:
        return False


class CommandName:
    """Every process whose command name (/proc/PID/comm) is this one."""

    def __init__(self, name: str) -> None:
        if not name or "/" in name:
            raise MemtraceError(f"--comm takes a command name as ps shows it, not {name!r}")
        self.name = name[:COMM_LEN]

    def pids(self) -> set[int]:
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and procfs.comm(int(entry)) == self.name:
                found.add(int(entry))
        return _processes(found)

    def describe(self) -> str:
        return f"command {self.name}"

    def ended(self) -> bool:
        return False
