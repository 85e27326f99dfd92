"""Checks the option classes share; their ValueErrors become one-line usage errors."""

from __future__ import annotations

import re


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """``pattern`` compiled, or a ValueError naming the option (``what``) and the regex error."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression ({e})") from None
