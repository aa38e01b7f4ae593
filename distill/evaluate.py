"""Teacher vs student report: quality on the same inputs, speed, memory and size.

    python -m distill.evaluate --teacher DIR_OR_ID --student [NAME=]DIR [--student ...] \
        --dataset-local-path data.jsonl --dataset-input-column document \
        --dataset-target-column summary --output-dir report/

How things are measured (also written into every report, so a reader needs no source):
- Quality: greedy decoding (num_beams=1, no sampling) over every evaluation sample, each model
  with its own tokenizer. Greedy is what a latency-bound deployment of a distilled student runs,
  and it is 1/num_beams of the cost of beam search; the model's own generation config (minimum
  length, repetition rules) still applies.
- Speed: every model is warmed up first (one call per measured shape), then repetitions are
  interleaved across models, in an order rotated each round, so drift (thermal, other load)
  hits all models alike; each model's turn starts with one untimed call (the switch from
  another model, its data out of the caches, is not this model's cost). Latency at batch 1,
  greedy and beam (--num-beams): one different input per repetition, p50/p90 in ms.
  Throughput: a batch of --batch-size inputs (cycled if there are fewer), samples/s from the
  median time. Generation stops at EOS, so a model that writes longer
  outputs pays for it; the mean number of new tokens is reported next to the times.
  Beam latency only when --num-beams > 1 (greedy is timed anyway).
- Memory: weights (parameters + buffers) plus the peak tensor memory of one extra, untimed
  batch generation, counted at torch's allocator. CUDA: torch.cuda.max_memory_allocated after a
  reset. CPU: the allocation/free events of torch.profiler(profile_memory=True), summed in time
  order (resident set size does not move: freed pages are reused at once).
- Size: parameters counted once (tied embeddings shared), bytes of weight files on disk.

Models are called by name everywhere (tables, examples, plot, report.json): the teacher
"teacher" (or teacher_name), each student NAME from --student NAME=DIR, else its folder's name,
the teacher in a runtime "teacher [NAME]" (--teacher-runtime: a runtime student's speedups are
against the teacher in the same runtime, so both are served alike).
Columns with nothing measured are left out of the tables; report.json keeps their keys as null.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from distill import runtime
from distill.errors import UserError
from distill.metrics import (METRICS, SPEED_KEYS, compute_metrics, encode, generate,
                             memory_method, pick_main_metric, weights_bytes)
from distill.report_files import (N_EXAMPLES, format_table, name_models, pick_examples,
                                  write_report)

__all__ = ["compute_metrics", "pick_main_metric", "run_report", "format_table", "write_report",
           "parse_student", "main"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MB = 1024 * 1024


# ---------------------------------------------------------------- loading and generation

def _resolve_device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load(path: str, role: str, device, trust_remote_code: bool, runtime_threads: int | None = None):
    """Model and its own tokenizer, through distill.models' loader: safetensors first, pickles
    only with weights_only, no remote code unless asked, a fast one-line error for an
    unreachable Hub id. On CPU everything runs in float32 (half precision is slow or missing
    there); on CUDA each model keeps the dtype it was saved in, and the report shows it."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # models.load_pretrained is the house's one hub/folder loader; evaluate needs it without
    # the trainer's --model-type check, so it calls it rather than load_teacher.
    from distill.models import load_pretrained

    if runtime.is_runtime_folder(path):  # a CTranslate2 / ONNX export of a student (distill/runtime.py)
        return runtime.load(path, role, device, threads=runtime_threads)
    flag = f"--{role}"
    try:
        model = load_pretrained(AutoModelForSeq2SeqLM.from_pretrained, path, role, flag,
                                dtype=torch.float32 if device.type == "cpu" else "auto",
                                weights_only=True, trust_remote_code=trust_remote_code)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, f"{role}'s tokenizer",
                                    flag, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # errors the loader does not translate (e.g. a corrupt safetensors)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"cannot load the {role} from {path!r}: {reason}; pass a folder written "
                        f"by save_pretrained (config.json, model.safetensors, tokenizer)") from None
    # eval mode: dropout off, so outputs are deterministic and the same for every measurement
    return model.to(device).eval(), tokenizer


def _check_folder(path: str, role: str) -> None:
    """Fail before any loading when a model folder lacks its config or tokenizer. The tokenizer
    check matters: transformers 5 quietly builds an empty tokenizer from config.json alone."""
    if runtime.is_runtime_folder(path):
        return runtime.check_folder(path, role)  # a runtime export has files of its own
    if not os.path.isdir(path):
        return  # a Hub id: the loader explains its own failures
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{role} folder {path!r} has no config.json; pass a folder written by "
                        f"save_pretrained (config.json, model.safetensors, tokenizer files)")
    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{role} folder {path!r} has no tokenizer (tokenizer.json or "
                        f"tokenizer_config.json); each model is fed by its own tokenizer, so save "
                        f"it there with tokenizer.save_pretrained")


def _size_on_disk(path: str) -> int | None:
    """Bytes of the weight files the model loads from: those at the top of its folder (a Hub id:
    its local cache snapshot). Subfolders are not the model: a training run's checkpoints/ live
    there."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=True)
        except Exception:  # not cached as a snapshot: report no size rather than guess
            return None
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, f)))


def _predict(entry, sources, *, prefix, max_source_length, max_new_tokens, batch_size, device):
    """Greedy outputs in input order; batches are formed by length to waste little on padding."""
    from tqdm.auto import tqdm

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
    outputs = [""] * len(sources)
    with tqdm(total=len(sources), desc=f"generate {entry['name']}", disable=None) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode(entry["tokenizer"], [sources[i] for i in idx], prefix,
                         max_source_length, device)
            out = generate(entry["model"], enc, 1, max_new_tokens)
            texts = entry["tokenizer"].batch_decode(out, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = text.strip()
            bar.update(len(idx))
    return outputs


# ---------------------------------------------------------------- the report

@contextlib.contextmanager
def _out_of_memory_is_user_error(batch_size):
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory generating batches of {batch_size}; pass a smaller "
                        f"--batch-size (or --max-source-length / --max-new-tokens)") from None


def _parameters_from_config(path: str, trust_remote_code: bool) -> int:
    """A model's parameter count (tied weights once) from its config alone: built on the meta
    device, so no memory is used for weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _ratio(num, den):
    return num / den if num is not None and den else None


def _runtime_key(path: str) -> tuple[str, str | None]:
    manifest = runtime.read_manifest(os.path.expanduser(path))
    return manifest["runtime"], manifest.get("quantization")


def _teacher_runtime_rows(teacher: str, named, folders) -> dict[tuple[str, str | None], tuple[str, str]]:
    """(runtime, quantization) -> (name, path) per --teacher-runtime folder, in the given order;
    UserError for a folder that is not a runtime export of this teacher, or two of the same
    runtime and quantization."""
    rows, keys = {}, {}
    taken = {name for name, _, _ in named}
    for path in folders:
        folder = os.path.expanduser(path)
        how = "python -m distill.export_runtime TEACHER_DIR --to ct2 (or onnx)"
        if not os.path.isdir(folder) or not runtime.is_runtime_folder(folder):
            raise UserError(f"--teacher-runtime {path!r} is not a runtime folder (no {runtime.MANIFEST}); "
                            f"export the teacher with {how}")
        manifest = runtime.read_manifest(folder, "teacher")
        key = (manifest["runtime"], manifest.get("quantization"))
        name = f"{named[0][0]} [{runtime.folder_name(*key)}]"
        if key in keys:
            raise UserError(f"--teacher-runtime {keys[key]!r} and {path!r} are both {runtime.folder_name(*key)}; "
                            f"give one teacher folder per runtime and quantization")
        if name in taken:
            raise UserError(f"two models are named {name!r}; rename the student with --student NAME=DIR")
        expanded = os.path.expanduser(teacher)
        if os.path.isfile(os.path.join(expanded, "config.json")) and (
                runtime.weights_fingerprint(expanded) != manifest["student"]["weights_sha256"]):
            raise UserError(f"--teacher-runtime {path!r} was exported from other weights than the teacher "
                            f"{teacher!r}; export this teacher: {how.replace('TEACHER_DIR', teacher)}")
        keys[key] = path
        taken.add(name)
        rows[key] = (name, path)
    return rows


def _speed_baseline(path: str, teachers) -> tuple[str, str] | None:
    """The teacher runtime (name, its runtime folder name) a runtime student's speedups are
    measured against: the one of the same runtime and quantization, else the float32 one; None
    (the PyTorch teacher) for a PyTorch student or when no such teacher runtime was given."""
    if not teachers or not runtime.is_runtime_folder(os.path.expanduser(path)):
        return None
    kind, quantization = _runtime_key(path)
    for key in ((kind, quantization), (kind, None)):
        if key in teachers:
            return teachers[key][0], runtime.folder_name(*key)
    return None


def run_report(teacher: str, students: list[str | tuple[str, str]], sources: list[str],
               references: list[str], output_dir: str, *, teacher_name="teacher",
               main_metric="auto", source_prefix="", max_source_length=512, max_new_tokens=128,
               batch_size=32, num_beams=4, speed_repeats=5, skip_speed=False, device=None,
               trust_remote_code=False, teacher_outputs: list[str] | None = None,
               teacher_outputs_from: str | None = None, teacher_runtimes: list[str] = (),
               runtime_threads: int | None = None, log=print) -> dict:
    """Evaluate the teacher and each student on `sources`; write report.md, report.json and
    quality_vs_speed.png into `output_dir`; return the report.json content.

    A student is a folder (named after it) or a (name, folder) pair; the teacher is named
    `teacher_name`. report.json's "models" is keyed by these names, each with its "role";
    "headline_student" names the first student, which the top-level figures compare with the
    teacher: speedup_b1 (greedy batch-1 p50 latency ratio), speedup_b32 (throughput ratio at
    `batch_size`, 32 by default) and quality_retention (student's main metric / teacher's).
    Raises UserError on bad input, before anything is written.

    `teacher_outputs`: the teacher's greedy outputs for `sources`, made elsewhere (the trainer's
    report, where the teacher stays partitioned over the ranks: `teacher_outputs_from` says how).
    The teacher is then never loaded: its quality comes from them, its speed and memory are not
    measured (nor the speedups), its size is counted from its config.

    `teacher_runtimes`: runtime folders of the teacher (python -m distill.export_runtime on the
    teacher's folder), each a row named "TEACHER [NAME]" (role "teacher-runtime"). A student
    that is a runtime folder then takes its speedups against the teacher in the same runtime
    (same quantization if given, else the float32 one): served alike, the ratio is the models',
    not the runtimes'. Each student's "speedup_vs" names its baseline; report["same_runtime"]
    lists those pairs. Quality kept is always against the PyTorch teacher. `runtime_threads`:
    the threads each runtime computes with (default: torch's thread count, as PyTorch's rows).
    """
    import torch

    if not students:
        raise UserError("no student given; pass at least one --student folder")
    named = name_models(teacher, teacher_name, students)
    teachers_in_runtimes = _teacher_runtime_rows(teacher, named, teacher_runtimes)
    named += [(name, "teacher-runtime", path) for name, path in teachers_in_runtimes.values()]
    for name, role, path in named[1:]:
        if not os.path.isdir(os.path.expanduser(path)):
            raise UserError(f"student folder {path!r} ({name!r}) not found; pass the folder the "
                            f"trainer exported (it holds config.json and the weights)")
    if teacher.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(teacher)):
        raise UserError(f"teacher folder {teacher!r} not found; pass a model folder or a Hub id")
    for _, role, path in named:
        _check_folder(os.path.expanduser(path), role)
    if not sources:
        raise UserError("no evaluation samples; the evaluation split is empty")
    if len(sources) != len(references):
        raise UserError(f"{len(sources)} sources but {len(references)} references; "
                        f"every input needs its target")
    for name, value, low in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("num_beams", num_beams, 1), ("speed_repeats", speed_repeats, 1),
                             ("max_source_length", max_source_length, 1),
                             ("runtime_threads", 1 if runtime_threads is None else runtime_threads, 1)):
        if int(value) < low:
            raise UserError(f"{name} is {value}; expected an integer >= {low}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"output path {output_dir!r} is a file; pass a folder for the report")
    main_metric = pick_main_metric(main_metric, references, sources)
    device = _resolve_device(device)

    if teacher_outputs is not None and len(teacher_outputs) != len(sources):
        raise UserError(f"{len(teacher_outputs)} teacher outputs for {len(sources)} sources")
    entries = []
    for name, role, path in named:
        if role == "teacher" and teacher_outputs is not None:
            log(f"evaluate: {role} {name!r}: outputs given ({teacher_outputs_from or 'made elsewhere'})")
            entries.append({"name": name, "role": role, "path": path, "model": None, "tokenizer": None})
            continue
        log(f"evaluate: loading {role} {name!r} from {path}")
        model, tokenizer = _load(os.path.expanduser(path), role, device, trust_remote_code, runtime_threads)
        entries.append({"name": name, "role": role, "path": path, "model": model,
                        "tokenizer": tokenizer})

    models = {}
    predictions = {}
    with torch.inference_mode(), _out_of_memory_is_user_error(batch_size):
        for e in entries:
            disk = _size_on_disk(os.path.expanduser(e["path"]))
            if e["model"] is None:  # outputs given: nothing is loaded, the size comes from the config
                predictions[e["name"]] = [text.strip() for text in teacher_outputs]
                sizes = {"dtype": None, "parameters": _parameters_from_config(os.path.expanduser(e["path"]),
                                                                              trust_remote_code),
                         "weights_mb": None}
            else:
                log(f"evaluate: {e['name']} greedy outputs for {len(sources)} samples")
                predictions[e["name"]] = _predict(
                    e, sources, prefix=source_prefix, max_source_length=max_source_length,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
                sizes = e["model"].sizes() if isinstance(e["model"], runtime.RuntimeModel) else {
                    "dtype": str(next(e["model"].parameters()).dtype).replace("torch.", ""),
                    "parameters": sum(p.numel() for p in e["model"].parameters()),
                    "weights_mb": weights_bytes(e["model"]) / MB}
            models[e["name"]] = {
                "role": e["role"],
                "path": e["path"],
                **sizes,
                "size_on_disk_mb": disk / MB if disk is not None else None,
                **compute_metrics(predictions[e["name"]], references),
            }
        speed = {}
        if not skip_speed:
            speed = runtime.measure_speed(
                {e["name"]: (e["model"], e["tokenizer"]) for e in entries if e["model"] is not None}, sources,
                source_prefix=source_prefix, max_source_length=max_source_length,
                max_new_tokens=max_new_tokens, batch_size=batch_size, num_beams=num_beams,
                repeats=speed_repeats, device=device, log=log)
    for name, figures in models.items():
        figures.update(speed.get(name, dict.fromkeys(SPEED_KEYS)))
    t = models[named[0][0]]
    same_runtime = []
    for name, role, path in named:
        if role != "student":
            continue
        m = models[name]
        served = _speed_baseline(path, teachers_in_runtimes)
        vs = served[0] if served else named[0][0]
        b = models[vs]
        m["speedup_vs"] = vs
        m["speedup_b1"] = _ratio(b["latency_greedy_b1_p50_ms"], m["latency_greedy_b1_p50_ms"])
        m["speedup_b32"] = _ratio(m["throughput_samples_per_s"], b["throughput_samples_per_s"])
        m["quality_retention"] = _ratio(m[main_metric], t[main_metric])
        if served:
            same_runtime.append({"runtime": served[1], "student": name, "teacher": vs,
                                 "speedup_b1": m["speedup_b1"], "speedup_b32": m["speedup_b32"],
                                 "quality_retention": m["quality_retention"]})
    headline = named[1][0]
    first = models[headline]
    report = {
        "main_metric": main_metric,
        "headline_student": headline,
        "speedup_b1": first["speedup_b1"],
        "speedup_b32": first["speedup_b32"],
        "quality_retention": first["quality_retention"],
        "same_runtime": same_runtime,
        "models": models,
        "settings": {
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "threads": torch.get_num_threads(),
            "runtime_threads": (runtime_threads or torch.get_num_threads()) if any(
                isinstance(e["model"], runtime.RuntimeModel) for e in entries) else None,
            "n_samples": len(sources),
            "speed_repeats": 0 if skip_speed else speed_repeats,
            "quality_decoding": "greedy",
            "num_beams": num_beams,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_source_length": max_source_length,
            "source_prefix": source_prefix,
            "memory_method": memory_method(device),
            "torch": torch.__version__,
            "teacher_outputs_from": teacher_outputs_from if teacher_outputs is not None else None,
        },
        "examples": [{"row": i, "source": sources[i], "reference": references[i],
                      "outputs": {n: predictions[n][i] for n in predictions}}
                     for i in pick_examples(references, predictions, N_EXAMPLES)],
    }
    write_report(report, output_dir, log)
    for e in entries:  # free the models before the caller (the trainer) carries on
        e.clear()
    return report


# ---------------------------------------------------------------- CLI

def parse_student(value: str) -> str | tuple[str, str]:
    """--student's value: DIR, or NAME=DIR to call the model NAME in the report. An existing
    folder wins, so a folder whose name holds '=' still works as a plain DIR."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return value
    name, sep, folder = value.partition("=")
    if sep and name.strip() and folder:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise UserError(f"student folder {folder!r} (named {name.strip()!r}) not found; pass "
                            f"--student NAME=DIR with the folder the trainer exported")
        return name.strip(), folder
    raise UserError(f"student folder {value!r} not found; pass --student DIR or "
                    f"--student NAME=DIR with the folder the trainer exported")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher folder or Hub model id")
    p.add_argument("--student", action="append", required=True, metavar="[NAME=]DIR",
                   help="student folder, or NAME=DIR to call it NAME in the report (default: "
                        "the folder's name); repeat to compare several (the first is headlined)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="Hub dataset name")
    src.add_argument("--dataset-local-path", help="save_to_disk folder or json/jsonl/csv/tsv/parquet")
    p.add_argument("--dataset-input-column", required=True)
    p.add_argument("--dataset-target-column", required=True)
    p.add_argument("--teacher-runtime", action="append", default=[], metavar="DIR",
                   help="the teacher exported for a runtime (python -m distill.export_runtime TEACHER "
                        "--to ct2): a row of its own, and runtime students' speedups are measured "
                        "against it (both served alike); repeat for several runtimes")
    p.add_argument("--runtime-threads", type=int, default=None, metavar="N",
                   help="threads of each runtime row (CTranslate2's intra_threads, ONNX Runtime's "
                        "intra-op threads; default: torch's thread count)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: test if present, else validation)")
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--source-prefix", default="", help='e.g. "summarize: " for T5')
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--main-metric", default="auto", help=f"auto or one of {', '.join(METRICS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=4,
                   help="beam width of the latency figure (1: greedy only)")
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage line; tests get the code back
        return int(exc.code or 0)
    try:
        if args.max_eval_samples is not None and args.max_eval_samples < 1:
            raise UserError(f"--max-eval-samples is {args.max_eval_samples}; expected >= 1")
        if args.main_metric != "auto" and args.main_metric not in METRICS:
            raise UserError(f"unknown metric {args.main_metric!r}; expected auto or one of "
                            f"{', '.join(METRICS)}")
        students = [parse_student(value) for value in args.student]
        from distill.data import load_raw_splits

        splits = load_raw_splits(args.dataset, args.dataset_local_path, args.dataset_input_column,
                                 args.dataset_target_column,
                                 trust_remote_code=args.trust_remote_code)
        split = args.split or ("test" if "test" in splits else "validation")
        if split not in splits:
            raise UserError(f"split {split!r} not in the dataset (found {', '.join(splits)}); "
                            f"pass --split with one of those")
        data = splits[split]
        if args.max_eval_samples is not None:
            data = data.select(range(min(args.max_eval_samples, len(data))))
        print(f"evaluate: {len(data)} samples from split {split!r}")
        report = run_report(
            args.teacher, students, list(data["source"]), list(data["target"]),
            args.output_dir, main_metric=args.main_metric, source_prefix=args.source_prefix,
            max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, num_beams=args.num_beams,
            speed_repeats=args.speed_repeats, skip_speed=args.skip_speed,
            trust_remote_code=args.trust_remote_code, teacher_runtimes=args.teacher_runtime,
            runtime_threads=args.runtime_threads)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
