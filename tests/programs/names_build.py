"""Build libnames.so (names_lib.c) and its program (names_main.c) in every
way a library's function names can be kept apart from it:

    full/       not stripped: the names the others must find
    stripped/   strip --strip-all: .eh_frame and .dynsym only
    debuglink/  stripped, with .gnu_debuglink to libnames.so.debug beside it
    mini/       stripped, with MiniDebugInfo (.gnu_debugdata), made the way
                Fedora's find-debuginfo makes it
    buildid/    stripped; its debug file is `debug_file`, for a test to put
                under .build-id/ or behind a debuginfod server

Each directory holds names_main and libnames.so (found through $ORIGIN).
Needs gcc, binutils (objcopy, strip, nm) and xz."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-Wl,--build-id"]
VARIANTS = ("full", "stripped", "debuglink", "mini", "buildid")


class NamesBuild(NamedTuple):
    root: Path  # one directory per variant under it
    debug_file: Path  # the debug file of the stripped copies
    build_id: str

    def program(self, variant: str) -> Path:
        return self.root / variant / "names_main"

    def library(self, variant: str) -> Path:
        return self.root / variant / "libnames.so"


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done.stdout


def _defined(binary: Path, dynamic: bool) -> list[tuple[str, str]]:
    out = _run("nm", *(["-D"] if dynamic else []), "--format=posix", "--defined-only", str(binary))
    return [(parts[0], parts[1]) for parts in (line.split() for line in out.splitlines()) if len(parts) >= 2]


def _add_mini_debuginfo(library: Path, debug: Path, work: Path) -> None:
    """Function symbols the dynamic table lacks, in a symbols-only ELF
    file, xz-compressed into .gnu_debugdata."""
    dynamic = {name for name, _ in _defined(library, True)}
    keep = sorted(name for name, kind in _defined(debug, False) if kind in "Tt" and name not in dynamic)
    (work / "keep_symbols").write_text("".join(f"{n}\n" for n in keep))
    mini = work / "mini_debuginfo"
    _run("objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
         f"--keep-symbols={work / 'keep_symbols'}", str(debug), str(mini))
    _run("xz", "-f", str(mini))
    _run("objcopy", "--add-section", f".gnu_debugdata={mini}.xz", str(library))


def build(out: Path) -> NamesBuild:
    for tool in ("gcc", "objcopy", "strip", "nm", "xz"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: install.sh --test-tools installs it")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    full_lib = work / "libnames.so"
    _run("gcc", *FLAGS, "-shared", "-fPIC", "-Wall", "-o", str(full_lib), str(SOURCE_DIR / "names_lib.c"))
    debug = work / "libnames.so.debug"
    _run("objcopy", "--only-keep-debug", str(full_lib), str(debug))
    stripped = work / "libnames.stripped.so"
    _run("strip", "--strip-all", "-o", str(stripped), str(full_lib))
    for variant in VARIANTS:
        directory = out / variant
        directory.mkdir(exist_ok=True)
        library = directory / "libnames.so"
        shutil.copy(full_lib if variant == "full" else stripped, library)
        if variant == "debuglink":
            shutil.copy(debug, directory / "libnames.so.debug")
            _run("objcopy", f"--add-gnu-debuglink={directory / 'libnames.so.debug'}", str(library))
        elif variant == "mini":
            _add_mini_debuginfo(library, debug, work)
        _run("gcc", *FLAGS, "-Wall", "-o", str(directory / "names_main"), str(SOURCE_DIR / "names_main.c"),
             f"-L{directory}", "-lnames", "-Wl,-rpath,$ORIGIN")
    notes = _run("readelf", "-n", str(full_lib))
    build_id = next(line.split()[-1] for line in notes.splitlines() if "Build ID" in line)
    return NamesBuild(out, debug, build_id)
