"""The command line, without BPF: parsing and refusals."""

from __future__ import annotations

import pytest

from memtrace.commands import _command_first, main

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
