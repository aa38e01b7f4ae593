"""Memory-lean, exact distillation losses (no (tokens x vocab) tensor lives past one chunk).

    chunked_kl_div(student_logits, teacher_logits, labels=None, *, temperature, ...)
    fused_linear_distill_loss(student_hidden, student_weight, labels, *, teacher_..., ...)
    naive_kl_div / naive_distill_loss: the plain-torch references with the same signatures.
    naive_logits_loss(student_logits, teacher_logits, labels, *, alpha, temperature, ...): the
        reference loss on full logits, the one the others are tested against;
        masked_cross_entropy: its CE term alone.
Benchmark: python -m kernels.bench [--quick | --full | --json].
"""
from .fused import fused_linear_distill_loss
from .kl import chunked_kl_div
from .naive import masked_cross_entropy, naive_distill_loss, naive_kl_div, naive_logits_loss

__all__ = ["chunked_kl_div", "fused_linear_distill_loss", "masked_cross_entropy", "naive_distill_loss",
           "naive_kl_div", "naive_logits_loss"]
