"""Which processes the agent follows: the cgroup v2 mount, cgroup members,
command names and pid lists, read from this machine's /proc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
import time

import pytest

from memtrace.errors import MemtraceError
from memtrace.process.follow import CgroupMembers, CommandName, PidList, cgroup2_root, find_cgroup


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


def _cgroup_tree(root: Path, *paths: str) -> None:
    for rel in paths:
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cgroup.procs").write_text("")


def test_a_cgroup_is_found_by_the_name_users_give_it(tmp_path):
    docker = "3f2a9c1d" + "0" * 56
    pod = "ab12cd34" + "f" * 56
    _cgroup_tree(tmp_path, "system.slice", "system.slice/nginx.service",
                 "system.slice/nginx.service/worker",  # a child: followed with it, never a match
                 f"system.slice/docker-{docker}.scope",
                 f"kubepods.slice/kubepods-pod1.slice/cri-containerd-{pod}.scope",
                 "user.slice/user-1000.slice/app.service",
                 "system.slice/app.service")
    root = str(tmp_path)
    assert find_cgroup("system.slice/nginx.service", root) == f"{root}/system.slice/nginx.service"
    assert find_cgroup(f"{root}/system.slice", root) == f"{root}/system.slice"
    # a unit, with or without its suffix
    assert find_cgroup("nginx", root) == f"{root}/system.slice/nginx.service"
    assert find_cgroup("nginx.service", root) == f"{root}/system.slice/nginx.service"
    # a container by the id docker ps shows, or its start, in any case
    assert find_cgroup(docker[:12], root) == f"{root}/system.slice/docker-{docker}.scope"
    assert find_cgroup("AB12CD", root).endswith(f"cri-containerd-{pod}.scope")
    with pytest.raises(MemtraceError, match=r"'app' names 2 cgroups .*give one as a path"):
        find_cgroup("app", root)
    with pytest.raises(MemtraceError, match="no cgroup named 'redis'"):
        find_cgroup("redis", root)
    with pytest.raises(MemtraceError, match="no cgroup named '3f2'"):
        find_cgroup("3f2", root)  # too short a prefix to mean a container
    with pytest.raises(MemtraceError, match="not a cgroup directory"):
        find_cgroup("system.slice/redis.service", root)
    assert CgroupMembers("nginx", root).describe() == f"cgroup {root}/system.slice/nginx.service"


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
