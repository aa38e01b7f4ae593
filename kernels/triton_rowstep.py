"""The row step as a Triton kernel, for CUDA (opt-in: SEQ2SEQ_DISTILL_TRITON=1).

Same contract as kernels/native.py's rowstep: for a float32 chunk of student logits s (and
teacher logits t) it returns per-row CE and divergence and, when asked, writes d loss / d s
over s. One program per row. The first sweep keeps running maxima and rescaled sums (online
softmax, as in FlashAttention), so the row is read once for all the statistics and, for the
forward and reverse KL, the cross term; the last sweep writes the gradient. "jsd" needs one
sweep more between them: log p and log q (hence log m) need the row's final sums, so a second
sweep accumulates both KL terms. Full-vocabulary probabilities never exist, not even per row.
The math is kernels/_core.py's (its docstring has the formulas).

Status: exact against the eager torch step under Triton's interpreter (TRITON_INTERPRET=1: every
test in tests/kernels runs on it too, on the CPU); its speed on a GPU has not been measured, which
is why it is opt-in. Without it, CUDA tensors use the eager torch row step.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ._core import DIVERGENCE_CODE, rowstep_io


@triton.jit
def _softplus_pair(delta):
    """(softplus(delta), softplus(-delta)) = (log(1 + e^delta), log(1 + e^-delta)), from one
    log1p(exp(-|delta|)); log1p by Kahan's (u = 1 + e, log(u) e / (u - 1)) so that a tiny e
    keeps its precision."""
    e = tl.exp(-tl.abs(delta))
    u = 1.0 + e
    l = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.maximum(delta, 0.0) + l, tl.maximum(-delta, 0.0) + l


@triton.jit
def _rowstep_kernel(S, T, LAB, MASK, CE, KL, V, ld, inv_t, c_ce, c_kl, beta, log_b, log_1b,
                    HAS_T: tl.constexpr, HAS_LAB: tl.constexpr, WANT_GRAD: tl.constexpr,
                    DIV: tl.constexpr, BLOCK: tl.constexpr):
    # DIV: 0 forward_kl, 1 reverse_kl, 2 jsd (only with a teacher)
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
    # sweep 1: running maxima and sums rescaled whenever a maximum grows; the cross term is
    # sum e_t (t - s) (forward, on the teacher's scale) or sum e_q (s - t) (reverse, student's)
    for k0 in range(0, V, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        inside = offs < V
        s = tl.load(s_row + offs, mask=inside, other=neg_inf)
        new_ms = tl.maximum(m_s, tl.max(s, 0))
        e_q = tl.where(inside, tl.exp((s - new_ms) * inv_t), 0.0)
        scale_q = tl.exp((m_s - new_ms) * inv_t)
        z_q = z_q * scale_q + tl.sum(e_q, 0)
        if HAS_LAB:
            z_1 = z_1 * tl.exp(m_s - new_ms) + tl.sum(tl.where(inside, tl.exp(s - new_ms), 0.0), 0)
        m_s = new_ms
        if HAS_T:
            t = tl.load(t_row + offs, mask=inside, other=neg_inf)
            new_mt = tl.maximum(m_t, tl.max(t, 0))
            e_t = tl.where(inside, tl.exp((t - new_mt) * inv_t), 0.0)
            scale = tl.exp((m_t - new_mt) * inv_t)
            z_t = z_t * scale + tl.sum(e_t, 0)
            if DIV == 0:
                cross = cross * scale + tl.sum(tl.where(inside, e_t * (t - s), 0.0), 0)
            elif DIV == 1:
                cross = cross * scale_q + tl.sum(tl.where(inside, e_q * (s - t), 0.0), 0)
            m_t = new_mt
    lse_q = m_s * inv_t + tl.log(z_q)
    d_q = tl.zeros((), tl.float32)
    mean_sp = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)
    if HAS_T:
        lse_t = m_t * inv_t + tl.log(z_t)
        if DIV == 0:
            tl.store(KL + row, cross * inv_t / z_t + lse_q - lse_t)
        elif DIV == 1:
            tl.store(KL + row, cross * inv_t / z_q + lse_t - lse_q)
        else:
            # sweep 2 (jsd), kernels/_core.py's form: with delta = log(beta p) - log((1 - beta) q),
            # log(p / m) = -log beta - softplus(-delta), b = log(q / m) = -log(1 - beta) - sp,
            # sp = softplus(delta); b - E_q[b] = E_q[sp] - sp keeps its precision.
            c = (m_s - m_t) * inv_t + tl.log(z_q) - tl.log(z_t) + log_b - log_1b
            d_p = tl.zeros((), tl.float32)
            for k0 in range(0, V, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                inside = offs < V
                s = tl.load(s_row + offs, mask=inside, other=0.0)
                t = tl.load(t_row + offs, mask=inside, other=0.0)
                sp, sp_neg = _softplus_pair((t - s) * inv_t + c)
                q = tl.exp((s - m_s) * inv_t - tl.log(z_q))
                p = tl.exp((t - m_t) * inv_t - tl.log(z_t))
                d_p += tl.sum(tl.where(inside, p * (-log_b - sp_neg), 0.0), 0)
                d_q += tl.sum(tl.where(inside, q * (-log_1b - sp), 0.0), 0)
                mean_sp += tl.sum(tl.where(inside, q * sp, 0.0), 0)
            tl.store(KL + row, beta * d_p + (1.0 - beta) * d_q)
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
        mean_d = cross / z_q  # reverse: E_q[s - t]
        # last sweep: the gradient over s; the one-hot term is folded in, so no second write
        for k0 in range(0, V, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            inside = offs < V
            s = tl.load(s_row + offs, mask=inside, other=0.0)
            if HAS_T:
                t = tl.load(t_row + offs, mask=inside, other=0.0)
                if DIV == 1:    # q (s - t - E_q[s - t]) / T
                    g = kq * inv_t * tl.exp((s - m_s) * inv_t) * (s - t - mean_d)
                elif DIV == 2:  # (1 - beta) q (b - E_q[b]) = (1 - beta) q (E_q[sp] - sp)
                    sp, _ = _softplus_pair((t - s) * inv_t + c)
                    g = mk * c_kl * (1.0 - beta) * tl.exp((s - m_s) * inv_t - tl.log(z_q)) * (mean_sp - sp)
                else:           # q - p (the p term below)
                    g = kq * tl.exp((s - m_s) * inv_t)
            else:
                g = kq * tl.exp((s - m_s) * inv_t)
            if HAS_LAB:
                g += k1 * tl.exp(s - m_s) - tl.where(offs == lab, mk * c_ce, 0.0)
            if HAS_T:
                if DIV == 0:
                    g -= kt * tl.exp((t - m_t) * inv_t)
            tl.store(s_row + offs, g, mask=inside)


def rowstep(s, t, labels, maskf, inv_t, c_ce, c_kl, want_grad, divergence="forward_kl", beta=0.5,
            block=None):
    """Per-row (ce, kl), (r,) float32, of the chunk s (and t or None); with want_grad writes the
    gradient over s. Arguments as kernels.native.rowstep; t is only read here."""
    r, vocab = s.shape
    ce, kl, labels, maskf = rowstep_io(s, t, labels, maskf, "triton")
    if r == 0:
        return ce, kl
    block = block or min(4096, triton.next_power_of_2(vocab))
    beta = float(beta)
    # log(beta), log(1 - beta) are only used by "jsd" (0 < beta < 1); finite stand-ins otherwise
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1b = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    _rowstep_kernel[(r,)](
        s, s if t is None else t, maskf if labels is None else labels, maskf, ce, kl, vocab,
        s.stride(0), float(inv_t), float(c_ce), float(c_kl), beta, log_b, log_1b,
        HAS_T=t is not None, HAS_LAB=labels is not None, WANT_GRAD=bool(want_grad),
        DIV=DIVERGENCE_CODE[divergence], BLOCK=block)
    return ce, kl
