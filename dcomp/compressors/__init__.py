"""Compression methods: pure library code (no CLI)."""


def numba_disabled() -> bool:
    """DCOMP_NO_NUMBA=1 (or true/yes/on): use the numpy/Python paths instead of compiled kernels."""
    import os

    return os.environ.get("DCOMP_NO_NUMBA", "").strip().lower() in ("1", "true", "yes", "on")
