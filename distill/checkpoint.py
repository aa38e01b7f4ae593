"""Resumable checkpoints that are complete or absent, never half-written.

Layout under <output_dir>/checkpoints/:
    step-000120/            a complete checkpoint (DeepSpeed engine state under tag "state",
                            rng-rank{R}.pt: each rank's RNG state, trainer.json with step/epoch/
                            world size/batch geometry/history, COMPLETE)
    .tmp-step-000140/       being written; ignored by resume, removed at the next save
    .tmp-old-step-000080/   an old checkpoint being deleted; ignored likewise

Protocol: every rank writes its DeepSpeed shards into the temporary folder (save_checkpoint is
collective), the ranks agree that all writes succeeded (an all-reduced flag), then rank 0 writes
trainer.json and the COMPLETE marker, fsyncs them and renames the folder into place. rename() is
atomic on POSIX, so a SIGKILL at any point leaves either the old set of complete checkpoints or
the new one; old checkpoints are renamed away before they are deleted for the same reason. A
failed write on any rank (disk full, permissions) leaves the complete checkpoints untouched and
raises the same UserError on every rank, naming the folder, the reason and the free space.
Resume = the highest step-N folder with a COMPLETE marker. A run resumed from an older checkpoint
(--resume-from) starts a new branch: at its first save, the checkpoints numbered after that save
(the abandoned branch) are removed, so a later --resume can only pick the new branch.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from distill.distributed import any_rank
from distill.errors import UserError
from distill.guard import fsync_dir

MARKER = "COMPLETE"
TAG = "state"
RNG_FILE = "rng-rank{rank}.pt"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def stale_checkpoints(output_dir: str, step: int) -> list[str]:
    """The complete checkpoints numbered `step` or later: when a run saves `step`, those belong
    to a branch it abandoned by resuming from an older checkpoint."""
    return [p for p in complete_checkpoints(output_dir) if int(_STEP.match(os.path.basename(p)).group(1)) >= step]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain lists and tensors: safe for torch.load
    with weights_only=True (no NumPy objects in the pickle)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: dropout on GPU draws from it
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _retire(path: str) -> None:
    """Remove a checkpoint folder so that no kill can leave it looking complete: first an atomic
    rename to a .tmp- name (ignored by resume, swept at the next save), then the slow delete."""
    trash = os.path.join(os.path.dirname(path), ".tmp-old-" + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _failure(what: str, path: str, exc: BaseException | None, output_dir: str) -> UserError:
    if exc is None:
        reason = "failed on another rank"
    elif isinstance(exc, OSError):
        reason = (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "")
    else:  # torch.save reports a full disk as a RuntimeError with an obscure first line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    with contextlib.suppress(OSError):
        reason += f"; {shutil.disk_usage(checkpoints_dir(output_dir)).free / 2**20:.0f} MiB free on that disk"
    latest = latest_checkpoint(output_dir)
    kept = f"the last complete checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
    return UserError(f"could not {what} checkpoint {path} ({reason}); {kept}; free disk space or fix "
                     "permissions, then rerun with --resume")


def save(engine, output_dir: str, step: int, trainer_state: dict[str, Any], *, rank: int,
         keep: int, barrier) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    A failure on any rank (disk full, permissions) raises the same UserError on every rank and
    leaves the complete checkpoints as they were.
    """
    from distill import faults

    root = checkpoints_dir(output_dir)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a run killed mid-save
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    error = None
    try:
        engine.save_checkpoint(tmp, tag=TAG, save_latest=False)
        # RNG state is per rank (dropout streams differ by rank). DeepSpeed's client_state lands
        # in the model-states file that only data-parallel rank 0 writes, so each rank writes
        # its own file next to DeepSpeed's shards.
        torch.save(rng_state(), os.path.join(tmp, RNG_FILE.format(rank=rank)))
        faults.at("checkpoint_written", step=step, rank=rank, path=tmp)  # tests only
    except (OSError, RuntimeError) as exc:  # RuntimeError: how torch.save reports a full disk
        error = exc
    if any_rank(error is not None, getattr(engine, "device", "cpu")):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise _failure("write", tmp, error, output_dir) from None
    error = None
    if rank == 0:
        try:
            _fsync_write(os.path.join(tmp, "trainer.json"), json.dumps(trainer_state, indent=2))
            _fsync_write(os.path.join(tmp, MARKER), f"step {step}\n")
            # Numbered at or after this step: an abandoned branch (resumed from an older
            # checkpoint with --resume-from); retired before the new one appears.
            for old in stale_checkpoints(output_dir, step):
                _retire(old)
            os.rename(tmp, final)
            fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    if any_rank(error is not None, getattr(engine, "device", "cpu")):
        raise _failure("finish", final, error, output_dir) from None
    if rank == 0:
        for old in complete_checkpoints(output_dir)[:-keep]:
            with contextlib.suppress(OSError):
                _retire(old)
    barrier()
    return final


def load(engine, path: str, *, rank: int = 0, world_size: int = 1,
         geometry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load engine state (model, optimizer, scheduler) and this rank's RNG; return trainer.json's
    content. A checkpoint saved with another world size or batch geometry (`geometry`: the
    per-device batch and the accumulation) is refused: the sampler's shards, the data position
    and the per-rank RNG streams all depend on them."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise UserError(f"checkpoint {path!r} is incomplete or not a checkpoint (no {MARKER} marker); "
                        "pass a complete one or use --resume to pick the latest complete checkpoint")
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise UserError(f"checkpoint {path} was saved by a run on {saved_world} rank(s); this run has "
                        f"{world_size}: resume with {saved_world} rank(s) (the data order and each rank's "
                        "RNG depend on it), or start a new run without --resume")
    for key, now in (geometry or {}).items():
        saved = state.get("geometry", {}).get(key)
        if saved is not None and saved != now:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"checkpoint {path} was saved with {flag} {saved}; this run has {now}: "
                            f"resume with {flag} {saved} (and the batch options of that run), or start a new run")
    loaded, client = engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:  # DeepSpeed's way of saying it found nothing to load
        raise UserError(f"DeepSpeed could not load the engine state from checkpoint {path} (tag {TAG}); "
                        "the folder is damaged: pass another with --resume-from, or start a new run")
    rng_file = os.path.join(path, RNG_FILE.format(rank=rank))
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    elif client and "rng" in client:  # a checkpoint from before per-rank RNG files
        set_rng_state(client["rng"])
    return state
