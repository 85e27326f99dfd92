"""Checks the option classes share; their ValueErrors become one-line usage errors."""

from __future__ import annotations

import re


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """``pattern`` compiled, or a ValueError naming the option (``what``) and the regex error."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression ({e})") from None


def check_layer_values(layers: dict, check) -> dict:
    """``--layer REGEX=VALUE`` entries: each regex compiles, each value passes ``check(value, what)``."""
    for pattern, value in layers.items():
        compile_regex(pattern, "--layer")
        check(value, f"--layer {pattern!r}")
    return layers


def check_excludes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        compile_regex(pattern, "--exclude")
    return patterns
