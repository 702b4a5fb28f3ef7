"""Checks run before any BPF is loaded, each failing with the fix."""

from __future__ import annotations

import os
import platform

from memtrace.errors import MemtraceError

CAP_PERFMON = 38
CAP_BPF = 39
CAP_SYS_ADMIN = 21

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


def check_privileges() -> None:
    caps = _effective_caps()
    has = lambda cap: bool(caps & (1 << cap))  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    who = "not root" if os.geteuid() != 0 else "root without CAP_BPF and CAP_PERFMON"
    raise MemtraceError(
        f"memtrace needs CAP_BPF and CAP_PERFMON to load probes ({who}): run it with sudo"
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
    if not os.path.isdir(os.path.join(tracefs, "events")):
        raise MemtraceError(
            f"tracefs is not mounted at {tracefs}: mount -t tracefs nodev {tracefs}"
        )


def check_all() -> None:
    check_privileges()
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
