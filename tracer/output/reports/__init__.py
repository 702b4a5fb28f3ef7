"""Reports on one moment of a recording.

Each reporter takes a `ReportData` in its constructor and writes itself
with `render(out)`; `binary` says whether `out` is a bytes stream. The
format modules are imported on demand, so a missing optional dependency
(protobuf for pprof) only affects its own format.
"""

from __future__ import annotations

import importlib
from typing import Any

from memtrace.errors import MemtraceError

# format -> (module, class)
FORMATS: dict[str, tuple[str, str]] = {
    "text": ("memtrace.output.reports.text", "TextReporter"),
    "json": ("memtrace.output.reports.jsonreport", "JsonReporter"),
    "folded": ("memtrace.output.reports.folded", "FoldedReporter"),
    "pprof": ("memtrace.output.reports.pprof", "PprofReporter"),
    "html": ("memtrace.output.reports.html", "HtmlReporter"),
}


def reporter_class(fmt: str) -> Any:
    try:
        module_name, class_name = FORMATS[fmt]
    except KeyError:
        raise MemtraceError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        package = "protobuf" if missing.startswith("google") else missing
        raise MemtraceError(
            f"the {fmt} format needs the Python package {package!r}, which is not installed:"
            f" pip install {package}"
        ) from None
    return getattr(module, class_name)
