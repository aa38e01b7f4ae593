"""Layer matching (--hidden-loss-weight W): the student's layers pulled towards the teacher's.

Student layer i of each stack (encoder, decoder) is matched with teacher layer
models.pick_layers(n_teacher, n_student)[i], the same spread-out map the student's layers are
copied by. The term added to the loss is

    W * mean over matched layers (encoder and decoder together) of MSE(proj(student_h), teacher_h)

with each MSE a mean over the real tokens (encoder: attention_mask; decoder: labels != -100) and
the hidden dimension, computed in float32; a fully masked batch gives 0, never NaN. DistilBART's
hidden-state loss (MSE on matched, masked hidden states) is the reference.

When the hidden sizes differ, proj is a learned Linear(student d_model -> teacher d_model) per
matched layer; it trains with the student (held by the student engine's module, so the same
optimizer steps it and checkpoints hold it) and is not exported. With equal sizes proj is the
identity and there are no parameters.

Hidden states: models.HiddenStates(..., all_layers=True) gives each stack's `hidden_states`
tuple, [0] the embeddings and [i + 1] layer i's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill import models

IGNORE_INDEX = -100
STACKS = ("encoder", "decoder")


def layer_map(student_config, teacher_config) -> dict[str, list[int]]:
    """{stack: [teacher layer matched by student layer i, ...]} for the encoder and the decoder."""
    student_n, teacher_n = models.layer_counts(student_config), models.layer_counts(teacher_config)
    return {stack: models.pick_layers(t, s) for stack, s, t in zip(STACKS, student_n, teacher_n)}


def masked_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked-in tokens of the mean squared difference over the hidden dimension,
    in float32. student_h and teacher_h (B, T, H), mask (B, T); no real token gives 0."""
    diff = (student_h.float() - teacher_h.float()).pow(2).mean(dim=-1)
    weights = mask.to(diff.dtype)
    return (diff * weights).sum() / weights.sum().clamp(min=1.0)


class LayerMatch(nn.Module):
    """The projections and the loss of layer matching; built only when W > 0."""

    def __init__(self, student_config, teacher_config, weight: float):
        super().__init__()
        assert weight > 0, "LayerMatch is built only when --hidden-loss-weight > 0"
        self.weight = float(weight)
        self.map = layer_map(student_config, teacher_config)
        self.student_width, self.teacher_width = student_config.d_model, teacher_config.d_model
        self.projected = self.student_width != self.teacher_width
        if self.projected:
            # One projection per matched layer: attribute names are the checkpoint's keys.
            self.encoder = nn.ModuleList(nn.Linear(self.student_width, self.teacher_width)
                                         for _ in self.map["encoder"])
            self.decoder = nn.ModuleList(nn.Linear(self.student_width, self.teacher_width)
                                         for _ in self.map["decoder"])

    def project(self, stack: str, i: int, student_h: torch.Tensor) -> torch.Tensor:
        """Student layer i's states in the teacher's width, float32 (identity when equal widths)."""
        if not self.projected:
            return student_h.float()
        proj = getattr(self, stack)[i]
        return F.linear(student_h.float(), proj.weight.float(), proj.bias.float())

    def mse(self, student_layers, teacher_layers, attention_mask, labels) -> torch.Tensor:
        """Unweighted mean over the matched layers of their masked MSEs (float32 scalar).

        student_layers / teacher_layers: (encoder hidden_states, decoder hidden_states) as
        models.HiddenStates(..., all_layers=True) returns them after the decoder output."""
        masks = {"encoder": attention_mask != 0, "decoder": labels != IGNORE_INDEX}
        terms = []
        for stack, s_states, t_states in zip(STACKS, student_layers, teacher_layers):
            for i, t in enumerate(self.map[stack]):
                terms.append(masked_mse(self.project(stack, i, s_states[i + 1]), t_states[t + 1], masks[stack]))
        return torch.stack(terms).mean()

    def forward(self, student_layers, teacher_layers, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(W * mse, mse detached): the term added to the loss and the figure logged as `hidden`."""
        mse = self.mse(student_layers, teacher_layers, attention_mask, labels)
        return self.weight * mse, mse.detach()

    def describe(self) -> str:
        """The start-of-run line: which layers are matched, and the projections."""
        # "encoder student 0->teacher 0, 1->3, ...": the first pair names the sides.
        stacks = "; ".join(f"{stack} student " + ", ".join(
            (f"{i}->teacher {t}" if i == 0 else f"{i}->{t}") for i, t in enumerate(self.map[stack]))
            for stack in STACKS)
        if self.projected:
            n = sum(p.numel() for p in self.parameters())
            proj = (f"projections {self.student_width}->{self.teacher_width} ({n:,} parameters, "
                    "trained, not exported)")
        else:
            proj = "same width: no projection"
        return f"layer matching (--hidden-loss-weight {self.weight:g}): {stacks}; {proj}"


def hidden_terms(student, teacher, batch, layer_match: LayerMatch | None):
    """Runs the two HiddenStates modules (engines) on `batch`: (student decoder hidden, teacher
    decoder hidden, (W * mse, mse) or None). Without layer matching the engines are run exactly as
    before (no per-layer states are asked for); the teacher runs under no_grad."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    if layer_match is None:
        with torch.no_grad():
            teacher_hidden = teacher(*args)
        return student(*args), teacher_hidden, None
    with torch.no_grad():
        teacher_hidden, *teacher_layers = teacher(*args, all_layers=True)
    student_hidden, *student_layers = student(*args, all_layers=True)
    return student_hidden, teacher_hidden, layer_match(student_layers, teacher_layers, batch["attention_mask"],
                                                       batch["labels"])
