"""Atomic file writes (a reader sees the old file or the new one, never half of one) and an exclusive lock."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file the permissions of a normal new file (0666 less the umask), for writers that create theirs
    private (``tempfile.mkstemp``, safetensors)."""
    os.chmod(path, 0o666 & ~_current_umask())


def unwritable_folder_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (created first if missing): ``"is a file"``, ``"cannot be
    created: X is a file"`` or ``"cannot be written (X: <OS reason>)"``; None when they can. Writing is tried, so a
    read-only file system is found even by root."""
    folder = Path(folder)
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        return "is a file" if existing == folder else f"cannot be created: {existing} is a file"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        return f"cannot be written ({existing}: {error.strerror})"
    return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file lives in the same folder, so the final ``os.replace`` is a rename on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    honour_umask(tmp_path)  # mkstemp creates the file private (0600)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (and what was there).

    The old folder is renamed away before the new one is renamed in, and deleted only then: ``path`` is never a
    half-deleted old folder or a half-written new one. Its files get the permissions of normal new files (safetensors
    creates its files private).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a folder was to be written there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp_dir.chmod(0o777 & ~_current_umask())
    try:
        yield tmp_dir
        for file in tmp_dir.rglob("*"):
            if file.is_file():
                honour_umask(file)
        if path.exists():
            old_dir = tmp_dir.with_suffix(".old")
            os.replace(path, old_dir)
            os.replace(tmp_dir, path)
            shutil.rmtree(old_dir)
        else:
            os.replace(tmp_dir, path)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


_LOCKING_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class LockHeldError(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote there (``pid N on HOST``)."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


def _read_holder(lock_file) -> str:
    lock_file.seek(0)
    return lock_file.read().strip() or "another process"


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on the file ``path`` (created, with its folder, if missing); ``LockHeldError`` if
    another process holds it. The system drops the lock when its holder dies, so a killed run never leaves a stale
    one. The lock file stays: deleting it would let a third process lock a new file while the second holds the old.
    While held, it names its holder (``pid N on HOST``) for the message the next process gets.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, the caller runs unlocked
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock_file)
            raise LockHeldError(f"{path} is locked by {holder}", holder) from None
        except OSError as error:
            if error.errno not in _LOCKING_UNSUPPORTED:
                raise
            yield  # a file system without locks (some network mounts): the caller runs unlocked
            return
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the ``exclusive_lock`` on ``path`` (``pid N on HOST``), or None when nobody does. Takes nothing."""
    try:
        import fcntl
    except ImportError:
        return None
    if not Path(path).is_file():
        return None
    with open(path, "a+", encoding="utf-8") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(lock_file)
        except OSError:
            return None
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    return None
