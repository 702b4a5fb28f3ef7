"""Small readers of /proc for one process. Each returns plain values and
treats a vanished process as "nothing to report", never as an error."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
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


def thread_names(pid: int) -> dict[int, str]:
    names = {}
    for tid in thread_ids(pid):
        name = comm(pid, tid)
        if name is not None:
            names[tid] = name
    return names


_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+):([0-9a-f]+)\s+(\d+)\s*(.*)$"
)
# smaps fields we keep, by their /proc name.
_SMAPS_FIELDS = {"Rss": "rss_bytes", "Pss": "pss_bytes", "Anonymous": "anonymous_bytes",
                 "Swap": "swap_bytes"}


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
    if m is None:
        return None
    start, end, perms, offset, major, minor, inode, path = m.groups()
    return Mapping(int(start, 16), int(end, 16), perms, int(offset, 16), int(inode), path.strip(),
                   device=os.makedev(int(major, 16), int(minor, 16)))


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/PID/maps text; lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        mapping = _parse_header(line)
        if mapping is not None:
            out.append(mapping)
    return out


def parse_smaps(text: str) -> list[Mapping]:
    """Parse /proc/PID/smaps text into mappings carrying Rss, Pss, Anonymous
    and Swap in bytes. A mapping missing a field keeps None for it."""
    out: list[Mapping] = []
    current: Optional[Mapping] = None
    sizes: dict[str, int] = {}

    def flush() -> None:
        if current is not None:
            out.append(replace(current, **sizes))

    for line in text.splitlines():
        header = _parse_header(line)
        if header is not None:
            flush()
            current, sizes = header, {}
            continue
        key, _, rest = line.partition(":")
        attr = _SMAPS_FIELDS.get(key)
        if attr is None or current is None:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            sizes[attr] = int(parts[0]) * 1024
    flush()
    return out


def read_maps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def read_smaps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/smaps") as f:
        return parse_smaps(f.read())


def maps(pid: int) -> list[Mapping]:
    """[] once the process is gone."""
    return parse_maps(_read(f"/proc/{pid}/maps") or "")
