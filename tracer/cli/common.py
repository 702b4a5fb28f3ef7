"""The flow every trace shares (plain `memtrace`, `memtrace demo`): check the
machine, find the target, load and attach, run the session, report."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

from memtrace.cli import preflight
from memtrace.errors import MemtraceError
from memtrace.output.serve import serve_address


# Snapshots faster than this cost the target more than they tell; slower
# than an hour, a live view is not live.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0
# A year: a finite end that no trace reaches by accident.
MAX_DURATION_S = 365 * 24 * 3600.0


def seconds(low: float, high: float, inclusive_low: bool = True):
    """An argparse type: a finite number of seconds within [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds: {text!r}")
        if value < low or (value == low and not inclusive_low) or value > high:
            lowest = f"at least {low:g}" if inclusive_low else f"more than {low:g}"
            raise argparse.ArgumentTypeError(f"{lowest} and at most {high:g} seconds: {text!r}")
        return value

    return parse


interval_seconds = seconds(MIN_INTERVAL_S, MAX_INTERVAL_S)
duration_seconds = seconds(0.0, MAX_DURATION_S, inclusive_low=False)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def count_up_to(limit: int, why: str):
    """An argparse type: a whole number in 1..limit (`why` says where the
    limit comes from)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"at most {limit} ({why}): {text!r}")
        return value

    return parse


# The kernel's own limits on the maps these options size (memory is
# checked at start, check_kernel_memory).
MAX_STATS_LIMIT = 1 << 20  # blocks carry the counters' index in 20 bits
MAX_ALLOCS_LIMIT = 1 << 30  # a 32 GiB table; the kernel indexes buckets in 32 bits
MAX_STACKS_LIMIT = 1 << 28  # a BPF hash holds at most 2^28 buckets
MAX_EVENT_BUFFER_MIB = 2048  # a BPF ring buffer's size is a 32-bit power of two
MAX_UNWIND_ROWS_LIMIT = 1 << 26  # 512 MiB of rows; their index is a u32
STACK_ENTRY_BYTES = 1024 + 64  # 127 frames, key and the hash's element header
BUCKET_BYTES = 16  # a BPF hash's bucket, allocated up front per entry


def kernel_memory_needs(args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    """Kernel memory each sizing option takes: (bytes, when)."""
    from memtrace.collect.probes import alloc_bucket_bits
    from memtrace.collect.unwind import ROW_BYTES

    ring = 1 << (args.event_buffer.bit_length() - 1) << 20  # as probes._ring_pages rounds it
    needs = {
        "--event-buffer": (ring, "allocated at start"),
        "--stack-storage-size": (args.stack_storage_size * STACK_ENTRY_BYTES,
                                 "when that many distinct stacks are seen"),
        "--unwind-rows": (args.unwind_rows * ROW_BYTES, "allocated at start"),
    }
    if not args.light:
        table = (1 << alloc_bucket_bits(args.max_allocs)) * 128
        needs["--max-allocs"] = (table, "allocated at start")
    return needs


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_kernel_memory(args: argparse.Namespace) -> None:
    """Refuse sizes the machine cannot hold, naming the flag, before
    anything is compiled: the kernel would only say that the map failed."""
    available = _available_memory()
    if available is None:
        return
    from memtrace.output.view.fmt import fmt_bytes

    for flag, (size, when) in kernel_memory_needs(args).items():
        if size > available // 2:
            raise MemtraceError(
                f"{flag} asks for {fmt_bytes(size)} of kernel memory ({when}), more than half "
                f"of the {fmt_bytes(available)} available: give a smaller {flag}"
            )


def check_output_paths(args: argparse.Namespace) -> None:
    """Every file the trace will write, checked before anything is launched
    or attached: a refusal then leaves nothing behind. A recording is a new
    file; -o FILE is written as a shell redirection would, replacing one."""
    output = getattr(args, "output", None)
    if output:
        _check_writable(f"-o {output}", output, replace=True)
    path = getattr(args, "record", None)
    if path:
        _check_writable(f"--record {path}", path, replace=False)


def _check_writable(shown: str, path: str, replace: bool) -> None:
    exists = f"{shown}: already exists; choose another file name or remove it"
    if os.path.isdir(path):
        raise MemtraceError(f"{shown}: is a directory; give the name of a "
                            f"{'' if replace else 'new '}file in it")
    existed = os.path.lexists(path)
    if existed and not replace:
        raise MemtraceError(exists)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MemtraceError(f"{shown}: the folder {folder} does not exist; create it first")
    # Creating a file is the only true test (read-only mounts, immutable
    # folders, quotas): the name itself, removed at once if it was not there.
    mode, perms = (os.O_APPEND, 0o644) if replace else (os.O_EXCL, 0o600)
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | mode, perms)
    except FileExistsError:
        raise MemtraceError(exists) from None
    except OSError as e:
        what = "cannot write there" if replace else f"cannot create a file in {folder}"
        raise MemtraceError(f"{shown}: {what} ({e.strerror}); choose a writable folder") from None
    os.close(fd)
    if not existed:
        os.unlink(path)


def json_on_stdout(args: argparse.Namespace) -> bool:
    """Whether stdout carries JSON (--json or --json-stream without -o): then
    it carries nothing else."""
    return bool((args.json or args.json_stream) and not getattr(args, "output", None))


def add_mode_options(mode) -> None:
    """--light and --vm-probes, for a trace and for the agent."""
    mode.add_argument("--light", action="store_true",
                      help="no malloc probes (for production): address-space syscalls and "
                      "glibc's arenas read from outside; heap figures become estimates")
    mode.add_argument("--vm-probes", choices=("tracepoint", "kprobe"), default="tracepoint",
                      help="how address-space syscalls are traced (default: the stable "
                      "syscall tracepoints; kprobe needs a kernel with kprobes)")


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--interval", type=interval_seconds, default=1.0,
                     metavar="S", help=f"seconds between snapshots, {MIN_INTERVAL_S:g} to "
                     f"{MAX_INTERVAL_S:g} (default 1)")
    out.add_argument("--duration", type=duration_seconds,
                     metavar="S", help="stop tracing after S seconds")
    out.add_argument("--json", action="store_true",
                     help="print the final snapshot as JSON on stdout instead of the view")
    out.add_argument("--json-stream", action="store_true",
                     help="print every snapshot as one JSON object per line on stdout "
                     "(the final one last) instead of the view")
    out.add_argument("--batch", action="store_true",
                     help="plain-text snapshots every interval, as without a terminal")
    out.add_argument("-o", "--output", metavar="FILE",
                     help="write the JSON to FILE instead of stdout (then the command keeps "
                     "stdout): the final snapshot, or every snapshot with --json-stream; "
                     "-o alone keeps the view and writes the final snapshot to FILE")
    out.add_argument("--record", metavar="FILE",
                     help="keep the session in FILE for `memtrace replay` and `memtrace report`")
    out.add_argument("--serve", type=serve_address, metavar="[HOST:]PORT",
                     help="serve /metrics (Prometheus) and /debug/pprof/heap (pprof) while "
                     "tracing; loopback unless HOST is given")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="say what is attached where, and how long it took")
    from memtrace.output.reports.select import add_policy_options

    add_policy_options(out)
    add_mode_options(parser.add_argument_group("what to trace"))
    maps = parser.add_argument_group("kernel map sizes (drops are counted and shown)")
    maps.add_argument("--max-allocs", type=count_up_to(MAX_ALLOCS_LIMIT, "a 32 GiB table"),
                      default=1 << 20, metavar="N",
                      help="live allocations tracked at once, 32 bytes of kernel memory "
                      "each, allocated at start (default 1048576)")
    maps.add_argument("--max-stats", type=count_up_to(MAX_STATS_LIMIT, "20 bits per block"),
                      default=65536, metavar="N",
                      help="(thread, stack, 64 MiB bucket) rows, at most 1048576 "
                      "(default 65536)")
    maps.add_argument("--event-buffer", type=count_up_to(MAX_EVENT_BUFFER_MIB, "MiB, the kernel's "
                      "largest ring buffer"), default=16, metavar="MIB",
                      help="ring buffer for address-space events, in MiB, rounded down to a "
                      "power of two (default 16)")
    maps.add_argument("--stack-storage-size", type=count_up_to(MAX_STACKS_LIMIT, "the kernel's "
                      "largest BPF hash"), default=65536, metavar="N",
                      help="distinct call stacks kept, 1 KiB of kernel memory each as they "
                      "appear (default 65536)")
    maps.add_argument("--unwind-rows", type=count_up_to(MAX_UNWIND_ROWS_LIMIT, "512 MiB of rows"),
                      default=1 << 21, metavar="N",
                      help="unwind rows of the code built without frame pointers, 8 bytes of "
                      "kernel memory each, allocated at start (default 2097152)")


DETACHING = "detaching… (removing the probes)"


def view_is_live(args: argparse.Namespace) -> bool:
    """The full-screen view, not batch text or JSON."""
    return sys.stdout.isatty() and not (args.json or args.json_stream or args.batch)


def make_sinks(args: argparse.Namespace, interactive: bool, metadata: dict,
               context=None) -> tuple[list, object]:
    """The sinks for this trace, and the live view if there is one."""
    from memtrace.output.sinks.console import console_sinks
    from memtrace.output.sinks.jsonout import JsonSink

    from memtrace.output.reports.select import policy_of

    sinks: list = []
    view = None
    policy = policy_of(args)
    if args.json_stream:
        from memtrace.output.sinks.jsonout import JsonStreamSink

        sinks.append(JsonStreamSink(policy, path=args.output))
    elif args.json or args.output:
        sinks.append(JsonSink(policy, path=args.output))
    if not (args.json or args.json_stream):
        console, view = console_sinks(interactive=interactive and not args.batch, policy=policy,
                                      mode="arenas" if args.light else "stacks", context=context)
        sinks.extend(console)
    try:
        if args.serve:
            from memtrace.output.sinks.serve import ServeSink

            sinks.append(ServeSink(args.serve))
        if args.record:  # last: nothing after it can fail and leave its file behind
            from memtrace.output.sinks.record import RecordSink

            # First, passing snapshots on: a recording that fails adds its note.
            sinks = [RecordSink(args.record, metadata, then=sinks)]
    except BaseException:
        for sink in sinks:
            abort = getattr(sink, "abort", None)
            if abort:
                abort()
        raise
    return sinks, view


def run_trace(args: argparse.Namespace, command_line: list[str], *, demo: bool = False,
              keyboard_to_command: bool = False, hold: bool = False) -> int:
    """`demo`: read keys for the view even when the command keeps our
    terminal; `keyboard_to_command`: the command waits for input, so our
    stdin stays its stdin; `hold`: when the command ends, the live view
    stays until `q`."""
    from memtrace.process import target as targets

    if args.pid and command_line:
        raise MemtraceError(f"both -p {args.pid} and a command ({command_line[0]}) were given: "
                            "trace one, -p PID for a running process or -- CMD ARGS to launch one")
    if not args.pid and not command_line:
        raise MemtraceError(
            "say what to trace: -p PID for a running process, or -- CMD ARGS to launch one"
        )
    from memtrace.output.reports.select import policy_of

    policy_of(args)  # a bad --function pattern fails here, before anything is loaded
    preflight.check_all(attach=bool(args.pid))
    if args.vm_probes == "kprobe":
        preflight.check_kprobes()
    check_kernel_memory(args)
    check_output_paths(args)
    started = time.monotonic()
    if args.pid:
        target = targets.resolve_pid(args.pid)
        return _trace(args, target.pid, target.comm, target.libc_path, target.libc_shown, None,
                      started, allocator=target.allocator)
    executable = targets.find_executable(command_line[0])
    libc, allocator = targets.allocator_of_command(command_line)
    from memtrace.collect.unwind import warm
    from memtrace.process.launch import Launched

    warm(targets.objects_of_command(command_line))  # while the BPF program compiles

    output = None
    if view_is_live(args):
        # Its output would write over the view: it writes to a pty of its own.
        from memtrace.process.command_output import CommandOutput

        output = CommandOutput(os.path.basename(command_line[0]), args.record,
                               keep_stdin=keyboard_to_command)
        output.resize(*shutil.get_terminal_size())
    # JSON on stdout is for a parser: the command's own output would break it.
    stdout_fd = 2 if json_on_stdout(args) else None
    try:
        launched = Launched(command_line, executable, terminal=output, stdout_fd=stdout_fd)
    except BaseException:
        if output is not None:
            output.close(keep_log=False)
        raise
    comm = os.path.basename(executable)[:15]
    try:
        return _trace(args, launched.pid, comm, libc, allocator.path, launched, started,
                      keys_allowed=demo or (output is not None and not keyboard_to_command),
                      allocator=allocator, hold=hold)
    finally:
        if output is not None:
            kept = output.byte_count > 0
            output.close(keep_log=kept)
            if kept:
                where = " (next to the recording)" if args.record and output.log_path.startswith(args.record) else ""
                print(f"memtrace: the output of {output.command} is in {output.log_path}{where}", file=sys.stderr)


def _import_in_background(*modules: str) -> None:
    """Import what the trace needs later on a thread of its own, while this
    one waits in the kernel for the BPF verifier: pyroute2 alone takes
    ~0.1 s. The import system's locks make a later import wait for it."""
    import importlib
    import threading

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 — the import where it is needed says why
                pass

    threading.Thread(target=load, name="memtrace-imports", daemon=True).start()


def _first_line(captured) -> str:
    captured.seek(0)
    lines = captured.read(4096).decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""


def _target_gone(pid: int, launched) -> bool:
    if launched is not None:
        return launched.poll() is not None
    from memtrace.process.target import process_ended

    return process_ended(pid)


def _trace(args, pid: int, comm: str, libc: str, libc_shown: str, launched, started: float,
           keys_allowed: bool = True, allocator=None, hold: bool = False) -> int:
    from memtrace.cli.session import EarlySignals

    # From here a signal ends the trace through the session, however long
    # the probes take to load.
    with EarlySignals() as early:
        return _trace_early(args, pid, comm, libc, libc_shown, launched, started,
                            keys_allowed=keys_allowed, allocator=allocator, hold=hold, early=early)


def _trace_early(args, pid: int, comm: str, libc: str, libc_shown: str, launched, started: float,
                 keys_allowed: bool = True, allocator=None, hold: bool = False, early=None) -> int:
    from memtrace.collect.collector import Collector
    from memtrace.collect.probes import Limits, Probes, redirect_fd2, resolve_sites
    from memtrace.cli.session import Session, wait_for_command

    interactive = sys.stdout.isatty() and not args.json and not args.json_stream
    metadata = {
        "command_line": ["memtrace", *sys.argv[1:]],
        "pid": pid,
        "comm": comm,
        "launched": launched is not None,
        "options": {k: v for k, v in vars(args).items() if k not in ("entrypoint",)},
    }
    if launched is not None and launched.terminal is not None:
        metadata["command_output_log"] = launched.terminal.log_path
    probes: Optional[Probes] = None
    # libbcc writes its reasons to fd 2 itself: kept for the one line
    bcc_said = tempfile.TemporaryFile()
    from memtrace.output.view.progress import StartupProgress

    progress = StartupProgress(view_is_live(args) and sys.stderr.isatty(), verbose=args.verbose)
    try:
        kind = allocator.kind if allocator is not None else "glibc"
        prefix = allocator.prefix if allocator is not None else ""
        progress.step(f"finding the allocator's functions in {libc_shown}")
        with redirect_fd2(bcc_said.fileno()):
            sites = resolve_sites(libc, kind, prefix)
        limits = Limits(max_allocs=args.max_allocs, max_stats=args.max_stats,
                        max_stacks=args.stack_storage_size,
                        event_buffer_bytes=args.event_buffer << 20, unwind_rows=args.unwind_rows)
        probes = Probes(pid, libc, limits, sites, light=args.light, vm_probes=args.vm_probes,
                        allocator_kind=kind, allocator_prefix=prefix)
        progress.step("compiling and loading the probes (a few seconds)")
        _import_in_background("memtrace.process.netlink", "memtrace.collect.collector")
        probes.load()
        progress.step(f"attaching to pid {pid} ({comm})")
        with redirect_fd2(bcc_said.fileno()):
            probes.attach()
        progress.step("reading the allocator and the address space")
        collector = Collector(pid, comm, probes, light=args.light, attached=launched is None)
        collector.allocator_path = allocator.path if allocator is not None else libc
        events_fd = collector.start()
        collector.watch = _open_watch(pid, args.verbose)
        progress.done()
        # Before the command runs: a file that cannot be written stops it unrun.
        context = None
        if interactive:
            from memtrace.output.view.context import Context
            from memtrace.output.view.fmt import fmt_duration

            context = Context(every_s=args.interval, output=launched.terminal if launched else None,
                              step=f"attached to pid {pid} ({comm}); first snapshot in "
                              f"{fmt_duration(args.interval)}")
        sinks, view = make_sinks(args, interactive, metadata, context)
    except BaseException as e:
        progress.done()
        if probes is not None:
            probes.detach()
        gone = isinstance(e, Exception) and _target_gone(pid, launched)
        if launched is not None:
            launched.kill()  # it never ran a single instruction
        if gone:
            raise MemtraceError(f"pid {pid} ({comm}) exited while memtrace was attaching: "
                                "nothing was traced") from None
        detail = _first_line(bcc_said)
        if isinstance(e, MemtraceError) and detail:
            if detail.endswith("Invalid argument") and "uprobe" in str(e):
                detail += ("; if dmesg says 'ref_ctr_offset mismatch', another bcc tool probes "
                           "the same function: let it finish")
            raise MemtraceError(f"{e} [bcc: {detail}]", e.exit_code) from None
        raise
    finally:
        if args.verbose:
            bcc_said.seek(0)
            sys.stderr.write(bcc_said.read().decode(errors="replace"))
        bcc_said.close()
    startup_hold = None  # the launched command's, at ld.so (collect/launchhold.py)
    if launched is not None:
        from memtrace.collect.launchhold import hold_at_libraries

        startup_hold = hold_at_libraries(probes, pid, collector.libraries_mapped)
        launched.release(startup_hold)
    if args.verbose:
        from memtrace.collect.probesite import format_sites

        print(f"memtrace: attached to pid {pid} in {libc_shown} (calls in flight kept in "
              f"{probes.calls_in})", file=sys.stderr)
        print(f"memtrace: {probes.object_note}; uprobes attached as {probes.attach_note}",
              file=sys.stderr)
        for line in format_sites(probes.sites):
            print(f"memtrace:   {line}", file=sys.stderr)
        print(f"memtrace: probes attached {time.monotonic() - started:.2f} s after start",
              file=sys.stderr)
        if startup_hold is not None and startup_hold.held_s is not None:
            print(f"memtrace: {comm} held {startup_hold.held_s * 1000:.1f} ms once ld.so had mapped "
                  "its libraries, while their unwind tables went in", file=sys.stderr)

    read_keys = interactive and sys.stdin.isatty() and keys_allowed and not args.batch
    collector.vm.keep_events = bool(args.record)
    keys = None
    if read_keys:
        from memtrace.output.view.keys import KeyReader

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
            on_resize=(lambda: _resized(view, launched)) if view is not None else None,
            events_fd=events_fd,
            on_events=collector.consume_events,
            watch_fds=collector.watch.filenos() if collector.watch else [],
            on_watch=collector.read_watch,
            output=launched.terminal if launched is not None else None,
            on_output=view.output_changed if view is not None else None,
            # The last frame says why it no longer moves: removing the
            # probes takes a second or two.
            on_quit=(lambda: view.set_context(banner=DETACHING)) if view is not None else None,
            early_signals=early.received if early is not None else (),
        )
        outcome = session.run()
        if hold and keys is not None and view is not None and outcome.reason == "target-exit":
            # Probes are gone already: a person looks at the last figures.
            view.hold(outcome.final, keys, f"{comm} has ended; q quits and prints the summary")
    finally:
        probes.detach()
        if launched is not None:
            launched.stop_following()  # an exec it still waited for is not held
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


def _resized(view, launched) -> None:
    view.refresh()
    if launched is not None and launched.terminal is not None:
        launched.terminal.resize(*shutil.get_terminal_size())


def _open_watch(pid: int, verbose: bool):
    """The proc connector (exec, exit) and taskstats (peak RSS at exit).
    Optional: without them the trace goes on, and --verbose says why."""
    from memtrace.process.netlink import ProcessWatch

    watch = ProcessWatch(pid)
    if not watch.available:
        if verbose:
            print(f"memtrace: no exec/exit news from netlink: {watch.reason}", file=sys.stderr)
        watch.close()
        return None
    return watch
