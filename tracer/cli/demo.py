"""Run a built-in demo or reproduction under memtrace, traced from its start."""

from __future__ import annotations

import argparse
import sys

from memtrace.cli.common import add_trace_options, run_trace


class DemoCommand:
    """Run a built-in demo or reproduction, traced from its first instruction.

    Without NAME, runs the default demo: named threads allocating from distinct
    call paths. Arguments after `--` go to the demo program (e.g. -- --pause).
    `memtrace demo --list` lists them."""

    name = "demo"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", nargs="?", help="which demo (default: threads)")
        parser.add_argument("--list", action="store_true", help="list the demos and exit")
        add_trace_options(parser)
        parser.set_defaults(pid=None)

    def run(self, args: argparse.Namespace) -> int:
        from memtrace.demos import catalog

        if args.list:
            for demo in catalog.DEMOS.values():
                print(f"{demo.name:18} {demo.summary}")
            return 0
        demo = catalog.get(args.name or catalog.DEFAULT_DEMO)
        # Before the demo is built into the cache: a user without the
        # rights to trace learns it first, and leaves nothing behind.
        from memtrace.cli import preflight

        preflight.check_privileges(attach=False)
        program_args = list(args.command_line)
        argv = demo.argv(catalog.default_cache_dir(), program_args)
        # A paused demo waits for Enter: leave the keyboard to it.
        keys = "--pause" not in program_args and sys.stdin.isatty()
        return run_trace(args, argv, demo=keys, keyboard_to_command="--pause" in program_args, hold=True)
