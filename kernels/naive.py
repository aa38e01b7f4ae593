"""The plain-torch references: they materialise every (tokens x vocab) tensor on purpose.

This is the one written-out form of the loss. `naive_logits_loss` is the objective's `naive`
path (distill/objective.py); the chunked KL, the fused loss and its row steps (torch, C, Triton)
are tested against these functions run in float64, and the benchmark measures against them.
`naive_kl_div` and `naive_distill_loss` have the signatures and semantics of chunked_kl_div and
fused_linear_distill_loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._core import check_divergence, check_temperature, sparse_repeats


def _masked_mean(per_token, mask):
    # clamp: an all-masked batch gives 0 (0 / 1), never 0 / 0 = NaN.
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def _kl(log_target, log_input):
    # kl_div(input, target) computes target * (log target - input), i.e. KL(target || input).
    return F.kl_div(log_input, log_target, reduction="none", log_target=True).sum(-1)


def _divergence_per_token(student_logits, teacher_logits, temperature, divergence, beta):
    """D per token at temperature T (no T^2), as TRL's GKDTrainer.generalized_jsd_loss defines
    it: forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), jsd =
    beta KL(teacher || m) + (1 - beta) KL(student || m) with m = beta teacher + (1 - beta) student."""
    divergence, beta = check_divergence(divergence, beta)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl":
        return _kl(t, s)
    if divergence == "reverse_kl":
        return _kl(s, t)
    m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def naive_kl_div(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                 ignore_index=-100, chunk_size=None, divergence="forward_kl", beta=0.5):
    """Reference for chunked_kl_div (chunk_size is accepted and ignored): T^2 * the mean over
    unmasked tokens of the divergence. Math in float32 for lower-precision inputs, float64
    stays float64."""
    temperature = check_temperature(temperature)
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dt)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(dt)
    mask = (torch.ones(s.shape[0], device=s.device, dtype=dt) if labels is None
            else (labels.reshape(-1) != ignore_index).to(dt))
    return temperature**2 * _masked_mean(_divergence_per_token(s, t, temperature, divergence, beta), mask)


def masked_cross_entropy(student_logits, labels, *, ignore_index=-100):
    """CE of logits (N, V) or (B, T, V) against labels (N,) or (B, T), averaged over the tokens
    whose label is not ignore_index; 0 with zero gradients when all are masked. Math in float32
    for lower-precision inputs, float64 stays float64."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dt)
    lab = labels.reshape(-1)
    n = (lab != ignore_index).sum().clamp_min(1).to(dt)
    return F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="sum") / n


def naive_logits_loss(student_logits, teacher_logits, labels, *, alpha=0.5, temperature=1.0,
                      ignore_index=-100, divergence="forward_kl", beta=0.5):
    """alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher, student) on full logits.

    student_logits and teacher_logits: (N, V) or (B, T, V); labels: (N,) or (B, T), ignore_index
    masks. The teacher gets no gradient; with alpha == 1 it may be None (kl is then 0). CE uses
    the T = 1 student logits, D softmax(./T) of both; both are means over unmasked tokens.
    divergence: "forward_kl" (KL(teacher || student), the default), "reverse_kl"
    (KL(student || teacher)) or "jsd" (beta KL(teacher || m) + (1 - beta) KL(student || m),
    m = beta teacher + (1 - beta) student; beta == 0 gives the forward and beta == 1 the reverse
    KL, as in TRL's GKDTrainer.generalized_jsd_loss). beta in [0, 1].
    Returns (loss, ce, kl): ce and kl are detached float32 scalars, kl the divergence without the
    T^2 factor (comparable across temperatures), which only loss applies.
    """
    temperature = check_temperature(temperature)
    check_divergence(divergence, beta)
    if teacher_logits is None and alpha != 1.0:
        raise ValueError(f"alpha={alpha} < 1 needs a teacher: pass the teacher's logits")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dt)
    ce = masked_cross_entropy(s, labels, ignore_index=ignore_index)
    if teacher_logits is None:
        kl = s.new_zeros(())
    else:
        t = teacher_logits.detach().reshape(-1, s.shape[-1]).to(dt)
        kl = _masked_mean(_divergence_per_token(s, t, temperature, divergence, beta),
                          (labels.reshape(-1) != ignore_index).to(dt))
    # T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, ce.detach().float(), kl.detach().float()


def naive_distill_loss(student_hidden, student_weight, labels, *, teacher_logits=None,
                       teacher_hidden=None, teacher_weight=None, student_bias=None,
                       teacher_bias=None, alpha=0.5, temperature=1.0, ignore_index=-100,
                       chunk_size=None, divergence="forward_kl", beta=0.5):
    """Reference for fused_linear_distill_loss (chunk_size is accepted and ignored): the full
    logits of both lm_heads, then naive_logits_loss."""
    if teacher_logits is not None and teacher_hidden is not None:
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight, not both")
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return naive_logits_loss(student_logits, teacher_logits, labels, alpha=alpha,
                             temperature=temperature, ignore_index=ignore_index,
                             divergence=divergence, beta=beta)


def naive_sparse_distill_loss(student_logits, labels, teacher_ids, teacher_logprobs, *, alpha=0.5,
                              temperature=1.0, ignore_index=-100, teacher_tail_logmass=None,
                              divergence="forward_kl", beta=0.5):
    """Reference for fused_linear_sparse_distill_loss on full logits (N, V) / (B, T, V): the
    top-k objective with a tail bucket written out (kernels/sparse.py's docstring). Returns
    (loss, ce, kl) like it; the gradient reaches the logits by autograd. Math in float32 for
    lower-precision inputs, float64 stays float64."""
    temperature = check_temperature(temperature)
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dt)
    vocab, k = s.shape[1], teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).long()
    lp = teacher_logprobs.detach().reshape(-1, k).to(dt)
    lab = labels.reshape(-1)
    mask = (lab != ignore_index).to(dt)
    ce = F.cross_entropy(s, torch.where(lab != ignore_index, lab, torch.zeros_like(lab)).long(), reduction="none")
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_q_support = log_q.gather(1, ids)
    log_m_s = log_q.scatter(1, ids, float("-inf")).logsumexp(1)
    if teacher_tail_logmass is None:
        m_t = (1.0 - lp.exp().sum(1)).clamp(0.0, 1.0)
    else:
        m_t = teacher_tail_logmass.detach().reshape(-1).to(dt).exp()
    m_t = m_t * (0.0 if k == vocab else 1.0)
    p = torch.softmax(lp / temperature, dim=1) * (1.0 - m_t).unsqueeze(1)
    tail = torch.where(m_t > 0, m_t * (m_t.clamp_min(1e-300).log() - log_m_s), torch.zeros_like(m_t))
    d = torch.xlogy(p, p).sum(1) - (p * log_q_support).sum(1) + tail
    divergence, beta = check_divergence(divergence, beta)
    if divergence != "forward_kl":  # the same two distributions over K + 1 outcomes, written out
        P = torch.cat([p, m_t.unsqueeze(1)], 1)
        q_support = torch.where(sparse_repeats(ids, lp), 0.0, log_q_support.exp())  # padding: no outcome
        Q = torch.cat([q_support, log_m_s.exp().unsqueeze(1)], 1)

        def kl(a, b):
            return (torch.xlogy(a, a) - torch.where(a > 0, a * torch.log(b), torch.zeros_like(a))).sum(1)

        if divergence == "reverse_kl":
            d = kl(Q, P)
        else:
            mix = beta * P + (1.0 - beta) * Q
            d = beta * kl(P, mix) + (1.0 - beta) * kl(Q, mix)
    ce_mean, d_mean = _masked_mean(ce, mask), _masked_mean(d, mask)
    loss = alpha * ce_mean + (1.0 - alpha) * temperature**2 * d_mean
    return loss, ce_mean.detach(), d_mean.detach()
