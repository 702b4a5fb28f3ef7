"""The one error type the CLI turns into a one-line message and an exit code."""


class MemtraceError(Exception):
    """A failure the user can act on. str(error) is the whole message: one
    line that says what went wrong and what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
