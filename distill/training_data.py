"""A training run's data, the same wherever it is needed: the raw splits (validation split off
train when the data has none), --max-train-samples / --max-eval-samples, the teacher's outputs
from --pseudo-labels (--target-source), and the tokenized splits.

Training (distill/train.py) and the teacher cache (distill/cache_teacher.py) both call
`training_splits`, so the cache is built over exactly the rows, in the form, that training feeds
the model.
"""
from __future__ import annotations

import os

from distill.config import DistillConfig


def _take(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None else ds


def pseudo_labels(cfg: DistillConfig, teacher_source: str, tokenizer):
    """The teacher's outputs from --pseudo-labels, once they are shown to come from this run's
    teacher (config and weights) and tokenizer; preflight checked the manifest's input settings."""
    from distill import pseudo_label_files as files

    folder = os.path.expanduser(str(cfg.pseudo_labels))
    manifest = files.check_for_training(folder, source_prefix=cfg.source_prefix,
                                        max_source_length=cfg.max_source_length)
    files.check_teacher(folder, manifest, teacher=teacher_source,
                        teacher_sha256=files.teacher_fingerprint(teacher_source)["sha256"],
                        tokenizer_sha256=files.tokenizer_fingerprint(tokenizer))
    return files.TeacherOutputs(folder, manifest)


def training_splits(cfg: DistillConfig, teacher_source: str, tokenizer, log):
    """(raw, tokenized): DatasetDicts with train, validation (and test when the data has it)."""
    from distill import data

    teacher_outputs = pseudo_labels(cfg, teacher_source, tokenizer) if cfg.target_source != "reference" else None
    # --target-source teacher trains on the teacher's outputs: the data may be inputs only.
    raw = data.load_raw_splits(cfg.dataset, cfg.dataset_local_path, cfg.input_column, cfg.target_column,
                               validation_ratio=cfg.validation_ratio, seed=cfg.seed,
                               trust_remote_code=cfg.trust_remote_code,
                               require_target=cfg.target_source != "teacher", log=log)
    raw["train"] = _take(raw["train"], cfg.max_train_samples)
    raw["validation"] = _take(raw["validation"], cfg.max_eval_samples)
    if teacher_outputs is not None:
        raw = data.apply_pseudo_labels(raw, teacher_outputs.get, cfg.target_source,
                                       f"--pseudo-labels {cfg.pseudo_labels}", log=log)
    tokenized = data.tokenize_splits(raw, tokenizer, max_source_length=cfg.max_source_length,
                                     max_target_length=cfg.max_target_length,
                                     source_prefix=cfg.source_prefix, log=log)
    return raw, tokenized
