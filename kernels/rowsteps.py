"""Which row step a chunk of the loss uses: native C (CPU), Triton (CUDA, opt-in) or eager torch.

A row step turns a float32 chunk of student (and teacher) logits into per-row CE and divergence
(forward KL, reverse KL or JSD) and, when asked, the gradient over the student block. kernels/_core.py's chunk_step + chunk_grad
(eager torch ops) is the reference and the fallback; pick() returns a faster equivalent or None.

  CPU   kernels/native.py (built at first use; off with SEQ2SEQ_DISTILL_NATIVE=0)
  CUDA  kernels/triton_rowstep.py when SEQ2SEQ_DISTILL_TRITON=1 (unmeasured on a GPU so far)
Tests also run the Triton kernel on CPU tensors under Triton's interpreter: with
TRITON_INTERPRET=1 and SEQ2SEQ_DISTILL_TRITON=1, CPU tensors use it too.
"""
from __future__ import annotations

import functools
import logging

from . import native
from .switches import env_flag

log = logging.getLogger("kernels.rowsteps")
TRITON_SWITCH = "SEQ2SEQ_DISTILL_TRITON"


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        from . import triton_rowstep
    except Exception as e:  # triton missing or broken: the eager path, said once
        log.warning("%s=1 but the Triton row step is unavailable (%s: %s); using the eager torch path",
                    TRITON_SWITCH, type(e).__name__, e)
        return None
    return triton_rowstep.rowstep


def pick(device):
    """A callable (s, t, labels, maskf, inv_t, c_ce, c_kl, want_grad, divergence="forward_kl",
    beta=0.5) -> (ce, kl), or None."""
    if env_flag(TRITON_SWITCH) and (device.type == "cuda" or (device.type == "cpu" and env_flag("TRITON_INTERPRET"))):
        fn = _triton()
        if fn is not None:
            return fn
    if device.type == "cpu":
        fn = native.get()
        return None if fn is None else functools.partial(native.rowstep, fn)
    return None


def describe(device) -> str:
    """Which row step pick(device) runs, in words (benchmarks print it)."""
    fn = pick(device)
    if fn is None:
        if device.type == "cpu":
            return native.status()
        return "eager torch" + ("" if env_flag(TRITON_SWITCH) else f" ({TRITON_SWITCH} not set)")
    if isinstance(fn, functools.partial):
        return "native"
    return "triton" + (" (interpreted)" if device.type == "cpu" else "")
