"""The one place output files are written: atomically for regular files, straight through for special ones.

Every file multifi writes (checkpoints, datasets, configs, metrics, predictions, plots) goes through
`atomic_write`: a regular file (or a new path) is written to a temporary file in the same folder,
flushed and renamed into place, so it is never half-written; character devices, FIFOs, sockets and
symlinks to them (a named pipe) are written straight through and never replaced; `/dev/stdout` and other
links to a process's streams are appended to, whatever the stream is (a terminal, a pipe, a redirected file);
any other symlink stays a link: the file it names gets the content.
New files and folders get the permissions the umask allows, like any other tool's. Errors of the
file system (full disk, read-only folder, no permission, a file where a folder belongs) become a
one-line `MultifiError` naming the path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from multifi.errors import MultifiError

log = logging.getLogger("multifi")


def umask() -> int:
    """The process's current umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def links_to_a_stream(path: Path) -> bool:
    """A symlink chain through /proc or /dev (/dev/stdout → /proc/self/fd/1): a process's stream, whatever
    file it ends at."""
    hop = path
    for _ in range(40):
        if str(hop).startswith(("/proc/", "/dev/")):
            return True
        if not hop.is_symlink():
            return False
        hop = hop.parent / os.readlink(hop)
    return False


def is_special(path: Path) -> bool:
    """True for an existing path that is not a regular file or folder (device, FIFO, socket; symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def os_error(path, exc: BaseException, action: str = "write") -> MultifiError:
    """A file-system error as a one-line MultifiError `PATH: cannot <action> (reason)`."""
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return MultifiError(f"{path}: cannot {action} ({reason})")


@contextlib.contextmanager
def reported(path, action: str = "write") -> Iterator[None]:
    """Turn OSError (also when a library wraps it in a RuntimeError) into a one-line MultifiError for `path`
    ("cannot write" or, with action="read", "cannot read")."""
    try:
        yield
    except OSError as exc:
        raise os_error(path, exc, action) from None
    except RuntimeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise os_error(path, cause, action) from None
        raise


def make_dir(path) -> Path:
    """mkdir -p with a one-line error (a file in the way, no permission, read-only file system)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MultifiError(f"{path}: exists and is not a folder")
    with reported(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Produce `path` by calling write(binary file object); see the module docstring for the rules."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if links_to_a_stream(path):
            with reported(path), open(path, "ab") as f:  # /dev/stdout and alike: the stream, appended to
                write(f)
                f.flush()
            return path
        path = target  # the link keeps naming the file, which gets the content (the link was replaced)
    if is_special(path):
        with reported(path), open(path, "wb") as f:  # (a device or pipe: write straight through)
            write(f)
            f.flush()
        return path
    if path.is_dir():
        raise MultifiError(f"{path}: is a folder, expected a file name")
    if not path.parent.is_dir():
        existed = path.parent.exists()
        make_dir(path.parent)  # (a file in the way: its error)
        if not existed:  # said: a mistyped folder name would otherwise go unnoticed
            log.info("%s: created the folder for %s", path.parent, path.name)
    with reported(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with reported(path):
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(exc, KeyboardInterrupt) and _interrupted(exc):
            # Ctrl-C inside write() can surface as the writer's own error while it unwinds (torch.save:
            # "unexpected pos"): it is the interrupt, and is reported as one (exit 130, no traceback)
            raise KeyboardInterrupt(f"interrupted while writing {path}") from None
        raise
    return path


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in the exception's chain (the error raised while handling it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__ or exc.__cause__
    return False


@contextlib.contextmanager
def held_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, holding this process's id) for the block: a second
    holder (another process) gets a one-line error naming `what` it protects; the kernel releases it when the
    process ends, killed or not. The file is removed when the block ends without an error (left otherwise: a mark
    of the start). Where the platform has no flock: no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            raise MultifiError(f"{path.parent}: {what} is in use by process {holder} ({path.name})") from None
        except OSError as exc:  # a file system without locks (NFS without lockd, Lustre mounted noflock)
            log.warning("%s: no lock on this file system (%s): nothing keeps a second process from it", path, exc)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def check_not_held(path: Path, what: str) -> None:
    """The one-line error held_lock would give, now: `path` exists and another process holds its lock (nothing is
    created; where locks are not available, nothing is said)."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # no such file, or not POSIX: nothing holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        raise MultifiError(f"{path.parent}: {what} is in use by process {holder} ({path.name})") from None
    except OSError:  # a file system without locks
        pass
    finally:
        os.close(fd)


def json_text(payload) -> str:
    """JSON of `payload` (indented) with every non-finite float as null: json.dumps writes NaN and Infinity, which
    are no JSON (strict parsers, jq, JavaScript reject the file)."""
    import json
    import math

    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(payload), indent=2, allow_nan=False)


def write_text(path, text: str) -> Path:
    """atomic_write of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def new_dir_mode(path) -> None:
    """Give a folder made by tempfile.mkdtemp (0700) the permissions the umask allows."""
    os.chmod(path, 0o777 & ~umask())


def encoded_for(path: Path, data: bytes) -> bytes:
    """The bytes to write to `path`: gzip-compressed when its name ends in .gz (as readers expect), else as given."""
    if Path(path).name.lower().endswith(".gz"):
        import gzip

        return gzip.compress(data, mtime=0)
    return data


def warn_if_cut_short(path, last: str) -> None:
    """Warn when a text file's content, whose last character is `last` ("" when empty), does not end with a newline:
    a file cut short (an interrupted copy or download) ends so, and readers take its last number as it stands
    (ASE and the label tables read 1.094 of a cut 1.09466975)."""
    if last not in ("", "\n", "\r"):
        log.warning(
            "%s: does not end with a newline: if it was cut short (an interrupted copy or download), its last "
            "number may be incomplete; compare it with the original",
            path,
        )
