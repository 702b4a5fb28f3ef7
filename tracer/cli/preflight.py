"""Checks run before any BPF is loaded, each failing with the fix."""

from __future__ import annotations

import os
import platform

from memtrace.errors import MemtraceError

CAP_DAC_OVERRIDE = 1
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

INSTALL_HINT = "run sudo ./install.sh from the memtrace checkout"


def kernel_build_dir() -> str:
    return os.environ.get("MEMTRACE_KERNEL_BUILD_DIR") or f"/lib/modules/{platform.release()}/build"


def tracefs_dir() -> str:
    return os.environ.get("MEMTRACE_TRACEFS") or "/sys/kernel/tracing"


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAP_BPF


def missing_capabilities(caps: int, attach: bool, last_cap: int = CAP_BPF) -> list[str]:
    """The capabilities a trace needs that `caps` (a CapEff mask) lacks.

    BPF programs and maps: CAP_BPF; perf events (uprobes, tracepoints) and
    reading kernel memory from BPF: CAP_PERFMON; CAP_SYS_ADMIN covers both,
    and is the only way before Linux 5.8 (no CAP_BPF). Reading another
    process's maps and memory and opening perf events on it:
    CAP_SYS_PTRACE (a launched command is our own child: not needed)."""
    has = lambda cap: bool(caps & (1 << cap))  # noqa: E731
    missing = []
    if not has(CAP_SYS_ADMIN):
        if last_cap < CAP_BPF:
            missing.append("CAP_SYS_ADMIN")
        else:
            missing += [name for cap, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
                        if not has(cap)]
    if attach and not has(CAP_SYS_PTRACE):
        missing.append("CAP_SYS_PTRACE")
    return missing


def check_privileges(attach: bool = True) -> None:
    caps = _effective_caps()
    missing = missing_capabilities(caps, attach, _last_cap())
    if missing:
        who = "not root" if os.geteuid() != 0 else "root with a reduced capability set"
        raise MemtraceError(
            f"tracing needs root, or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE: "
            f"{' and '.join(missing)} missing ({who}); run it with sudo"
        )
    if not caps & (1 << CAP_SYS_ADMIN):
        # Without CAP_SYS_ADMIN the kernel refuses perf's uprobe events, and
        # bcc creates them through tracefs instead.
        events = os.path.join(tracefs_dir(), "uprobe_events")
        if os.path.exists(tracefs_dir()) and not os.access(events, os.W_OK, effective_ids=True):
            raise MemtraceError(
                f"without CAP_SYS_ADMIN, uprobes are made through {events}, which this user "
                "cannot write: run memtrace as root, or add CAP_DAC_OVERRIDE"
            )


def check_bcc() -> None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise MemtraceError(
            "bcc's Python module is not installed: apt-get install python3-bpfcc "
            f"(the PyPI package 'bcc' is unrelated), or {INSTALL_HINT}"
        ) from None


def check_kernel_headers() -> None:
    build = kernel_build_dir()
    if not os.path.isdir(os.path.join(build, "include")):
        raise MemtraceError(
            f"kernel headers not found at {build}: {INSTALL_HINT} "
            "(it installs linux-headers and links them for this kernel)"
        )
    if "MEMTRACE_KERNEL_BUILD_DIR" in os.environ:
        os.environ.setdefault("BCC_KERNEL_SOURCE", build)


def check_tracefs() -> None:
    tracefs = tracefs_dir()
    if os.path.isdir(tracefs) and not os.access(tracefs, os.R_OK | os.X_OK, effective_ids=True):
        raise MemtraceError(
            f"cannot read tracefs at {tracefs} (permission denied): run memtrace as root, "
            "or add CAP_DAC_OVERRIDE"
        )
    if not os.path.isdir(os.path.join(tracefs, "events")):
        raise MemtraceError(
            f"tracefs is not mounted at {tracefs}: mount -t tracefs nodev {tracefs}"
        )


def check_all(attach: bool = True) -> None:
    check_privileges(attach)
    check_bcc()
    check_kernel_headers()
    check_tracefs()


def check_kprobes() -> None:
    """--vm-probes kprobe: only where the kernel was built with kprobes."""
    if not os.path.exists(os.path.join(tracefs_dir(), "kprobe_events")):
        raise MemtraceError(
            "--vm-probes kprobe: this kernel has no kprobes (CONFIG_KPROBES is off); "
            "use the default --vm-probes tracepoint"
        )
