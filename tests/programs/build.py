"""Build the ground-truth C programs the integration tests trace.

Used by the `programs` fixture in tests/conftest.py; also runnable by hand:
    python tests/programs/build.py OUTDIR [NAME ...]
Programs are built on first use, so a missing optional compiler (musl-gcc)
fails only the test that needs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent

# -O1 keeps the code realistic; noinline on the allocating functions keeps
# them in the stack. Frame pointers on, except for the *_nofp variant that
# shows the immediate caller survives without them.
WITH_FP = ["-O1", "-g", "-fno-omit-frame-pointer", "-pthread"]
WITHOUT_FP = ["-O1", "-g", "-fomit-frame-pointer", "-pthread"]
# As distributions build: every frame found from .eh_frame alone.
OPTIMIZED_WITHOUT_FP = ["-O2", "-g", "-fomit-frame-pointer", "-pthread"]

# name -> (source, compiler, flags)
PROGRAMS: dict[str, tuple[str, str, list[str]]] = {
    "threads": ("threads.c", "gcc", WITH_FP),
    "threads_nofp": ("threads.c", "gcc", WITHOUT_FP),
    "variants": ("variants.c", "gcc", WITH_FP),
    "crossfree": ("crossfree.c", "gcc", WITH_FP),
    "pretrace": ("pretrace.c", "gcc", WITH_FP),
    "idle": ("idle.c", "gcc", WITH_FP),
    "busy": ("busy.c", "gcc", WITH_FP),
    "heapstates": ("heapstates.c", "gcc", WITH_FP),
    "cppnew": ("cppnew.cc", "g++", WITH_FP),
    "churn": ("churn.c", "gcc", WITH_FP),
    "views": ("views.c", "gcc", WITH_FP),
    # thousands of distinct stacks that churn: the benchmark's own target
    "manystacks": ("../../bench/scale_target.c", "gcc", WITH_FP),
    "unwind_chains": ("unwind_chains.c", "gcc", OPTIMIZED_WITHOUT_FP),
    "exec_deep": ("exec_deep.c", "gcc", OPTIMIZED_WITHOUT_FP),
    "first_calls": ("first_calls.c", "gcc", WITH_FP),
    # no libc.so at all: memtrace must refuse it
    "idle_static": ("idle.c", "gcc", ["-O1", "-g", "-static"]),
    # dynamically linked, but against musl (Debian package musl-tools)
    "idle_musl": ("idle.c", "musl-gcc", ["-O1", "-g"]),
}


class BuildError(Exception):
    pass


class Programs:
    """Builds each program once into `out_dir`, on demand."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> Path:
        source, compiler, flags = PROGRAMS[name]
        if shutil.which(compiler) is None:
            raise BuildError(f"{compiler} not found: cannot build {name}")
        binary = self.out_dir / name
        cmd = [compiler, *flags, "-Wall", "-o", str(binary), str(SOURCE_DIR / source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{done.stderr}")
        return binary


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 64
    programs = Programs(Path(argv[0]))
    for name in argv[1:] or PROGRAMS:
        print(programs[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
