"""Writing output files so that an interrupted command leaves the old file or none.

Every file dcomp writes (a command's ``-o``, a recipe's stage outputs) goes through
``atomic_write``: the bytes go to a temporary file in the target's folder, named
``.<name>.<pid>.<random>.tmp``, which is flushed and fsync-ed and then renamed over the target;
the folder is fsync-ed after the rename. A signal or a crash before the rename leaves the old
file (or none); SIGINT/SIGTERM remove the temporary file on the way out, and a temporary file
left by a killed process (SIGKILL, power loss) is removed by the next write to the same path
(its pid no longer runs).

Targets that are not regular files:

* a symlink: its target is replaced atomically, the link itself is kept;
* a character device, a FIFO, or anything under /dev or /proc (``/dev/null``, ``/dev/stderr``,
  ``/dev/tty``): written through in place (opened for appending, never replaced). No atomicity is
  possible there: a reader of a FIFO sees a partial stream if the command is interrupted;
* ``/dev/stdout`` (and ``/dev/fd/1``, ``/proc/self/fd/1``): the same as ``-o -``;
* a directory, a block device or a socket: refused before any work.

``check_writable`` is the probe a command runs before its work: the folder must accept a new
file and have room for about ``expected_bytes`` (reserved with posix_fallocate, then freed), so a
read-only folder or a full disk is one line at the start rather than an OSError at the end.

Torch-free on purpose: the CLI imports this before it knows whether a command needs torch.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dcomp.errors import DcompError

STDOUT_ALIASES = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")
_PROBE_DEFAULT = 64 * 1024


def _err(path, e: OSError) -> DcompError:
    return DcompError(f"cannot write {path}: {e.strerror or e}")


def output_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """How ``path`` is written: ("stdout", p), ("through", p) or ("file", resolved target)."""
    p = Path(path)
    text = os.path.abspath(os.fspath(p))
    if text in STDOUT_ALIASES:
        return "stdout", p
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _err(path, e) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise DcompError(f"{path}: is a directory; give a file name for the output")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return "through", p
        if stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            raise DcompError(f"{path}: is a {'block device' if stat.S_ISBLK(st.st_mode) else 'socket'}; "
                             f"dcomp writes regular files, character devices and FIFOs only")
    if text.startswith(("/dev/", "/proc/")):
        return "through", p
    # a symlink (or a path through symlinked folders): replace what it points to, keep the link
    target = Path(os.path.realpath(p))
    if not target.parent.is_dir():
        raise DcompError(f"{path}: output folder {target.parent} does not exist")
    return "file", target


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(r"^\." + re.escape(target.name) + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[str]:
    """Remove temporary files for ``target`` left by processes that no longer run."""
    removed = []
    pat = _temp_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        m = pat.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(target.parent / name)
                removed.append(name)
            except OSError:
                pass
    return removed


def _new_temp(path, target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target`` (after removing dead processes' leftovers), named
    so that ``remove_stale_temps`` recognises it; errors name the ``path`` the user gave."""
    remove_stale_temps(target)
    try:
        return tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _err(path, e) from None


def check_writable(path: str | os.PathLike, expected_bytes: int | None = None) -> None:
    """Fail now, with one line, if ``path`` cannot be written (read-only folder, no permission,
    full disk, a directory): a temporary file is created in the target folder, ``expected_bytes``
    (default 64 KiB) reserved in it, and removed again."""
    kind, target = output_kind(path)
    if kind == "stdout":
        return
    if kind == "through":
        if not os.access(target, os.W_OK):
            raise DcompError(f"cannot write {path}: permission denied")
        return
    fd, tmp = _new_temp(path, target)
    try:
        size = max(int(expected_bytes or _PROBE_DEFAULT), 1)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DcompError(f"cannot write {path}: not enough space in {target.parent} "
                                 f"(the output needs about {size:,} bytes)") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _err(path, e) from None
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass


@contextmanager
def _signals_blocked():
    """Hold SIGINT/SIGTERM/SIGHUP for the few system calls that commit a file."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # not the main thread / not POSIX
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_through(path: Path, data: bytes) -> None:
    """Write into a device, FIFO or /dev path in place (no temporary file, no rename)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise _err(path, e) from None
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:
        raise _err(path, e) from None
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, on_commit=None) -> Path:
    """Write ``data`` to ``path``: the old file or the new one, never a torn one (see the module
    docstring for symlinks and special files). Returns the path actually written. ``on_commit``
    runs with signals held right after the rename (the CLI uses it to mark its output final)."""
    kind, target = output_kind(path)
    if kind == "stdout":
        import sys

        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return Path(path)
    if kind == "through":
        write_through(target, data)
        return target
    fd, tmp = _new_temp(path, target)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the old file's)
        if target.exists():
            mode = target.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with _signals_blocked():
            os.replace(tmp, target)
            if on_commit is not None:
                on_commit()
        fsync_dir(target.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _err(path, e) from None
        raise
    return target
