"""Which processes the agent follows: the cgroup v2 mount, cgroup members,
command names and pid lists, read from this machine's /proc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
import time

import pytest

from memtrace.errors import MemtraceError
from memtrace.process.follow import CgroupMembers, CommandName, PidList, cgroup2_root


def test_cgroup2_root_on_unified_and_hybrid_hosts(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n")
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
                      "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"
    assert cgroup2_root(str(tmp_path / "none")) == "/sys/fs/cgroup"


def test_cgroup_members_walk_the_subtree(tmp_path):
    (tmp_path / "cgroup.procs").write_text(f"{os.getppid()}\n")
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")
    members = CgroupMembers(str(tmp_path))
    # ourselves and a pid that no longer exists are left out
    assert members.pids() == {os.getppid()}
    assert not members.ended()
    with pytest.raises(MemtraceError, match="not a cgroup directory"):
        CgroupMembers(str(tmp_path / "nope"))


def test_command_name_and_pid_list():
    child = subprocess.Popen(["sleep", "30"])
    try:
        # Until the child has exec'd, it still bears our name.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "sleep never started"
            time.sleep(0.01)
        assert child.pid in CommandName("sleep").pids()
        assert CommandName("a-much-longer-name-than-15").name == "a-much-longer-n"
        with pytest.raises(MemtraceError):
            CommandName("/bin/sleep")
        pids = PidList([child.pid])
        assert pids.pids() == {child.pid} and not pids.ended()
    finally:
        child.kill()
        child.wait()
    assert pids.ended()
    with pytest.raises(MemtraceError, match="no process with pid"):
        PidList([child.pid])
