"""The output-dir lock (one run per --output-dir), and fsync_dir for durable renames.

Rank 0 holds fcntl.flock on <output_dir>/.distill.lock for the run's life. The kernel drops a
flock when its holder dies (even by SIGKILL), so a lock file left behind by a dead run never
blocks the next one; only a live holder does. The lock is taken before the run writes anything
else, and the file is removed again when the run ends (so a run stopped by bad input leaves
nothing behind, not even the folder the lock created).

Why not the `filelock` package: its UnixFileLock takes the same flock, but removing the lock
file at the end races with a run that opened the old file just before: that run would then hold
a lock on an unlinked inode while a third run locks a new file. Here each run checks, after
locking, that the path still names the inode it locked, and retries if not; that needs the
locked descriptor, which filelock keeps private.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

from distill.errors import UserError

LOCK_NAME = ".distill.lock"


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip() or "unknown process"
    except OSError:
        return "unknown process"


@contextlib.contextmanager
def output_dir_lock(output_dir: str, rank: int | None = None) -> Iterator[None]:
    """Hold the output-dir lock (rank 0 only) for the duration of the block.

    Raises UserError, before anything is written, when another live run holds it.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0 or (os.path.exists(output_dir) and not os.path.isdir(output_dir)):
        yield  # other ranks share rank 0's lock; a file path is reported by the output-dir check
        return
    created = not os.path.exists(output_dir)
    path = os.path.join(output_dir, LOCK_NAME)
    while True:
        try:
            os.makedirs(output_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write in --output-dir {output_dir!r} ({exc.strerror or exc}); "
                            "choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--output-dir {output_dir!r} is in use by another run ({_holder(path)}, lock "
                            f"{path}); wait for it to finish or stop it, or choose another --output-dir") from None
        # A run that just ended may have unlinked the file we opened; then our lock guards nothing
        # and we retry on the new file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no other run can be holding this inode
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # only succeeds if the run wrote nothing (e.g. a user error)


def is_lock_file(name: str) -> bool:
    """For the empty-output-dir check: our own lock file does not make a folder 'not empty'."""
    return name == LOCK_NAME


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable: a power cut after rename() could otherwise undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
