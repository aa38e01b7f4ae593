"""The two DeepSpeed engines and the training loop.

Facts (read these before changing the loop):
- Every rank runs this same code; the launcher (deepspeed / torchrun / python) only decides how
  many ranks there are. Rank 0 alone writes files and prints summaries (see ARCHITECTURE.md).
- The teacher is frozen and in eval mode (no dropout: its soft targets must be deterministic) and
  runs under no_grad. With world size > 1 it defaults to ZeRO-3: the checkpoint is read under
  ZeRO-3 init (zero.zero3_loading), so each rank only ever holds its partition.
- The student trains under ZeRO stage 0-2 (ds_configs/zero2.json) with DeepSpeed's optimizer
  (FusedAdam on CUDA, the fused CPU Adam on CPU). engine.step() is called every micro-batch;
  DeepSpeed itself applies the optimizer at gradient-accumulation boundaries.
- Data: DistributedSampler (each rank its own shard of one seeded permutation), drop_last so all
  ranks do the same number of steps; with --global-batch-size the global batch is the same
  whatever the world size.
- Both engines' forward returns decoder hidden states (models.HiddenStates); the lm_heads are
  applied chunk-wise inside the loss, so full-vocabulary logits are never built.
- What a model is (heads, hidden states, partitioned tensors) is distill.models' knowledge; ZeRO's
  parameter internals are reached only through distill/zero.py (see ARCHITECTURE.md).
"""
from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable

import torch

from distill import checkpoint, faults, models, zero
from distill.distributed import (all_reduce_sum, any_rank, device_for, precision, resolve_grad_accum,
                                 student_ds_config, teacher_ds_config, teacher_zero_stage)
from distill.errors import UserError
from distill.objective import Objective

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BadLossError(UserError):
    pass


class Distiller:
    """Owns the engines, the data loaders and the loop. Built by train.run()."""

    def __init__(self, cfg, *, rank: int, world_size: int, local_rank: int, log: Callable[[str], None]):
        self.cfg, self.rank, self.world_size, self.log = cfg, rank, world_size, log
        self.device = device_for(local_rank)
        self.prec = precision(cfg, on_gpu=self.device.type != "cpu")
        self.grad_accum = resolve_grad_accum(cfg, world_size)
        self.teacher_stage = teacher_zero_stage(cfg, world_size)
        self.stop_signal = None
        self.teacher_memory = None  # set by load_teacher; stays None when the teacher is not loaded

    # ---- set-up -----------------------------------------------------------------------------
    def load_teacher(self, source: str, teacher_config):
        """The teacher from `source` with the config train.prepare loaded and checked already;
        under ZeRO-3 each rank reads only its partition of the checkpoint."""
        self.teacher_ds_conf = (teacher_ds_config(self.cfg, prec=self.prec) if self.teacher_stage == 3
                                else None)
        # The ZeRO-3 loading switch is gone again after this block, before the student is built,
        # or the student would be partitioned too.
        with zero.zero3_loading(self.teacher_ds_conf):
            teacher = models.load_teacher(source, self.cfg.model_type, config=teacher_config,
                                          dtype=DTYPES[self.prec],
                                          trust_remote_code=self.cfg.trust_remote_code)
        line, self.teacher_memory = models.teacher_memory_line(teacher)
        self.log(line, all_ranks=True)
        return teacher

    def build_engines(self, teacher, student, steps_per_epoch: int, total_steps: int):
        import deepspeed

        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        warmup = int(math.ceil(self.cfg.warmup_ratio * total_steps))
        conf = student_ds_config(self.cfg, world_size=self.world_size, grad_accum=self.grad_accum,
                                 total_steps=total_steps, warmup_steps=warmup, prec=self.prec)
        self.student_ds_conf = conf
        decay, no_decay = [], []
        for name, p in student.named_parameters():
            if p.requires_grad:
                # Biases and norms are not weight-decayed (standard AdamW practice).
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.student, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=models.HiddenStates(student), model_parameters=groups, config=conf)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.optimizer_name = f"{type(inner).__module__}.{type(inner).__name__}"
        self.teacher = None
        # Kept only when the teacher runs: a labels-only run frees it once the student is built.
        self.teacher_model = teacher if self.cfg.alpha < 1.0 else None
        if self.cfg.alpha < 1.0:
            if self.teacher_stage == 3:
                self.teacher, *_ = deepspeed.initialize(model=models.HiddenStates(teacher), config=self.teacher_ds_conf)
            else:
                self.teacher = models.HiddenStates(teacher).to(self.device)
            self.teacher.eval()
        self.objective = Objective(self.cfg.alpha, self.cfg.temperature, self.cfg.loss_impl)
        self.log(f"world size {self.world_size}; student ZeRO stage {conf['zero_optimization'].get('stage', 0)}, "
                 f"{self.prec}, optimizer {self.optimizer_name}; teacher "
                 + (f"ZeRO stage {self.teacher_stage}" if self.teacher is not None else "not run (alpha = 1)")
                 + f"; micro-batch {self.cfg.per_device_batch_size} x accumulation {self.grad_accum} x "
                 f"{self.world_size} ranks = global batch {conf['train_batch_size']}; {total_steps} steps")

    # ---- one micro-batch ---------------------------------------------------------------------
    def _teacher_hidden(self, batch):
        with torch.no_grad():
            return self.teacher(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def compute_loss(self, batch):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.teacher is None:  # alpha = 1: labels only, the teacher is never run
            student_hidden = self.student(batch["input_ids"], batch["attention_mask"], batch["labels"])
            return self.objective(student_hidden, models.lm_head_of(self.student.module.model), batch["labels"])
        teacher_hidden = self._teacher_hidden(batch)
        student_hidden = self.student(batch["input_ids"], batch["attention_mask"], batch["labels"])
        student_head = models.lm_head_of(self.student.module.model)
        # The teacher's lm_head, gathered when ZeRO-3 partitions it, lives for this loss call only.
        with models.gathered_lm_head(self.teacher_model) as teacher_head:
            return self.objective(student_hidden, student_head, batch["labels"], teacher_hidden, teacher_head)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, loader) -> dict[str, float]:
        self.student.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # ce*tokens, kl*tokens, loss*tokens, tokens
        with torch.no_grad():
            for batch in loader:
                loss, ce, kl = self.compute_loss(batch)
                n = float((batch["labels"] != -100).sum())
                sums = [sums[0] + float(ce) * n, sums[1] + float(kl) * n, sums[2] + float(loss) * n, sums[3] + n]
        self.student.train()
        ce, kl, loss, n = all_reduce_sum(sums, self.device)
        n = max(n, 1.0)
        return {"eval_loss": loss / n, "eval_ce": ce / n, "eval_kl": kl / n, "eval_tokens": int(n)}

    # ---- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self):
        def handler(signum, _frame):
            # Only set a flag: the loop saves a checkpoint at the next step boundary, where the
            # engine state is consistent on every rank. A second signal gets the default action
            # (terminate now), so an impatient Ctrl-C still works.
            self.stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, train_loader, sampler, eval_loader, *, start_step: int = 0,
              state: dict[str, Any] | None = None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        state = dict(state or {})
        history = state.setdefault("history", [])
        counters = state.setdefault("counters", {"samples": 0, "tokens": 0, "bad_steps": 0})
        step = start_step
        bad_in_row = 0
        accum = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, ce, kl, micro-batches, tokens since last log
        t_log = time.time()
        # The with-block closes the bar on every exit, so an error line never lands on the bar's line.
        distilling = self.teacher is not None
        with tqdm(total=self.total_steps, initial=step, disable=self.rank != 0,
                  desc="distill" if distilling else "train (labels only)", dynamic_ncols=True) as bar:
            micro = 0
            epoch = step // self.steps_per_epoch if self.steps_per_epoch else 0
            skip = (step % self.steps_per_epoch) * self.grad_accum if self.steps_per_epoch else 0
            self.student.train()
            t_start = time.time()
            tokens_run = 0
            per_epoch = self.steps_per_epoch * self.grad_accum  # micro-batches per epoch, all ranks equal
            stop = False
            while step < self.total_steps and not stop:
                sampler.set_epoch(epoch)
                for i, batch in enumerate(train_loader):
                    if i < skip:  # resume: same data order, skip what was already trained on
                        continue
                    if i >= per_epoch:
                        break
                    loss, ce, kl = self.compute_loss(batch)
                    loss = faults.at("train_loss", loss, step=step + 1, rank=self.rank)  # tests only
                    finite = not any_rank(not torch.isfinite(loss).item(), self.device)
                    tokens = int((batch["labels"] != -100).sum())
                    if not finite:
                        # Every rank skips this micro-batch together (the flag was all-reduced).
                        counters["bad_steps"] += 1
                        bad_in_row += 1
                        self.log(f"warning: non-finite loss at step {step + 1}; micro-batch skipped "
                                 f"({bad_in_row} in a row, {counters['bad_steps']} in total)")
                        if bad_in_row >= cfg.max_bad_steps:
                            self.save(step, epoch, state)
                            raise BadLossError(
                                f"{bad_in_row} steps in a row had a NaN/inf loss (last at step {step + 1}); "
                                "try --bf16 instead of --fp16, a lower --learning-rate, or a lower --temperature")
                        continue
                    bad_in_row = 0
                    self.student.backward(loss)
                    self.student.step()
                    micro += 1
                    counters["samples"] += int(batch["input_ids"].size(0)) * self.world_size
                    counters["tokens"] += tokens * self.world_size
                    tokens_run += tokens
                    accum = [accum[0] + float(loss.detach()), accum[1] + float(ce), accum[2] + float(kl), accum[3] + 1, accum[4] + tokens]
                    if micro % self.grad_accum:
                        continue
                    step += 1
                    bar.update(1)
                    if step % cfg.logging_steps == 0 or step == self.total_steps:
                        loss_s, ce_s, kl_s, count, toks = all_reduce_sum(accum, self.device)
                        dt = max(time.time() - t_log, 1e-9)
                        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else cfg.learning_rate
                        entry = {"step": step, "loss": loss_s / count, "ce": ce_s / count, "kl": kl_s / count,
                                 "tokens_per_s": toks / dt, "lr": lr}
                        history.append(entry)
                        shown = {"loss": f"{entry['loss']:.3f}", "ce": f"{entry['ce']:.3f}"}
                        if distilling:  # without a teacher the KL term is not computed
                            shown["kl"] = f"{entry['kl']:.3f}"
                        bar.set_postfix(**shown, tok_s=f"{entry['tokens_per_s']:.0f}")
                        accum = [0.0, 0.0, 0.0, 0.0, 0.0]
                        t_log = time.time()
                    if cfg.eval_steps and step % cfg.eval_steps == 0 and step < self.total_steps:
                        metrics = self.evaluate(eval_loader)
                        history.append({"step": step, **metrics})
                        self.log(f"step {step}: eval loss {metrics['eval_loss']:.4f} (ce {metrics['eval_ce']:.4f}, "
                                 f"kl {metrics['eval_kl']:.4f})")
                    # A signal on any rank stops all of them at the same step boundary.
                    stop = any_rank(self.stop_signal is not None, self.device)
                    if (cfg.save_steps and step % cfg.save_steps == 0) or stop:
                        self.save(step, epoch, state)
                    if stop or step >= self.total_steps:
                        break
                else:
                    epoch, skip = epoch + 1, 0
                    continue
                if i >= per_epoch:
                    epoch, skip = epoch + 1, 0
            if stop:
                return {"interrupted": True, "step": step, **state}
            elapsed = time.time() - t_start
            state["train_seconds"] = state.get("train_seconds", 0.0) + elapsed
            state["train_tokens_per_s"] = all_reduce_sum([tokens_run], self.device)[0] / max(elapsed, 1e-9)
            return {"interrupted": False, "step": step, **state}

    def save(self, step: int, epoch: int, state: dict[str, Any]) -> str:
        import torch.distributed as dist

        trainer_state = {"step": step, "epoch": epoch, "world_size": self.world_size, **state}
        path = checkpoint.save(self.student, self.cfg.output_dir, step, trainer_state, rank=self.rank,
                               keep=self.cfg.save_total_limit, barrier=dist.barrier)
        self.log(f"saved checkpoint {path}")
        return path
