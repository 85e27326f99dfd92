"""Resource limits for reading untrusted model files (.dcz and dcomp checkpoints).

A small file may claim a large decoded size; every claim a header makes (header size, Huffman
tables, decoded bytes, classes, input elements) is checked against these limits before anything
is allocated for it. Defaults suit real models; each can be raised:

    DCOMP_MAX_HEADER=64M  DCOMP_MAX_TABLES=100000  DCOMP_MAX_DECODED=40G  DCOMP_MAX_CLASSES=5000000
    DCOMP_MAX_INPUT=1G    (environment, for every command)
    dcomp unpack/inspect --max-decoded 40G --max-header 64M --max-tables 100000   (flags)

Sizes take the suffixes K, M, G, T (powers of 1024). docs/RELIABILITY.md ("Limits") explains
each default.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, fields, replace

from dcomp.errors import UsageError


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 16 << 30


@dataclass(frozen=True)
class Limits:
    max_header: int = 16 << 20          # header JSON bytes, as stored and as inflated
    max_tables: int = 16384             # Huffman streams (each with its own code table) per file
    max_decoded: int = 0                # decoded bytes of all tensors; 0 = a quarter of RAM
    max_classes: int = 1 << 20          # num_classes a file may claim
    max_input: int = 1 << 28            # elements of one input sample (product of input_shape)

    def decoded(self) -> int:
        return self.max_decoded or max(1 << 30, _ram_bytes() // 4)


ENV = {"max_header": "DCOMP_MAX_HEADER", "max_tables": "DCOMP_MAX_TABLES", "max_decoded": "DCOMP_MAX_DECODED",
       "max_classes": "DCOMP_MAX_CLASSES", "max_input": "DCOMP_MAX_INPUT"}
# command-line flags (on `unpack` and `inspect`); the other limits are raised by environment only
FLAGS = {"max_header": "--max-header", "max_tables": "--max-tables", "max_decoded": "--max-decoded"}

_override: dict[str, int] = {}


def parse_size(text: str, what: str = "size") -> int:
    """'1.5G' -> bytes (K, M, G, T are powers of 1024; a plain number is taken as it is)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise UsageError(f"{what}: {text!r} is not a size; write e.g. 4096, 512M or 8G")
    n = float(m.group(1)) * (1024 ** " KMGT".index(m.group(2).upper() or " "))
    if n < 1:
        raise UsageError(f"{what}: {text!r} must be at least 1")
    return int(n)


def current() -> Limits:
    """The limits in force: defaults, then DCOMP_MAX_* variables, then command-line flags."""
    values = {}
    for f in fields(Limits):
        env = os.environ.get(ENV[f.name], "").strip()
        if env:
            values[f.name] = parse_size(env, ENV[f.name])
    values.update(_override)
    return replace(Limits(), **values)


def set_overrides(**values: int | None) -> None:
    """Command-line flags (None = not given); replaces any earlier overrides."""
    _override.clear()
    _add(values)


def _add(values: dict) -> None:
    for k, v in values.items():
        if k not in ENV:
            raise KeyError(k)
        if v is not None:
            _override[k] = int(v)


@contextlib.contextmanager
def overridden(**values: int | None):
    saved = dict(_override)
    try:
        _add(values)
        yield current()
    finally:
        _override.clear()
        _override.update(saved)


def hint(name: str) -> str:
    """How to raise one limit, for error messages."""
    if name in FLAGS:
        return f"raise it with {FLAGS[name]} or {ENV[name]} if you trust the file"
    return f"raise it with {ENV[name]}=N if you trust the file"
