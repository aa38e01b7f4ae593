"""The exported student: a normal Hugging Face folder plus what the run used and measured.

<output_dir>/
  model.safetensors, config.json, generation_config.json    from save_pretrained (safetensors)
  tokenizer files                                           the tokenizer the student was trained with
  distill_config.json                                       every option, resolved
  metrics.json                                              losses, steps, tokens/s, samples seen
  README.md                                                 model card
Secrets never leave the machine in these files: values that look like tokens, or that equal an
environment variable whose name says TOKEN/KEY/SECRET/PASSWORD, are redacted.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
_SECRET_VALUE = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}\b"                           # Hugging Face tokens
    r"|\b(?:sk|ghp|gho|ghs|ghu|xox[abp])[-_]?[A-Za-z0-9_]{20,}\b"  # OpenAI/GitHub/Slack style
    r"|\bgithub_pat_[A-Za-z0-9_]{20,}\b"                  # GitHub fine-grained tokens
    r"|\bAKIA[0-9A-Z]{16}\b"                              # AWS access key ids
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"                # Authorization headers
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")                  # user:password@ in URLs
REDACTED = "<redacted>"


def _secret_values() -> list[str]:
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6},
                  key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """Recursively replace secret-looking substrings in strings of a JSON-like value."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return _SECRET_VALUE.sub(REDACTED, value)
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(redact(data), fh, indent=2, default=str)
    os.replace(tmp, path)


def model_card(cfg, info: dict[str, Any], metrics: dict[str, Any]) -> str:
    teacher = cfg.teacher_local_path or cfg.teacher
    data = cfg.dataset_local_path or cfg.dataset
    last = next((h for h in reversed(metrics.get("history", [])) if "loss" in h), {})
    ev = metrics.get("final_eval", {})
    target_source = getattr(cfg, "target_source", "reference")
    soft = cfg.alpha < 1.0  # the teacher's distributions enter the loss
    distilled = soft or target_source != "reference"  # or its outputs are the targets

    def num(value):  # a figure the run did not log (e.g. CE when every micro-batch was generated)
        return "-" if value is None or value != value else f"{value:.4f}"
    init = info.get("init", "?")
    targets = {"reference": "the dataset's references", "teacher": "the teacher's outputs "
               "(sequence-level KD)", "mixed": "the references and the teacher's outputs"}[target_source]
    if distilled:
        title = f"# Distilled {cfg.model_type} student"
        origin = f"Distilled with seq2seq-distill from teacher `{teacher}` on `{data}`"
        divergence = getattr(cfg, "divergence", "forward_kl")
        objective = (f"Objective: {cfg.alpha} * CE + {1 - cfg.alpha:g} * T^2 * {divergence}(teacher, student), "
                     f"T = {cfg.temperature}, loss implementation `{cfg.loss_impl}`; targets: {targets}"
                     + (f"; {cfg.on_policy_ratio:g} of the micro-batches on the student's own samples"
                        if getattr(cfg, "on_policy_ratio", 0) else "")
                     + (f"; {cfg.seq_kd_ratio:g} on the teacher's samples"
                        if getattr(cfg, "seq_kd_ratio", 0) else "") + ".")
    else:
        # alpha = 1: the teacher never ran; it only lent its config (and its layers if copied).
        title = f"# {cfg.model_type} model trained on labels only"
        lent = "layers" if init == "teacher" else "config (random initial weights)"
        origin = (f"Trained with seq2seq-distill on labels only (alpha = 1, no teacher signal) on "
                  f"`{data}`, starting from the {lent} of `{teacher}`")
        objective = f"Objective: CE on the labels, loss implementation `{cfg.loss_impl}`."
    lines = [
        "---", "library_name: transformers",
        f"tags: [seq2seq, {'distillation, ' if distilled else ''}seq2seq-distill]", "---", "",
        title, "",
        f"{origin} (`{cfg.input_column}` -> `{cfg.target_column}`).", "",
        "| | teacher | student |", "|---|---|---|",
        f"| parameters | {info.get('teacher_params', 0):,} | {info.get('student_params', 0):,} |",
        f"| encoder layers | {info.get('teacher_encoder_layers', '?')} | {info.get('student_encoder_layers', '?')} |",
        f"| decoder layers | {info.get('teacher_decoder_layers', '?')} | {info.get('student_decoder_layers', '?')} |",
        f"| hidden size | {info.get('teacher_hidden', '?')} | {info.get('student_hidden', '?')} |", "",
        f"Initialisation: {init}"
        + (f" (encoder layers {info.get('encoder_layers_copied')}, decoder layers "
           f"{info.get('decoder_layers_copied')} copied from the teacher)" if info.get("init") == "teacher" else ""), "",
        objective, "",
        f"Training: {metrics.get('steps', 0)} steps, {metrics.get('samples_seen', 0):,} samples, "
        f"{metrics.get('tokens_seen', 0):,} target tokens, learning rate {cfg.learning_rate}, seed {cfg.seed}.", "",
        (f"Final train loss {num(last.get('loss'))} (CE {num(last.get('ce'))}, "
         f"KL {num(last.get('kl'))}); validation loss {num(ev.get('eval_loss'))} "
         f"(CE {num(ev.get('eval_ce'))}, KL {num(ev.get('eval_kl'))})." if soft else
         f"Final train loss (CE) {num(last.get('loss'))}; validation loss {num(ev.get('eval_loss'))}."), "",
        "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForSeq2SeqLM.from_pretrained(PATH)", "```", "",
        "`distill_config.json` holds every option of the run; `metrics.json` the losses and throughput.",
    ]
    return redact("\n".join(lines) + "\n")


STAGING = ".export-partial"  # inside --output-dir while the export is written


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))


def export_student(student, tokenizer, cfg, info: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Rank 0 only. ZeRO-2 keeps full parameters on every rank, so no gathering is needed.

    Atomic in what matters: everything is written into OUTPUT/.export-partial first, the previous
    export's weights are removed, the other files are renamed in, the weights last. A run stopped
    at any point leaves a folder with the new complete model, or with no weights at all (never
    new files beside old weights, never half a safetensors file); a later run removes the
    staging folder.
    """
    import shutil

    from distill import faults
    from distill.guard import fsync_dir

    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    staging = os.path.join(out, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # an earlier export that was stopped
    os.makedirs(staging)
    student.save_pretrained(staging)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(staging)
    write_json(os.path.join(staging, "distill_config.json"), cfg.to_dict())
    write_json(os.path.join(staging, "metrics.json"), metrics)
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(model_card(cfg, info, metrics))
    fsync_dir(staging)
    faults.at("export_staged", step=0, rank=0, path="export_staged")  # tests only
    for name in os.listdir(out):  # the previous export's weights go first
        if _is_weights(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    names = sorted(os.listdir(staging), key=lambda n: (_is_weights(n), n.endswith(".index.json")))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    fsync_dir(out)
    os.rmdir(staging)
    return out
