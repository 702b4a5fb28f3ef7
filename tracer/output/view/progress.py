"""What memtrace is doing before the first snapshot (compiling, attaching,
reading the allocator): a spinner and the current step on the terminal,
instead of seconds of blank screen. Without a terminal nothing, so batch
and JSON runs keep stderr clean, unless -v asks: then one line a step."""

from __future__ import annotations


class StartupProgress:
    """`step(text)` names the step under way; `done()` clears the line
    (before the live view takes the screen). Safe to call when disabled."""

    def __init__(self, enabled: bool, verbose: bool = False) -> None:
        self._status = None
        self._lines = verbose and not enabled
        if enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("", spinner="dots")

    def step(self, text: str) -> None:
        if self._lines:
            import sys

            print(f"memtrace: {text}", file=sys.stderr, flush=True)
        if self._status is None:
            return
        self._status.update(f"memtrace: {text}…")
        self._status.start()  # no-op once started

    def done(self) -> None:
        status, self._status = self._status, None
        if status is not None:
            status.stop()

    def __enter__(self) -> "StartupProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

