"""The C targets the benchmarks launch, built into bench/build/ when their
source is newer than the binary."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent

# Frame pointers, and no builtin malloc/free folded away by the compiler:
# every call reaches the probes with a stack memtrace can walk.
FLAGS = ("-O2", "-g", "-fno-builtin", "-fno-omit-frame-pointer", "-Wall")


def build_target(name: str, extra_flags: Sequence[str] = ()) -> Path:
    """bench/build/NAME, compiled from bench/NAME.c."""
    out = HERE / "build" / name
    out.parent.mkdir(exist_ok=True)
    src = HERE / f"{name}.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", *FLAGS, *extra_flags, "-o", str(out), str(src)], check=True)
    return out
