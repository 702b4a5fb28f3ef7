"""Which process to trace: what the refusals say (no BPF needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from memtrace.process import procfs

from memtrace.process import target
from memtrace.errors import MemtraceError


def test_a_zombie_is_called_a_zombie():
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
         "print(pid, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        zombie = int(parent.stdout.readline())
        for _ in range(100):
            if target._state(zombie) == "Z":
                break
            time.sleep(0.05)
        with pytest.raises(MemtraceError, match="zombie") as e:
            target.resolve_pid(zombie)
        assert "static" not in str(e.value)
    finally:
        parent.kill()
        parent.wait()


def test_unreadable_maps_say_why(monkeypatch):
    def denied(pid):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(procfs, "read_maps", denied)
    with pytest.raises(MemtraceError) as e:
        target.resolve_pid(os.getpid())
    message = str(e.value)
    assert "cannot read /proc/" in message and "Permission denied" in message, message
    assert "static" not in message and "CAP_SYS_PTRACE" in message


def _maps_of(paths):
    return [procfs.Mapping(0x1000 * (i + 1), 0x1000 * (i + 2), "r-xp", 0, 10 + i, p, device=1)
            for i, p in enumerate(paths)]


@pytest.mark.parametrize("paths, says", [
    (["/usr/bin/app", "/usr/lib/x86_64-linux-musl/libc.so"],
     "musl (/usr/lib/x86_64-linux-musl/libc.so)"),
    (["/usr/bin/app", "/lib/ld-musl-x86_64.so.1"], "musl"),
    (["/usr/bin/app", "[heap]", "[stack]"], "statically linked"),
    (["/usr/bin/app", "/usr/lib/libjemalloc.so.2"], "does not map glibc"),
])
def test_what_a_process_without_glibc_is_called(paths, says, monkeypatch):
    monkeypatch.setattr(procfs, "read_maps", lambda pid: _maps_of(paths))
    with pytest.raises(MemtraceError) as e:
        target.resolve_pid(os.getpid())
    assert says in str(e.value), str(e.value)


def test_a_deleted_libc_is_still_the_libc_it_maps():
    """After an upgrade, a service maps "libc.so.6 (deleted)": that file is
    what to probe, reached through the mapping itself."""
    mapping = next(m for m in procfs.read_maps(os.getpid()) if "libc.so.6" in m.path)
    deleted = procfs.Mapping(mapping.start, mapping.end, mapping.perms, mapping.offset,
                             mapping.inode, mapping.path + " (deleted)", device=mapping.device)
    assert target._GLIBC_NAME.search(deleted.path.removesuffix(" (deleted)"))
    from memtrace.process import mappedfile

    fd = mappedfile.open_mapped(os.getpid(), deleted)
    try:
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (mapping.device, mapping.inode)
    finally:
        os.close(fd)
