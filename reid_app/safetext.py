"""Text from sources the app does not control (database rows, file names, error messages quoting
them), made safe to show: control characters removed, so a stored escape sequence cannot move
the cursor, retitle the terminal or fake output lines, and, in a rich table, never parsed as
markup. The HTML report escapes the result of :func:`plain`."""

from __future__ import annotations

import re

from rich.text import Text

# C0 and C1 controls (ESC, CR, BEL...), DEL, and the invisible Unicode format characters that
# reorder or hide text (bidi overrides and isolates, zero-width marks).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def plain(value: object) -> str:
    """``str(value)`` on one line with every control and bidi character replaced by ``?``."""
    return _UNSAFE.sub("?", str(value))


def cell(value: object) -> Text:
    """A rich table cell that shows ``value`` literally (``[bold]`` stays text)."""
    return Text(plain(value))
