"""Which processes the agent follows now: a list of pids, the members of a
cgroup (a systemd unit, a container), or the processes of one command name.

Each answer is read from /proc or /sys/fs/cgroup when asked: the agent asks
once a second, so a process that starts is seen within that second.
"""

from __future__ import annotations

import os
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


class CgroupMembers:
    """The processes of a cgroup and of the cgroups below it."""

    def __init__(self, path: str) -> None:
        root = cgroup2_root()
        self.path = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
        if not os.path.isfile(os.path.join(self.path, "cgroup.procs")):
            raise MemtraceError(
                f"{self.path} is not a cgroup directory (no cgroup.procs): give a path under "
                f"{root}, e.g. system.slice/NAME.service")

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
