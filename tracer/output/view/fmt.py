"""Turning numbers and frames into short strings for people.

Sizes travel as bytes everywhere else; only the views call these. Nothing
here knows about rich, so the plain-text views and reports can share it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from memtrace.model.frames import PYTHON_MODULE, UNNAMED_FUNCTION, split_frame

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB; keeps a minus sign."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(round(value))} B"
    unit = 0
    # Round first so 1048575 B prints as '1.0 MiB', not '1024.0 KiB'.
    while unit < len(_UNITS) - 1 and round(value, 1) >= 1024:
        value /= 1024
        unit += 1
    return f"{sign}{value:.1f} {_UNITS[unit]}"


def fmt_signed_bytes(n: float) -> str:
    """Growth: '+1.5 MiB', '-512 B', and '0 B' for no change."""
    if n > 0:
        return "+" + fmt_bytes(n)
    return fmt_bytes(n)


def fmt_count(n: float) -> str:
    """Call counts with thousands separators: 1234567 -> '1,234,567'."""
    return f"{int(round(n)):,}"


def fmt_counted(n: float, word: str, plural: str = "") -> str:
    """'1 block', '1,234 blocks': the noun agrees with the number."""
    return f"{fmt_count(n)} {word if int(round(n)) == 1 else plural or word + 's'}"


def fmt_si(n: float) -> str:
    """Compact counts for tight columns and rates: 1234 -> '1.2k'."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for suffix in ("", "k", "M", "G"):
        if round(value, 1) < 1000 or suffix == "G":
            if suffix == "":
                text = f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
            else:
                text = f"{value:.1f}"
            return f"{sign}{text}{suffix}"
        value /= 1000
    raise AssertionError("unreachable")


NO_RATE = "—"  # before a second snapshot there is no interval to divide by


def fmt_rate(bytes_per_s: float) -> str:
    """'1.5 MiB/s'."""
    return fmt_bytes(bytes_per_s) + "/s"


def fmt_count_rate(per_s: float) -> str:
    """Calls per second: '1.2k/s'."""
    return fmt_si(per_s) + "/s"


def fmt_duration(seconds: float) -> str:
    """'850ms', '42.3s', '3m07s', '1h02m', '2d03h': two units at most."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def fit_list(items: Sequence[str], width: int, empty: str = "-", mark: str = "…") -> str:
    """'a, b, c' cut to `width`, ending in '+N' for the items left out."""
    if not items:
        return empty
    out = ""
    for i, item in enumerate(items):
        candidate = f"{out}, {item}" if out else item
        rest = len(items) - i - 1
        tail = f", +{rest}" if rest else ""
        if len(candidate) + len(tail) <= width:
            out = candidate
            continue
        if out:  # it fit with room for this tail when it was added
            return f"{out}, +{len(items) - i}"
        room = width - len(tail)
        return ellipsize(items[0], room, mark) + tail if room >= 8 else ellipsize(items[0], width, mark)
    return out


# ---------------------------------------------------------------- frames

_SONAME_TAIL = re.compile(r"\.so(?:\.[0-9.]+)?$")


def short_module(module: str) -> str:
    """'/usr/lib/x86_64-linux-gnu/libz.so.1.2.13' -> 'libz'."""
    base = module.rsplit("/", 1)[-1]
    return _SONAME_TAIL.sub("", base) or base


def _drop_arguments(func: str) -> str:
    # C++ and Java names carry argument lists that rarely help at a glance:
    # 'ns::Foo::bar(int, char const*) const' -> 'ns::Foo::bar'.
    depth = 0
    for i, ch in enumerate(func):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0 and i > 0:
            return func[:i].rstrip()  # a Python frame: 'leak (app.py:4)' -> 'leak'
    return func


def short_frame(frame: str, max_len: int = 40, mark: str = "…") -> str:
    """A frame as a chain element: the function name alone, or '[libfoo]'
    for an unsymbolized address (its module is all we know)."""
    func, module = split_frame(frame)
    if func is None:
        text = f"[{short_module(module)}]" if module else frame.strip()
    elif func.startswith(UNNAMED_FUNCTION) and module:
        text = f"{func} [{short_module(module)}]"  # the start alone says little
    else:
        text = _drop_arguments(func)
    return ellipsize(text, max_len, mark)


def ellipsize(text: str, max_len: int, mark: str = "…") -> str:
    """Cut the middle of a long name, keeping both ends: they differ most."""
    if max_len <= 0:
        return ""
    if len(text) <= max_len:
        return text
    if max_len <= len(mark) + 2:
        return text[:max_len]
    head = (max_len - len(mark)) // 2
    tail = max_len - len(mark) - head
    return text[:head] + mark + text[len(text) - tail :]


def frame_chain(
    frames: Sequence[str],
    width: int,
    max_frames: int = 6,
    sep: str = " ← ",
    more: str = "…",
) -> str:
    """Innermost caller first, as many frames as fit in `width`; a frame
    that only partly fits is cut in the middle if enough of it shows, and
    `more` marks that outer frames were left out."""
    if width <= 0:
        return ""
    if not frames:
        return ellipsize("(no frames)", width, more)
    shown: list[Optional[str]] = list(frames[:max_frames])
    python_at = _first_python_frame(frames)
    if python_at is not None and python_at > 1:
        # The interpreter's C frames between the allocation and the Python
        # function that made it say little: skip to the function.
        shown = [frames[0], None, *frames[python_at:python_at + max_frames - 2]]
        complete = python_at + len(shown) - 2 == len(frames)
    else:
        complete = len(frames) == len(shown)
    names = [more if f is None else short_frame(f, mark=more) for f in shown]
    # Where the Python function is in the chain (after the skip, if any).
    function_at = None if not python_at else 2 if python_at > 1 else 1
    if function_at is not None:
        # Too narrow for both whole: the allocating frame gives way, down to
        # a readable cut, so that the Python function still shows.
        after = len(sep) * function_at + len(more) * (function_at - 1) + len(names[function_at]) \
            + len(sep) + len(more)
        if len(names[0]) + after > width:
            names[0] = ellipsize(names[0], max(_MIN_CUT_NAME, width - after), more)
    out = ellipsize(names[0], width, more)
    for i, name in enumerate(names[1:], start=1):
        # The Python function needs no room kept after it: shown, it says
        # more than the "…" that would follow.
        last = (i == len(names) - 1 and complete) or i == function_at
        # Unless this is the last frame, keep room to say more follow.
        room = width - len(out) - len(sep) - (0 if last else len(sep) + len(more))
        if len(name) <= room:
            out += sep + name
            continue
        if room >= _MIN_CUT_NAME:
            out += sep + ellipsize(name, room, more)
        break
    else:
        return out
    if len(out) + len(sep) + len(more) <= width and not out.endswith(sep + more):
        return out + sep + more
    return out


def _first_python_frame(frames: Sequence[str]) -> Optional[int]:
    for i, frame in enumerate(frames):
        if frame.endswith(f"[{PYTHON_MODULE}]"):
            return i
    return None


# A frame cut shorter than this is noise: end the chain instead.
_MIN_CUT_NAME = 12
