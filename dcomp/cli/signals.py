"""Signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP end any command the same way.

``install()`` runs first thing in the ``dcomp`` entry point, before torch is imported, so a
signal during the imports is handled too. Each signal becomes a ``KeyboardInterrupt``
(``Terminated`` carries the signal number); it unwinds the command, whose output writer removes
its temporary file on the way (dcomp.atomic), and the CLI prints one line, ``interrupted``
(``interrupted (SIGTERM)``), and exits 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM.

Once a command's output has been renamed into place (``committed()``), later signals are held
until the process exits normally: an output that exists is complete and the exit status is 0.
"""

from __future__ import annotations

import signal
import sys

_installed = False
_deferred: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, unwinding like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


def _defer(signum, frame):
    _deferred.append(signum)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP unwind the command (main thread of the CLI process only)."""
    global _installed
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise)
        signal.signal(signal.SIGHUP, _raise)
    except (ValueError, OSError):  # not the main thread
        return
    _installed = True


def committed() -> None:
    """The command's output is in place: from now on a signal no longer interrupts it."""
    if not _installed:
        return
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, _defer)
        except (ValueError, OSError):
            pass


def signum_of(e: BaseException) -> int:
    return getattr(e, "signum", signal.SIGINT)


def exit_code(e: BaseException) -> int:
    return 128 + int(signum_of(e))


def message(e: BaseException) -> str:
    s = signum_of(e)
    return "interrupted" if s == signal.SIGINT else f"interrupted ({signal.Signals(s).name})"


def report_and_exit(e: BaseException) -> None:
    """One line on stderr, exit 128 + signal."""
    try:
        sys.stderr.write(message(e) + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr may be gone (a closed pipe)
        pass
    exit_now(exit_code(e))


def exit_now(code: int) -> None:
    """Leave with ``code``. In the CLI process after an interrupt: without the interpreter's
    shutdown (a signal that landed inside torch's import can make it end with SIGINT instead of
    the code); temporary files were removed while the exception unwound."""
    if _installed:
        import os

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)
    raise SystemExit(code)
