"""Run guards: one run per --output-dir (a lock), and fault-injection hooks for the robustness tests.

The lock: rank 0 holds fcntl.flock on <output_dir>/.distill.lock for the run's life. The kernel
drops a flock when its holder dies (even by SIGKILL), so a lock file left behind by a dead run
never blocks the next one; only a live holder does. The lock is taken before the run writes
anything else, and the file is removed again when the run ends.

Fault injection (tests only): DISTILL_FAULT holds comma-separated KIND@STEP items, read ONCE at
import so the hooks below cost one dict check when it is unset.
    kill_in_save@N     rank 0 SIGKILLs itself while saving step N, after DeepSpeed wrote its
                       shards and before the checkpoint is renamed into place
    enospc_in_save@N   the save of step N fails with OSError(ENOSPC) after the shards are written
    nan@N              the loss of the first micro-batch of step N becomes NaN (once)
    nan_from@N         every loss from step N on is NaN
    raise_on_rankR@N   rank R raises InjectedFault when it reaches step N (a crashing rank)
Every kind but nan_from fires once per process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import socket
from typing import Iterator

from distill.errors import UserError

LOCK_NAME = ".distill.lock"
FAULT_ENV = "DISTILL_FAULT"
_KINDS = re.compile(r"^(kill_in_save|enospc_in_save|nan|nan_from|raise_on_rank(\d+))@(\d+)$")


class InjectedFault(RuntimeError):
    """The exception raise_on_rankR@N throws: stands for any crash on one rank."""


# ---- output-dir lock -----------------------------------------------------------------------------
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


# ---- fault injection -----------------------------------------------------------------------------
def parse_faults(text: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not _KINDS.match(item):
            raise ValueError(f"{FAULT_ENV}: cannot parse {item!r}; expected KIND@STEP with KIND one of "
                             "kill_in_save, enospc_in_save, nan, nan_from, raise_on_rankR")
        kind, step = item.rsplit("@", 1)
        faults[kind] = int(step)
    return faults


_FAULTS = parse_faults(os.environ.get(FAULT_ENV, ""))


def _fire(kind: str, step: int) -> bool:
    """True once (or every time for nan_from) when fault `kind` is armed for `step`."""
    at = _FAULTS.get(kind)
    if at is None:
        return False
    if kind == "nan_from":
        return step >= at
    if step != at:
        return False
    del _FAULTS[kind]
    return True


def on_train_loss(loss, step: int, rank: int):
    """Training loop hook, once per micro-batch before the finiteness check. `step` is 1-based."""
    if not _FAULTS:
        return loss
    if _fire(f"raise_on_rank{rank}", step):
        raise InjectedFault(f"injected fault ({FAULT_ENV}): rank {rank} crashed at step {step}")
    if _fire("nan_from", step) or _fire("nan", step):
        return loss * float("nan")
    return loss


def on_checkpoint_written(step: int, rank: int, path: str) -> None:
    """checkpoint.save hook: the DeepSpeed shards of `step` are in `path`, not yet renamed."""
    if not _FAULTS:
        return
    if _fire("enospc_in_save", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)", path)
    if rank == 0 and _fire("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)
