"""The distillation objective: alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher, student).

D is the divergence (`--divergence`): forward_kl = KL(teacher || student) (the default),
reverse_kl = KL(student || teacher), or jsd (GKD's generalized Jensen-Shannon with beta).

Math on tensors only: what a model is (its lm_head, BART's bias, T5's scaling, its decoder
hidden states) is distill.models' knowledge; here the heads arrive as (weight, bias) pairs.

The student's full (tokens x vocab) logits are the largest tensor of a training step; by default
they never exist: the decoder's hidden states and the lm_head go into
`kernels.fused_linear_distill_loss` (kernels/, reached through distill/kernel_ops.py), which
computes logits chunk by chunk. `--loss-impl chunked` materialises the student logits but
computes the KL chunk-wise; `naive` is the plain-torch reference `kernels.naive_logits_loss`,
which the tests compare the other two with and the benchmark measures them against.

Shapes: hidden (B, T, H), lm_head weight (V, H), bias (V,), labels (B, T) with -100 for padding.
Both CE and KL are means over the real (label != -100) target tokens, so a batch of long and short
targets weighs every token the same; a fully masked batch gives 0, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class Objective:
    alpha: float
    temperature: float
    impl: str = "fused"
    divergence: str = "forward_kl"
    beta: float = 0.5  # of divergence "jsd"

    def __call__(self, student_hidden, student_head, labels, teacher_hidden=None, teacher_head=None):
        """Returns (loss, ce, kl) for one micro-batch. `*_head` = (weight (V, H), bias (V,) or None),
        as distill.models.lm_head_of gives them. The teacher is needed only when alpha < 1.

        ce and kl are detached, for logging; kl is the divergence without the T^2 factor (so it
        stays comparable across temperatures), while loss uses T^2 * kl."""
        # `kernels.<name>` at call time (not `from kernels import`): tests count the calls.
        from distill.kernel_ops import kernels

        s_w, s_b = student_head
        needs_teacher = self.alpha < 1.0
        if self.impl == "fused":
            t_w, t_b = teacher_head if needs_teacher else (None, None)
            return kernels.fused_linear_distill_loss(
                student_hidden, s_w, labels, teacher_hidden=teacher_hidden if needs_teacher else None,
                teacher_weight=t_w, student_bias=s_b, teacher_bias=t_b, alpha=self.alpha,
                temperature=self.temperature, ignore_index=IGNORE_INDEX, divergence=self.divergence,
                beta=self.beta)
        student_logits = F.linear(student_hidden, s_w, s_b)
        teacher_logits = None
        if needs_teacher:
            with torch.no_grad():
                t_w, t_b = teacher_head
                teacher_logits = F.linear(teacher_hidden, t_w, t_b)
        if self.impl == "naive":
            return kernels.naive_logits_loss(student_logits, teacher_logits, labels, alpha=self.alpha,
                                             temperature=self.temperature, ignore_index=IGNORE_INDEX,
                                             divergence=self.divergence, beta=self.beta)
        # chunked: the reference CE on the full student logits plus a chunk-wise KL (no
        # full-vocabulary probabilities). chunked_kl_div returns T^2 * KL, the term in the loss.
        ce = kernels.masked_cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)
        kl_term = (kernels.chunked_kl_div(student_logits, teacher_logits, labels,
                                          temperature=self.temperature, ignore_index=IGNORE_INDEX,
                                          divergence=self.divergence, beta=self.beta)
                   if needs_teacher else ce.new_zeros(()))
        loss = self.alpha * ce + (1.0 - self.alpha) * kl_term
        kl = kl_term / self.temperature ** 2
        return loss, ce.detach(), kl.detach()

    def sparse(self, student_hidden, student_head, labels, teacher_ids, teacher_logprobs, teacher_tail):
        """(loss, ce, kl) against a sparse teacher (a teacher cache's targets, distill/teacher_cache.py):
        alpha * CE + (1 - alpha) * T^2 * the divergence between the two distributions coarsened to
        the cached tokens and a tail bucket (kernels.fused_linear_sparse_distill_loss; student
        logits never whole)."""
        from distill.kernel_ops import kernels

        s_w, s_b = student_head
        return kernels.fused_linear_sparse_distill_loss(
            student_hidden, s_w, labels, teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs,
            teacher_tail_logmass=teacher_tail, student_bias=s_b, alpha=self.alpha,
            temperature=self.temperature, ignore_index=IGNORE_INDEX, divergence=self.divergence, beta=self.beta)
