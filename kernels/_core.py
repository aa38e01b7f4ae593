"""The per-chunk math shared by the chunked KL and the fused linear distillation loss.

Everything here works on one block of rows (tokens) at a time, in float32, writing into
buffers the caller owns, so that a loop over chunks allocates nothing per step. Notation per
row: s = student logits, t = teacher logits, T = temperature,
    p = softmax(t / T)  (teacher),  q = softmax(s / T)  (student),  r = softmax(s)  (for CE),
    KL(p || q) = sum_v p_v (t_v - s_v) / T + lse(s / T) - lse(t / T)
    d(T^2 KL)/ds = T (q - p)          d CE/ds = r - onehot(label)
The T^2 factor keeps the soft-target gradient's scale independent of T (Hinton et al. 2015).
"""
from __future__ import annotations

import torch

# chunked_kl_div: a chunk's float32 logits block is about this many bytes; there are no
# matmuls, so small cache-friendly blocks are best.
CHUNK_BYTES = 16 * 2**20
# fused_linear_distill_loss: each chunk streams the whole (V, H) lm_head through three matmuls,
# so small chunks are matmul-inefficient; blocks of up to ~100 MB each, split evenly (at 4096
# tokens x 50265 that is 8 chunks of 512 rows). The README ("The loss kernels") has the
# measurements behind this size.
FUSED_CHUNK_BYTES = 100 * 2**20


def default_chunk_size(vocab: int, rows: int) -> int:
    """Rows per chunk so that one float32 (rows x vocab) block is about CHUNK_BYTES."""
    return max(1, min(rows, CHUNK_BYTES // (4 * max(vocab, 1))))


def default_fused_chunk_size(vocab: int, rows: int) -> int:
    """Rows per chunk for the fused loss: blocks of at most FUSED_CHUNK_BYTES, all chunks the
    same size (the last one at most a few rows shorter)."""
    cap = max(1, FUSED_CHUNK_BYTES // (4 * max(vocab, 1)))
    rows = max(rows, 1)
    n_chunks = -(-rows // cap)
    return -(-rows // n_chunks)


def rowstep_io(s, t, labels, maskf, who: str):
    """What every row step (kernels/rowsteps.py) does before its kernel: check that the teacher
    block shares the student block's layout, allocate the (r,) float32 ce and kl outputs on the
    block's device, and flatten labels and mask to contiguous (r,). -> (ce, kl, labels, maskf)."""
    r = s.shape[0]
    if t is not None and (t.shape != s.shape or t.stride(0) != s.stride(0)):
        raise ValueError(f"{who} rowstep: student and teacher blocks must have the same layout")
    ce = torch.empty(r, dtype=torch.float32, device=s.device)
    kl = torch.empty(r, dtype=torch.float32, device=s.device)
    labels = None if labels is None else labels.reshape(-1).contiguous()
    return ce, kl, labels, maskf.reshape(-1).contiguous()


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def flatten_rows(x: torch.Tensor, name: str, last: int | None = None) -> torch.Tensor:
    """(B, T, D) or (N, D) -> contiguous (N, D)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, D) or (B, T, D), got shape {tuple(x.shape)}")
    if last is not None and x.shape[-1] != last:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {last}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def chunk_step(s, t, u, inv_t, labels=None, row_ce=None, row_kl=None):
    """Per-row CE and KL for one chunk; leaves the unnormalised softmaxes in the buffers.

    s, t, u: float32 (r, V) blocks; s holds student logits, t teacher logits, u is scratch.
    labels: (r, 1) int64 with ignored positions already replaced by a valid index, or None
    (no CE wanted). Returns a dict of (r, 1) float32 tensors: "kl" (per-row KL), "ce" (when
    labels given), and the normalisers the gradient needs. Afterwards:
      u = exp((t - max t) / T)                        (teacher, unnormalised; sum "z_t")
      q-buffer = exp((s - max s) / T)                  (student at T;     sum "z_q")
      s = exp(s - max s)  when a separate CE softmax is needed (T != 1; sum "z_1")
    The q-buffer is s when T == 1 or no CE is wanted (one exponential serves both), else t.
    """
    m_s = s.amax(1, keepdim=True)
    m_t = t.amax(1, keepdim=True)
    out = {}
    if labels is not None:
        out["s_lab"] = s.gather(1, labels)
    # Teacher: u = exp((t - m_t) / T), the max-shift keeps +-1e4 logits finite.
    torch.sub(t, m_t, out=u)
    if inv_t != 1.0:
        u.mul_(inv_t)
    u.exp_()
    z_t = u.sum(1, keepdim=True)
    # sum_v p_v (t_v - s_v) / T, in t (no longer needed): in place, it allocates nothing.
    cross = t.sub_(s).mul_(u).sum(1, keepdim=True).mul_(inv_t).div_(z_t)
    one_exp = inv_t == 1.0 or labels is None
    q = s if one_exp else t
    if one_exp:
        s.sub_(m_s)
        if inv_t != 1.0:
            s.mul_(inv_t)
        s.exp_()
    else:
        torch.sub(s, m_s, out=t).mul_(inv_t).exp_()
    z_q = q.sum(1, keepdim=True)
    lse_q = m_s * inv_t + z_q.log()
    out["kl"] = cross + lse_q - (m_t * inv_t + z_t.log())
    out.update(z_t=z_t, z_q=z_q, q=q)
    if labels is not None:
        if one_exp:
            out["z_1"], lse_1 = z_q, lse_q
        else:
            s.sub_(m_s).exp_()
            out["z_1"] = s.sum(1, keepdim=True)
            lse_1 = m_s + out["z_1"].log()
        out["ce"] = lse_1 - out.pop("s_lab")
    return out


def chunk_grad(s, u, st, maskf, c_ce, c_kl, labels=None):
    """Turn the buffers left by chunk_step into d loss / d s, written into s (in place).

    G = c_ce * (r - onehot) + c_kl * (q - p) on unmasked rows, 0 on masked ones, where
    c_ce = alpha / n and c_kl = (1 - alpha) * T / n (chunked_kl_div: c_ce = 0, c_kl = T / n).
    """
    q, z_q, z_t = st["q"], st["z_q"], st["z_t"]
    kl_coef = maskf * c_kl
    if q is s:
        s.mul_((maskf * c_ce + kl_coef) / z_q)
    else:
        s.mul_(maskf * c_ce / st["z_1"])
        s.addcmul_(q, kl_coef / z_q)
    s.addcmul_(u, -kl_coef / z_t)
    if labels is not None and c_ce != 0.0:
        s.scatter_add_(1, labels, maskf * -c_ce)
    return s
