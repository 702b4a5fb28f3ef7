"""`memtrace agent`: a host agent that follows processes as they come and
go and serves them all on one /metrics."""

from __future__ import annotations

import argparse

from memtrace.cli.common import (add_mode_options, duration_seconds, interval_seconds,
                                      positive_int)
from memtrace.errors import MemtraceError
from memtrace.output.serve import serve_address


def pid_list(text: str) -> list[int]:
    """-p 12,34 (and -p may be repeated)."""
    try:
        return [positive_int(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"a pid or a comma-separated list of pids: {e}") from None


class AgentCommand:
    """Follow processes as they start and exit; serve them all on one /metrics.

    For production, with --light (no malloc probes): one BPF program,
    compiled when the agent starts, serves every process, each attached
    within a second of its start and detached when it exits. Without
    --light each process gets a program compiled for it (~1.5 s of CPU).

    examples:
      sudo memtrace agent --light --cgroup system.slice/app.service --serve 9480
      sudo memtrace agent --light --comm java --serve 0.0.0.0:9480
      sudo memtrace agent --light -p 1234,5678 --serve 9480
    """

    name = "agent"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        what = parser.add_argument_group("what to follow (one of)")
        what.add_argument("-p", "--pid", type=pid_list, action="append", metavar="PID[,PID...]",
                          help="these processes, until they exit")
        what.add_argument("--cgroup", metavar="PATH|UNIT|ID",
                          help="the processes of this cgroup v2 and those below it: a path "
                          "under /sys/fs/cgroup (system.slice/app.service), a systemd unit "
                          "(app or app.service) or a container id (as docker ps shows it)")
        what.add_argument("--comm", metavar="NAME",
                          help="every process with this command name (as ps -o comm shows)")
        out = parser.add_argument_group("output")
        out.add_argument("--serve", type=serve_address, required=True, metavar="[HOST:]PORT",
                         help="serve /metrics and /debug/pprof/heap here; loopback unless "
                         "HOST is given")
        out.add_argument("--interval", type=interval_seconds, default=1.0, metavar="S",
                         help="seconds between snapshots (default 1)")
        out.add_argument("--duration", type=duration_seconds, metavar="S",
                         help="stop after S seconds")
        mode = parser.add_argument_group("how")
        add_mode_options(mode)
        mode.add_argument("--max-targets", type=positive_int, default=16, metavar="N",
                          help="processes traced at once, at most (default 16); others "
                          "wait, named on stderr, until one exits")
        mode.add_argument("--max-allocs", type=positive_int, default=65536, metavar="N",
                          help="without --light: live allocations tracked per process, 32 bytes "
                          "of kernel memory each (default 65536)")
        mode.add_argument("--event-buffer", type=positive_int, default=2, metavar="MIB",
                          help="ring buffer for address-space events, in MiB: one shared by "
                          "every process with --light, one per process without (default 2)")

    def run(self, args: argparse.Namespace) -> int:
        from memtrace.process import follow
        from memtrace.cli import preflight
        from memtrace.cli.fleet import Agent, AgentOptions, agent_limits
        from memtrace.output.serve import Board, Server

        if args.command_line:
            raise MemtraceError("the agent launches nothing: follow running processes with "
                                "-p, --cgroup or --comm")
        chosen = [bool(args.pid), bool(args.cgroup), bool(args.comm)]
        if sum(chosen) != 1:
            raise MemtraceError("say what to follow, once: -p PID[,PID...], --cgroup PATH "
                                "or --comm NAME")
        if args.pid:
            selector = follow.PidList(p for group in args.pid for p in group)
        elif args.cgroup:
            selector = follow.CgroupMembers(args.cgroup)
        else:
            selector = follow.CommandName(args.comm)
        preflight.check_all()
        if args.vm_probes == "kprobe":
            preflight.check_kprobes()
        options = AgentOptions(
            light=args.light,
            interval_s=args.interval,
            max_targets=args.max_targets,
            limits=agent_limits(args.light, args.max_allocs, args.event_buffer << 20,
                                args.max_targets),
            duration_s=args.duration,
            vm_probes=args.vm_probes,
        )
        board = Board()
        server = Server(args.serve, board)
        agent = Agent(selector, options, board)
        try:
            agent.load()  # said once it can attach
            agent.say(f"following {selector.describe()}{' (light)' if args.light else ''}; "
                      f"serving http://{args.serve}/metrics")
            agent.run()
        finally:
            server.close()
        return 0
