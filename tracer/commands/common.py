"""The flow every trace shares (plain `memtrace`, `memtrace demo`): check the
machine, find the target, load and attach, run the session, report."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from memtrace import preflight
from memtrace.errors import MemtraceError
from memtrace.serve import serve_address


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def stats_count(text: str) -> int:
    """--max-stats: blocks carry the counters' index in 20 bits."""
    value = positive_int(text)
    if value > 1 << 20:
        raise argparse.ArgumentTypeError(f"at most 1048576: {text!r}")
    return value


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                     help="seconds between snapshots (default 1)")
    out.add_argument("--duration", type=positive_float, metavar="S",
                     help="stop tracing after S seconds")
    out.add_argument("--json", action="store_true",
                     help="print the final snapshot as JSON on stdout instead of the view")
    out.add_argument("--batch", action="store_true",
                     help="plain-text snapshots every interval, as without a terminal")
    out.add_argument("--record", metavar="FILE",
                     help="keep the session in FILE for `memtrace replay` and `memtrace report`")
    out.add_argument("--serve", type=serve_address, metavar="[HOST:]PORT",
                     help="serve /metrics (Prometheus) and /debug/pprof/heap (pprof) while "
                     "tracing; loopback unless HOST is given")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="say what is attached where, and how long it took")
    mode = parser.add_argument_group("what to trace")
    mode.add_argument("--light", action="store_true",
                      help="no malloc probes (for production): address-space syscalls and "
                      "glibc's arenas read from outside; heap figures become estimates")
    mode.add_argument("--vm-probes", choices=("tracepoint", "kprobe"), default="tracepoint",
                      help="how address-space syscalls are traced (default: the stable "
                      "syscall tracepoints; kprobe needs a kernel with kprobes)")
    maps = parser.add_argument_group("kernel map sizes (drops are counted and shown)")
    maps.add_argument("--max-allocs", type=positive_int, default=1 << 20, metavar="N",
                      help="live allocations tracked at once, 32 bytes of kernel memory "
                      "each, allocated at start (default 1048576)")
    maps.add_argument("--max-stats", type=stats_count, default=65536, metavar="N",
                      help="(thread, stack, 64 MiB bucket) rows, at most 1048576 "
                      "(default 65536)")
    maps.add_argument("--event-buffer", type=positive_int, default=16, metavar="MIB",
                      help="ring buffer for address-space events, in MiB (default 16)")
    maps.add_argument("--stack-storage-size", type=positive_int, default=65536, metavar="N",
                      help="distinct call stacks kept, 1 KiB of kernel memory each as they "
                      "appear (default 65536)")


def make_sinks(args: argparse.Namespace, interactive: bool, metadata: dict) -> tuple[list, object]:
    """The sinks for this trace, and the live view if there is one."""
    from memtrace.sinks.console import console_sinks
    from memtrace.sinks.jsonout import JsonSink

    sinks: list = []
    view = None
    if args.json:
        sinks.append(JsonSink())
    else:
        console, view = console_sinks(interactive=interactive and not args.batch,
                                      mode="arenas" if args.light else "stacks")
        sinks.extend(console)
    if args.serve:
        from memtrace.sinks.serve import ServeSink

        sinks.append(ServeSink(args.serve))
    if args.record:
        from memtrace.sinks.record import RecordSink

        # First, passing snapshots on: a recording that fails adds its note.
        sinks = [RecordSink(args.record, metadata, then=sinks)]
    return sinks, view


def run_trace(args: argparse.Namespace, command_line: list[str], *, demo: bool = False) -> int:
    from memtrace import target as targets

    if bool(args.pid) == bool(command_line):
        raise MemtraceError(
            "say what to trace: -p PID for a running process, or -- CMD ARGS to launch one"
        )
    preflight.check_all()
    if args.vm_probes == "kprobe":
        preflight.check_kprobes()
    started = time.monotonic()
    if args.pid:
        target = targets.resolve_pid(args.pid)
        return _trace(args, target.pid, target.comm, target.libc_path, None, started,
                      allocator=target.allocator)
    executable = targets.find_executable(command_line[0])
    libc, allocator = targets.allocator_of_command(command_line)
    from memtrace.launch import Launched

    launched = Launched(command_line, executable)
    import os

    comm = os.path.basename(executable)[:15]
    return _trace(args, launched.pid, comm, libc, launched, started, keys_allowed=demo,
                  allocator=allocator)


def _trace(args, pid: int, comm: str, libc: str, launched, started: float,
           keys_allowed: bool = True, allocator=None) -> int:
    from memtrace.collect.collector import Collector
    from memtrace.collect.probes import Limits, Probes, resolve_sites
    from memtrace.session import Session, wait_for_command

    probes: Optional[Probes] = None
    try:
        kind = allocator.kind if allocator is not None else "glibc"
        prefix = allocator.prefix if allocator is not None else ""
        sites = resolve_sites(libc, kind, prefix)
        limits = Limits(max_allocs=args.max_allocs, max_stats=args.max_stats,
                        max_stacks=args.stack_storage_size,
                        event_buffer_bytes=args.event_buffer << 20)
        probes = Probes(pid, libc, limits, sites, light=args.light, vm_probes=args.vm_probes,
                        allocator_kind=kind, allocator_prefix=prefix)
        probes.load()
        probes.attach()
        collector = Collector(pid, comm, probes, light=args.light, attached=launched is None)
        events_fd = collector.start()
        collector.watch = _open_watch(pid, args.verbose)
    except BaseException:
        if probes is not None:
            probes.detach()
        if launched is not None:
            launched.kill()  # it never ran a single instruction
        raise
    if launched is not None:
        launched.release()
    if args.verbose:
        from memtrace.collect.probesite import format_sites

        print(f"memtrace: attached to pid {pid} in {libc} (calls in flight kept in "
              f"{probes.calls_in})", file=sys.stderr)
        for line in format_sites(probes.sites):
            print(f"memtrace:   {line}", file=sys.stderr)
        print(f"memtrace: probes attached {time.monotonic() - started:.2f} s after start",
              file=sys.stderr)

    interactive = sys.stdout.isatty() and not args.json
    read_keys = interactive and sys.stdin.isatty() and keys_allowed and not args.batch
    metadata = {
        "command_line": ["memtrace", *sys.argv[1:]],
        "pid": pid,
        "comm": comm,
        "launched": launched is not None,
        "options": {k: v for k, v in vars(args).items() if k not in ("entrypoint",)},
    }
    sinks, view = make_sinks(args, interactive, metadata)
    collector.vm.keep_events = bool(args.record)
    keys = None
    if read_keys:
        from memtrace.view.keys import KeyReader

        keys = KeyReader(sys.stdin.fileno())
    outcome = None
    try:
        if keys is not None:
            keys.__enter__()
        session = Session(
            pid=pid,
            snapshot=collector.snapshot,
            detach=probes.detach,
            sinks=sinks,
            interval_s=args.interval,
            duration_s=args.duration,
            launched=launched,
            keys=keys,
            on_key=view.handle_key if view is not None else None,
            on_resize=view.refresh if view is not None else None,
            events_fd=events_fd,
            on_events=collector.consume_events,
            watch_fds=collector.watch.filenos() if collector.watch else [],
            on_watch=collector.read_watch,
        )
        outcome = session.run()
    finally:
        probes.detach()
        if collector.watch is not None:
            collector.watch.close()
        if keys is not None:
            keys.__exit__(None, None, None)
        if outcome is not None:
            for sink in sinks:
                sink.close(outcome.final)
        else:
            for sink in sinks:
                abort = getattr(sink, "abort", None)
                if abort:
                    abort()
    if launched is not None:
        return wait_for_command(launched)
    return 0


def _open_watch(pid: int, verbose: bool):
    """The proc connector (exec, exit) and taskstats (peak RSS at exit).
    Optional: without them the trace goes on, and --verbose says why."""
    from memtrace.netlink import ProcessWatch

    watch = ProcessWatch(pid)
    if not watch.available:
        if verbose:
            print(f"memtrace: no exec/exit news from netlink: {watch.reason}", file=sys.stderr)
        watch.close()
        return None
    return watch
