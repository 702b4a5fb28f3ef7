"""memtrace probes and reads only the file a process maps, whatever the
process does to the paths that named it (issue 15 item 1).

A target runs in a chroot on its own copy of libc. Then the names that
led to that copy are swapped: the path the old code opened (the maps path
appended to /proc/PID/root) becomes a symlink to the host's libc, a FIFO,
/dev/zero or /etc/shadow; or the copy itself is replaced by one of them
(its mapping then reads "(deleted)"). memtrace must either probe the
copy's inode and count the target's calls, or refuse with one line; never
hang, never probe the host's libc (uprobes are per inode: every process
mapping it would trap). Without CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE
/proc/PID/map_files cannot be opened, so the same cases run again without
them: then the path is opened and the inode compared with the mapping's.
"""

from __future__ import annotations

import os
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

HOST_LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LOADER = "/lib64/ld-linux-x86-64.so.2"
# /proc/PID/map_files opens with CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE
NO_MAP_FILES = ["setpriv", "--inh-caps=-sys_admin,-checkpoint_restore",
                "--bounding-set=-sys_admin,-checkpoint_restore"]
SWAPS = ["host-libc", "fifo", "dev-zero", "shadow"]


def _swap(path: Path, how: str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to({"host-libc": HOST_LIBC, "dev-zero": "/dev/zero",
                         "shadow": "/etc/shadow"}[how])


@pytest.fixture
def chrooted(programs, tmp_path, spawn):
    """chrooted() -> (Popen of idle in a chroot on a copy of libc, the
    chroot's directory, the copy's path)."""

    def start():
        root = tmp_path / "root"
        libc = root / HOST_LIBC.lstrip("/")
        libc.parent.mkdir(parents=True)
        shutil.copy(HOST_LIBC, libc)
        (root / "lib64").mkdir()
        shutil.copy(LOADER, root / LOADER.lstrip("/"))
        shutil.copy(programs["idle"], root / "idle")
        target = spawn(["chroot", root, "/idle"])
        for _ in range(100):
            if str(libc) in Path(f"/proc/{target.pid}/maps").read_text():
                break
            subprocess.run(["sleep", "0.05"])
        else:
            pytest.fail("the chrooted target never mapped its libc", pytrace=False)
        return target, root, libc

    return start


def _probed_inodes(events: list[dict]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file memtrace's uprobes are on: bpftool
    names the path given to the kernel; a /proc/self/fd/N one is read
    through the holder's own descriptor table."""
    inodes = set()
    for event in events:
        name = event["filename"]
        if name.startswith("/proc/self/"):
            name = f"/proc/{event['pid']}/" + name[len("/proc/self/"):]
        st = os.stat(name)
        inodes.add((st.st_dev, st.st_ino))
    return inodes


def _wait_probes(probes, tracer: subprocess.Popen, timeout: float = 60.0) -> list[dict]:
    """memtrace's uprobes once their count is stable; [] if it exited first."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if tracer.poll() is not None:
            return []
        found = probes.perf(probes.below(tracer.pid))
        if len(found) != last:
            last, since = len(found), time.monotonic()
        elif found and time.monotonic() - since >= 0.5:
            return found
        time.sleep(0.1)
    tracer.kill()
    pytest.fail(f"memtrace neither attached nor refused within {timeout}s", pytrace=False)


def trace_or_refuse(chrooted, memtrace_cmd, probes, where: str, how: str,
                    prefix=()) -> str:
    """'traced' (every probe on the copy's inode, the target's malloc
    after the attach counted) or 'refused: <the one line>'."""
    target, root, libc = chrooted()
    start = next(line.split()[0] for line in Path(f"/proc/{target.pid}/maps").read_text()
                 .splitlines() if line.endswith(str(libc)))
    copy = os.stat(f"/proc/{target.pid}/map_files/{start}")
    if where == "mirror":  # what /proc/PID/root + the maps path leads to
        _swap(root / str(libc).lstrip("/"), how)
    else:  # the copy's own name
        _swap(libc, how)
    host = os.stat(HOST_LIBC)
    tracer = subprocess.Popen([*prefix, *memtrace_cmd, "--json", "--interval", "0.2",
                               "-p", str(target.pid)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = _wait_probes(probes, tracer)
        if not events:
            out, err = tracer.communicate(timeout=30)
            lines = err.strip().splitlines()
            assert tracer.returncode == 2 and len(lines) == 1 and not out, (tracer.returncode, err)
            assert target.poll() is None, "the target died"
            return f"refused: {lines[0]}"
        inodes = _probed_inodes(events)
        assert (host.st_dev, host.st_ino) not in inodes, "the host's libc is probed"
        assert inodes == {(copy.st_dev, copy.st_ino)}, (inodes, copy)
        target.send_signal(signal.SIGTERM)  # idle mallocs 100 bytes, then exits 0
        assert target.wait(30) == 0
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        heap = json.loads(out)["heap"]
        assert heap["alloc_count"] >= 1 and heap["alloc_bytes"] >= 100, heap
        return "traced"
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()


@pytest.mark.parametrize("how", SWAPS)
@pytest.mark.parametrize("where", ["mirror", "copy"])
def test_swapped_libc_path_as_root(where, how, chrooted, memtrace_cmd, probes):
    """As root the mapped file itself is opened (/proc/PID/map_files): the
    trace goes on, on the copy, whatever the names now lead to."""
    assert trace_or_refuse(chrooted, memtrace_cmd, probes, where, how) == "traced"


@pytest.mark.parametrize("how", SWAPS)
@pytest.mark.parametrize("where", ["mirror", "copy"])
def test_swapped_libc_path_without_map_files(where, how, chrooted, memtrace_cmd, probes):
    """Without CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE the path is opened
    and its inode compared with the mapping's. The mirror path is not the
    one opened (a chroot's maps path is seen from our root): traced. The
    copy's own name now leads elsewhere: refused, naming the file."""
    outcome = trace_or_refuse(chrooted, memtrace_cmd, probes, where, how, prefix=NO_MAP_FILES)
    if where == "mirror":
        assert outcome == "traced"
    else:
        assert outcome.startswith("refused: ") and "another file" in outcome, outcome
