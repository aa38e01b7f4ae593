"""The native CPU row step (kernels/_rowstep.c): built at first use, loaded with ctypes.

One call does, for a float32 chunk of student (and teacher) logits, what chunk_step +
chunk_grad do in ~20 eager torch passes: per-row CE, divergence and the gradient written over
the student block, in three passes per row (four for "jsd") of which all but the first find
the row in the L2 cache (`python -m kernels.bench` compares it with the eager step: the row
"same, eager torch chunk step").

The source is plain C without torch headers, so building it takes about a second with the
system C compiler (`$CC`, else `cc`). It is compiled with -march=native, so the cached library
is keyed by the source, the flags, the compiler and this CPU's feature flags (a home directory
shared by different machines gets one library per CPU kind). The cache is
$SEQ2SEQ_DISTILL_CACHE/kernels, else ~/.cache/seq2seq-distill/kernels; a build is written to
a temporary name and renamed, so ranks starting together cannot load a half-written file.

When there is no compiler, the build fails, or SEQ2SEQ_DISTILL_NATIVE=0 is set, the losses use
the eager torch path: same results within float rounding, slower. `status()` says which runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ._core import DIVERGENCE_CODE, rowstep_io
from .switches import env_flag

log = logging.getLogger("kernels.native")

SOURCE = Path(__file__).with_name("_rowstep.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
         "-fPIC", "-shared", "-pthread"]
ENV_SWITCH = "SEQ2SEQ_DISTILL_NATIVE"

_lib = None
_sparse = None
_reason = "not loaded yet"
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("SEQ2SEQ_DISTILL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "seq2seq-distill"
    return base / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    out = cache_dir() / f"rowstep-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rowstep-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{cc} exited {proc.returncode}: {last[:200]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    global _lib, _sparse, _reason, _tried
    _tried = True
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found ($CC, cc, gcc, clang)"
        return
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        fn = lib.distill_rowstep
        sparse = lib.distill_sparse_rowstep
    except Exception as e:  # any build or load failure means: use the eager path
        _reason = f"build or load failed: {type(e).__name__}: {e}"
        log.warning("native loss kernel unavailable (%s); using the eager torch path (same results, slower)", _reason)
        return
    P, I64, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    fn.argtypes = [P, P, P, P, P, P, I64, I64, I64, F, F, F, ctypes.c_int, ctypes.c_int, ctypes.c_double,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    sparse.argtypes = [P, P, P, P, P, P, P, P, I64, I64, I64, I64, F, F, F, ctypes.c_int, ctypes.c_int]
    sparse.restype = ctypes.c_int
    _lib, _sparse = fn, sparse
    _reason = "native"


def enabled() -> bool:
    return env_flag(ENV_SWITCH, default=True)


def get():
    """The loaded C function, or None (eager path) when switched off or unavailable."""
    if not enabled():
        return None
    if not _tried:
        _load()
    return _lib


def get_sparse():
    """The loaded C function of the sparse loss's forward-KL row step, or None (torch path)."""
    if not enabled():
        return None
    if not _tried:
        _load()
    return _sparse


def status() -> str:
    """'native', or why the eager torch path runs."""
    if not enabled():
        return f"eager ({ENV_SWITCH}=0)"
    get()
    return "native" if _lib is not None else f"eager ({_reason})"


def rowstep(fn, s, t, labels, maskf, inv_t, c_ce, c_kl, want_grad, divergence="forward_kl", beta=0.5):
    """Per-row ce and kl (the divergence D), (r,) float32, for the chunk s (and teacher t, or
    None). Overwrites t; with want_grad writes d loss / d s over s. labels: (r,) integers (taken
    as int64) with ignored positions already replaced by a valid index, or None (no CE); a label
    outside [0, V) is a ValueError. maskf: (r,) float32.
    divergence, beta: as kernels._core.check_divergence returns them."""
    r, vocab = s.shape
    ce, kl, labels, maskf = rowstep_io(s, t, labels, maskf, "native")
    if s.device.type != "cpu":
        raise ValueError(f"native rowstep: CPU blocks only, got {s.device}")
    # The C code reads s[label] through raw pointers: an index outside the row would read (and,
    # for the gradient, write) another row's memory or beyond the block. The callers check the
    # labels too; this is the last check before the pointers, and it costs one pass over r values.
    if labels is not None and r and bool(((labels < 0) | (labels >= vocab)).any()):
        bad = labels[(labels < 0) | (labels >= vocab)][0].item()
        raise ValueError(f"native rowstep: label {bad} is outside [0, {vocab})")
    rc = fn(s.data_ptr(), None if t is None else t.data_ptr(),
            None if labels is None else labels.data_ptr(), maskf.data_ptr(), ce.data_ptr(),
            kl.data_ptr(), r, vocab, s.stride(0), float(inv_t), float(c_ce), float(c_kl),
            1 if want_grad else 0, DIVERGENCE_CODE[divergence], float(beta), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("native rowstep: could not allocate a scratch row")
    return ce, kl


def sparse_rowstep(fn, s, ids, p, m_t, labels, maskf, inv_t, c_ce, c_kl, want_grad):
    """The sparse loss's forward KL for one block (kernels/sparse.py; the C comment above
    distill_sparse_rowstep has the math): per-row ce and kl, (r,) float32; with want_grad the
    gradient d loss / d s written over s. ids (r, K) int64 in [0, V) (checked by the caller),
    p (r, K) float32 teacher weights at T, m_t (r,) float32 tail masses, labels (r,) valid
    indices, maskf (r,) float32."""
    r, vocab = s.shape
    ce, kl, labels, maskf = rowstep_io(s, None, labels, maskf, "native sparse")
    if s.device.type != "cpu":
        raise ValueError(f"native sparse rowstep: CPU blocks only, got {s.device}")
    k = ids.shape[1]
    ids = ids.to(torch.int64).contiguous()
    p = p.to(torch.float32).contiguous()
    m_t = m_t.reshape(-1).to(torch.float32).contiguous()
    if ids.shape != (r, k) or p.shape != (r, k) or m_t.numel() != r:
        raise ValueError(f"native sparse rowstep: {r} rows need ({r}, K) ids and weights and {r} tail masses")
    # raw pointers below: an index outside the row would touch another row's memory
    if r and (bool(((labels < 0) | (labels >= vocab)).any()) or (k and bool(((ids < 0) | (ids >= vocab)).any()))):
        raise ValueError(f"native sparse rowstep: a label or teacher id is outside [0, {vocab})")
    rc = fn(s.data_ptr(), ids.data_ptr(), p.data_ptr(), m_t.data_ptr(), labels.data_ptr(), maskf.data_ptr(),
            ce.data_ptr(), kl.data_ptr(), r, vocab, s.stride(0), k, float(inv_t), float(c_ce), float(c_kl),
            1 if want_grad else 0, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("native sparse rowstep: could not allocate a scratch row")
    return ce, kl
