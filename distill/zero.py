"""The one place that touches DeepSpeed ZeRO's parameter internals and transformers' ZeRO-3 switch.

ZeRO-3 replaces each parameter's data with an empty placeholder and keeps this rank's slice in
`p.ds_tensor`; `p.ds_id` marks a parameter as partitioned and `p.ds_numel` is its full size.
A full tensor exists only inside `deepspeed.zero.GatheredParameters`, a collective: every rank
must enter it for the same parameters in the same order.

transformers reads a checkpoint partitioned (ZeRO-3 init) only while an `HfDeepSpeedConfig`
object is alive (it keeps a weak reference to it); `zero3_loading` holds one for one `with` block.

Everything else (the engines, the loop) uses DeepSpeed's public API: `deepspeed.initialize` and
the engine's methods. See ARCHITECTURE.md.
"""
from __future__ import annotations

import contextlib


def is_partitioned(param) -> bool:
    """True for a parameter ZeRO-3 has partitioned (its data is a placeholder)."""
    return hasattr(param, "ds_id")


def param_sizes(param) -> tuple[int, int, int]:
    """(elements held on this rank, full elements, bytes held) for a maybe-partitioned param."""
    if hasattr(param, "ds_tensor"):
        local = param.ds_tensor.numel()
        return local, param.ds_numel, local * param.ds_tensor.element_size()
    return param.numel(), param.numel(), param.numel() * param.element_size()


@contextlib.contextmanager
def gathered(params):
    """Inside the block each partitioned parameter of `params` holds its full data; released on
    exit. Collective when any is partitioned; a no-op (and no DeepSpeed import) otherwise."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


MMAP_THRESHOLD = 128 << 10  # bytes (glibc's own starting value); see return_freed_blocks_to_os


def return_freed_blocks_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of `threshold` bytes or more with mmap, so that freeing one
    gives its memory back at once (process-wide; False where glibc's mallopt is not there).

    Why: a partitioned teacher's layers exist whole only while ZeRO-3 has them gathered, for
    loading, each forward and each generation step. glibc raises its mmap threshold to the size
    of the first such block freed (up to 32 MiB) and keeps later ones in its heap, so on a
    teacher whose layers are a few MiB each the freed gathers stayed in the rank's memory: 2.5x
    the partition's worth on 2 CPU ranks (README, "Memory"). Blocks over 32 MiB are mmapped
    anyway; this only fixes the threshold at `threshold`."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def zero3_loading(ds_config: dict | None):
    """transformers' from_pretrained loads partitioned (ZeRO-3 init) inside this block when
    `ds_config` is given (a ZeRO stage 3 DeepSpeed config); plain loading when it is None.
    Partitioned loading also fixes glibc's mmap threshold (return_freed_blocks_to_os), so the
    gathered layers' memory goes back when they are released.

    The switch is gone again on exit, so a model built afterwards (the student) is not partitioned.
    """
    switch = None
    if ds_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        return_freed_blocks_to_os()
        switch = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del switch


def zero3_loading_active() -> bool:
    """True while a `zero3_loading` switch (or any HfDeepSpeedConfig for stage 3) is alive."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
