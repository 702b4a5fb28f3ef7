"""Small readers of /proc for one process. Each returns plain values and
treats a vanished process as "nothing to report", never as an error."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # "" for anonymous, "[heap]", "[stack]", or a file path

    @property
    def size(self) -> int:
        return self.end - self.start


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
    wanted = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "VmHWM": "peak_rss_bytes"}
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


def parse_maps(text: str) -> Iterator[Mapping]:
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        yield Mapping(
            int(start, 16),
            int(end, 16),
            parts[1],
            int(parts[2], 16),
            int(parts[4]),
            parts[5].strip() if len(parts) > 5 else "",
        )


def maps(pid: int) -> list[Mapping]:
    return list(parse_maps(_read(f"/proc/{pid}/maps") or ""))
