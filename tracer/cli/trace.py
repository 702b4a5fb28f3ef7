"""Trace a process: attach with -p PID, or launch -- CMD ARGS from its first instruction."""

from __future__ import annotations

import argparse

from memtrace.cli.common import add_trace_options, positive_int, run_trace


class TraceCommand:
    """Trace a running process (-p PID) or a command (-- CMD ARGS) with the live view.

    Under the live view a launched command writes to a pseudo-terminal of its own:
    its latest lines show in the view, all of them in a log file, and its
    stdin is /dev/null. Without the view (batch, JSON) it keeps its stdin,
    stdout and stderr, except that JSON on stdout keeps stdout to itself: the
    command's stdout then goes to stderr (-o FILE puts the JSON in a file
    instead). When it exits, memtrace prints a final summary and exits with
    the command's status."""

    name = "trace"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-p", "--pid", type=positive_int, help="attach to this running process")
        add_trace_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        return run_trace(args, args.command_line)
