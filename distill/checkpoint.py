"""Resumable checkpoints that are complete or absent, never half-written.

Layout under <output_dir>/checkpoints/:
    step-000120/            a complete checkpoint (DeepSpeed engine state under tag "state",
                            trainer.json with step/epoch/RNG, COMPLETE marker)
    .tmp-step-000140/       being written; ignored by resume, removed at the next save

Protocol: every rank writes its DeepSpeed shards into the temporary folder (save_checkpoint is
collective), all ranks meet at a barrier, then rank 0 writes trainer.json and the COMPLETE marker,
fsyncs them and renames the folder into place. rename() is atomic on POSIX, so a SIGKILL at any
point leaves either the old set of complete checkpoints or the new one. A failed write (disk full)
leaves the previous checkpoints untouched and is reported as a UserError naming the folder.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from distill.errors import UserError

MARKER = "COMPLETE"
TAG = "state"
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


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def save(engine, output_dir: str, step: int, trainer_state: dict[str, Any], *, rank: int,
         keep: int, barrier) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
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
        # RNG state is per rank (dropout streams differ by rank); DeepSpeed keeps client_state
        # per rank alongside its own shards.
        engine.save_checkpoint(tmp, tag=TAG, client_state={"rng": rng_state()}, save_latest=False)
    except OSError as exc:
        error = exc
    barrier()
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {tmp} ({error.strerror or error}); the previous "
                        "checkpoint is intact; free disk space or fix permissions, then --resume")
    if rank == 0:
        try:
            _fsync_write(os.path.join(tmp, "trainer.json"), json.dumps(trainer_state, indent=2))
            _fsync_write(os.path.join(tmp, MARKER), f"step {step}\n")
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not finish checkpoint {final} ({exc.strerror or exc}); the previous "
                            "checkpoint is intact; free disk space or fix permissions, then --resume") from None
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(engine, path: str) -> dict[str, Any]:
    """Load engine state (model, optimizer, scheduler, RNG) and return trainer.json's content."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise UserError(f"checkpoint {path!r} is incomplete or not a checkpoint (no {MARKER} marker); "
                        "pass a complete one or use --resume to pick the latest complete checkpoint")
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    _, client = engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client and "rng" in client:
        set_rng_state(client["rng"])
    return state
