"""The command line, without BPF: parsing and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrace.cli import _command_first, main
from memtrace.errors import MemtraceError

NAMES = {"trace", "demo", "replay", "report"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--record", "F", "demo", "inflater"], ["demo", "--record", "F", "inflater"]),
        (["--json", "demo"], ["demo", "--json"]),
        (["--record", "demo", "-p", "3"], ["--record", "demo", "-p", "3"]),  # a file named demo
        (["-p", "3"], ["-p", "3"]),
        (["demo", "--json"], ["demo", "--json"]),
    ],
)
def test_trace_options_may_come_before_the_subcommand(argv, expected):
    assert _command_first(argv, NAMES) == expected


def test_nothing_to_trace_is_one_line_and_exit_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-p PID" in err[0] and "-- CMD" in err[0]


def test_pid_and_command_together_are_refused(capsys):
    assert main(["-p", "1", "--", "true"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bad_option_values_are_refused_by_argparse():
    with pytest.raises(SystemExit) as e:
        main(["--interval", "0", "-p", "1"])
    assert e.value.code == 2


def test_demo_list(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("threads", "arena-retention", "inflater", "leak", "startup"):
        assert name in out


@pytest.mark.parametrize("option, value", [
    ("--interval", "nan"), ("--interval", "inf"), ("--interval", "1e-9"), ("--interval", "0"),
    ("--interval", "-1"), ("--interval", "7200"), ("--interval", "x"),
    ("--duration", "nan"), ("--duration", "inf"), ("--duration", "-inf"), ("--duration", "0"),
    ("--duration", "1e300"),
])
def test_timing_options_must_be_finite_and_sane(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([option, value, "-p", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, limit", [
    ("--max-allocs", "2147483648", "1073741824"),
    ("--stack-storage-size", "100000000000", "268435456"),
    ("--stack-storage-size", "1e11", "whole number"),
    ("--event-buffer", "4096", "2048"),
    ("--max-stats", "2000000", "1048576"),
])
def test_map_sizes_beyond_the_kernel_name_the_flag_and_its_limit(option, value, limit, capsys):
    with pytest.raises(SystemExit) as e:
        main([option, value, "-p", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}:" in err and limit in err, err


def test_map_sizes_beyond_memory_name_the_flag(monkeypatch):
    from memtrace.cli import common

    args = get_trace_args(["--max-allocs", str(1 << 30), "-p", "1"])
    monkeypatch.setattr(common, "_available_memory", lambda: 8 << 30)
    with pytest.raises(MemtraceError, match=r"^--max-allocs asks for .* of kernel memory"):
        common.check_kernel_memory(args)
    args = get_trace_args(["--event-buffer", "2048", "-p", "1"])
    monkeypatch.setattr(common, "_available_memory", lambda: 3 << 30)
    with pytest.raises(MemtraceError, match=r"^--event-buffer asks for"):
        common.check_kernel_memory(args)
    common.check_kernel_memory(get_trace_args(["-p", "1"]))  # the defaults fit


def get_trace_args(argv):
    from memtrace.cli import get_argument_parser

    return get_argument_parser().parse_args(["trace", *argv])


def test_record_path_is_checked_before_anything_starts(tmp_path):
    from memtrace.cli.common import check_output_paths

    def refused(path):
        with pytest.raises(MemtraceError) as e:
            check_output_paths(get_trace_args(["--record", str(path), "-p", "1"]))
        return str(e.value)

    assert "is a directory" in refused(tmp_path)
    existing = tmp_path / "old.rec"
    existing.write_text("keep me")
    assert "already exists" in refused(existing)
    assert existing.read_text() == "keep me"
    assert "does not exist" in refused(tmp_path / "no-such-folder" / "x.rec")
    dangling = tmp_path / "link.rec"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "already exists" in refused(dangling)
    assert "cannot create" in refused(Path("/proc/memtrace-test.rec"))
    fresh = tmp_path / "new.rec"
    check_output_paths(get_trace_args(["--record", str(fresh), "-p", "1"]))
    assert not fresh.exists(), "the check must leave nothing behind"


@pytest.mark.parametrize("dropped, attach, named", [
    ({"CAP_BPF"}, True, "CAP_BPF"),
    ({"CAP_PERFMON"}, True, "CAP_PERFMON"),
    ({"CAP_SYS_PTRACE"}, True, "CAP_SYS_PTRACE"),
    ({"CAP_BPF", "CAP_PERFMON"}, False, "CAP_BPF and CAP_PERFMON"),
])
def test_the_missing_capability_is_named(dropped, attach, named):
    from memtrace.cli import preflight

    caps = {"CAP_BPF": preflight.CAP_BPF, "CAP_PERFMON": preflight.CAP_PERFMON,
            "CAP_SYS_PTRACE": preflight.CAP_SYS_PTRACE}
    mask = sum(1 << bit for name, bit in caps.items() if name not in dropped)
    assert " and ".join(preflight.missing_capabilities(mask, attach)) == named


def test_capabilities_enough_for_a_trace():
    from memtrace.cli import preflight

    minimal = (1 << preflight.CAP_BPF) | (1 << preflight.CAP_PERFMON)
    assert preflight.missing_capabilities(minimal, attach=False) == []
    assert preflight.missing_capabilities(minimal | (1 << preflight.CAP_SYS_PTRACE), True) == []
    assert preflight.missing_capabilities(1 << preflight.CAP_SYS_ADMIN, False) == []
    # before CAP_BPF existed (Linux < 5.8), only CAP_SYS_ADMIN will do
    assert preflight.missing_capabilities(minimal, False, last_cap=37) == ["CAP_SYS_ADMIN"]


def test_a_map_the_kernel_refuses_names_its_option():
    from memtrace.collect.probes import refused_map

    said = ("In file included from <built-in>:2:\nwarning: something\n"
            "could not open bpf map: allocs, error: Cannot allocate memory\n")
    assert refused_map(said) == ("the kernel refused the BPF map allocs (Cannot allocate memory): "
                                 "give a smaller --max-allocs")
    assert "--event-buffer" in refused_map("could not open bpf map: vm_events, error: E2BIG\n")
    assert refused_map("error: use of undeclared identifier\n") is None


def test_cli_errors_are_one_line_and_say_where_help_is(capsys):
    from memtrace.cli import main

    cases = {
        ("reprot", "x.memtrace"): "did you mean report?",
        ("-p", "1", "--", "ls"): "both -p 1 and a command (ls) were given",
        ("--interval", "nan", "-p", "1"): "try 'memtrace trace --help'",
        ("report",): "try 'memtrace report --help'",
    }
    for argv, says in cases.items():
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse's own exit
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert says in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)


def test_report_format_follows_the_output_extension():
    from memtrace.cli.report import format_of

    assert [format_of(p) for p in ("a.json", "a.HTML", "heap.pb.gz", "x.folded", "-", "r.txt",
                                   "noext")] == ["json", "html", "pprof", "folded", "text", "text",
                                                 "text"]
