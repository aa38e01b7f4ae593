"""DistillConfig: every option of a distillation run, its default, its help and its checks.

The CLI is generated from the dataclass fields, so a new option is one field here. Values come
from (lowest to highest priority) the field default, a `--config FILE` (json or yaml with the same
keys, dashes or underscores), and the command line. The seed CLI writes a literal `None` for
"unset"; `_none()` turns it into None for every optional field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from distill import config_checks
from distill.errors import UserError
from distill.unset import is_unset  # noqa: F401  (the one "unset" rule, config.is_unset to its users)

MODEL_TYPES = ("bart", "mbart", "t5", "mt5")
LOSS_IMPLS = ("fused", "chunked", "naive")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
STUDENT_INITS = ("teacher", "random")
TARGET_SOURCES = ("reference", "teacher", "mixed")
LOG_LEVELS = ("debug", "info", "warning", "error")  # distill/run_log.py's LEVELS
_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEEPSPEED_CONFIG = os.path.join(os.path.dirname(_HERE), "ds_configs", "zero2.json")
DEFAULT_TEACHER_DEEPSPEED_CONFIG = os.path.join(os.path.dirname(_HERE), "ds_configs", "zero3_teacher.json")


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DistillConfig:
    # --- teacher, tokenizer, student -------------------------------------------------------
    model_type: str = opt("bart", "Model family of the teacher: bart, mbart, t5 or mt5; checked "
                          "against the checkpoint's model_type.", choices=MODEL_TYPES)
    teacher: Optional[str] = opt(None, "Teacher as a Hugging Face Hub id (e.g. facebook/bart-base).")
    teacher_local_path: Optional[str] = opt(None, "Teacher as a local folder (save_pretrained); wins "
                                            "over --teacher when both are given.")
    custom_tokenizer_local_path: Optional[str] = opt(None, "Tokenizer folder to use instead of the "
                                                     "teacher's own.")
    num_encoder_layers: Optional[int] = opt(None, "Student encoder layers. Default: the teacher's "
                                            "count (the encoder runs once per input; decoder depth "
                                            "is what generation latency pays for). Spread-out "
                                            "teacher layers are copied when the hidden size matches.")
    num_decoder_layers: Optional[int] = opt(None, "Student decoder layers. Default: half the "
                                            "teacher's (at least 1).")
    hidden_dim: Optional[int] = opt(None, "Student hidden size d_model (default: the teacher's). "
                                    "Equal to the teacher's -> initialised from the teacher; "
                                    "different -> random init, FFN and heads scaled.")
    vocab_size: Optional[int] = opt(None, "Student vocabulary size (default: the teacher's). Must "
                                    "equal the teacher's unless --alpha 1 (logit distillation "
                                    "needs a shared vocabulary).")
    student_init: str = opt("teacher", "Student start: teacher (copy spread-out teacher layers, "
                            "embeddings and head where the shapes fit; random where they do not) "
                            "or random (the student's config, random weights: the baseline of "
                            "training the small model without a teacher).", choices=STUDENT_INITS)
    trust_remote_code: bool = opt(False, "Allow checkpoints/datasets that run their own Python "
                                  "code. Off by default: only enable for sources you trust.")
    # --- data --------------------------------------------------------------------------------
    dataset: Optional[str] = opt(None, "Hub dataset name; NAME:CONFIG picks a config "
                                 "(e.g. cnn_dailymail:3.0.0).")
    dataset_local_path: Optional[str] = opt(None, "Local dataset: a save_to_disk folder, a "
                                            "json/jsonl/csv/tsv/parquet file, or a folder of them "
                                            "(train.*, validation.*, test.*). Wins over --dataset.")
    input_column: str = opt("source", "Column holding the model input.", flag="--dataset-input-column")
    target_column: str = opt("target", "Column holding the reference output.",
                             flag="--dataset-target-column")
    validation_ratio: float = opt(0.05, "Fraction of train split off for validation when the data "
                                  "has no validation split.")
    max_train_samples: Optional[int] = opt(None, "Use at most this many training rows.")
    max_eval_samples: Optional[int] = opt(None, "Use at most this many validation rows (eval loss "
                                          "and the final report).")
    max_source_length: int = opt(512, "Inputs are truncated to this many tokens (counted in the log).")
    max_target_length: int = opt(128, "Targets are truncated to this many tokens.")
    source_prefix: str = opt("", "Text put before every input, e.g. 'summarize: ' for T5.")
    pseudo_labels: Optional[str] = opt(None, "Folder written by python -m distill.pseudo_label: "
                                       "the teacher's outputs for the inputs (sequence-level KD), "
                                       "for --target-source teacher or mixed.")
    target_source: str = opt("reference", "Training targets: reference (the dataset's), teacher "
                             "(the teacher's outputs from --pseudo-labels; the data may then lack a "
                             "target column) or mixed (each training example twice, with its "
                             "reference and with the teacher's output). Validation keeps its "
                             "references.", choices=TARGET_SOURCES)
    teacher_cache: Optional[str] = opt(None, "Folder written by python -m distill.cache_teacher: the "
                                        "teacher's sparse predictions for this run's rows. The teacher "
                                        "is then never loaded for training (its weights are read tensor "
                                        "by tensor to initialise the student); the loss is the sparse "
                                        "one (--divergence between the teacher and student coarsened to "
                                        "the cached tokens and a tail bucket, kernels/sparse.py).")
    # --- objective ---------------------------------------------------------------------------
    alpha: float = opt(0.5, "Weight of the cross-entropy on the labels; 1 - alpha weighs the KL to "
                       "the teacher. alpha=1 trains on labels only (the teacher is not run).")
    temperature: float = opt(2.0, "Softening temperature T for the KL term. The KL is multiplied "
                             "by T^2 so its gradients keep the same scale as the CE's when T changes "
                             "(Hinton et al. 2015).")
    loss_impl: str = opt("fused", "Loss implementation: fused (student logits never materialised), "
                         "chunked (chunked KL on full logits), naive (plain torch).", choices=LOSS_IMPLS)
    divergence: str = opt("forward_kl", "What the soft term measures between teacher and student "
                          "distributions (at temperature T, times T^2): forward_kl = KL(teacher || "
                          "student) (Hinton et al.), reverse_kl = KL(student || teacher) (mode-seeking), "
                          "jsd = the generalized Jensen-Shannon divergence of GKD with --jsd-beta "
                          "(TRL's GKDTrainer.generalized_jsd_loss).", choices=DIVERGENCES)
    jsd_beta: float = opt(0.5, "beta of --divergence jsd: M = beta*teacher + (1-beta)*student, "
                          "D = beta*KL(teacher || M) + (1-beta)*KL(student || M); 0 and 1 give the "
                          "forward and reverse KL, as in TRL.")
    hidden_loss_weight: float = opt(0.0, "Layer matching: weight W of the MSE between each student "
                                    "layer's hidden states and its mapped teacher layer's (the "
                                    "spread-out map of the layer copy; encoder and decoder; real tokens "
                                    "only), added to the loss. Different hidden sizes go through learned "
                                    "projections (trained, not exported). 0 (default) turns it off; "
                                    "needs the teacher (--alpha below 1).")
    # --- on-policy distillation (GKD) ----------------------------------------------------------
    on_policy_ratio: float = opt(0.0, "Probability that a training micro-batch's targets are sampled "
                                 "from the current student (on-policy distillation, GKD's lambda); on "
                                 "them the loss is the divergence to the teacher only, no CE.")
    seq_kd_ratio: float = opt(0.0, "Probability that a training micro-batch's targets are sampled from "
                              "the teacher during training (sequence-level KD); divergence only, as "
                              "above. --on-policy-ratio + --seq-kd-ratio must be <= 1; the rest of the "
                              "micro-batches use the dataset's targets.")
    on_policy_temperature: float = opt(1.0, "Sampling temperature for the generated targets of "
                                       "--on-policy-ratio and --seq-kd-ratio.")
    on_policy_max_new_tokens: Optional[int] = opt(None, "Most tokens a generated target may have. "
                                                  "Default: --max-target-length.")
    # --- optimisation ------------------------------------------------------------------------
    num_train_epochs: float = opt(3.0, "Epochs over the training data (ignored when --max-steps > 0).")
    max_steps: int = opt(-1, "Total optimizer steps; > 0 overrides --num-train-epochs.")
    per_device_batch_size: int = opt(8, "Micro-batch size per rank.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    global_batch_size: Optional[int] = opt(None, "Samples per optimizer step over all ranks. When "
                                           "set, gradient accumulation is derived so the global "
                                           "batch is the same whatever the world size; it must be "
                                           "a multiple of per-device batch x world size.")
    learning_rate: float = opt(5e-4, "Peak learning rate (AdamW).")
    warmup_ratio: float = opt(0.05, "Fraction of steps with linear warmup; then linear decay to 0.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    seed: int = opt(42, "Seed for data order, initialisation and dropout.")
    bf16: bool = opt(False, "Train in bfloat16 (recommended on Ampere+ GPUs).")
    fp16: bool = opt(False, "Train in float16 with dynamic loss scaling.")
    # --- DeepSpeed ---------------------------------------------------------------------------
    deepspeed: str = opt(DEFAULT_DEEPSPEED_CONFIG, "DeepSpeed JSON for the student (ZeRO stage 0-2); "
                         "'auto' values are filled from these options.")
    teacher_deepspeed: str = opt(DEFAULT_TEACHER_DEEPSPEED_CONFIG, "DeepSpeed JSON for the teacher "
                                 "(inference, no optimizer).")
    teacher_zero_stage: Optional[int] = opt(None, "0 keeps a full teacher copy per rank; 3 "
                                            "partitions it over ranks. Default: 3 when the world "
                                            "size is > 1, else 0.", choices=(0, 3))
    local_rank: int = opt(-1, "Set by the deepspeed launcher; ignore.", flag="--local_rank")
    # --- evaluation, checkpoints, output -----------------------------------------------------
    eval_steps: int = opt(0, "Evaluate on the validation split every N steps (0: only at the end).")
    save_steps: int = opt(0, "Save a resumable checkpoint every N steps (0: only on signal).")
    save_total_limit: int = opt(2, "Keep at most this many checkpoints (oldest removed).")
    resume: bool = opt(False, "Continue from the latest complete checkpoint in --output-dir.")
    resume_from: Optional[str] = opt(None, "Continue from this checkpoint folder.")
    max_bad_steps: int = opt(10, "Stop (after saving) when this many steps in a row had a NaN/inf loss.")
    output_dir: str = opt("./distilled_model", "Where the student, tokenizer, configs, metrics, "
                          "model card and report go.")
    overwrite_output_dir: bool = opt(False, "Allow a non-empty --output-dir (its files may be replaced).")
    skip_report: bool = opt(False, "Do not run the teacher-vs-student report at the end.")
    report_samples: int = opt(200, "Validation/test rows used by the final report.")
    export_runtime: Optional[str] = opt(None, "Also export the student for a serving runtime: ct2 "
                                        "(CTranslate2), onnx (ONNX Runtime) or ct2,onnx, into "
                                        "OUTPUT_DIR/runtime/, each kept only if it passes the parity check; "
                                        "the report gets a row per runtime.")
    export_quantization: Optional[str] = opt(None, "Weights of --export-runtime: int8, int8_float16 or "
                                             "float16 (onnx: int8 only); default float32.")
    logging_steps: int = opt(10, "Log losses every N steps.")
    log_level: str = opt("info", "What the console and OUTPUT_DIR/train.log show: debug, info, warning "
                         "(warnings and errors only) or error.", choices=LOG_LEVELS)
    report_to: str = opt("none", "Experiment trackers: none, or a comma list of tensorboard, wandb, "
                         "mlflow (README: Watching a run).")
    config: Optional[str] = opt(None, "json or yaml file with any of these options (keys with "
                                "dashes or underscores); flags given on the command line win.")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _none(getattr(self, f.name)))
        self.validate()

    # Each check names the value found and the fix (ARCHITECTURE.md, "Rules").
    def validate(self):
        if self.model_type not in MODEL_TYPES:
            raise UserError(f"--model-type {self.model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}")
        if self.teacher is None and self.teacher_local_path is None:
            raise UserError("no teacher given: pass --teacher HUB_ID or --teacher-local-path DIR")
        if self.dataset is None and self.dataset_local_path is None:
            raise UserError("no dataset given: pass --dataset HUB_NAME or --dataset-local-path PATH")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha {self.alpha} is outside [0, 1]; use e.g. --alpha 0.5 "
                            "(1 = labels only, 0 = teacher only)")
        if not self.temperature > 0:
            raise UserError(f"--temperature {self.temperature} must be > 0; use e.g. --temperature 2")
        if self.divergence not in DIVERGENCES:
            raise UserError(f"--divergence {self.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise UserError(f"--jsd-beta {self.jsd_beta} is outside [0, 1]; use e.g. --jsd-beta 0.5 "
                            "(0 = forward KL, 1 = reverse KL)")
        if not self.hidden_loss_weight >= 0:
            raise UserError(f"--hidden-loss-weight {self.hidden_loss_weight} must be >= 0; use e.g. "
                            "--hidden-loss-weight 1 (0 turns layer matching off)")
        if self.hidden_loss_weight > 0 and self.alpha >= 1.0:
            raise UserError(f"--hidden-loss-weight {self.hidden_loss_weight} needs the teacher, but --alpha 1 "
                            "trains on labels only and never runs it; use --alpha below 1 (e.g. 0.5) or "
                            "drop --hidden-loss-weight")
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are both on; pick one (bf16 is the safer choice on GPUs that have it)")
        for name in ("num_encoder_layers", "num_decoder_layers", "hidden_dim", "vocab_size",
                     "max_train_samples", "max_eval_samples", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value} must be >= 1")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_source_length",
                     "max_target_length", "save_total_limit", "max_bad_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        for name in ("eval_steps", "save_steps", "report_samples", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        if not 0.0 < self.validation_ratio < 1.0:
            raise UserError(f"--validation-ratio {self.validation_ratio} must be in (0, 1), e.g. 0.05")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1), e.g. 0.05")
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate {self.learning_rate} must be > 0, e.g. 5e-4")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError("nothing to train: --max-steps <= 0 and --num-train-epochs <= 0; set one of them")
        if self.loss_impl not in LOSS_IMPLS:
            raise UserError(f"--loss-impl {self.loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}")
        if self.student_init not in STUDENT_INITS:
            raise UserError(f"--student-init {self.student_init!r} is not one of {', '.join(STUDENT_INITS)}")
        if self.target_source not in TARGET_SOURCES:
            raise UserError(f"--target-source {self.target_source!r} is not one of {', '.join(TARGET_SOURCES)}")
        if self.target_source != "reference" and is_unset(self.pseudo_labels):
            raise UserError(f"--target-source {self.target_source} needs the teacher's outputs; pass "
                            "--pseudo-labels DIR (made by python -m distill.pseudo_label)")
        if self.target_source == "reference" and not is_unset(self.pseudo_labels):
            raise UserError("--pseudo-labels is given but --target-source is reference, which does not "
                            "use it; pass --target-source teacher or mixed, or drop --pseudo-labels")
        config_checks.check_teacher_cache(self)
        from distill.tracking import parse_report_to  # the trackers' names live with them

        parse_report_to(self.report_to)  # raises UserError on an unknown one
        from distill.runtime import parse_targets  # the runtimes' names and packages live with them

        parse_targets(self.export_runtime, self.export_quantization, "--export-runtime", "--export-quantization")
        if self.log_level not in LOG_LEVELS:
            raise UserError(f"--log-level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.teacher_zero_stage not in (None, 0, 3):
            raise UserError(f"--teacher-zero-stage {self.teacher_zero_stage} is not supported; use 0 or 3")
        config_checks.check_on_policy(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _none(value):
    # Only the literal None/none becomes None here: an empty string option (e.g. a prefix "")
    # keeps its value; the loaders treat "" as unset through is_unset.
    return None if isinstance(value, str) and value.strip() in ("None", "none") else value


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _str2bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, found {text!r}")


def _optional(kind):
    def parse(text):
        if text is None or str(text).strip() in ("None", "none"):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where there is a default the help text does not already state
    (an option that is unset by default says nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2 at the CLI) instead of exiting itself."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser that raises UserError and states defaults the way this CLI does."""
    return _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)


def add_options(parser: argparse.ArgumentParser, names=None, helps=None) -> None:
    """Add DistillConfig's options to `parser`: all of them, or only the fields in `names` (other
    CLIs, e.g. distill.pseudo_label, share the options that mean the same); `helps` replaces the
    help text of some fields."""
    types = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[str]": str,
             "Optional[float]": float}
    for f in dataclasses.fields(DistillConfig):
        if names is not None and f.name not in names:
            continue
        flags = [_flag(f)]
        if f.name == "local_rank":
            flags.append("--local-rank")
        kwargs = {"dest": f.name, "help": (helps or {}).get(f.name, f.metadata["help"]), "default": f.default}
        if f.type == "bool":
            # `--bf16` alone means true; `--bf16 false` is accepted for configs/scripts.
            kwargs.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
        else:
            kind = types[f.type]
            kwargs["type"] = _optional(kind) if f.type.startswith("Optional") else kind
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"]) + ([None] if f.type.startswith("Optional") else [])
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("seq2seq-distill", "Distill a fine-tuned BART/T5 teacher into a small, fast "
                         "student (alpha*CE + (1-alpha)*T^2*KL) with DeepSpeed.")
    add_options(parser)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"--config {path!r} does not exist; pass a json or yaml file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json/yaml/unicode errors all mean the same thing to the user
        raise UserError(f"--config {path!r} could not be parsed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path!r} holds a {type(data).__name__}; expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    aliases = {"dataset_input_column": "input_column", "dataset_target_column": "target_column"}
    out = {}
    for key, value in data.items():
        name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in known or name == "config":
            raise UserError(f"--config {path!r}: unknown option {key!r}; see --help for the option names")
        out[name] = value
    return out


def parse_args(argv: Optional[list[str]] = None) -> DistillConfig:
    """argv -> validated DistillConfig. Raises UserError on any bad input."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.config:
        file_values = _read_config_file(first.config)
        parser.set_defaults(**file_values)
        first = parser.parse_args(argv)
    values = vars(first)
    try:
        return DistillConfig(**values)
    except TypeError as exc:
        raise UserError(f"bad option value: {exc}") from None
