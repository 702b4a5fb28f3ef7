"""`memtrace report`: one moment of a recording as text, JSON, folded
stacks, pprof or an HTML page."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import dataclasses
from typing import IO, Iterator, Optional, Union

from memtrace.errors import MemtraceError
from memtrace.record.reader import open_recording, parse_when, when_arg
from memtrace.output.reports import FORMATS, reporter_class
from memtrace.output.reports.common import BY_CHOICES, ReportData, check_by
from memtrace.output.reports.diff import load_baseline
from memtrace.output.reports.select import StackPolicy, add_policy_options, policy_of




def load_report_data(path: str, when: str, by: str, since: Optional[str] = None,
                     policy: StackPolicy = StackPolicy()) -> ReportData:
    data = _load(path, when, by, policy)
    if since is None:
        return data
    diffed, baseline = load_baseline(since, path, data.snapshot)
    return dataclasses.replace(data, snapshot=diffed, since=baseline)


def _load(path: str, when: str, by: str, policy: StackPolicy) -> ReportData:
    with open_recording(path) as rec:
        index, snapshot = rec.snapshot_at(when)
        check_by(snapshot, by)
        # Of the peak and the end only the sections count: no stacks.
        peak_index = rec.index_at("peak")
        peak = snapshot if peak_index == index else rec.summary(peak_index)
        end = len(rec) - 1
        final = snapshot if end == index else rec.summary(end)
        if index >= len(rec):
            # Reading up to the peak found damage and cut the recording.
            index, snapshot = rec.snapshot_at(when)
        return ReportData(
            snapshot=snapshot,
            by=by,
            when=str(parse_when(when)),
            index=index,
            peak=peak,
            peak_index=peak_index,
            timeline=tuple(rec.points),
            metadata=rec.metadata,
            complete=rec.complete,
            source=path,
            final=final,
            policy=policy,
        )


@contextlib.contextmanager
def _output(path: str, binary: bool, fmt: str) -> Iterator[IO]:
    if path in ("", "-"):
        if binary:
            if sys.stdout.isatty():
                raise MemtraceError(f"the {fmt} format is binary: give -o FILE or redirect stdout to a file")
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        else:
            yield sys.stdout
            sys.stdout.flush()
        return
    # Rendered in memory first: a failed report leaves no half-written file.
    buf: Union[io.BytesIO, io.StringIO] = io.BytesIO() if binary else io.StringIO()
    yield buf
    value = buf.getvalue()
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise MemtraceError(f"cannot write {path}: {e.strerror}") from None


class ReportCommand:
    """Write a report on one moment of a recording (made with --record FILE).

    examples:
      memtrace report app.rec                      text summary at the end
      memtrace report app.rec --at peak            ... at the highest RSS
      memtrace report app.rec --at 90              ... 90 s into the recording
      memtrace report app.rec --at 90 --since 30   what changed from 30 s to 90 s
      memtrace report new.rec --since old.rec      what the new run holds that the old did not
      memtrace report app.rec --by allocated --format folded | flamegraph.pl > alloc.svg
      memtrace report app.rec --format pprof -o heap.pb.gz && go tool pprof -top heap.pb.gz
      memtrace report app.rec --format html -o report.html
      memtrace report app.rec --format json --top 100 --min-size 64K
    """

    name = "report"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", metavar="FILE", help="a recording made with --record")
        parser.add_argument("--at", type=when_arg, default=None, metavar="T|end|peak",
                            help="the moment: seconds since the start, 'end' or 'peak' (highest RSS);"
                            " by default the end, and the peak for html, whose chart shows the whole run")
        parser.add_argument("--since", metavar="T|FILE[@T]",
                            help="report changes since this moment (seconds, start, peak, end) or since"
                            " another recording of the program (its end, or FILE@T): heap, threads and"
                            " stacks then show what changed; the flame graph what grew")
        parser.add_argument("--by", choices=BY_CHOICES, default="live",
                            help="weight of a stack: live bytes (default), retained or allocated bytes")
        parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                            help="text, json (the snapshot), folded (flamegraph.pl),"
                            " pprof (gzipped profile.proto) or html (one offline page); by default"
                            " guessed from -o's extension (.json .folded .pb.gz .pprof .html),"
                            " else text")
        parser.add_argument("-o", "--output", default="-", metavar="FILE",
                            help="write here instead of stdout")
        add_policy_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        args.format = args.format or format_of(args.output)
        reporter_cls = reporter_class(args.format)
        if args.at is None:
            # A page that plots the run is read for its worst moment; after
            # the exit there is often nothing left to see.
            args.at = "peak" if args.format == "html" else "end"
        data = load_report_data(os.fspath(args.file), args.at, args.by, args.since,
                                 policy_of(args))
        reporter = reporter_cls(data)
        try:
            with _output(args.output, reporter_cls.binary, args.format) as out:
                reporter.render(out)
        except BrokenPipeError:
            quiet_stdout()  # `| head` has read enough: not an error
        return 0


# An output file's ending -> the format it asks for.
_EXTENSIONS = ((".json", "json"), (".folded", "folded"), (".pb.gz", "pprof"), (".pprof", "pprof"),
               (".pb", "pprof"), (".html", "html"), (".htm", "html"), (".txt", "text"))


def format_of(output: str) -> str:
    """The format -o's extension asks for; text for stdout or anything else."""
    name = output.lower()
    return next((fmt for ext, fmt in _EXTENSIONS if name.endswith(ext)), "text")


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a
    closed pipe does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
