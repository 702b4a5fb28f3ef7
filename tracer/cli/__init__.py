"""The command line: `memtrace [trace options] (-p PID | -- CMD ...)` and
subcommands. Each subcommand is a class with a docstring (its help),
`prepare_parser(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Optional, Protocol

from memtrace import __version__
from memtrace.errors import MemtraceError


class Command(Protocol):
    name: str

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _commands() -> list[Command]:
    from memtrace.cli.agent import AgentCommand
    from memtrace.cli.demo import DemoCommand
    from memtrace.cli.trace import TraceCommand

    commands: list[Command] = [TraceCommand(), DemoCommand(), AgentCommand()]
    try:
        from memtrace.cli.replay import ReplayCommand
        from memtrace.cli.report import ReportCommand

        commands += [ReplayCommand(), ReportCommand()]
    except ImportError:
        pass
    return commands


EPILOG = """examples:
  sudo memtrace -p 1234                  attach to a running process, live view
  sudo memtrace -- java -jar app.jar     trace a service from its first instruction
  sudo memtrace --json --duration 30 -p 1234 > snapshot.json
  sudo memtrace demo                     a built-in multi-threaded demo
  sudo memtrace agent --light --cgroup system.slice/app.service --serve 9480
"""


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line, saying where the help is."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"memtrace: {message}; try '{self.prog} --help'\n")


def get_argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memtrace",
        description="Live memory tracer for glibc processes: heap per thread and call stack, "
        "what the process took from the OS, and the gap between the two.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"memtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _commands():
        doc = inspect.cleandoc(type(command).__doc__ or "")
        sp = sub.add_parser(
            command.name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.prepare_parser(sp)
        sp.set_defaults(entrypoint=command.run)
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` is the command to launch, untouched."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _command_first(options: list[str], names: set[str]) -> list[str]:
    """`memtrace --record F demo NAME` means `memtrace demo --record F NAME`:
    trace options may come before the subcommand."""
    takes_value = set()
    for action in _trace_actions():
        if action.nargs != 0:
            takes_value.update(action.option_strings)
    i = 0
    while i < len(options) and options[i].startswith("-"):
        i += 2 if options[i] in takes_value else 1
    if 0 < i < len(options) and options[i] in names:
        return [options[i], *options[:i], *options[i + 1 :]]
    return options


def _trace_actions() -> list[argparse.Action]:
    from memtrace.cli.trace import TraceCommand

    trace = argparse.ArgumentParser(add_help=False)
    TraceCommand().prepare_parser(trace)
    return list(trace._actions)  # argparse lists its actions nowhere public


def run() -> None:
    """The memtrace command: main(), then an exit that skips the
    interpreter's teardown of every module and object (~0.1 s of CPU, a
    quarter second on a busy machine, after the work is done). Exit
    handlers still run and the standard streams are flushed; every file and
    probe of ours is closed by then (finally blocks)."""
    import atexit

    try:
        code = main()
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say there
            code = code or 1
    os._exit(code or 0)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, command_line = _split_command(argv)
    parser = get_argument_parser()
    names = {c.name for c in _commands()}
    options = _command_first(options, names)
    # `memtrace -p PID` and `memtrace -- CMD` mean `memtrace trace ...`
    if not options or (options[0] not in names and options[0] not in ("-h", "--help", "--version")):
        if options and not options[0].startswith("-"):
            import difflib

            close = difflib.get_close_matches(options[0], sorted(names), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            print(f"memtrace: unknown command {options[0]!r}: {hint}"
                  "(try 'memtrace --help'; a command to trace goes after --)", file=sys.stderr)
            return 2
        options = ["trace"] + options
    args = parser.parse_args(options)
    args.command_line = command_line
    try:
        return args.entrypoint(args)
    except MemtraceError as e:
        print(f"memtrace: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `memtrace --json ... | head` has read enough: not an error.
        from memtrace.cli.report import quiet_stdout

        quiet_stdout()
        return 0
    except Exception as e:  # a bug of ours: probes are already removed (finally blocks)
        if os.environ.get("MEMTRACE_DEBUG"):
            raise
        print(f"memtrace: internal error ({type(e).__name__}: {e}); "
              "run again with MEMTRACE_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 70
