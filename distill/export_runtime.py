"""python -m distill.export_runtime: a trained student -> parity-checked CTranslate2 / ONNX Runtime folders.

Each folder is kept only if it decodes like the PyTorch student (the parity check, below).

    python -m distill.export_runtime STUDENT_DIR --to ct2[,onnx] [--quantization int8|int8_float16|float16]
        [--parity-samples 32] [--dataset-local-path data.jsonl --dataset-input-column document
         --dataset-target-column summary] [--split validation]
    python -m distill.train ... --export-runtime ct2[,onnx] [--export-quantization int8]

Each target is written to STUDENT_DIR/runtime/NAME (NAME: ct2, ct2-int8, onnx, onnx-int8, ...;
distill/runtime.py describes the folder). It is staged in runtime/.NAME.partial, checked, and
renamed into place; the folder it replaces is removed only after that. A failed conversion or
check removes the staging folder and leaves an earlier NAME as it was. Nothing of the PyTorch
student (STUDENT_DIR's own files) is ever written.

The parity check: the PyTorch student (float32, CPU) and the runtime decode the same inputs
greedily in the same batches, with the student's generation config. A float32 export must give
the same token ids for every input; a quantized one (int8, int8_float16, float16: weights
rounded) must keep the main metric (distill/metrics.py's rule, on the inputs' references) within
1 point of the student's. The inputs: --parity-samples rows (default 100) of --split of the
dataset; the dataset, columns, prefix and lengths default to the student's distill_config.json
(what it was trained with; the same validation split is cut from train when the data has none).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from distill import runtime
from distill.errors import UserError

# A quantized export is held to the main metric, and on 32 inputs a single changed output moves
# BLEU or exact match by 1-3 points: 100 keeps one output below the tolerance on most tasks.
PARITY_SAMPLES = 100
METRIC_TOLERANCE = 1.0  # points (0-100) a quantized export's main metric may move


def check_student(student_dir: str, flag: str = "STUDENT_DIR") -> str:
    """The student's model type; UserError unless the folder is an exported student."""
    if not os.path.isdir(student_dir):
        raise UserError(f"{flag} {student_dir!r} is not a folder; pass the folder the trainer exported")
    if runtime.is_runtime_folder(student_dir):
        raise UserError(f"{flag} {student_dir!r} is a runtime folder; pass the student folder it was "
                        f"exported from")
    files = os.listdir(student_dir)
    if ("config.json" not in files or not any(f.endswith(".safetensors") for f in files)
            or "tokenizer_config.json" not in files):
        raise UserError(f"{flag} {student_dir!r} is not a student folder (expected config.json, "
                        f"model.safetensors and the tokenizer); pass the folder the trainer exported")
    try:
        with open(os.path.join(student_dir, "config.json"), encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    except ValueError:
        raise UserError(f"{flag} {student_dir!r}: config.json is not valid JSON") from None
    if model_type not in runtime.MODEL_TYPES:
        raise UserError(f"the student in {student_dir!r} is a {model_type!r} model; the runtime export "
                        f"supports {', '.join(runtime.MODEL_TYPES)}")
    return model_type


def _batches(sources: list[str], batch_size: int) -> list[list[int]]:
    """Indices by length, longest first (little padding), the same for both models."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def greedy_ids(model, tokenizer, sources, *, prefix, max_source_length, max_new_tokens, batch_size,
               eos_ids) -> list[list[int]]:
    """Greedy generated ids per source (start token dropped, cut after EOS), the way
    distill/evaluate.py generates: metrics.encode + metrics.generate."""
    from distill.metrics import encode, generate

    outputs = [None] * len(sources)
    for idx in _batches(sources, batch_size):
        enc = encode(tokenizer, [sources[i] for i in idx], prefix, max_source_length, "cpu")
        for i, row in zip(idx, generate(model, enc, 1, max_new_tokens)):
            outputs[i] = runtime.cut_at_eos(row[1:].tolist(), eos_ids)
    return outputs


def check_parity(name, quantization, student_ids, runtime_ids, tokenizer, sources, references,
                 main_metric="auto") -> dict:
    """The parity record for runtime.json; UserError (one line) when the rule is not met."""
    from distill.metrics import compute_metrics, pick_main_metric

    n = len(student_ids)
    differ = [i for i in range(n) if student_ids[i] != runtime_ids[i]]
    record = {"samples": n, "identical": n - len(differ)}
    if quantization is None:
        record["rule"] = "float32: the same greedy token ids as the PyTorch student on every input"
        if differ:
            i = differ[0]
            at = next((k for k, (a, b) in enumerate(zip(student_ids[i], runtime_ids[i])) if a != b),
                      min(len(student_ids[i]), len(runtime_ids[i])))
            raise UserError(f"{name} failed its parity check: {len(differ)} of {n} greedy outputs differ "
                            f"from the PyTorch student's (first: input {i}, token {at}); the runtime "
                            f"folder was not kept and the student is untouched")
        return record
    decode = lambda ids: [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    metric = pick_main_metric(main_metric, references, sources)
    ours = compute_metrics(decode(student_ids), references)[metric]
    theirs = compute_metrics(decode(runtime_ids), references)[metric]
    record.update(rule=f"{quantization}: main metric within {METRIC_TOLERANCE:g} point of the PyTorch "
                       f"student's", metric=metric, student=ours, runtime=theirs)
    if abs(theirs - ours) > METRIC_TOLERANCE:
        raise UserError(f"{name} failed its parity check: {metric} {theirs:.2f} against the PyTorch "
                        f"student's {ours:.2f} on {n} inputs (allowed: within {METRIC_TOLERANCE:g}; "
                        f"{len(differ)} outputs differ); the runtime folder was not kept and the student "
                        f"is untouched; try another --quantization, or more --parity-samples when a "
                        f"single output moves the metric by more than a point")
    return record


def _install(staging: str, final: str) -> None:
    """Rename the checked folder into place; the one it replaces goes after that."""
    from distill.guard import fsync_dir

    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(os.path.dirname(final))
    shutil.rmtree(old, ignore_errors=True)


def export_runtimes(student_dir: str, targets: list[str], quantization: str | None, sources: list[str],
                    references: list[str], *, source_prefix: str = "", max_source_length: int = 512,
                    max_new_tokens: int = 128, batch_size: int = 32, main_metric: str = "auto",
                    trust_remote_code: bool = False, errors: list | None = None, root: str | None = None,
                    log=print) -> list[str]:
    """Export, check and install each target in turn; returns the runtime folders written.
    A target that fails raises UserError (those before it stay installed), or, when an `errors`
    list is given, adds its line there and the next target goes on. `root`: where the folders go
    (default STUDENT_DIR/runtime; the demo puts its teacher's beside its run, not in the teacher's
    folder); the manifest points back to the model by a relative path either way."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from distill.export import write_json
    from distill.models import load_pretrained  # the house loader: safetensors, one-line errors
    from distill.runtime_convert import convert_ct2, export_onnx

    model_type = check_student(student_dir)
    if not sources:
        raise UserError("no parity inputs: the split is empty; pass --split or another dataset")
    model = load_pretrained(AutoModelForSeq2SeqLM.from_pretrained, student_dir, "student", "STUDENT_DIR",
                            dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, student_dir, "student's tokenizer",
                                "STUDENT_DIR", trust_remote_code=trust_remote_code)
    rules = runtime.decoding_rules(model.generation_config)
    common = dict(prefix=source_prefix, max_source_length=max_source_length,
                  max_new_tokens=max_new_tokens, batch_size=batch_size, eos_ids=rules["eos_token_ids"])
    with torch.inference_mode():
        student_ids = greedy_ids(model, tokenizer, sources, **common)
    root = root or os.path.join(student_dir, runtime.RUNTIME_DIR)
    created_root = not os.path.exists(root)
    written = []
    for target in targets:
        name = runtime.folder_name(target, quantization)
        final, staging = os.path.join(root, name), os.path.join(root, f".{name}.partial")
        log(f"export_runtime: {name}: converting {student_dir}")
        start = time.time()
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier export that was stopped
        try:
            if target == "ct2":
                start_token = tokenizer.convert_ids_to_tokens(rules["decoder_start_token_id"])
                files = convert_ct2(student_dir, staging, quantization, start_token, trust_remote_code)
            else:
                files = export_onnx(model, staging, quantization)
            tokenizer.save_pretrained(staging)
            manifest = _manifest(target, quantization, model_type, model, rules, student_dir, final, files,
                                 source_prefix, max_source_length)
            write_json(os.path.join(staging, runtime.MANIFEST), manifest)
            loaded, _ = runtime.load(staging, check_student=False)
            with torch.inference_mode():
                runtime_ids = greedy_ids(loaded, tokenizer, sources, **common)
            del loaded
            manifest["parity"] = check_parity(name, quantization, student_ids, runtime_ids, tokenizer,
                                              sources, references, main_metric)
            write_json(os.path.join(staging, runtime.MANIFEST), manifest)
            _install(staging, final)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if created_root and not written:
                shutil.rmtree(root, ignore_errors=True)  # nothing was kept: leave no empty folder
            if errors is None or not isinstance(exc, UserError):
                raise
            log(f"export_runtime: {name} not kept: {exc}")
            errors.append(str(exc))
            continue
        p = manifest["parity"]
        how = (f"{p['identical']}/{p['samples']} identical" if quantization is None else
               f"{p['metric']} {p['runtime']:.2f} vs {p['student']:.2f}, {p['identical']}/{p['samples']} identical")
        log(f"export_runtime: {name}: parity passed ({how}); written to {final} in {time.time() - start:.1f} s")
        written.append(final)
    return written


def _manifest(target, quantization, model_type, model, rules, student_dir, final, files, prefix,
              max_source_length) -> dict:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", *{"ct2": ("ctranslate2",),
                                                                        "onnx": ("onnx", "onnxruntime")}[target])}
    return {"format": 1, "runtime": target, "quantization": quantization, "model_type": model_type,
            "files": [f for f in files if f.endswith((".bin", ".onnx"))],
            "student": {"path": os.path.relpath(student_dir, final),  # "../.." for STUDENT_DIR/runtime/NAME
                        "weights_sha256": runtime.weights_fingerprint(student_dir),
                        "parameters": sum(p.numel() for p in model.parameters())},
            "generation": rules, "source_prefix": prefix, "max_source_length": max_source_length,
            "versions": versions, "parity": None}


def for_training(cfg, raw, log) -> tuple[list[str], str | None]:
    """The trainer's --export-runtime, after export_student (rank 0): the runtime folders written
    and the error line of the first failure (None when all passed); a failed target does not
    stop the next. Parity inputs: the first PARITY_SAMPLES validation rows."""
    targets = runtime.parse_targets(cfg.export_runtime, cfg.export_quantization, "--export-runtime",
                                    "--export-quantization")
    split = raw["validation"] if "validation" in raw else raw["train"]
    rows = split.select(range(min(PARITY_SAMPLES, len(split))))
    errors = []
    try:
        written = export_runtimes(cfg.output_dir, targets, cfg.export_quantization, list(rows["source"]),
                                  list(rows["target"]), source_prefix=cfg.source_prefix,
                                  max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_target_length,
                                  trust_remote_code=cfg.trust_remote_code, errors=errors, log=log)
    except UserError as exc:  # before any target (e.g. a generation rule no runtime applies)
        return [], str(exc)
    return written, (errors[0] if errors else None)


# ---------------------------------------------------------------- CLI

def build_parser():
    from distill.config import make_parser

    p = make_parser("python -m distill.export_runtime", __doc__.splitlines()[0])
    p.add_argument("student_dir", metavar="STUDENT_DIR", help="the folder the trainer exported")
    p.add_argument("--to", required=True, help="ct2, onnx, or both: ct2,onnx")
    p.add_argument("--quantization", default=None, help="int8, int8_float16 or float16 (onnx: int8 "
                   "only); default float32, checked for identical token ids")
    p.add_argument("--parity-samples", type=int, default=PARITY_SAMPLES, help="inputs of the parity check")
    p.add_argument("--dataset", default=None, help="Hub dataset of the parity inputs (default: the "
                   "student's distill_config.json)")
    p.add_argument("--dataset-local-path", default=None, help="local dataset of the parity inputs "
                   "(default: the student's distill_config.json)")
    p.add_argument("--dataset-input-column", default=None)
    p.add_argument("--dataset-target-column", default=None)
    p.add_argument("--split", default="validation", help="split of the parity inputs")
    p.add_argument("--source-prefix", default=None, help="default: the student's")
    p.add_argument("--max-source-length", type=int, default=None, help="default: the student's")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the student's --max-target-length")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per generate call in the check")
    p.add_argument("--main-metric", default="auto", help="metric of the quantized rule (auto: "
                   "distill/metrics.py's rule)")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def _settings(args) -> dict:
    """The options, the unset ones from the student's distill_config.json (how it was trained)."""
    trained = {}
    path = os.path.join(args.student_dir, "distill_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                trained = json.load(fh)
        except ValueError:
            raise UserError(f"{path!r} is not valid JSON; pass the dataset options explicitly") from None
    given = lambda value, key, default: value if value is not None else trained.get(key, default)
    dataset, local = args.dataset, args.dataset_local_path
    if dataset is None and local is None:
        dataset, local = trained.get("dataset"), trained.get("dataset_local_path")
    if dataset is None and local is None:
        raise UserError(f"no parity inputs: {args.student_dir!r} has no distill_config.json naming its "
                        f"data; pass --dataset-local-path PATH (with --dataset-input-column and "
                        f"--dataset-target-column)")
    settings = {"dataset": dataset, "dataset_local_path": local,
                "input_column": given(args.dataset_input_column, "input_column", "source"),
                "target_column": given(args.dataset_target_column, "target_column", "target"),
                "source_prefix": given(args.source_prefix, "source_prefix", ""),
                "max_source_length": given(args.max_source_length, "max_source_length", 512),
                "max_new_tokens": given(args.max_new_tokens, "max_target_length", 128),
                "validation_ratio": trained.get("validation_ratio", 0.05), "seed": trained.get("seed", 42)}
    for flag, value in (("--parity-samples", args.parity_samples), ("--batch-size", args.batch_size),
                        ("--max-source-length", settings["max_source_length"]),
                        ("--max-new-tokens", settings["max_new_tokens"])):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} is {value!r}; expected an integer >= 1")
    return settings


def _parity_inputs(args, settings) -> tuple[list[str], list[str]]:
    from distill.data import load_raw_splits

    splits = load_raw_splits(settings["dataset"], settings["dataset_local_path"], settings["input_column"],
                             settings["target_column"], validation_ratio=settings["validation_ratio"],
                             seed=settings["seed"], trust_remote_code=args.trust_remote_code,
                             log=lambda *a: None)
    if args.split not in splits:
        raise UserError(f"split {args.split!r} not in the dataset (found {', '.join(splits)}); pass "
                        f"--split with one of those")
    rows = splits[args.split].select(range(min(args.parity_samples, len(splits[args.split]))))
    return list(rows["source"]), list(rows["target"])


def main(argv=None) -> int:
    from distill import logs
    from distill.guard import output_dir_lock

    opened_here = logs.active() is None
    lib = logs.quiet_libraries()  # the libraries' notices and loading bars stay off the console
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help; tests get the code back
            return int(exc.code or 0)
        targets = runtime.parse_targets(args.to, args.quantization)
        check_student(args.student_dir)
        if args.main_metric != "auto":
            from distill.metrics import pick_main_metric

            pick_main_metric(args.main_metric, [])  # an unknown name is refused here, not after converting
        settings = _settings(args)
        sources, references = _parity_inputs(args, settings)
        print(f"export_runtime: parity on {len(sources)} {args.split} inputs")
        with output_dir_lock(args.student_dir):  # not while a run trains into the same folder
            export_runtimes(args.student_dir, targets, args.quantization, sources, references,
                            source_prefix=settings["source_prefix"],
                            max_source_length=settings["max_source_length"],
                            max_new_tokens=settings["max_new_tokens"], batch_size=args.batch_size,
                            main_metric=args.main_metric, trust_remote_code=args.trust_remote_code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if opened_here:
            lib.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
