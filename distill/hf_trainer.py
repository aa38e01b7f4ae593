"""DistillationSeq2SeqTrainer: this project's loss inside a plain Hugging Face Seq2SeqTrainer script.

    from distill import DistillationSeq2SeqTrainer      # instead of transformers.Seq2SeqTrainer
    trainer = DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, alpha=0.5,
                                         temperature=2.0, divergence="forward_kl", args=..., ...)

Everything else is transformers' Trainer (data, optimizer, DeepSpeed/accelerate, logging, saving);
only `compute_loss` changes: alpha * CE + (1 - alpha) * T^2 * D(teacher, student) through
distill.objective's fused kernel, on the decoder hidden states of both models and their lm_heads,
so neither model's (tokens x vocab) logits exist during training.

How the pieces fit the Trainer:
- The student's forward goes through the wrapper the Trainer hands to compute_loss (DeepSpeed
  engine, DDP), because those wrappers do work in forward (DeepSpeed registers its backward
  prologue on the outputs, DDP prepares its reducer). For that one call the student's `forward`
  is replaced by one that returns decoder hidden states (`_forward_replaced`).
- Reduction: the kernel gives the mean over this batch's real (label != -100) tokens. When the
  Trainer passes `num_items_in_batch` (the real tokens of every micro-batch of the optimizer
  step, on every rank with `average_tokens_across_devices`), the loss becomes the token sum over
  num_items_in_batch (times the rank count in that case), exactly as Trainer.compute_loss scales
  a model's own loss; without it, the per-batch token mean, which the Trainer divides by the
  accumulation steps.
- The teacher: eval mode, no gradient, on the student's device and in its dtype (moved when they
  differ, e.g. after DeepSpeed casts the student to bf16). It stays a plain module, whole on
  every rank; ZeRO-3 (either model partitioned) is refused: the loss reads both lm_heads
  directly. A teacher too large for one device is the job of this project's CLI
  (distill/train.py), which keeps it partitioned under ZeRO-3.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainer

from distill import models
from distill.config import DIVERGENCES
from distill.errors import UserError
from distill.objective import IGNORE_INDEX, Objective

NAME = "DistillationSeq2SeqTrainer"


def _number(x):
    """float(x), or None when x is not a real number (a string, None, NaN stays NaN: the range
    checks below refuse it)."""
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def check_options(alpha, temperature, divergence, jsd_beta) -> None:
    """One-line UserError for a loss option out of range (NaN included)."""
    a, t, b = _number(alpha), _number(temperature), _number(jsd_beta)
    if a is None or not 0.0 <= a <= 1.0:
        raise UserError(f"{NAME}: alpha={alpha!r} is outside [0, 1]; use e.g. alpha=0.5 "
                        "(1 = labels only, 0 = teacher only)")
    if t is None or not 0.0 < t < math.inf:
        raise UserError(f"{NAME}: temperature={temperature!r} must be a finite number > 0; use e.g. temperature=2.0")
    if divergence not in DIVERGENCES:
        raise UserError(f"{NAME}: divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}; "
                        "use e.g. divergence='forward_kl'")
    if b is None or not 0.0 <= b <= 1.0:
        raise UserError(f"{NAME}: jsd_beta={jsd_beta!r} is outside [0, 1]; use e.g. jsd_beta=0.5 "
                        "(0 = forward KL, 1 = reverse KL)")


def check_vocab(student, teacher, alpha) -> None:
    """The divergence compares the two distributions token id by token id: same output size."""
    s_vocab, t_vocab = (models.lm_head_of(m)[0].shape[0] for m in (student, teacher))
    if s_vocab != t_vocab:
        raise UserError(f"{NAME}: the student's lm_head has {s_vocab} outputs but the teacher's {t_vocab}, "
                        f"and alpha={alpha} < 1 compares their distributions token by token; give the student "
                        f"the teacher's tokenizer and vocabulary (student.resize_token_embeddings({t_vocab})) "
                        "or use alpha=1.0 (labels only)")


@contextlib.contextmanager
def _forward_replaced(module, forward):
    """module.forward is `forward` inside the block, whatever it was before (accelerate, for
    one, sets an instance attribute; it is put back as it was)."""
    saved = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


class DistillationSeq2SeqTrainer(Seq2SeqTrainer):
    """A Seq2SeqTrainer whose loss distills `teacher_model` into `model` (the student).

    alpha: weight of the CE on the labels (1 - alpha weighs the divergence); with alpha=1 the
    teacher may be None and is never run. temperature: T of the soft term, which is multiplied
    by T^2. divergence: "forward_kl" (KL(teacher || student)), "reverse_kl" or "jsd" (GKD's,
    with jsd_beta). The defaults are the CLI's (--alpha, --temperature, --divergence, --jsd-beta).
    Batches need input_ids, attention_mask and labels (-100 on padding); the decoder inputs come
    from the labels, as the models' own loss makes them. The student and teacher must share the
    tokenizer. Evaluation reports the same loss, except with predict_with_generate, where
    Seq2SeqTrainer reports the student's own CE.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, alpha: float = 0.5,
                 temperature: float = 2.0, divergence: str = "forward_kl", jsd_beta: float = 0.5, **kwargs):
        check_options(alpha, temperature, divergence, jsd_beta)
        if teacher_model is None and alpha < 1:
            raise UserError(f"{NAME}: alpha={alpha} < 1 distills from a teacher, but teacher_model is None; "
                            "pass teacher_model=<the fine-tuned model> or use alpha=1.0 (labels only)")
        if kwargs.get("compute_loss_func") is not None:
            raise UserError(f"{NAME}: compute_loss_func was given, but this trainer computes the loss itself; "
                            "drop compute_loss_func (or use transformers.Seq2SeqTrainer)")
        super().__init__(model=model, args=args, **kwargs)
        if self.args.label_smoothing_factor:
            raise UserError(f"{NAME}: label_smoothing_factor={self.args.label_smoothing_factor} is not supported "
                            "(the soft targets come from the teacher); set label_smoothing_factor=0")
        hf_ds = getattr(self.args, "hf_deepspeed_config", None)
        if self.args.deepspeed and hf_ds is not None and hf_ds.is_zero3():
            raise UserError(f"{NAME}: DeepSpeed ZeRO stage 3 partitions the lm_heads this loss reads whole; "
                            "use a ZeRO stage 2 config (ds_configs/zero2.json), or this project's CLI "
                            "(python main.py --deepspeed ...), which keeps a ZeRO-3 teacher partitioned")
        if self.is_fsdp_enabled:
            raise UserError(f"{NAME}: FSDP shards the lm_heads this loss reads whole; use DeepSpeed ZeRO-2 "
                            "(--deepspeed ds_configs/zero2.json) or plain data parallel (torchrun)")
        if self.args.n_gpu > 1:
            raise UserError(f"{NAME}: {self.args.n_gpu} GPUs in one process (torch.nn.DataParallel) are not "
                            "supported; start one process per GPU (torchrun --nproc_per_node N script.py)")
        if teacher_model is not None and alpha < 1:
            check_vocab(self.model, teacher_model, alpha)
        self.alpha, self.temperature, self.jsd_beta = float(alpha), float(temperature), float(jsd_beta)
        self.divergence = divergence
        self.objective = Objective(self.alpha, self.temperature, impl="fused", divergence=divergence,
                                   beta=self.jsd_beta)
        self.teacher_model = None
        if teacher_model is not None and alpha < 1:
            # eval: no dropout, so the soft targets are the teacher's real predictions.
            self.teacher_model = teacher_model.eval().requires_grad_(False).to(self.args.device)
        # Our loss honours num_items_in_batch whatever the model's forward accepts; this makes the
        # Trainer count the tokens and, with them given, not divide the loss by the accumulation
        # steps again (Trainer.training_step).
        self.model_accepts_loss_kwargs = True
        self._logits_wanted = True

    def _teacher_like(self, student):
        """The teacher on the student's device and in its dtype (DeepSpeed casts the student to
        bf16/fp16 when it wraps it, after __init__)."""
        t_w, s_w = models.lm_head_of(self.teacher_model)[0], models.lm_head_of(student)[0]
        if (t_w.device, t_w.dtype) != (s_w.device, s_w.dtype):
            self.teacher_model.to(device=s_w.device, dtype=s_w.dtype)
        return self.teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise UserError(f"{NAME}: a batch has no `labels`; tokenize the targets into labels (-100 on "
                            "padding), e.g. with DataCollatorForSeq2Seq")
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        student = self.accelerator.unwrap_model(model)

        def student_hidden(input_ids, attention_mask, labels):
            # accelerate's autocast (native fp16/bf16 without DeepSpeed) wraps the forward this replaces.
            with self.accelerator.autocast():
                return models.decoder_hidden(student, input_ids, attention_mask, labels)

        with _forward_replaced(student, student_hidden):
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if not torch.is_tensor(hidden):  # a wrapper that kept the model's own forward (torch.compile)
            raise UserError(f"{NAME}: the student's wrapper {type(model).__name__} ran the model's own forward, "
                            "not the decoder hidden states this loss needs; turn torch_compile off")
        teacher_hidden = teacher_head = None
        if self.teacher_model is not None:
            teacher = self._teacher_like(student)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_hidden = models.decoder_hidden(teacher, input_ids, attention_mask, labels)
            teacher_head = models.lm_head_of(teacher)
        loss, _ce, _kl = self.objective(hidden, models.lm_head_of(student), labels, teacher_hidden, teacher_head)
        if num_items_in_batch is not None:
            # mean over this batch's tokens -> their sum / num_items_in_batch (clamped: a fully
            # masked window gives 0, not 0/0); the kernel's gradients scale with it exactly.
            n_tokens = (labels != IGNORE_INDEX).sum()
            loss = loss * (n_tokens / torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1))
            if self.args.average_tokens_across_devices:
                # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and the
                # gradient all-reduce averages over ranks; times the rank count makes it their sum.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if not return_outputs:
            return loss
        outputs = {"loss": loss}
        if self._logits_wanted:  # evaluation with compute_metrics, or a caller asking for outputs
            with torch.no_grad():
                outputs["logits"] = F.linear(hidden, *models.lm_head_of(student))
        return loss, outputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        # compute_loss makes the student's logits only when evaluation keeps them.
        self._logits_wanted = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        finally:
            self._logits_wanted = True
