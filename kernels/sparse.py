"""fused_linear_sparse_distill_loss: distillation from a sparse teacher (K token ids per target
token and their log-probabilities, as a teacher cache stores them), lm_head fused in.

The objective ("top-k with a tail bucket"). For each unmasked target token the teacher gives a
support S of K distinct token ids with log-probabilities log p_i at T = 1, and so a tail mass
m_t = 1 - sum_i p_i (clamped at 0) for every other token. With temperature T:

    p~_i = (1 - m_t) * softmax_i(log p_i / T)        the teacher on its support (its tail kept)
    q    = softmax(z / T)                             the student (z: its logits)
    q_i  = q at id k_i;  m_s = 1 - sum_i q_i          the student's mass off the support
    D    = sum_i p~_i (log p~_i - log q_i) + m_t (log m_t - log m_s)        (0 log 0 = 0)
    loss = alpha * CE(z, label) + (1 - alpha) * T^2 * D,   both means over unmasked tokens.

D is the KL divergence between the two distributions coarsened to K + 1 outcomes (the support
ids and "anything else"): >= 0, 0 when the student matches the teacher on the support and in
the tail mass, and exactly the full forward KL(teacher || student) when the support is the whole
vocabulary. At T = 1, p~ is the cached teacher itself. The gradient wrt z / T is q_v - p~_v on
the support and q_v (1 - m_t / m_s) off it: the tail bucket pushes the student's off-support mass
towards the teacher's without saying where inside it. m_s is computed as a log-sum-exp over the
off-support logits, never as 1 minus a sum close to 1.

The tail mass m_t is 1 - sum_i p_i by default; `teacher_tail_logmass` (log m_t per token) gives it
exactly instead: a cache stores it computed from the teacher's full logits, where 1 - sum_i p_i of
rounded fp16 log-probabilities is off by ~1e-4. -inf there means no tail: the support weights are
then the whole target (a sampled sparse teacher, distill/teacher_cache.py: softmax(log p_i / T)
over the support, summing to 1).

Other divergences (`divergence`, as the fused loss's, TRL's definitions) are taken between the
same two coarsened distributions P = (p~, m_t) and Q = (q_S, m_s) over the K + 1 outcomes:
    reverse_kl  D = KL(Q || P) = sum_j Q_j (log Q_j - log P_j)     (infinite where P_j = 0 < Q_j,
                                                                    e.g. a cache without a tail)
    jsd         D = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                (beta 0 / 1: the forward / reverse KL, as in TRL)
Both have the gradient d D / d (z_v / T) = q_v (G_j(v) - sum_j Q_j G_j), G_j = d D / d Q_j:
log(Q_j / P_j) + 1 for reverse_kl, (1 - beta) log(Q_j / M_j) for jsd; j(v) is v's outcome.

A token id may appear more than once in a row only with zero mass (log-probability -inf) in all
but one of its places: such entries add nothing to D or its gradient, so a row with fewer than K
distinct tokens is padded by repeating an id with -inf.

Like the fused loss (kernels/fused.py), the student's logits exist for one block of rows at a
time and the forward pass also does the two backward matmuls. The forward KL on the CPU runs a
native C row step (kernels/_rowstep.c, distill_sparse_rowstep: three passes per row, two of
them in L2; SEQ2SEQ_DISTILL_NATIVE=0 or no compiler: the torch block below, same values within
float rounding); the reverse KL, the JSD and other devices run the torch block (a few
vocabulary-wide torch ops).
"""
from __future__ import annotations

import torch

from . import native
from ._core import (check_divergence, check_ignore_index, check_temperature, default_fused_chunk_size, flatten_rows,
                    index_labels, scale_rows_, scale_saved_grad, sparse_repeats)


def _teacher_rows(ids, logprobs, n_rows: int, vocab: int):
    """(N, K) int64 ids and (N, K) float32 log-probabilities from any (..., K) inputs, checked."""
    if ids is None or logprobs is None:
        raise ValueError("pass teacher_ids and teacher_logprobs (the teacher's K tokens per target token)")
    if ids.shape != logprobs.shape or ids.dim() < 1:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} and teacher_logprobs {tuple(logprobs.shape)} must have "
                         "the same shape (..., K)")
    k = ids.shape[-1]
    ids2 = index_labels(ids, "teacher_ids").view(-1, k) if k else ids.reshape(-1, 0).long()
    lp2 = logprobs.detach().reshape(-1, k).float()
    if ids2.shape[0] != n_rows:
        raise ValueError(f"teacher_ids has {ids2.shape[0]} rows, expected {n_rows} (one per token)")
    if k < 1 or k > vocab:
        raise ValueError(f"K = {k} teacher tokens per row; expected 1 <= K <= vocabulary size {vocab}")
    if n_rows and bool(((ids2 < 0) | (ids2 >= vocab)).any()):
        bad = ids2[(ids2 < 0) | (ids2 >= vocab)][0].item()
        raise ValueError(f"teacher_ids must be in [0, {vocab}); found {bad}")
    if n_rows and k > 1:
        # Entries with zero mass may repeat an id (padding): give each a distinct negative stand-in.
        standin = -1 - torch.arange(k, device=ids2.device).expand_as(ids2)
        ordered = torch.where(lp2 > float("-inf"), ids2, standin).sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("teacher_ids repeat a token within a row; each row's K ids must be distinct "
                             "(a repeat is allowed only with log-probability -inf)")
    return ids2, lp2


def _tail_rows(tail, n_rows: int):
    """(N, 1) float32 log tail masses, or None."""
    if tail is None:
        return None
    t = tail.detach().reshape(-1, 1).float()
    if t.shape[0] != n_rows:
        raise ValueError(f"teacher_tail_logmass has {t.shape[0]} entries, expected {n_rows} (one per token)")
    if bool((t > 0).any()) or bool(t.isnan().any()):
        raise ValueError("teacher_tail_logmass must be log-masses: <= 0 (or -inf for no tail)")
    return t


def _sparse_targets(lp, inv_t, vocab: int, tail=None):
    """(p~ (r, K), m_t (r, 1)) from cached log-probabilities at T = 1 (see the module docstring),
    the tail mass from `tail` (log m_t) when given. A support of the whole vocabulary has no
    tail, whatever the cached values' rounding says."""
    if tail is None:
        m_t = (1.0 - lp.exp().sum(1, keepdim=True)).clamp_(0.0, 1.0)
    else:
        m_t = tail.exp().clamp_(0.0, 1.0)
    if lp.shape[1] == vocab:
        m_t.zero_()
    p = torch.softmax(lp * inv_t, dim=1) * (1.0 - m_t)
    return p, m_t


def _coarse_terms(divergence: str, beta: float, p, m_t, log_q, log_m_s):
    """(D (r, 1), G_S - E (r, K), G_tail - E (r, 1)) of the module docstring for reverse_kl and jsd
    between P = (p, m_t) and Q = (exp(log_q), exp(log_m_s)); E = sum_j Q_j G_j."""
    q, m_s = log_q.exp(), log_m_s.exp()
    log_p, log_m_t = torch.log(p), torch.log(m_t)
    if divergence == "reverse_kl":
        lr_s, lr_t = log_q - log_p, log_m_s - log_m_t
        d = (torch.where(q > 0, q * lr_s, torch.zeros_like(q)).sum(1, keepdim=True)
             + torch.where(m_s > 0, m_s * lr_t, torch.zeros_like(m_s)))
        g_s, g_t = lr_s + 1.0, lr_t + 1.0
    else:  # jsd
        mix_s, mix_t = beta * p + (1.0 - beta) * q, beta * m_t + (1.0 - beta) * m_s
        log_mix_s, log_mix_t = torch.log(mix_s), torch.log(mix_t)

        def kl_to_mix(a_s, a_t):  # KL(A || M) over the K + 1 outcomes, 0 log 0 = 0
            return ((torch.xlogy(a_s, a_s) - torch.where(a_s > 0, a_s * log_mix_s, torch.zeros_like(a_s))).sum(1, keepdim=True)
                    + torch.xlogy(a_t, a_t) - torch.where(a_t > 0, a_t * log_mix_t, torch.zeros_like(a_t)))

        d = beta * kl_to_mix(p, m_t) + (1.0 - beta) * kl_to_mix(q, m_s)
        g_s, g_t = (1.0 - beta) * (log_q - log_mix_s), (1.0 - beta) * (log_m_s - log_mix_t)
    # outcomes with Q_j = 0 take no part in E (their G may be inf)
    g_s = torch.where(q > 0, g_s, torch.zeros_like(g_s))
    g_t = torch.where(m_s > 0, g_t, torch.zeros_like(g_t))
    e = (q * g_s).sum(1, keepdim=True) + m_s * g_t
    return d, g_s - e, g_t - e


def _apply_block_grad(g, h, w32, i, j, grad_h, grad_w, grad_b):
    """The block's logit gradient g (rows i:j) into the gradients of the hidden states, the
    lm_head weight and its bias (each None when not wanted)."""
    if grad_b is not None:
        grad_b.add_(g.sum(0))
    if grad_h is not None:
        torch.mm(g, w32, out=grad_h[i:j])
    if grad_w is not None:
        grad_w.addmm_(g.t(), h)


class FusedLinearSparseDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, logprobs, tail, alpha, temperature, ignore_index,
                chunk_size, divergence="forward_kl", beta=0.5):
        shape = hidden.shape
        h_all = flatten_rows(hidden, "student_hidden")
        n_rows, width = h_all.shape
        if weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(f"student_weight must be (V, {width}), got shape {tuple(weight.shape)}")
        vocab = weight.shape[0]
        if bias is not None and bias.shape != (vocab,):
            raise ValueError(f"student_bias must be ({vocab},), got shape {tuple(bias.shape)}")
        lab = index_labels(labels)
        if lab.numel() != n_rows:
            raise ValueError(f"labels has {lab.numel()} positions, expected {n_rows} (one per token)")
        ids_all, lp_all = _teacher_rows(ids, logprobs, n_rows, vocab)
        tail_all = _tail_rows(tail, n_rows)
        valid = lab != ignore_index
        safe_lab = torch.where(valid, lab, torch.zeros_like(lab))
        if n_rows and bool(((safe_lab < 0) | (safe_lab >= vocab)).any()):
            bad = lab[valid & ((lab < 0) | (lab >= vocab))][0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {bad}")
        maskf = valid.to(torch.float32)
        denom = max(int(valid.sum().item()), 1)
        c_ce, c_kl = alpha / denom, (1.0 - alpha) * temperature / denom  # d(T^2 D)/dz = T dD/d(z/T)
        inv_t = 1.0 / temperature
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        chunk = int(chunk_size or default_fused_chunk_size(vocab, n_rows))
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = min(chunk, max(n_rows, 1))
        f32 = dict(dtype=torch.float32, device=h_all.device)
        grad_h = torch.empty(h_all.shape, **f32) if need_h else None
        grad_w = torch.zeros(weight.shape, **f32) if need_w else None
        grad_b = torch.zeros(vocab, **f32) if need_b else None
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_all.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=h_all.device)
        want_grad = need_h or need_w or need_b
        # the native C row step (forward KL on the CPU): three passes over each row instead of
        # about twenty vocabulary-wide torch ops; same values within float rounding
        row_fn = native.get_sparse() if divergence == "forward_kl" and h_all.device.type == "cpu" else None
        for i in range(0, n_rows, chunk):
            j = min(i + chunk, n_rows)
            h = h_all[i:j].float()
            m = maskf[i:j].view(-1, 1)
            k_ids, lab_c = ids_all[i:j], safe_lab[i:j].view(-1, 1)
            s = h @ w32.t()
            if b32 is not None:
                s += b32
            p, m_t = _sparse_targets(lp_all[i:j], inv_t, vocab, None if tail_all is None else tail_all[i:j])
            if row_fn is not None:
                ce_row, d_row = native.sparse_rowstep(row_fn, s, k_ids, p, m_t, lab_c.view(-1), m.view(-1), inv_t,
                                                      c_ce, c_kl, want_grad)
                ce_sum += (ce_row * m.view(-1)).sum()
                kl_sum += torch.where(m.view(-1) > 0, d_row, torch.zeros_like(d_row)).sum()
                if want_grad:
                    _apply_block_grad(s, h, w32, i, j, grad_h, grad_w, grad_b)
                continue
            # CE at T = 1
            lse1 = torch.logsumexp(s, dim=1, keepdim=True)
            ce_row = lse1 - s.gather(1, lab_c)
            # D at T: the student on the support, and its log mass off it (log-sum-exp of the rest)
            z = s * inv_t
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            log_q = z.gather(1, k_ids) - lse
            off = z.scatter(1, k_ids, float("-inf"))
            lse_off = torch.logsumexp(off, dim=1, keepdim=True)  # -inf when the support is everything
            if divergence == "forward_kl":
                has_tail = m_t > 0  # never where the support is the whole vocabulary (lse_off = -inf)
                tail = torch.where(has_tail, m_t * (m_t.clamp_min(1e-38).log() - (lse_off - lse)), torch.zeros_like(m_t))
                d_row = torch.xlogy(p, p).sum(1, keepdim=True) - (p * log_q).sum(1, keepdim=True) + tail
            else:
                # a padding place is no outcome of the coarsened distributions: Q = 0 there
                log_q_c = log_q.masked_fill(sparse_repeats(k_ids, lp_all[i:j]), float("-inf"))
                d_row, g_support, g_tail = _coarse_terms(divergence, beta, p, m_t, log_q_c, lse_off - lse)
            ce_sum += (ce_row * m).sum()
            kl_sum += torch.where(m > 0, d_row, torch.zeros_like(d_row)).sum()  # an infinite D stays inf, not nan
            if not want_grad:
                continue
            # G = c_ce (softmax(s) - onehot) + c_kl (q - p~ on S, q (1 - m_t / m_s) off S), masked
            g = torch.exp(s - lse1).mul_(c_ce)
            g.scatter_add_(1, lab_c, torch.full_like(ce_row, -c_ce))
            if divergence == "forward_kl":
                g.add_(torch.exp(z - lse), alpha=c_kl)
                g.scatter_add_(1, k_ids, -c_kl * p)
                if ids_all.shape[1] < vocab:  # q_v m_t / m_s = m_t exp(z_v - lse_off), at most m_t
                    g.sub_(torch.exp(off - lse_off).mul_(c_kl * m_t))
            else:  # c_kl q_v (G_j(v) - E): the tail's coefficient on every v, the support's difference on S
                g.add_(torch.exp(z - lse).mul_(c_kl * g_tail))
                g.scatter_add_(1, k_ids, c_kl * log_q_c.exp() * (g_support - g_tail))
            g.mul_(m)
            _apply_block_grad(g, h, w32, i, j, grad_h, grad_w, grad_b)
        ce = (ce_sum / denom).to(torch.float32)
        kl = (kl_sum / denom).to(torch.float32)
        loss = ((alpha * ce_sum + (1.0 - alpha) * temperature**2 * kl_sum) / denom).to(torch.float32)
        # float16 inputs: a power-of-two scale per row until backward applies the incoming gradient
        # (the fp16 loss scale), as in the fused loss (kernels/_core.py, "Float16 gradients").
        saved = []
        for grad, x in ((grad_h, hidden), (grad_w, weight), (grad_b, bias)):
            row_scale = None
            if grad is not None and x.dtype == torch.float16:
                row_scale = scale_rows_(grad.view(-1, grad.shape[-1]))
            saved += [None if grad is None else grad.to(x.dtype), row_scale]
        ctx.save_for_backward(*saved)
        ctx.shape = shape
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        g_h, s_h, g_w, s_w, g_b, s_b = ctx.saved_tensors
        grads = [scale_saved_grad(g, grad_loss, sc) for g, sc in ((g_h, s_h), (g_w, s_w), (g_b, s_b))]
        if grads[0] is not None:
            grads[0] = grads[0].view(ctx.shape)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def fused_linear_sparse_distill_loss(student_hidden, student_weight, labels, *, teacher_ids, teacher_logprobs,
                                     teacher_tail_logmass=None, student_bias=None, alpha=0.5,
                                     temperature=1.0, ignore_index=-100, chunk_size=None,
                                     divergence="forward_kl", beta=0.5):
    """alpha * CE(labels) + (1 - alpha) * T^2 * D(sparse teacher, student), logits never whole.

    student_hidden (N, H) or (B, T, H), student_weight (V, H), student_bias optional (V,), labels
    (N,) or (B, T) with ignore_index masked, as in fused_linear_distill_loss. teacher_ids: (..., K)
    integer token ids per target token, distinct within a row; teacher_logprobs: the teacher's
    log-probabilities of those ids at T = 1, same shape (an id may repeat only with -inf).
    teacher_tail_logmass: optional (...) log of the teacher's mass off the support per token
    (default: from 1 - sum exp(teacher_logprobs); -inf: no tail). D is the top-k objective with a
    tail bucket of the module docstring; divergence "reverse_kl" / "jsd" (beta) the same two
    coarsened distributions' reverse KL / generalized JSD. Returns (loss, ce, kl): loss carries the gradient (to the
    student's hidden states, weight and bias); ce and kl (D without T^2) are detached float32.
    Math in float32; the gradients are rounded to the inputs' dtypes (float16 ones after a
    per-row power-of-two scale, so the fp16 loss scale is applied before they are rounded).
    """
    temperature = check_temperature(temperature)
    ignore_index = check_ignore_index(ignore_index)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    divergence, beta = check_divergence(divergence, beta)
    return FusedLinearSparseDistill.apply(student_hidden, student_weight, student_bias, labels, teacher_ids,
                                          teacher_logprobs, teacher_tail_logmass, alpha, temperature,
                                          ignore_index, chunk_size, divergence, beta)
