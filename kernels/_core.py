"""The per-chunk math shared by the chunked KL and the fused linear distillation loss.

Everything here works on one block of rows (tokens) at a time, in float32, writing into
buffers the caller owns, so that a loop over chunks allocates nothing per step. Notation per
row: s = student logits, t = teacher logits, T = temperature,
    p = softmax(t / T)  (teacher),  q = softmax(s / T)  (student),  r = softmax(s)  (for CE),
and D, the divergence (`divergence`, as TRL's GKDTrainer.generalized_jsd_loss defines them):
    forward_kl  D = KL(p || q) = sum_v p_v (t_v - s_v) / T + lse(s / T) - lse(t / T)
                dD/d(s/T) = q - p
    reverse_kl  D = KL(q || p) = sum_v q_v (s_v - t_v) / T + lse(t / T) - lse(s / T)
                dD/d(s/T)_j = q_j (a_j - D),  a = log q - log p
    jsd         D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                dD/d(s/T)_j = (1 - beta) q_j (b_j - sum_v q_v b_v),  b = log q - log m
                (the terms from dm/ds cancel, since sum_v dm_v = 0)
The loss term is T^2 D, so d(T^2 D)/ds = T dD/d(s/T); d CE/ds = r - onehot(label). The T^2
factor keeps the soft-target gradient's scale independent of T (Hinton et al. 2015).
"""
from __future__ import annotations

import math
import operator

import torch

# chunked_kl_div: a chunk's float32 logits block is about this many bytes; there are no
# matmuls, so small cache-friendly blocks are best.
CHUNK_BYTES = 16 * 2**20
# fused_linear_distill_loss: each chunk streams the whole (V, H) lm_head through three matmuls,
# so small chunks are matmul-inefficient; blocks of up to ~100 MB each, split evenly (at 4096
# tokens x 50265 that is 8 chunks of 512 rows). The README ("The loss kernels") has the
# measurements behind this size.
FUSED_CHUNK_BYTES = 100 * 2**20
# backward: the float32 scratch through which a float16 input's gradient is scaled and rounded
# (kernels/_core.py, "Float16 gradients")
SCALE_PIECE_BYTES = 4 * 2**20


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# the divergence as the native and Triton row steps take it
DIVERGENCE_CODE = {name: i for i, name in enumerate(DIVERGENCES)}


def check_divergence(divergence: str, beta: float) -> tuple[str, float]:
    """Validate (divergence, beta) -> the divergence the row steps compute, and beta as a float.

    beta must be in [0, 1] whatever the divergence (it is only used by "jsd"). As in TRL's
    generalized_jsd_loss, "jsd" with beta == 0 is the forward KL and with beta == 1 the reverse
    KL (the mixture formula would give 0 there)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}") from None
    if not 0.0 <= b <= 1.0:  # also refuses NaN
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if divergence == "jsd" and b in (0.0, 1.0):
        return ("forward_kl" if b == 0.0 else "reverse_kl"), b
    return divergence, b


def sparse_repeats(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: the places of a sparse teacher's rows that only pad them (kernels/sparse.py):
    log-probability -inf and an id listed at another place that has mass, or at an earlier place.
    The coarsened distributions leave these places out, so padding changes no divergence."""
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (N, K, K): place i and place j list one id
    k = ids.shape[1]
    other = ~torch.eye(k, dtype=torch.bool, device=ids.device)
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # j < i
    counts = same & other & ((logprobs > float("-inf")).unsqueeze(1) | earlier)
    return (logprobs == float("-inf")) & counts.any(2)


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


def index_labels(labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
    """Labels of any integer dtype -> flat, contiguous int64: the row steps index rows with the
    labels through a raw int64 pointer (native C), so nothing of another width may reach them.
    Float, complex and bool tensors are refused (TypeError): a class index is an integer."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of integer class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {labels.dtype}; "
                        f"convert them with {name}.long()")
    return labels.reshape(-1).to(torch.int64).contiguous()


def check_ignore_index(ignore_index) -> int:
    """ignore_index as a Python int that an int64 label can equal (TypeError / ValueError otherwise)."""
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index!r}")
    return value


def rowstep_io(s, t, labels, maskf, who: str):
    """What every row step (kernels/rowsteps.py) does before its kernel: check that the blocks
    are what the kernels index into (float32 rows of unit stride, the teacher's in the student's
    layout, one label and one mask value per row), allocate the (r,) float32 ce and kl outputs on
    the block's device, and flatten labels (to int64) and mask to contiguous (r,).
    -> (ce, kl, labels, maskf)."""
    r, vocab = s.shape
    if s.dtype != torch.float32 or (vocab > 1 and s.stride(1) != 1) or (r > 1 and s.stride(0) < vocab):
        raise ValueError(f"{who} rowstep: the student block must be float32 rows of unit stride, got "
                         f"{s.dtype} with strides {s.stride()}")
    if t is not None and (t.shape != s.shape or t.stride() != s.stride() or t.dtype != torch.float32):
        raise ValueError(f"{who} rowstep: student and teacher blocks must have the same layout")
    ce = torch.empty(r, dtype=torch.float32, device=s.device)
    kl = torch.empty(r, dtype=torch.float32, device=s.device)
    labels = None if labels is None else index_labels(labels)
    maskf = maskf.reshape(-1).to(torch.float32).contiguous()
    if maskf.numel() != r or (labels is not None and labels.numel() != r):
        raise ValueError(f"{who} rowstep: {r} rows need {r} labels and mask values, got "
                         f"{None if labels is None else labels.numel()} and {maskf.numel()}")
    return ce, kl, labels, maskf


# Float16 gradients. Both losses compute their gradient in the forward pass, but the loss scale
# of fp16 training (DeepSpeed's dynamic scale, 2^15, 2^16, ...) only arrives in backward, as the
# incoming gradient. Rounded to float16 before that, entries of order alpha / n * p (1e-9 and
# below) flush to zero or keep a few bits, and a scale of 2^16 is inf in float16 (whose largest
# number is 65504). So the gradient of a float16 input is kept as float16 numbers with one
# power-of-two scale per row (float32, 4 bytes a row): scale_rows_ puts each row's largest
# |entry| into [2^14, 2^15), and backward multiplies by (incoming gradient / that scale) in
# float32 and rounds to float16 once more. An entry that is a normal float16 number once scaled
# was then stored at >= 2^-16 whenever its row's largest entry, scaled, stays below 2^16 (else
# that one is inf anyway): two roundings, a relative error below 0.25%. Same bytes as a
# float16 gradient rounded in the forward pass. The fused loss also runs its matmuls in float32
# for float16 operands (float16 logits would put a rounding error of up to 2^-11 |logit| into
# every probability). bfloat16 has float32's exponent range, so its gradients are rounded in the
# forward pass as before, and float32 / float64 inputs keep their gradients in their own dtype.
def scale_rows_(g):
    """Scale each row of the float32 block g (r, C) in place by 2^k, k = 14 - floor(log2 of its
    largest |entry|) (within [-100, 100]; 0 for a row that is all zero or not finite), and return
    2^-k per row, (r, 1) float32: g rounded to float16 afterwards loses nothing to the range."""
    m = torch.maximum(g.amax(1, keepdim=True), g.amin(1, keepdim=True).neg_())  # max |g|, no |g| block
    ok = torch.isfinite(m) & (m > 0)
    k = torch.where(ok, 14.0 - torch.floor(torch.log2(torch.where(ok, m, torch.ones_like(m)))), 0.0)
    k.clamp_(-100.0, 100.0)
    g.mul_(torch.exp2(k))
    return torch.exp2(k.neg_())


def scale_saved_grad(saved, grad_out, row_scale=None):
    """The gradient to return: saved * grad_out (grad_out: the 0-dim incoming gradient). With
    row_scale (a float16 gradient kept by scale_rows_: saved (r, C) and row_scale (r, 1)) the
    product saved * (row_scale * grad_out) is taken in float32 and rounded to float16, piece by
    piece through one float32 scratch of at most SCALE_PIECE_BYTES. Otherwise grad_out is usually
    1 (`loss.backward()`) and saved is returned as it is; any other value scales it out of place,
    so that a retained graph can be differentiated twice without compounding."""
    if saved is None:
        return None
    if row_scale is not None:
        rows = saved.view(row_scale.shape[0], -1)
        out = torch.empty_like(saved)
        out_rows = out.view(rows.shape)
        factor = row_scale * grad_out.to(torch.float32)
        step = max(1, min(rows.shape[0], SCALE_PIECE_BYTES // (4 * max(rows.shape[1], 1))))
        scratch = torch.empty(step, rows.shape[1], dtype=torch.float32, device=saved.device)
        for i in range(0, rows.shape[0], step):
            j = min(i + step, rows.shape[0])
            piece = scratch[: j - i]
            # copy, multiply, copy: a mixed-dtype mul would make temporaries
            out_rows[i:j].copy_(piece.copy_(rows[i:j]).mul_(factor[i:j]))
        return out
    if grad_out.ne(1).item():
        return saved * grad_out.to(saved.dtype)
    return saved


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


def chunk_step(s, t, u, inv_t, labels=None, divergence="forward_kl", beta=0.5, w=None):
    """Per-row CE and divergence for one chunk; leaves in the buffers what chunk_grad needs.

    s, t, u: float32 (r, V) blocks; s holds student logits, t teacher logits, u is scratch; w is
    a fourth scratch block, used by "jsd" only (allocated here when not given). labels: (r, 1)
    int64 with ignored positions already replaced by a valid index, or None (no CE wanted).
    divergence, beta: as check_divergence returns them. Returns a dict of (r, 1) float32
    tensors: "kl" (per-row divergence D, without T^2), "ce" (when labels given), and what the
    gradient needs. For the forward KL, afterwards:
      u = exp((t - max t) / T)                        (teacher, unnormalised; sum "z_t")
      q-buffer = exp((s - max s) / T)                  (student at T;     sum "z_q")
      s = exp(s - max s)  when a separate CE softmax is needed (T != 1; sum "z_1")
    The q-buffer is s when T == 1 or no CE is wanted (one exponential serves both), else t.
    """
    m_s = s.amax(1, keepdim=True)
    m_t = t.amax(1, keepdim=True)
    out = {"div": divergence}
    if labels is not None:
        out["s_lab"] = s.gather(1, labels)
    if divergence == "jsd":
        lse_q = _jsd_step(s, t, u, w if w is not None else torch.empty_like(s), inv_t, labels, beta,
                          m_s, m_t, out)
    else:
        step = _reverse_step if divergence == "reverse_kl" else _forward_step
        lse_q = step(s, t, u, inv_t, labels, m_s, m_t, out)
    if labels is not None:
        if inv_t == 1.0:
            out["z_1"], lse_1 = out["z_q"], lse_q
        else:
            # the steps leave exp(s - max s) (the separate T = 1 softmax) in s, or its sum
            if "z_1" not in out:
                out["z_1"] = s.sum(1, keepdim=True)
            lse_1 = m_s + out["z_1"].log()
        out["ce"] = lse_1 - out.pop("s_lab")
    return out


def _exp_shifted(x, m, inv_t, out):
    """out = exp((x - m) * inv_t); out may be x."""
    torch.sub(x, m, out=out)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out.exp_()


def _forward_step(s, t, u, inv_t, labels, m_s, m_t, out):
    # Teacher: u = exp((t - m_t) / T), the max-shift keeps +-1e4 logits finite.
    _exp_shifted(t, m_t, inv_t, u)
    z_t = u.sum(1, keepdim=True)
    # sum_v p_v (t_v - s_v) / T, in t (no longer needed): in place, it allocates nothing.
    # u keeps the teacher's numerator for chunk_grad.
    cross = t.sub_(s).mul_(u).sum(1, keepdim=True).mul_(inv_t).div_(z_t)
    one_exp = inv_t == 1.0 or labels is None
    q = s if one_exp else t
    _exp_shifted(s, m_s, inv_t, q)
    if not one_exp:
        s.sub_(m_s).exp_()  # the T = 1 softmax numerator, for CE
    z_q = q.sum(1, keepdim=True)
    lse_q = m_s * inv_t + z_q.log()
    out["kl"] = cross + lse_q - (m_t * inv_t + z_t.log())
    out.update(z_t=z_t, z_q=z_q, q=q)
    return lse_q


def _reverse_step(s, t, u, inv_t, labels, m_s, m_t, out):
    # With d = s - t: log q - log p = d / T - lse(s / T) + lse(t / T), so
    # D = E_q[d] / T - lse(s / T) + lse(t / T) and a_j - D = (d_j - E_q[d]) / T.
    z_t = _exp_shifted(t, m_t, inv_t, u).sum(1, keepdim=True)
    t.sub_(s)  # t = -d, kept for the gradient
    out["sep_ce"] = labels is not None and inv_t != 1.0
    if not out["sep_ce"]:
        q = _exp_shifted(s, m_s, inv_t, s)  # one exponential serves q and (T == 1) the CE
        neg_d_sum = torch.mul(q, t, out=u).sum(1, keepdim=True)
    else:
        # q in s, the CE's exp(s - max s) in u; q's exponential is taken twice so that u can
        # hold the products q (-d) before
        neg_d_sum = _exp_shifted(s, m_s, inv_t, u).mul_(t).sum(1, keepdim=True)
        out["z_1"] = torch.sub(s, m_s, out=u).exp_().sum(1, keepdim=True)
        q = _exp_shifted(s, m_s, inv_t, s)
    z_q = q.sum(1, keepdim=True)
    neg_mean_d = neg_d_sum / z_q  # E_q[t - s]
    lse_q = m_s * inv_t + z_q.log()
    out["kl"] = -inv_t * neg_mean_d - lse_q + (m_t * inv_t + z_t.log())
    out.update(z_q=z_q, q=q, neg_d=t, neg_mean_d=neg_mean_d, inv_t=inv_t)
    return lse_q


def _jsd_step(s, t, u, w, inv_t, labels, beta, m_s, m_t, out):
    # With delta = log(beta p) - log((1 - beta) q), taken from t - s in one rounding:
    #   log(p / m) = -log beta - softplus(-delta),  b = log(q / m) = -log(1 - beta) - softplus(delta),
    # and b - E_q[b] = E_q[sp] - sp with sp = softplus(delta), small where a token carries most
    # of q, so the gradient keeps its precision. softplus(x) = logaddexp(x, 0), without overflow.
    log_b, log_1b = math.log(beta), math.log1p(-beta)
    z_t = _exp_shifted(t, m_t, inv_t, u).sum(1, keepdim=True)
    z_q = _exp_shifted(s, m_s, inv_t, u).sum(1, keepdim=True)
    lz_t, lz_q = z_t.log(), z_q.log()
    zero = u.new_zeros(())
    torch.sub(t, s, out=u).mul_(inv_t).add_((m_s - m_t) * inv_t + lz_q - lz_t + (log_b - log_1b))  # u = delta
    torch.logaddexp(u.neg_(), zero, out=w).neg_().sub_(log_b)  # w = log(p / m)
    u.neg_()
    d_p = _exp_shifted(t, m_t, inv_t, t).div_(z_t).mul_(w).sum(1, keepdim=True)  # KL(p || m)
    torch.logaddexp(u, zero, out=w)                             # w = sp
    q = _exp_shifted(s, m_s, inv_t, u).div_(z_q)                # u = q
    mean_sp = torch.mul(q, w, out=t).sum(1, keepdim=True)       # E_q[sp]
    d_q = -log_1b * q.sum(1, keepdim=True) - mean_sp            # KL(q || m)
    out["kl"] = beta * d_p + (1.0 - beta) * d_q
    w.sub_(mean_sp).mul_(q).mul_(beta - 1.0)                    # w = (1 - beta) q (b - E_q[b])
    out["sep_ce"] = labels is not None and inv_t != 1.0
    if out["sep_ce"]:
        s.sub_(m_s).exp_()  # the T = 1 softmax numerator, for CE
    out.update(z_q=z_q, q=q, g_div=w)
    return m_s * inv_t + lz_q


def chunk_grad(s, u, st, maskf, c_ce, c_kl, labels=None):
    """Turn the buffers left by chunk_step into d loss / d s, written into s (in place).

    G = c_ce * (r - onehot) + c_kl * dD/d(s/T) on unmasked rows, 0 on masked ones, where
    c_ce = alpha / n and c_kl = (1 - alpha) * T / n (chunked_kl_div: c_ce = 0, c_kl = T / n).
    """
    kl_coef = maskf * c_kl
    div = st["div"]
    if div == "forward_kl":
        q, z_q, z_t = st["q"], st["z_q"], st["z_t"]
        if q is s:
            s.mul_((maskf * c_ce + kl_coef) / z_q)
        else:
            s.mul_(maskf * c_ce / st["z_1"])
            s.addcmul_(q, kl_coef / z_q)
        s.addcmul_(u, -kl_coef / z_t)
    elif div == "reverse_kl":
        # dD/d(s/T) = q (d - E_q[d]) / T = q (E_q[-d] - (-d)) / T
        z_q, h = st["z_q"], st["neg_d"]  # q is in s
        h.sub_(st["neg_mean_d"]).mul_(-kl_coef * st["inv_t"] / z_q)  # h = kl_coef (d - E_q[d]) / (T z_q)
        if st["sep_ce"]:
            s.mul_(h).addcmul_(u, maskf * c_ce / st["z_1"])  # u = exp(s - max s)
        else:
            s.mul_(h.add_(maskf * c_ce / z_q))  # T == 1: r = q
    else:
        g_div = st["g_div"]
        if st["sep_ce"]:          # separate T = 1 softmax in s
            s.mul_(maskf * c_ce / st["z_1"])
            s.addcmul_(g_div, kl_coef)
        elif labels is not None:  # T == 1: r = q
            torch.mul(st["q"], maskf * c_ce, out=s)
            s.addcmul_(g_div, kl_coef)
        else:
            torch.mul(g_div, kl_coef, out=s)
    if labels is not None and c_ce != 0.0:
        s.scatter_add_(1, labels, maskf * -c_ce)
    return s
