"""User-facing errors: each carries one line that the CLI prints to stderr before exiting non-zero."""


class ReidAppError(Exception):
    """An error the operator can act on (bad input, missing file, wrong database...)."""

    exit_code: int = 2
