"""Errors the CLI turns into one line on stderr.

Library code raises these with a message that says what was wrong and what to do;
the CLI prints ``error: <message>`` and exits with ``exit_code`` (no traceback unless --debug).
"""


class DcompError(Exception):
    """A failure the user can act on (bad file, impossible request). Exit code 1."""

    exit_code = 1


class UsageError(DcompError):
    """The command line asked for something invalid (bad option value). Exit code 2."""

    exit_code = 2


class FormatError(DcompError):
    """A file is not what it claims to be (truncated, foreign, corrupt, unknown version)."""
