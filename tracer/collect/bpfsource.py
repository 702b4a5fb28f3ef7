"""The BPF C sources, installed or in a checkout, joined into the one
program bcc compiles.

bcc loads only the functions of its main file as programs, so layers are
not #included: their text is joined, each part marked with #line so that
compiler messages name the layer's own file and line."""

from __future__ import annotations

from pathlib import Path

import memtrace


def bpf_dir() -> Path:
    package = Path(memtrace.__file__).parent
    for candidate in (package / "bpf", package.parent / "bpf"):
        if (candidate / "memtrace.h").exists():
            return candidate
    raise FileNotFoundError("memtrace's BPF sources are missing: reinstall memtrace")


def program_text(layers: list[str]) -> str:
    """The source of the named layers ("heap", "vm", ...), in that order."""
    parts = []
    for layer in layers:
        path = bpf_dir() / f"{layer}.bpf.c"
        parts.append(f'#line 1 "{path}"\n{path.read_text()}')
    return "\n".join(parts)
