"""Build the demo programs from their sources, once per source version.

Each build lands in `cache_dir/<name>-<digest>`, where the digest covers the
sources and the build recipe, so a changed source or flag rebuilds and an
unchanged one is reused. A build is made in a scratch folder and renamed into
place, so two memtrace runs starting the same demo never see half a build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from memtrace.errors import MemtraceError

SOURCE_DIR = Path(__file__).resolve().parent

# -O1 keeps the code realistic; frame pointers and -g let the tracer walk and
# name every frame; -pthread because most demos are about threads.
C_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-pthread")

# Included by every C demo (#include "demo_support.c"), so part of its key.
C_SUPPORT = "demo_support.c"

_INSTALL_HINT = "run 'sudo ./install.sh' from the memtrace checkout, or"


def default_cache_dir() -> Path:
    """Where built demos live between runs (per user, survives reboots)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memtrace" / "demos"


def require_tool(tool: str, package: str, purpose: str) -> str:
    """The absolute path of `tool`, or a MemtraceError naming the package."""
    path = shutil.which(tool)
    if path is None:
        raise MemtraceError(
            f"{purpose} needs '{tool}', which is not on PATH: "
            f"{_INSTALL_HINT} 'sudo apt-get install {package}'"
        )
    return path


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        # Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def cached_build(
    cache_dir: Path,
    name: str,
    key: str,
    build: Callable[[Path], None],
) -> Path:
    """The folder holding the build of `name` for `key`, building it first if
    it is not cached. `build(folder)` fills an empty folder or raises."""
    final = cache_dir / f"{name}-{key}"
    if final.is_dir():
        return final
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    except OSError as error:
        raise MemtraceError(
            f"cannot create the demo build folder in {cache_dir}: "
            f"{error.strerror}; pass a writable cache folder"
        ) from None
    try:
        build(scratch)
        scratch.chmod(0o755)  # mkdtemp made it private; the build is not
        try:
            scratch.rename(final)
        except OSError:
            # Another run finished the same build first: theirs is as good.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def run_compiler(argv: list[str], what: str, log: Path) -> None:
    """Run one build step; on failure keep its output in `log` and raise with
    the first error line, which is usually the one that matters."""
    result = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if result.returncode == 0:
        return
    # The scratch folder is removed on failure, so the log goes beside it.
    log.write_text(result.stdout)
    lines = [line for line in result.stdout.splitlines() if "error" in line]
    first = (lines or result.stdout.splitlines() or ["no output"])[0].strip()
    raise MemtraceError(
        f"building {what} failed ({first}); full output in {log}"
    )
