"""Small readers of /proc for one process. Each returns plain values and
treats a vanished process as "nothing to report", never as an error."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

PF_KTHREAD = 0x00200000


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/stat")


def comm(pid: int, tid: Optional[int] = None) -> Optional[str]:
    path = f"/proc/{pid}/task/{tid}/comm" if tid else f"/proc/{pid}/comm"
    text = _read(path)
    return text.rstrip("\n") if text is not None else None


def is_kernel_thread(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return False
    # comm may hold spaces and parentheses: fields start after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return bool(int(fields[6]) & PF_KTHREAD)


def tgid(pid: int) -> Optional[int]:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


def memory(pid: int) -> Optional[dict[str, int]]:
    """RSS figures from /proc/PID/status, in bytes."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    wanted = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes",
              "RssShmem": "rss_shmem_bytes", "VmHWM": "peak_rss_bytes"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            out[wanted[key]] = int(rest.split()[0]) * 1024
    return out or None


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def thread_names(pid: int, tids: Optional[list[int]] = None) -> dict[int, str]:
    """tid -> name of these threads (default: all) that are still there."""
    names = {}
    for tid in thread_ids(pid) if tids is None else tids:
        name = comm(pid, tid)
        if name is not None:
            names[tid] = name
    return names


_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+):([0-9a-f]+)\s+(\d+)\s*(.*)$"
)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps, plus its smaps sizes when read from smaps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # "" for anonymous memory; "[heap]", "[stack]", or a file
    rss_bytes: Optional[int] = None
    pss_bytes: Optional[int] = None
    anonymous_bytes: Optional[int] = None
    swap_bytes: Optional[int] = None
    device: Optional[int] = None  # st_dev of the mapped file, as os.makedev builds it

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def is_plain_anonymous(self) -> bool:
        """Unnamed anonymous memory (where glibc puts thread arena heaps)."""
        return self.inode == 0 and (self.path == "" or self.path.startswith("[anon:"))

    @property
    def writable(self) -> bool:
        return self.perms[:2] == "rw"


def _parse_header(line: str) -> Optional[Mapping]:
    m = _HEADER.match(line)
    return _mapping(m.groups(), None, None, None, None) if m is not None else None


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/PID/maps text; lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        mapping = _parse_header(line)
        if mapping is not None:
            out.append(mapping)
    return out


def parse_smaps(text: str, known: Optional[dict] = None,
                seen: Optional[dict] = None) -> list[Mapping]:
    """Parse /proc/PID/smaps text into mappings carrying Rss, Pss, Anonymous
    and Swap in bytes. A mapping missing a field keeps None for it.

    A kernel prints the same fields, in the same order, for every mapping:
    each block is then read at the lines of those four fields alone, where
    splitting every line of 4,000 mappings (a service with 2,000 threads)
    took 55 ms. known: the mappings of the last parse of this process, by
    their header and field lines (most are unchanged from one snapshot to
    the next, and are taken as they were); seen: filled likewise for the
    next parse."""
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    block = _uniform_block(lines)
    if block is not None:
        try:
            return _parse_blocks(lines, *block, known or {}, seen if seen is not None else {})
        except ValueError:
            pass  # a field that is not "N kB": line by line
    return _parse_lines(text)


_SMAPS_LINE = re.compile(
    r"^(?:([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+):([0-9a-f]+)\s+(\d+)[ \t]*(.*)"
    r"|(Rss|Pss|Anonymous|Swap):[ \t]+(\d+) kB)$", re.M)
_HEX_DIGITS = frozenset("0123456789abcdef")
_SMAPS_KEPT = ("Rss", "Pss", "Anonymous", "Swap")  # in Mapping's order


def _uniform_block(lines: list[str]) -> Optional[tuple[int, int, int, int, int]]:
    """(lines per mapping, then the index in a block of Rss, Pss, Anonymous
    and Swap) when every block can be that long; None otherwise."""
    n = 1
    while n < len(lines) and lines[n][:1] not in _HEX_DIGITS:
        n += 1
    if not lines or len(lines) % n:
        return None
    found = {line.split(":", 1)[0]: i for i, line in enumerate(lines[:n])}
    where = [found.get(name) for name in _SMAPS_KEPT]
    if None in where:
        return None
    return (n, *where)


def _parse_blocks(lines: list[str], n: int, rss_at: int, pss_at: int, anon_at: int,
                  swap_at: int, known: dict, seen: dict) -> list[Mapping]:
    """parse_smaps where every block is n lines with the fields at the same
    places; ValueError at the first block that is not."""
    out: list[Mapping] = []
    append = out.append
    for b in range(0, len(lines), n):
        rss, pss, anon, swap = lines[b + rss_at], lines[b + pss_at], lines[b + anon_at], lines[b + swap_at]
        key = (lines[b], rss, pss, anon, swap)
        mapping = known.get(key)
        if mapping is None:
            header = _HEADER.match(lines[b])
            if header is None or not (rss.startswith("Rss:") and pss.startswith("Pss:")
                                      and anon.startswith("Anonymous:") and swap.startswith("Swap:")
                                      and rss.endswith(" kB") and pss.endswith(" kB")
                                      and anon.endswith(" kB") and swap.endswith(" kB")):
                raise ValueError("not one mapping")
            mapping = _mapping(header.groups(), int(rss[4:-3]) * 1024, int(pss[4:-3]) * 1024,
                               int(anon[10:-3]) * 1024, int(swap[5:-3]) * 1024)
        seen[key] = mapping
        append(mapping)
    return out


def _parse_lines(text: str) -> list[Mapping]:
    """parse_smaps for any text: each header, then the fields kept that
    follow it."""
    out: list[Mapping] = []
    header: Optional[tuple] = None
    sizes: dict[str, int] = {}
    for m in _SMAPS_LINE.finditer(text):
        if m.start(1) >= 0:
            if header is not None:
                out.append(_mapping(header, *map(sizes.get, _SMAPS_KEPT)))
            header, sizes = m.groups()[:8], {}
        else:
            sizes[m.group(9)] = int(m.group(10)) * 1024
    if header is not None:
        out.append(_mapping(header, *map(sizes.get, _SMAPS_KEPT)))
    return out



def _mapping(groups: tuple, rss: Optional[int], pss: Optional[int], anon: Optional[int],
             swap: Optional[int]) -> Mapping:
    """A Mapping of _HEADER's groups and its smaps sizes."""
    start, end, perms, offset, major, minor, inode, path = groups
    return Mapping(int(start, 16), int(end, 16), perms, int(offset, 16), int(inode), path.strip(),
                   rss, pss, anon, swap, os.makedev(int(major, 16), int(minor, 16)))


def read_maps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


# pid -> its mappings at the last read, for parse_smaps: a few processes'
# (the agent's), each a few MB for thousands of mappings.
_smaps_seen: "OrderedDict[int, dict]" = OrderedDict()
SMAPS_PROCESSES_KEPT = 16


def read_smaps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/smaps") as f:
        text = f.read()
    seen: dict = {}
    mappings = parse_smaps(text, _smaps_seen.pop(pid, None), seen)
    _smaps_seen[pid] = seen
    while len(_smaps_seen) > SMAPS_PROCESSES_KEPT:
        _smaps_seen.popitem(last=False)
    return mappings


def maps(pid: int) -> list[Mapping]:
    """[] once the process is gone."""
    return parse_maps(_read(f"/proc/{pid}/maps") or "")
