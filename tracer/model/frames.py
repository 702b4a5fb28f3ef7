"""The one grammar of a frame, as the collector writes it and every output
reads it back."""

from __future__ import annotations

import re
from typing import Optional

# The collector writes 'func+0x1a [libc.so.6]'; for a function of a
# stripped file known only by where it starts (.eh_frame),
# 'function at 0x3a40+0x1a [libz.so.1]', whose function part is
# 'function at 0x3a40', one per function; unsymbolized, '0x7f12 [libfoo.so]'.
# Either part may be missing. A Python frame (CPython 3.11) is
# 'leak (/srv/app.py:42) [py]', whose function part is 'leak (/srv/app.py)':
# the line, like an offset, is where in the function.
_FRAME = re.compile(r"^(?P<sym>.*?)(?:\s+\[(?P<module>[^\]]*)\])?\s*$")
_OFFSET = re.compile(r"\+0x[0-9a-fA-F]+$")
_ADDRESS = re.compile(r"^(?:0x)?[0-9a-fA-F]+$")
UNNAMED_FUNCTION = "function at "
PYTHON_MODULE = "py"
_PYTHON_LINE = re.compile(r":[0-9]+\)$")


def split_frame(frame: str) -> tuple[Optional[str], Optional[str]]:
    """('func', 'libc.so.6') from 'func+0x1a [libc.so.6]'; the function is
    None when the frame is a bare address."""
    m = _FRAME.match(frame)
    sym = (m.group("sym") if m else frame).strip()
    module = m.group("module") if m else None
    sym = _OFFSET.sub("", sym)
    if module == PYTHON_MODULE:
        sym = _PYTHON_LINE.sub(")", sym)
    if not sym or _ADDRESS.match(sym):
        return None, module or None
    return sym, module or None
