"""Every refusal is exit code 2 and one line on stderr, never a traceback,
and leaves an attached-to target running untouched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def assert_refused(result, *hints: str) -> str:
    """Exit 2, no JSON, exactly one line on stderr mentioning one of `hints`."""
    rc, doc, stderr = result
    assert "Traceback" not in stderr, stderr
    assert rc == 2, f"rc={rc}, stderr={stderr!r}"
    assert doc is None, f"a refusal printed JSON: {doc}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    if hints:
        assert any(h.lower() in lines[0].lower() for h in hints), (
            f"message does not mention any of {hints}: {lines[0]!r}"
        )
    return lines[0]


def assert_untouched(target: subprocess.Popen) -> None:
    """The target survived the failed attach and still exits cleanly."""
    assert target.poll() is None, f"target died (rc={target.returncode})"
    target.send_signal(signal.SIGTERM)
    assert target.wait(10) == 0


@pytest.fixture
def idle_target(programs, spawn):
    """A glibc process blocked until SIGTERM."""
    return spawn([programs["idle"]])


def test_not_root(run_memtrace):
    result = run_memtrace(["--json", "-p", "1", "--duration", "1"], prefix=AS_NOBODY)
    assert_refused(result, "root", "sudo", "CAP_BPF")


def test_not_root_launch(run_memtrace, programs, tmp_path):
    marker = tmp_path / "ran"
    result = run_memtrace(
        ["--json", "--", "/bin/sh", "-c", f"touch {marker}"], prefix=AS_NOBODY
    )
    assert_refused(result, "root", "sudo", "CAP_BPF")
    assert not marker.exists(), "the command ran although memtrace refused to trace it"


def test_demo_not_root_says_so_before_building(run_memtrace, tmp_path):
    cache = tmp_path / "cache"
    result = run_memtrace(["demo"], prefix=AS_NOBODY, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert_refused(result, "root", "sudo", "CAP_BPF")
    assert not cache.exists() or not any(cache.rglob("*")), "the demo was built before the refusal"


def test_no_such_pid(run_memtrace):
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    assert_refused(run_memtrace(["--json", "-p", str(gone.pid), "--duration", "1"]), str(gone.pid))


def test_kernel_thread(run_memtrace):
    assert Path("/proc/2/comm").read_text().strip() == "kthreadd"
    assert_refused(run_memtrace(["--json", "-p", "2", "--duration", "1"]), "kernel", "kthreadd")


@pytest.mark.parametrize("program", ["idle_static", "idle_musl"])
def test_target_without_glibc_attach(program, programs, spawn, run_memtrace):
    target = spawn([programs[program]])
    assert_refused(
        run_memtrace(["--json", "-p", str(target.pid), "--duration", "1"]),
        "glibc", "libc", "static",
    )
    assert_untouched(target)


@pytest.mark.parametrize("program", ["idle_static", "idle_musl"])
def test_target_without_glibc_launch(program, programs, run_memtrace):
    assert_refused(
        run_memtrace(["--json", "--", programs[program], "--exit"]), "glibc", "libc", "static"
    )


@pytest.mark.parametrize(
    "variable", ["MEMTRACE_KERNEL_BUILD_DIR", "MEMTRACE_TRACEFS"]
)
def test_missing_kernel_facility(variable, idle_target, run_memtrace, tmp_path):
    missing = tmp_path / "not-here"
    env = {**os.environ, variable: str(missing)}
    result = run_memtrace(["--json", "-p", str(idle_target.pid), "--duration", "1"], env=env)
    assert_refused(result, str(missing))
    assert_untouched(idle_target)


def test_kprobe_vm_probes(idle_target, run_memtrace, programs, tmp_path):
    """--vm-probes kprobe: where the kernel has kprobes (the Vagrant VM), it
    traces the address space; where it has none (CONFIG_KPROBES off, as on
    the development machines), it refuses clearly, names the default, and
    leaves the target alone."""
    if os.path.exists("/sys/kernel/tracing/kprobe_events"):
        rc, doc, stderr = run_memtrace(["--json", "--vm-probes", "kprobe", "--interval", "0.2",
                                        "--", programs["threads"], tmp_path / "truth.json",
                                        "--hold-ms", "600"])
        assert rc == 0, stderr
        assert doc["os"]["mapped_bytes"] > 0 and doc["allocator"]["arena_count"] >= 1, doc
        return
    result = run_memtrace(["--json", "--vm-probes", "kprobe", "-p", str(idle_target.pid),
                           "--duration", "1"])
    assert_refused(result, "kprobe")
    assert "tracepoint" in result[2]
    assert_untouched(idle_target)


@pytest.fixture(scope="module")
def python_without_bcc(tmp_path_factory) -> Path:
    """A venv like a Debian system without python3-bpfcc: every system
    package but bcc, memtrace's own dependencies, and memtrace itself."""
    import bcc

    root = tmp_path_factory.mktemp("no-bcc")
    venv = root / "venv"
    base_python = getattr(sys, "_base_executable", None) or "/usr/bin/python3"
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )

    system_packages = Path(bcc.__file__).resolve().parent.parent
    shim = root / "system-without-bcc"
    shim.mkdir()
    for entry in system_packages.iterdir():
        if not entry.name.lower().startswith("bcc"):
            (shim / entry.name).symlink_to(entry)

    # memtrace's dependencies as installed for this test run, and memtrace:
    # an editable install is a finder module plus a .pth, which only work
    # from a site directory, so they are copied.
    our_site = Path(sysconfig.get_paths()["purelib"])
    (site / "memtrace-test-paths.pth").write_text(f"{our_site}\n{shim}\n")
    for finder in our_site.glob("__editable__*memtrace*"):
        shutil.copy(finder, site / finder.name)

    probe = subprocess.run(
        [python, "-c", "import memtrace\ntry:\n import bcc\nexcept ImportError:\n print('ok')"],
        capture_output=True, text=True,
    )
    if probe.stdout.strip() != "ok":
        pytest.fail(f"could not build a venv without bcc: {probe.stdout} {probe.stderr}",
                    pytrace=False)
    return python


def test_bcc_not_installed(python_without_bcc):
    done = subprocess.run(
        [python_without_bcc, "-m", "memtrace", "--json", "-p", "1", "--duration", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert_refused((done.returncode, done.stdout.strip() or None, done.stderr), "python3-bpfcc")


# ---------------------------------------------------------------- item 6, 8


def test_musl_and_static_targets_are_named(programs, spawn, run_memtrace):
    for program, says in (("idle_musl", "musl"), ("idle_static", "statically linked")):
        target = spawn([programs[program]])
        line = assert_refused(run_memtrace(["--json", "-p", str(target.pid), "--duration", "1"]),
                              says)
        assert "memtrace: memtrace" not in line
        assert_untouched(target)


def test_a_zombie_is_not_called_statically_linked(run_memtrace):
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
         "print(pid, flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        zombie = parent.stdout.readline().strip()
        line = assert_refused(run_memtrace(["--json", "-p", zombie, "--duration", "1"]), "zombie")
        assert "static" not in line
    finally:
        parent.kill()
        parent.wait()


ONLY = "setpriv --inh-caps=-all,{caps} --bounding-set=-all,{caps}"
TRACING_CAPS = ["bpf", "perfmon", "sys_ptrace"]


def _with_caps(caps: list[str]) -> list[str]:
    listed = ",".join(f"+{c}" for c in caps)
    return ONLY.format(caps=listed).split()


@pytest.mark.parametrize("dropped", TRACING_CAPS)
def test_the_missing_capability_is_named(dropped, idle_target, run_memtrace):
    """Root with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE but one (and no
    CAP_SYS_ADMIN, which would stand in for the first two)."""
    kept = [c for c in TRACING_CAPS if c != dropped]
    result = run_memtrace(["--json", "-p", str(idle_target.pid), "--duration", "1"],
                          prefix=_with_caps(kept))
    line = assert_refused(result, f"CAP_{dropped.upper()}")
    assert line.count("memtrace") == 1, line  # "memtrace: " once, from the CLI
    assert_untouched(idle_target)


def test_exactly_the_documented_capabilities_trace(run_memtrace, programs, tmp_path):
    """CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE as root: a trace works (the
    uprobes are made through tracefs, which root's uid may write)."""
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.2", "--", programs["threads"], tmp_path / "truth.json",
         "--hold-ms", "300"], prefix=_with_caps(TRACING_CAPS))
    assert rc == 0, stderr
    assert doc["heap"]["alloc_count"] > 0, doc["heap"]


# ---------------------------------------------------------------- item 5


def _uprobe_events() -> set[str]:
    return set(Path("/sys/kernel/tracing/uprobe_events").read_text().splitlines())


@pytest.mark.parametrize("delay_s", [0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2, 1.6, 2.0])
def test_target_killed_during_the_attach(delay_s, programs, spawn, start_memtrace, probes):
    """Whenever the target dies, memtrace exits 0 with what it saw, or 2 with
    one line; never 70, never a traceback; no probe left behind."""
    for _ in range(2):
        events_before = _uprobe_events()
        target = spawn([programs["idle"]])
        tracer = start_memtrace(["--json", "--interval", "0.2", "-p", str(target.pid)])
        time.sleep(delay_s)
        target.kill()
        target.wait()
        rc, doc, stderr = tracer.wait()
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr
        assert rc in (0, 2), (rc, stderr)
        if rc == 2:
            assert len(stderr.strip().splitlines()) == 1, stderr
        assert not probes.perf(probes.below(tracer.pid))
        # nor a tracefs event of a uprobe whose attach failed (bcc names
        # each after the target and itself; pids wrap, so only new ones)
        left = [line for line in _uprobe_events() - events_before
                if f"_{target.pid}_bcc_{tracer.pid}" in line.split(" ", 1)[0]]
        assert not left, (left, stderr)


# ---------------------------------------------------------------- issue 10 item 7


def _running(text: str) -> list[int]:
    """Processes whose command line holds `text`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read().replace(b"\0", b" "):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True)
    yield folder
    subprocess.run(["umount", folder], check=True)


@pytest.mark.parametrize("case", ["existing", "directory", "read-only"])
def test_a_refused_start_leaves_nothing_behind(case, tmp_path, read_only_folder, run_memtrace,
                                               spawn, probes):
    existing = tmp_path / "old.rec"
    existing.write_text("keep")
    record = {"existing": existing, "directory": tmp_path,
              "read-only": read_only_folder / "new.rec"}[case]
    hint = {"existing": "already exists", "directory": "is a directory",
            "read-only": "cannot create"}[case]
    marker = tmp_path / "ran"
    started = time.monotonic()
    result = run_memtrace(["--json", "--record", str(record), "--",
                           "/bin/sh", "-c", f"touch {marker}; sleep 30"])
    took = time.monotonic() - started
    assert_refused(result, hint)
    assert took < 3, f"refused after {took:.1f} s"
    assert not marker.exists(), "the command ran"
    assert not _running(f"touch {marker}"), "the command's process is still there"
    assert existing.read_text() == "keep"
    # attach mode: the same refusal, and the target is untouched
    target = spawn(["/bin/sleep", "30"])
    started = time.monotonic()
    assert_refused(run_memtrace(["--json", "--record", str(record), "-p", str(target.pid)]), hint)
    assert time.monotonic() - started < 3
    assert target.poll() is None


@pytest.mark.parametrize("case", ["directory", "no-folder", "read-only"])
def test_a_json_file_that_cannot_be_written_is_refused_first(case, tmp_path, read_only_folder,
                                                            run_memtrace):
    output = {"directory": tmp_path, "no-folder": tmp_path / "nope" / "out.json",
              "read-only": read_only_folder / "out.json"}[case]
    hint = {"directory": "is a directory", "no-folder": "does not exist",
            "read-only": "cannot write there"}[case]
    marker = tmp_path / "ran"
    result = run_memtrace(["--json", "-o", str(output), "--", "/bin/sh", "-c", f"touch {marker}"])
    assert_refused(result, hint)
    assert not marker.exists(), "the command ran"


def test_a_failed_attach_kills_the_launched_command(run_memtrace, tmp_path, probes):
    """A failure after the launch (here the BPF program does not compile):
    the command never ran an instruction and is gone."""
    marker = tmp_path / "ran"
    env = {**os.environ, "MEMTRACE_BPF_CFLAGS": "-DMEMTRACE_TEST_BROKEN=( -include /nonexistent.h"}
    result = run_memtrace(["--json", "--", "/bin/sh", "-c", f"touch {marker}; sleep 30"], env=env)
    assert_refused(result, "failed to load")
    assert not marker.exists(), "the command ran"
    assert not _running(f"touch {marker}"), "the command's process is still there"


@pytest.fixture
def memory_limited(tmp_path):
    """A prefix running memtrace in a memory cgroup of 700 MiB (BPF maps are
    charged to it): cgroup v2, or v1's memory controller."""
    name = f"memtrace-test-{os.getpid()}"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        group = Path("/sys/fs/cgroup") / name
        group.mkdir()
        (group / "memory.max").write_text(str(700 << 20))
    else:
        group = Path("/sys/fs/cgroup/memory") / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(700 << 20))
    yield ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_a_map_the_kernel_refuses_names_its_option(idle_target, run_memtrace, memory_limited):
    """A table that fits the machine but not the cgroup: the kernel refuses
    the map, and the refusal names the option that sizes it."""
    result = run_memtrace(["--json", "-p", str(idle_target.pid), "--duration", "1",
                           "--max-allocs", str(1 << 25)], prefix=memory_limited)
    line = assert_refused(result, "--max-allocs")
    assert "failed to load" not in line
    assert_untouched(idle_target)


def test_a_reader_that_stops_early_is_not_an_error(memtrace_cmd):
    """`memtrace --json -- CMD | head -2`: the pipe closes before the JSON
    is written; memtrace ends quietly, like any filter."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run([*memtrace_cmd, "--json", "--", "/bin/true"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and "internal error" not in done.stderr, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_attaching_still_ends_with_the_json(sig, idle_target, memtrace_cmd):
    """Ctrl-C or a SIGTERM before the probes are in (bcc takes seconds to
    compile on a loaded host) ends the trace the one way: probes removed,
    the JSON written, exit 0; the target runs on."""
    import json

    tracer = subprocess.Popen([*memtrace_cmd, "--json", "-v", "-p", str(idle_target.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    for line in tracer.stderr:  # -v names each start-up step
        said.append(line)
        if "compiling" in line:
            break
    tracer.send_signal(sig)  # while bcc compiles: seconds before the probes are in
    out, err = tracer.communicate(timeout=120)
    err = "".join(said) + err
    assert tracer.returncode == 0, err
    assert "probes attached" in err, "the signal came after the attach: the test did not test it"
    assert json.loads(out)["pid"] == idle_target.pid
    assert_untouched(idle_target)
