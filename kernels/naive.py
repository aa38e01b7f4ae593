"""Plain-torch references: they materialise every (tokens x vocab) tensor on purpose.

They are the baseline the benchmark measures against and, run in float64, the reference the
tests compare the chunked kernels with. Same signatures and semantics as the chunked ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._core import check_temperature


def _masked_mean(per_token, mask):
    # clamp: an all-masked batch gives 0 (0 / 1), never 0 / 0 = NaN.
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def _kl_per_token(student_logits, teacher_logits, temperature):
    # kl_div(input, target) computes target * (log target - input), i.e. KL(target || input):
    # the teacher is the target, so this is KL(teacher || student).
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)


def naive_kl_div(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                 ignore_index=-100, chunk_size=None):
    """Reference for chunked_kl_div (chunk_size is accepted and ignored). Math in float32
    for lower-precision inputs, float64 stays float64."""
    temperature = check_temperature(temperature)
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dt)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(dt)
    mask = (torch.ones(s.shape[0], device=s.device, dtype=dt) if labels is None
            else (labels.reshape(-1) != ignore_index).to(dt))
    return temperature**2 * _masked_mean(_kl_per_token(s, t, temperature), mask)


def naive_distill_loss(student_hidden, student_weight, labels, *, teacher_logits=None,
                       teacher_hidden=None, teacher_weight=None, student_bias=None,
                       teacher_bias=None, alpha=0.5, temperature=1.0, ignore_index=-100,
                       chunk_size=None):
    """Reference for fused_linear_distill_loss: full logits, log_softmax, kl_div and CE."""
    temperature = check_temperature(temperature)
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight")
    s = F.linear(student_hidden, student_weight, student_bias)
    s = s.reshape(-1, s.shape[-1])
    dt = torch.promote_types(s.dtype, torch.float32)
    s = s.to(dt)
    with torch.no_grad():
        if teacher_logits is None:
            teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
        t = teacher_logits.detach().reshape(-1, s.shape[-1]).to(dt)
    lab = labels.reshape(-1)
    mask = (lab != ignore_index).to(dt)
    # CE sums over unmasked tokens, divided by the same count as the KL (0 when all masked).
    ce = F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="sum") / mask.sum().clamp_min(1)
    kl = _masked_mean(_kl_per_token(s, t, temperature), mask)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, ce.detach().float(), kl.detach().float()
