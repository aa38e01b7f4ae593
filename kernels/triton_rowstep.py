"""The row step as a Triton kernel, for CUDA (opt-in: SEQ2SEQ_DISTILL_TRITON=1).

Same contract as kernels/native.py's rowstep: for a float32 chunk of student logits s (and
teacher logits t) it returns per-row CE and KL and, when asked, writes d loss / d s over s.
One program per row, two sweeps over it: the first keeps running maxima and rescaled sums
(online softmax, as in FlashAttention), so the row is read once for all the statistics; the
second writes the gradient. Full-vocabulary probabilities never exist, not even per row.

Status: exact against the eager torch step under Triton's interpreter (TRITON_INTERPRET=1: every
test in tests/kernels runs on it too, on the CPU); its speed on a GPU has not been measured, which
is why it is opt-in. Without it, CUDA tensors use the eager torch row step.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._core import rowstep_io


@triton.jit
def _rowstep_kernel(S, T, LAB, MASK, CE, KL, V, ld, inv_t, c_ce, c_kl,
                    HAS_T: tl.constexpr, HAS_LAB: tl.constexpr, WANT_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * ld
    t_row = T + row * ld
    # Lanes past the row's end load a finite "minus infinity": below any logit, exp() of it
    # is 0, and (t - s) between two of them is 0, not NaN.
    neg_inf = -3.0e38
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_q = tl.zeros((), tl.float32)
    z_1 = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    # sweep 1: running maxima and sums rescaled whenever a maximum grows
    for k0 in range(0, V, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        inside = offs < V
        s = tl.load(s_row + offs, mask=inside, other=neg_inf)
        new_ms = tl.maximum(m_s, tl.max(s, 0))
        e_q = tl.where(inside, tl.exp((s - new_ms) * inv_t), 0.0)
        z_q = z_q * tl.exp((m_s - new_ms) * inv_t) + tl.sum(e_q, 0)
        if HAS_LAB:
            z_1 = z_1 * tl.exp(m_s - new_ms) + tl.sum(tl.where(inside, tl.exp(s - new_ms), 0.0), 0)
        m_s = new_ms
        if HAS_T:
            t = tl.load(t_row + offs, mask=inside, other=neg_inf)
            new_mt = tl.maximum(m_t, tl.max(t, 0))
            e_t = tl.where(inside, tl.exp((t - new_mt) * inv_t), 0.0)
            scale = tl.exp((m_t - new_mt) * inv_t)
            z_t = z_t * scale + tl.sum(e_t, 0)
            cross = cross * scale + tl.sum(tl.where(inside, e_t * (t - s), 0.0), 0)
            m_t = new_mt
    lse_q = m_s * inv_t + tl.log(z_q)
    if HAS_T:
        tl.store(KL + row, cross * inv_t / z_t + lse_q - (m_t * inv_t + tl.log(z_t)))
    else:
        tl.store(KL + row, 0.0)
    if HAS_LAB:
        lab = tl.load(LAB + row)
        tl.store(CE + row, m_s + tl.log(z_1) - tl.load(s_row + lab))
    else:
        lab = -1
        tl.store(CE + row, 0.0)
    if WANT_GRAD:
        mk = tl.load(MASK + row)
        kq = mk * c_kl / z_q
        k1 = tl.zeros((), tl.float32)
        kt = tl.zeros((), tl.float32)
        if HAS_LAB:
            k1 = mk * c_ce / z_1
        if HAS_T:
            kt = mk * c_kl / z_t
        # sweep 2: the gradient over s; the one-hot term is folded in, so no second write
        for k0 in range(0, V, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            inside = offs < V
            s = tl.load(s_row + offs, mask=inside, other=0.0)
            g = kq * tl.exp((s - m_s) * inv_t)
            if HAS_LAB:
                g += k1 * tl.exp(s - m_s) - tl.where(offs == lab, mk * c_ce, 0.0)
            if HAS_T:
                t = tl.load(t_row + offs, mask=inside, other=0.0)
                g -= kt * tl.exp((t - m_t) * inv_t)
            tl.store(s_row + offs, g, mask=inside)


def rowstep(s, t, labels, maskf, inv_t, c_ce, c_kl, want_grad, block=None):
    """Per-row (ce, kl), (r,) float32, of the chunk s (and t or None); with want_grad writes the
    gradient over s. Arguments as kernels.native.rowstep; t is only read here."""
    r, vocab = s.shape
    ce, kl, labels, maskf = rowstep_io(s, t, labels, maskf, "triton")
    if r == 0:
        return ce, kl
    block = block or min(4096, triton.next_power_of_2(vocab))
    _rowstep_kernel[(r,)](
        s, s if t is None else t, maskf if labels is None else labels, maskf, ce, kl, vocab,
        s.stride(0), float(inv_t), float(c_ce), float(c_kl), HAS_T=t is not None,
        HAS_LAB=labels is not None, WANT_GRAD=bool(want_grad), BLOCK=block)
    return ce, kl
