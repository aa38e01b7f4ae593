"""The distillation objective: alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher || student).

The student's full (tokens x vocab) logits are the largest tensor of a training step; by default
they never exist: the decoder's hidden states and the lm_head go into
`kernels.fused_linear_distill_loss`, which computes logits chunk by chunk. `--loss-impl chunked`
materialises the student logits but computes the KL chunk-wise; `naive` is plain torch, kept as the
reference and the benchmark baseline.

Shapes: hidden (B, T, H), lm_head weight (V, H), bias (V,), labels (B, T) with -100 for padding.
Both CE and KL are means over the real (label != -100) target tokens, so a batch of long and short
targets weighs every token the same; a fully masked batch gives 0, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def reference_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                   labels: torch.Tensor, *, alpha: float, temperature: float,
                   ignore_index: int = IGNORE_INDEX):
    """Plain-torch objective on full logits (B, T, V) or (N, V). Returns (loss, ce, kl).

    ce and kl are detached float32 scalars for logging; kl is the plain KL(teacher || student) at
    temperature T, without the T^2 factor (so it stays comparable across temperatures), while
    loss uses T^2 * kl. With alpha == 1 the teacher may be None and kl is 0.
    """
    v = student_logits.size(-1)
    s = student_logits.reshape(-1, v).float()
    y = labels.reshape(-1)
    mask = y != ignore_index
    n = mask.sum()
    # sum / max(n, 1): a fully masked batch gives exactly 0 with zero gradients.
    denom = n.clamp(min=1).to(s.dtype)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / denom
    if teacher_logits is None or alpha >= 1.0:
        kl = s.new_zeros(())
    else:
        t = teacher_logits.reshape(-1, v).float().detach()
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q): this is
        # KL(teacher || student), the forward KL of Hinton et al.; the T^2 factor keeps the soft
        # term's gradient scale independent of T.
        per_token = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
        kl = (per_token * mask).sum() / denom
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return loss, ce.detach(), kl.detach()


def lm_head_of(model: nn.Module):
    """(weight (V, H), bias (V,) or None) of a BART/mBART/T5 model's output projection."""
    weight = model.get_output_embeddings().weight
    bias = getattr(model, "final_logits_bias", None)  # BART/mBART add a (1, V) buffer
    return weight, (bias.view(-1) if bias is not None else None)


def decoder_hidden(model: nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """Decoder output exactly as the model's lm_head sees it, without computing logits.

    T5 with tied embeddings rescales the decoder output by d_model**-0.5 before the lm_head
    (`config.scale_decoder_outputs` in transformers 5); BART does not.
    """
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    encoder_out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    hidden = model.get_decoder()(
        input_ids=decoder_input_ids, encoder_hidden_states=encoder_out[0],
        encoder_attention_mask=attention_mask, use_cache=False)[0]
    if getattr(model.config, "scale_decoder_outputs", False):
        hidden = hidden * (model.config.d_model ** -0.5)
    return hidden


class HiddenStates(nn.Module):
    """Wraps a seq2seq LM so that the DeepSpeed engine's forward returns decoder hidden states.

    Going through the engine keeps ZeRO's hooks (ZeRO-3 parameter gathering, ZeRO-2 gradient
    bucketing) in charge; the lm_head is applied later, chunk-wise, by the loss kernel.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return decoder_hidden(self.model, input_ids, attention_mask, labels)


@dataclass
class Objective:
    alpha: float
    temperature: float
    impl: str = "fused"

    def __call__(self, student_hidden, student_head, labels, teacher_hidden=None, teacher_head=None):
        """Returns (loss, ce, kl) for one micro-batch. `*_head` = (weight, bias) from lm_head_of.

        ce and kl are detached, for logging; kl is without the T^2 factor (see reference_loss)."""
        import kernels

        s_w, s_b = student_head
        needs_teacher = self.alpha < 1.0
        if self.impl == "fused":
            t_w, t_b = teacher_head if needs_teacher else (None, None)
            return kernels.fused_linear_distill_loss(
                student_hidden, s_w, labels, teacher_hidden=teacher_hidden if needs_teacher else None,
                teacher_weight=t_w, student_bias=s_b, teacher_bias=t_b, alpha=self.alpha,
                temperature=self.temperature, ignore_index=IGNORE_INDEX)
        student_logits = F.linear(student_hidden, s_w, s_b)
        teacher_logits = None
        if needs_teacher:
            with torch.no_grad():
                t_w, t_b = teacher_head
                teacher_logits = F.linear(teacher_hidden, t_w, t_b)
        if self.impl == "naive":
            return reference_loss(student_logits, teacher_logits, labels, alpha=self.alpha,
                                  temperature=self.temperature)
        # chunked: full student logits, chunk-wise KL (no full-vocabulary probabilities).
        v = student_logits.size(-1)
        y = labels.reshape(-1)
        n = (y != IGNORE_INDEX).sum().clamp(min=1)
        ce = F.cross_entropy(student_logits.reshape(-1, v).float(), y, ignore_index=IGNORE_INDEX,
                             reduction="sum") / n
        # chunked_kl_div returns T^2 * KL, the term that enters the loss.
        kl_term = (kernels.chunked_kl_div(student_logits, teacher_logits, labels, temperature=self.temperature,
                                          ignore_index=IGNORE_INDEX)
                   if needs_teacher else ce.new_zeros(()))
        loss = self.alpha * ce + (1.0 - self.alpha) * kl_term
        kl = kl_term / self.temperature ** 2
        return loss, ce.detach(), kl.detach()
