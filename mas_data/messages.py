"""Library errors as the short reasons our one-line messages quote: the first line of a multi-line
error, and the operating system's words ('Connection refused') out of urllib3's and urllib's wrappers."""

from __future__ import annotations

import re


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s text, or its type's name when it has none."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def errno_reason(text: str) -> str:
    """'Connection refused' out of the nested wrappers of urllib3 and urllib."""
    found = re.search(r"\[Errno -?\d+\] ([^'\"<>()\]\[]+)", text)
    return found.group(1).strip() if found else " ".join(text.split())[:200]
