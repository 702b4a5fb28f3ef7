"""parse_smaps reads a kernel's smaps at the lines of the fields it keeps
when every mapping prints the same fields (the kernel's own text, here
/proc/self/smaps), line by line otherwise, and both read the same; the
mappings of the last read are taken again where their lines are the same."""

from __future__ import annotations

import dataclasses

from memtrace.process import procfs
from memtrace.process.procfs import parse_smaps


def _own_smaps() -> str:
    with open("/proc/self/smaps") as f:
        return f.read()


def test_the_kernels_text_reads_the_same_by_field_lines_and_line_by_line() -> None:
    text = _own_smaps()
    assert procfs._uniform_block(text.split("\n")[:-1]) is not None, "not uniform: the fast path is never taken"
    fast = parse_smaps(text)
    assert fast == procfs._parse_lines(text)
    assert len(fast) == text.count("\nVmFlags:") and all(m.rss_bytes is not None for m in fast)


def test_unchanged_mappings_are_taken_from_the_last_read() -> None:
    text = _own_smaps()
    seen: dict = {}
    first = parse_smaps(text, None, seen)
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("Rss:"))
    lines[at] = "Rss:                 999 kB"  # the first mapping moved
    again = parse_smaps("\n".join(lines), seen, {})
    assert again[0].rss_bytes == 999 * 1024 and again[0] is not first[0]
    assert all(a is b for a, b in zip(again[1:], first[1:]))
    assert [dataclasses.replace(m, rss_bytes=None) for m in again] == \
        [dataclasses.replace(m, rss_bytes=None) for m in first]


def test_odd_text_is_read_line_by_line() -> None:
    text = _own_smaps()
    blocks = text.split("\nVmFlags:")
    # one mapping without Swap, one with a field that is not "N kB"
    odd = text.replace("\nSwap:", "\nSwapped:", 1).replace("\nRss:", "\nRss:    many kB\nRss_:", 1)
    got = parse_smaps(odd)
    assert got == procfs._parse_lines(odd)
    assert len(got) == len(blocks) - 1
    assert got[0].swap_bytes is None
