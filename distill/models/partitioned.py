"""The teacher as ZeRO-3 holds it: full tensors one at a time, its lm_head for one loss call, and
how much of it this rank holds. A teacher held whole in one process works the same way.

Gathering is collective (distill/zero.py): every rank must ask for the same tensors in the same
order, which build_student and the training loop do, since every rank runs the same code.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from distill import zero
from distill.models.heads import lm_head_of


def module_tensor_getter(model) -> Callable[[str], torch.Tensor]:
    """A `get_teacher_tensor` for build_student, for a teacher held whole in this process."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors.__getitem__


def gathering_tensor_getter(model) -> Callable[[str], torch.Tensor]:
    """A `get_teacher_tensor` for build_student: name -> a full copy of the teacher's tensor,
    gathering one ZeRO-3 partitioned parameter at a time (collective), so no rank ever holds
    more than one full teacher tensor besides its own partition."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())  # ZeRO-3 does not partition buffers

    def get(name: str) -> torch.Tensor:
        if name in buffers:
            return buffers[name].detach().clone()
        p = params[name]
        with zero.gathered([p]):
            return p.data.detach().clone()

    return get


def file_tensor_getter(weight_paths: list[str], teacher_config):
    """A `get_teacher_tensor` for build_student that reads the teacher's tensors one at a time
    from its safetensors files (memory-mapped), the teacher model never built: a student trained
    from a teacher cache takes the teacher's layers without its memory. None when the files are
    not safetensors, or do not hold every tensor (the caller then loads the teacher).

    Names are the model's parameter and buffer names; a tied parameter that the file stores
    under another name (BART's and T5's embeddings and lm_head share `shared.weight`) is found
    through the ties of a skeleton of the model built on the meta device (no memory)."""
    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM

    files = [p for p in weight_paths if p.endswith(".safetensors")]
    if not files:
        return None
    where = {}
    for path in files:
        with safe_open(path, framework="pt") as fh:
            where.update({key: path for key in fh.keys()})
    with torch.device("meta"):
        skeleton = AutoModelForSeq2SeqLM.from_config(teacher_config)
    tied: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    source = {}
    for names in tied.values():
        stored = next((n for n in names if n in where), None)
        if stored is None:
            return None
        source.update({n: stored for n in names})
    for name, _ in skeleton.named_buffers():
        if name in where:
            source[name] = name

    def get(name: str) -> torch.Tensor:
        key = source[name]
        with safe_open(where[key], framework="pt") as fh:
            return fh.get_tensor(key)

    return get


@contextlib.contextmanager
def gathered_lm_head(model):
    """The model's (lm_head weight, bias), detached, with the weight gathered when ZeRO-3
    partitions it.

    Every loss implementation uses the teacher's head only inside its forward call (the fused
    kernel computes the student's gradients there too), so the full weight lives only for the
    duration of one loss call and is released again on exit.
    """
    weight, bias = lm_head_of(model)
    with zero.gathered([weight]):
        yield weight.detach(), (bias.detach() if bias is not None else None)


def teacher_memory_line(model) -> tuple[str, dict[str, int]]:
    """A log line with the teacher's parameters held on this rank, and the same as a dict
    (local and full element counts, bytes held)."""
    local = full = nbytes = 0
    for p in model.parameters():
        a, b, c = zero.param_sizes(p)
        local, full, nbytes = local + a, full + b, nbytes + c
    line = f"teacher parameters on this rank: {local:,} of {full:,} ({nbytes / 2**20:.1f} MiB)"
    return line, {"local": local, "full": full, "bytes": nbytes}
