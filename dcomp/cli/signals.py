"""Signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP end any command the same way.

``install()`` runs first thing in the ``dcomp`` entry point, before torch is imported, so a
signal during the imports is handled too. Each signal becomes a ``KeyboardInterrupt``
(``Terminated`` carries the signal number); it unwinds the command, whose output writer removes
its temporary file on the way (dcomp.atomic), and the CLI prints one line, ``interrupted``
(``interrupted (SIGTERM)``), and exits 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM.

A signal that arrives while torch is being imported, or inside importlib's own code, is held
until the import is done (torch's C++ initialisation calls back into Python, and an exception
raised there aborts the process; importlib runs callbacks whose exceptions are only printed).
Once a command's output has been renamed into place (``committed()``), or the command has
ended (``finishing()``), later signals are ignored: an output that exists is complete and the
exit status is the command's.
"""

from __future__ import annotations

import signal
import sys

_installed = False


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, unwinding like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: list[int] = []
_received: list[int] = []  # every signal that reached this process (libraries may hide the exception)


def _torch_importing() -> bool:
    """True while torch's import runs: its C++ init calls back into Python (pybind11), and an
    exception raised there aborts the process instead of unwinding."""
    mod = sys.modules.get("torch")
    spec = getattr(mod, "__spec__", None) if mod is not None else None
    return bool(getattr(spec, "_initializing", False))


def _in_import_machinery(frame) -> bool:
    """True when the signal interrupted importlib's own code: an exception raised there can land in
    a callback whose errors Python only prints ("Exception ignored in ... _get_module_lock"), and
    the interrupt would be lost (seen: a train run that went on after its SIGTERM)."""
    code = getattr(frame, "f_code", None)
    return code is not None and code.co_filename.startswith("<frozen importlib")


def _hold(frame) -> bool:
    return _torch_importing() or _in_import_machinery(frame)


def _unwind(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _raise(signum, frame):
    _received.append(signum)
    if _hold(frame):  # hold it; the SIGALRM below delivers it once the import is done
        _pending.append(signum)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _unwind(signum)


def _deliver(signum, frame):
    if not _pending:
        return
    if _hold(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _unwind(_pending.pop(0))


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP unwind the command (main thread of the CLI process only)."""
    global _installed
    try:
        signal.signal(signal.SIGINT, _raise)
        signal.signal(signal.SIGTERM, _raise)
        signal.signal(signal.SIGHUP, _raise)
        signal.signal(signal.SIGALRM, _deliver)
    except (ValueError, OSError):  # not the main thread
        return
    _installed = True


def committed() -> None:
    """The command's output is in place: from now on a signal no longer interrupts it."""
    finishing()


def finishing() -> None:
    """The command is over (output in place, or its error printed): ignore further signals, so one
    that arrives during the interpreter's shutdown, which puts back the default handlers of every
    Python-level one (killing the process), cannot change the exit status."""
    if not _installed:
        return
    _pending.clear()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except (ValueError, OSError):
        pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def signum_of(e: BaseException) -> int:
    return getattr(e, "signum", signal.SIGINT)


def exit_code(e: BaseException) -> int:
    return 128 + int(signum_of(e))


def interrupt_behind(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt another exception was raised from or while handling (pydantic, for
    one, wraps an interrupt that lands while it builds a schema into a SchemaError), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        e = e.__cause__ or e.__context__
    if _received:  # the chain was cut (a compiled library re-raised without it), but a signal came
        return KeyboardInterrupt() if _received[-1] == signal.SIGINT else Terminated(_received[-1])
    return None


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
