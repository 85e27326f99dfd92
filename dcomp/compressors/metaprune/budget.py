"""Budgets: ``--max-macs 0.5x`` (a fraction of the input model) or an absolute value (``12M``, ``3.5e6``,
``1500000``; latency in milliseconds), and the window ``[min_fraction x max, max]`` a candidate must fall in."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dcomp.errors import UsageError

METRICS = ("macs", "params", "latency_ms")
OPTION = {"macs": "--max-macs", "params": "--max-params", "latency_ms": "--max-latency-ms"}
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_budget(value, option: str) -> tuple[str, float]:
    """("fraction", f) for '0.5x', else ("absolute", v). Raises UsageError with an example."""
    if isinstance(value, bool):
        raise UsageError(f"{option}: expected a number or a fraction such as 0.5x, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise UsageError(f"{option} must be positive, got {value}")
        return "absolute", float(value)
    text = str(value).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|k|m|g)?", text)
    if not m:
        raise UsageError(f"{option} {value!r}: give a fraction of the input model such as 0.5x, or a number such "
                         f"as 12M or 3.5e6")
    num, suf = float(m.group(1)), m.group(2) or ""
    if num <= 0:
        raise UsageError(f"{option} must be positive, got {value!r}")
    if suf == "x":
        return "fraction", num
    return "absolute", num * _SUFFIX[suf]


@dataclass
class Window:
    """Per metric: (low, high) a candidate must satisfy (low <= value <= high)."""

    bounds: dict[str, tuple[float, float]]

    def ok(self, cost) -> bool:
        for metric, (lo, hi) in self.bounds.items():
            v = cost.get(metric)
            if v is None or v > hi or v < lo:
                return False
        return True

    def over(self, cost) -> bool:
        return any((cost.get(m) or 0) > hi for m, (lo, hi) in self.bounds.items())

    def under(self, cost) -> bool:
        return any((cost.get(m) or 0) < lo for m, (lo, hi) in self.bounds.items())

    def describe(self) -> dict:
        return {m: [lo, hi] for m, (lo, hi) in self.bounds.items()}


def fmt_value(metric: str, v: float) -> str:
    if metric == "latency_ms":
        return f"{v:.3f} ms"
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{s}"
    return f"{v:.0f}"
