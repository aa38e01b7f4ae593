"""DistillConfig's checks of options that only make sense together (on-policy targets, the
teacher cache); config.DistillConfig.validate calls them with the options' values in place."""
from __future__ import annotations

from distill.errors import UserError
from distill.unset import is_unset


def check_teacher_cache(cfg) -> None:
    if is_unset(cfg.teacher_cache):
        return
    # What needs the live teacher, or a loss the sparse targets cannot give.
    for bad, flag, fix in ((cfg.alpha >= 1.0, "--alpha 1", "use --alpha below 1 (e.g. 0.5)"),
                           (cfg.hidden_loss_weight > 0, "--hidden-loss-weight", "drop it (layer matching needs the "
                            "teacher's hidden states)"),
                           (cfg.on_policy_ratio > 0, "--on-policy-ratio", "drop it (the teacher must score "
                            "the student's own tokens)"),
                           (cfg.seq_kd_ratio > 0, "--seq-kd-ratio", "drop it (use --pseudo-labels for "
                            "sequence-level KD)"),
                           (cfg.loss_impl != "fused", f"--loss-impl {cfg.loss_impl}", "use --loss-impl "
                            "fused (the sparse loss has one implementation)")):
        if bad:
            raise UserError(f"--teacher-cache does not work with {flag}; {fix}, or drop --teacher-cache")


def check_on_policy(cfg) -> None:
    for name in ("on_policy_ratio", "seq_kd_ratio"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {value} is outside [0, 1]; use e.g. "
                            f"--{name.replace('_', '-')} 0.5 (the share of micro-batches with generated targets)")
    if cfg.on_policy_ratio + cfg.seq_kd_ratio > 1.0 + 1e-9:
        raise UserError(f"--on-policy-ratio {cfg.on_policy_ratio} + --seq-kd-ratio {cfg.seq_kd_ratio} "
                        "is more than 1; lower one so that they sum to at most 1 (the rest use the dataset's targets)")
    if cfg.alpha >= 1.0 and (cfg.on_policy_ratio > 0 or cfg.seq_kd_ratio > 0):
        flag = "--on-policy-ratio" if cfg.on_policy_ratio > 0 else "--seq-kd-ratio"
        raise UserError(f"{flag} needs the teacher, but --alpha 1 trains on labels only and never runs "
                        f"it; use --alpha below 1 (e.g. 0.5) or drop {flag}")
    if not cfg.on_policy_temperature > 0:
        raise UserError(f"--on-policy-temperature {cfg.on_policy_temperature} must be > 0; use e.g. "
                        "--on-policy-temperature 1")
    if cfg.on_policy_max_new_tokens is not None and cfg.on_policy_max_new_tokens < 1:
        raise UserError(f"--on-policy-max-new-tokens {cfg.on_policy_max_new_tokens} must be >= 1")
