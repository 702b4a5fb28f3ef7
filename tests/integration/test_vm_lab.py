"""The Vagrant lab for real: a VM from Debian's packages, a reproduction
traced in it with kprobes, and the kprobe path checked against the
tracepoint path.

Slow (a box build, an emulated VM), so outside the default run (marker vm,
deselected in pyproject.toml); run it on its own, as root:

    sudo tests/run -m vm

It builds the box with vagrant/box/build (skipped when the box in
MEMTRACE_BOX_CACHE is newer than that script; MEMTRACE_BOX_REBUILD=1 forces
it), starts libvirtd and virtlogd if they are not running (and stops them
after), `vagrant up --provider=libvirt` with MEMTRACE_BOX=local, runs
`vagrant/run arena-retention` once per --vm-probes path, reads both
recordings here, and `vagrant destroy`s the VM. Each step's time is printed
(pytest -s shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "vagrant"
BUILD = LAB / "box" / "build"
BOX_NAME = "memtrace/debian12-local"
CACHE = Path(os.environ.get("MEMTRACE_BOX_CACHE", "/var/cache/memtrace-box"))
BOX_FILE = CACHE / "memtrace-debian12-local.box"
LIBVIRT = "qemu:///system"

# As in test_demos.py, small, and each worker has an arena of its own; but
# held longer: emulated, the phases take about 3 s before memtrace's first
# sample, and a program gone before it leaves no arenas to compare.
ARENA_THREADS = 4
ARENA_MIB = 16
ARENA_OPTIONS = ["--threads", str(ARENA_THREADS), "--mib", str(ARENA_MIB), "--hold", "6"]
TRACE_OPTIONS = ["--interval", "0.25"]

BUILD_TIMEOUT_S = 60 * 60
UP_TIMEOUT_S = 40 * 60
RUN_TIMEOUT_S = 30 * 60


def _say(text: str) -> None:
    print(f"[vm lab] {text}", file=sys.stderr, flush=True)


def _run(argv: list[str], what: str, timeout: float, env: Optional[dict] = None,
         log: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a step, time it, fail with its output's end if it fails."""
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          errors="replace")
    took = time.monotonic() - started
    _say(f"{what}: {took:.0f} s, exit {done.returncode}")
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}  # {took:.0f} s, exit {done.returncode}\n")
            f.write(done.stdout + done.stderr + "\n")
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n"
                    f"{(done.stdout + done.stderr)[-4000:]}", pytrace=False)
    return done


def _tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {fix}", pytrace=False)
    return path


# ---------------------------------------------------------------- libvirt


def _libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", LIBVIRT, "uri"], capture_output=True,
                          timeout=30).returncode == 0


@pytest.fixture(scope="module")
def libvirt():
    """libvirtd and virtlogd, started here when no init system runs them."""
    _tool("virsh", "install Debian's libvirt-clients (vagrant/box/build does not)")
    started: list[subprocess.Popen] = []
    if not _libvirt_answers():
        for daemon in ("virtlogd", "libvirtd"):
            path = _tool(daemon, "install Debian's libvirt-daemon-system")
            started.append(subprocess.Popen([path], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not _libvirt_answers():
            if time.monotonic() > deadline:
                pytest.fail("libvirtd started but does not answer on qemu:///system",
                            pytrace=False)
            time.sleep(0.5)
        _say(f"started {', '.join(str(p.pid) for p in started)} (virtlogd, libvirtd)")
    yield
    for proc in reversed(started):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- the VM


@pytest.fixture(scope="module")
def vagrant_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    state = tmp_path_factory.mktemp("vagrant")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACE_")}
    env.update(
        MEMTRACE_BOX="local",
        MEMTRACE_PROVIDER="libvirt",
        MEMTRACE_RECORDINGS=str(state / "recordings"),
        VAGRANT_CWD=str(LAB),
        # The VM's state outside the checkout; the boxes in the cache.
        VAGRANT_DOTFILE_PATH=str(state / "dotfile"),
        VAGRANT_HOME=str(CACHE / "vagrant.d"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_DEFAULT_PROVIDER="libvirt",
    )
    return env


def _box_is_current(env: dict) -> bool:
    if os.environ.get("MEMTRACE_BOX_REBUILD") == "1" or not BOX_FILE.is_file():
        return False
    if BOX_FILE.stat().st_mtime < BUILD.stat().st_mtime:
        return False
    listed = subprocess.run(["vagrant", "box", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    return BOX_NAME in listed.stdout


@pytest.fixture(scope="module")
def lab_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = CACHE / "vm-lab-test.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _say(f"commands and their output: {log}")
    return log


@pytest.fixture(scope="module")
def vm(libvirt, vagrant_env: dict, lab_log: Path):
    """The lab VM from the local box, up and provisioned; destroyed after."""
    if os.geteuid() != 0:
        pytest.fail("not root: the VM lab test builds a box and runs libvirt (sudo tests/run -m vm)",
                    pytrace=False)
    _tool("vagrant", "install Debian's vagrant and vagrant-libvirt")
    if _box_is_current(vagrant_env):
        _say(f"box {BOX_NAME} is current ({BOX_FILE})")
    else:
        _run([str(BUILD)], "vagrant/box/build", BUILD_TIMEOUT_S, env=vagrant_env, log=lab_log)
    try:
        _run(["vagrant", "up", "--provider=libvirt"], "vagrant up", UP_TIMEOUT_S,
             env=vagrant_env, log=lab_log)
        yield vagrant_env
    finally:
        subprocess.run(["vagrant", "destroy", "-f"], env=vagrant_env, capture_output=True,
                       timeout=600)
        _say("vagrant destroy done")
        _delete_box_volumes()


def _delete_box_volumes() -> None:
    """vagrant-libvirt keeps each box it uploaded in libvirt's pool (1.6 GB
    a build); the next `vagrant up` uploads the box again in seconds."""
    # A table (name, path): this virsh's vol-list has no --name.
    table = subprocess.run(["virsh", "-c", LIBVIRT, "vol-list", "default"],
                           capture_output=True, text=True, timeout=60).stdout
    prefix = BOX_NAME.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
    for volume in (line.split()[0] for line in table.splitlines() if line.strip()):
        if volume.startswith(prefix):
            subprocess.run(["virsh", "-c", LIBVIRT, "vol-delete", volume, "--pool", "default"],
                           capture_output=True, timeout=60)


def _guest(vm: dict, command: str, log: Path, what: str) -> str:
    return _run(["vagrant", "ssh", "--no-tty", "-c", command], what, 600, env=vm, log=log).stdout


# ---------------------------------------------------------------- recordings


class Run:
    def __init__(self, path: Path, output: str) -> None:
        self.path = path
        self.output = output.replace("\r", "")

    def doc(self) -> dict:
        done = subprocess.run([sys.executable, "-m", "memtrace", "report", str(self.path),
                               "--format", "json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def metadata(self) -> dict:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            (raw,) = db.execute("select value from meta where key = 'metadata'").fetchone()
        return json.loads(raw)

    def event_counts(self) -> dict[str, int]:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            return dict(db.execute("select kind, count(*) from events group by kind"))

    def truth(self, phase: str) -> list[dict[str, str]]:
        found = []
        for line in self.output.splitlines():
            marker = f"] truth {phase}: "
            if marker in line:
                fields = line.split(marker, 1)[1].split()
                found.append(dict(f.split("=", 1) for f in fields if "=" in f))
        return found


@pytest.fixture(scope="module")
def recorded(vm: dict, lab_log: Path):
    """recorded(PATH) -> the Run of arena-retention with --vm-probes PATH."""
    runs: dict[str, Run] = {}

    def run(vm_probes: str) -> Run:
        if vm_probes not in runs:
            recordings = Path(vm["MEMTRACE_RECORDINGS"]) / vm_probes
            env = {**vm, "MEMTRACE_RECORDINGS": str(recordings)}
            done = _run([str(LAB / "run"), "arena-retention", "--vm-probes", vm_probes,
                         *TRACE_OPTIONS, "--", *ARENA_OPTIONS],
                        f"vagrant/run arena-retention --vm-probes {vm_probes}", RUN_TIMEOUT_S,
                        env=env, log=lab_log)
            files = sorted(recordings.glob("arena-retention-*.memtrace"))
            assert len(files) == 1, (files, done.stderr[-2000:])
            runs[vm_probes] = Run(files[0], done.stdout + done.stderr)
        return runs[vm_probes]

    return run


# ---------------------------------------------------------------- tests


def test_the_guest_is_debians_kernel_with_kprobes(vm: dict, lab_log: Path) -> None:
    out = _guest(vm, "uname -r; grep -E '^CONFIG_(KPROBES|UPROBES|DEBUG_INFO_BTF)=' "
                     "/boot/config-$(uname -r); test -e /sys/kernel/btf/vmlinux && echo btf; "
                     "sudo memtrace --version", lab_log, "guest facts")
    lines = out.split()
    assert lines[0].endswith("-amd64"), out
    for option in ("CONFIG_KPROBES=y", "CONFIG_UPROBES=y", "CONFIG_DEBUG_INFO_BTF=y", "btf"):
        assert option in lines, out

    # Facts for the README, not conditions: how libvirt runs the guest (the
    # Vagrantfile's driver choice), and which registries the guest reaches
    # through libvirt's NAT (the box installs memtrace without them).
    domain = (Path(vm["VAGRANT_DOTFILE_PATH"]) / "machines/memtrace/libvirt/id").read_text().strip()
    xml = subprocess.run(["virsh", "-c", LIBVIRT, "dumpxml", domain], capture_output=True,
                         text=True, timeout=60).stdout
    _say("libvirt domain type: " + xml.split("'", 2)[1] if xml.startswith("<domain type=") else xml[:80])
    reach = _run(["vagrant", "ssh", "--no-tty", "-c",
                  "sudo apt-get update -qq >/dev/null 2>&1 && echo debian=yes || echo debian=no; "
                  "python3 -m pip download --isolated --no-deps -q -d /tmp/pip-probe pip "
                  ">/dev/null 2>&1 && echo pypi=yes || echo pypi=no"],
                 "guest registries", 600, env=vm, log=lab_log).stdout
    _say("guest reaches: " + " ".join(reach.split()))


def test_kprobe_recording_shows_arena_retention(recorded) -> None:
    run = recorded("kprobe")
    meta = run.metadata()
    assert meta["options"]["vm_probes"] == "kprobe", meta["options"]
    assert meta["kernel"].endswith("-amd64"), meta  # recorded in the guest
    # The address-space calls came from the kprobes on the syscall functions
    # (with VM_KPROBES the syscall tracepoints are not in the BPF program).
    events = run.event_counts()
    assert events.get("mmap", 0) >= ARENA_THREADS and events.get("munmap", 0) >= 1, events

    # The signature, as in test_demos.py's local run.
    doc = run.doc()
    after_free = run.truth("free")
    threads = {t["thread"]: t for t in after_free if "thread" in t}
    (freed,) = [t for t in after_free if "thread" not in t]
    allocator = doc["allocator"]
    truth_live = int(freed["live_bytes"])
    assert truth_live <= doc["heap"]["live_bytes"] <= truth_live + 64 * 1024, doc["heap"]
    assert allocator["arena_count"] >= ARENA_THREADS + 1, allocator
    assert allocator["retained_bytes"] >= 0.5 * allocator["resident_bytes"], allocator
    by_tid = {int(t["tid"]): t for t in threads.values()}
    mine = [a for a in doc["arenas"] if a["kind"] == "thread" and set(a["tids"]) & set(by_tid)]
    assert len(mine) == ARENA_THREADS, doc["arenas"]
    for arena in mine:
        (tid,) = arena["tids"]
        assert arena["live_bytes"] == int(by_tid[tid]["live_bytes"]), (arena, by_tid[tid])
        assert arena["retained_bytes"] >= 0.5 * arena["resident_bytes"], arena
    top = max(doc["stacks"], key=lambda s: s["retained_bytes"])
    assert top["frames"][0].startswith("inflate_block"), top
    assert top["retained_bytes"] >= 0.5 * allocator["retained_bytes"], top


# The same program twice, once per path. Both paths catch the same system
# calls, so the address-space model built from them must agree: the mapped,
# reserved, committed and returned bytes, the arenas and the regions follow
# from the calls alone and are compared exactly. What may differ between two
# runs is what the kernel decides, not what it was asked:
# - munmap counts: glibc maps a new arena heap at twice its size and unmaps
#   the unaligned head and tail, one call or two depending on where the
#   kernel put the mapping (ASLR): at most one more per thread arena;
# - resident bytes of file mappings (page cache), and when smaps was read:
#   2 % plus one MiB (the runs measured differ by 12 KiB);
# - the regions listed are the 12 holding the most resident bytes, so the
#   small ones (library pages, the 132 KiB [heap] and [stack]) enter the
#   list by the kernel's page cache; those holding at least 1 MiB (the arena
#   heaps, 16 MiB each here) are compared.
RESIDENT_SLACK = 0.02
RESIDENT_SLACK_BYTES = 1 << 20


def _close(a: int, b: int) -> bool:
    return abs(a - b) <= RESIDENT_SLACK * max(a, b) + RESIDENT_SLACK_BYTES


def _region_shape(doc: dict) -> list[tuple]:
    """The large regions, without their addresses (ASLR)."""
    return sorted((r["kind"], r["in_malloc"], r["end"] - r["start"], r["committed_bytes"])
                  for r in doc["regions"] if r["resident_bytes"] >= RESIDENT_SLACK_BYTES)


def _arena_shape(doc: dict) -> list[tuple]:
    return sorted((a["kind"], a["heap_count"], a["reserved_bytes"], a["committed_bytes"],
                   a["live_bytes"]) for a in doc["arenas"])


def test_kprobe_and_tracepoint_paths_agree(recorded) -> None:
    kprobe, tracepoint = recorded("kprobe"), recorded("tracepoint")
    assert tracepoint.metadata()["options"]["vm_probes"] == "tracepoint"
    k_events, t_events = kprobe.event_counts(), tracepoint.event_counts()
    k, t = kprobe.doc(), tracepoint.doc()
    _say(f"events: kprobe {k_events}, tracepoint {t_events}")
    _say(f"os: kprobe {k['os']}, tracepoint {t['os']}")

    # the same calls were seen, kind by kind
    assert set(k_events) == set(t_events), (k_events, t_events)
    for kind in k_events:
        slack = ARENA_THREADS if kind == "munmap" else 0
        assert abs(k_events[kind] - t_events[kind]) <= slack, (kind, k_events, t_events)
    # the figures that follow from the calls alone are equal
    for key in ("mapped_bytes", "reserved_bytes", "committed_bytes", "returned_bytes"):
        assert k["os"][key] == t["os"][key], (key, k["os"], t["os"])
    assert _arena_shape(k) == _arena_shape(t)
    assert len(_region_shape(k)) >= ARENA_THREADS, k["regions"]
    assert _region_shape(k) == _region_shape(t)
    # residency is the kernel's, within the slack above
    assert _close(k["os"]["resident_bytes"], t["os"]["resident_bytes"]), (k["os"], t["os"])
    for key in ("resident_bytes", "retained_bytes", "live_bytes"):
        assert _close(k["allocator"][key], t["allocator"][key]), (key, k["allocator"], t["allocator"])
