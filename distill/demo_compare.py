"""`python -m distill.demo --compare`: every distillation method against plain fine-tuning.

All methods train the same student shape from the same start (the teacher's copied layers) with
the same data, step budget and learning rate, over several seeds (the seed sets data order and
dropout), and are scored on the same clean test references (exact match, greedy). The baseline is
"shrink and fine-tune": the same student trained on the (noisy) references alone. A method's
figure is the mean over seeds with its spread (min-max); a gap counts only where it is larger
than the spreads.

Methods (the options each adds to the student's training run):
    ce            labels only (alpha 1): the baseline
    kd            word-level KD, forward KL(teacher || student), alpha 0.5
    kd_reverse    word-level KD with the reverse KL(student || teacher), alpha 0.5
    kd_jsd        word-level KD with GKD's generalized JSD (beta 0.5), alpha 0.5
    gkd           on-policy distillation (GKD): half the micro-batches on the student's own
                  samples, JSD (beta 0.5) on them; the other half word-level KD on the references
    seq_kd        sequence-level KD: CE on the teacher's greedy outputs for the training inputs
                  (python -m distill.pseudo_label, made once for all seeds), alpha 1
    seq_kd_kd     both: the teacher's outputs as targets and word-level KD, alpha 0.5
    kd_cache_topkK, kd_cache_sampleK (K = 8, 32, 64)
                  kd trained from a teacher cache (python -m distill.cache_teacher, built once
                  per method and K over the rows the students train on): the sparse loss
                  instead of the live teacher (not in the default list: --methods names them)
Every method's figure is reported, including those that do not help.
"""
from __future__ import annotations

import json
import os
import statistics

PSEUDO = "<pseudo-labels>"  # stands for the folder run_compare makes with distill.pseudo_label
METHODS: dict[str, dict] = {
    "ce": dict(label="CE only (shrink and fine-tune)", alpha=1.0),
    "kd": dict(label="word-level KD (forward KL)", alpha=0.5),
    "kd_reverse": dict(label="word-level KD (reverse KL)", alpha=0.5, divergence="reverse_kl"),
    "kd_jsd": dict(label="word-level KD (JSD, beta 0.5)", alpha=0.5, divergence="jsd", jsd_beta=0.5),
    "gkd": dict(label="on-policy GKD (lambda 0.5, JSD)", alpha=0.5, divergence="jsd", jsd_beta=0.5,
                on_policy_ratio=0.5),
    "seq_kd": dict(label="sequence-level KD (teacher outputs)", alpha=1.0, target_source="teacher",
                   pseudo_labels=PSEUDO),
    "seq_kd_kd": dict(label="sequence-level + word-level KD", alpha=0.5, target_source="teacher",
                      pseudo_labels=PSEUDO),
}
CACHE = "<teacher-cache>"  # stands for the folder run_compare builds with distill.cache_teacher
CACHE_KS = (8, 32, 64)
CACHE_METHODS = {f"kd_cache_{how}{k}": dict(label=f"word-level KD from a {how} K={k} teacher cache", alpha=0.5,
                                             teacher_cache=(CACHE, how, k))
                 for how in ("topk", "sample") for k in CACHE_KS}
DEFAULT_SEEDS = (0, 1, 2)


def parse_methods(text: str | None) -> list[str]:
    from distill.errors import UserError

    names = list(METHODS) if not text else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS and m not in CACHE_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method(s) {', '.join(unknown)}; pick from "
                        f"{', '.join([*METHODS, *CACHE_METHODS])}")
    return names


def parse_seeds(text: str | None) -> list[int]:
    from distill.errors import UserError

    if not text:
        return list(DEFAULT_SEEDS)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds is empty; pass e.g. 0,1,2")
    return seeds


def run_compare(train, teacher: str, task_dir: str, out: str, test: list[dict], *, layers, budget: dict,
                methods: list[str], seeds: list[int], max_len: int, labeled_rows: int | None = None,
                log=print) -> dict:
    """Train every (method, seed) student with `train(init, task, out_dir, layers, **options)`,
    score them with the teacher on `test`, write compare.json and compare.md into `out`.

    `labeled_rows`: the scarce-labels setting. Only the first `labeled_rows` training rows keep
    their references (what the methods that learn from references see, repeated over the same
    step budget); the other training inputs are unlabeled, and only the methods that train on
    the teacher's outputs (sequence-level KD) can use them."""
    from distill.evaluate import run_report

    pseudo = None
    if any(METHODS.get(m, {}).get("pseudo_labels") == PSEUDO for m in methods):
        pseudo = make_pseudo_labels(teacher, task_dir, os.path.join(out, "teacher-outputs"),
                                    rows=budget["rows"], max_len=max_len, log=log)
    setting = _setting(labeled_rows)
    caches = {}
    for method in methods:
        if method in CACHE_METHODS:
            _, how, k = CACHE_METHODS[method]["teacher_cache"]
            caches[method] = make_teacher_cache(teacher, task_dir, os.path.join(out, f"teacher-cache-{how}{k}" + setting),
                                                rows=labeled_rows or budget["rows"], max_len=max_len, how=how, k=k,
                                                log=log)
    runs = {}
    for seed in seeds:
        students = []
        for method in methods:
            spec = {k: (pseudo if v == PSEUDO else caches[method] if k == "teacher_cache" else v)
                    for k, v in {**METHODS, **CACHE_METHODS}[method].items() if k != "label"}
            if labeled_rows and METHODS.get(method, {}).get("pseudo_labels") != PSEUDO:
                spec["max_train_samples"] = labeled_rows
            folder = os.path.join(out, "compare", f"{method}-seed{seed}" + setting)
            label = {**METHODS, **CACHE_METHODS}[method]["label"]
            if _trained(folder, dict(spec, seed=seed, max_steps=budget["steps"])):
                log(f"compare: {label}, seed {seed}: trained already in {folder}")
            else:
                log(f"compare: {label}, seed {seed}")
                train(teacher, task_dir, folder, layers, student_init="teacher",
                      **dict(budget, seed=seed), **spec)
            students.append((f"{method}-seed{seed}", folder))
        report = run_report(teacher, students, [r["source"] for r in test], [r["target"] for r in test],
                            os.path.join(out, "compare", f"report-seed{seed}{setting}"), main_metric="exact_match",
                            max_source_length=max_len, max_new_tokens=max_len, batch_size=32,
                            num_beams=1, skip_speed=True)
        for name, figures in report["models"].items():
            runs[name] = figures["exact_match"]
    result = summarize(runs, methods, seeds)
    result["labeled_rows"] = labeled_rows
    result["training_rows"] = budget["rows"]
    write_compare(result, out, name=compare_name(labeled_rows))
    return result


def _setting(labeled_rows: int | None) -> str:
    """The suffix that names a setting in folder and file names: "" or "-labelsN"."""
    return f"-labels{labeled_rows}" if labeled_rows else ""


def compare_name(labeled_rows: int | None) -> str:
    """The table's file name (without .md/.json) for a setting."""
    return "compare" + _setting(labeled_rows)


def _trained(folder: str, options: dict) -> bool:
    """Whether `folder` holds a finished student trained with these options (a rerun of the
    comparison, e.g. with another method added, keeps it)."""
    try:
        with open(os.path.join(folder, "distill_config.json"), encoding="utf-8") as f:
            used = json.load(f)
    except (OSError, ValueError):
        return False
    return (os.path.isfile(os.path.join(folder, "model.safetensors"))
            and all(used.get(k) == v for k, v in options.items()))


def make_pseudo_labels(teacher: str, task_dir: str, folder: str, *, rows: int, max_len: int, log=print) -> str:
    """The teacher's greedy outputs for the first `rows` training inputs (the rows the students
    train on) and the validation inputs; kept when an earlier run made the same ones (same
    teacher, data and options), replaced when they were made otherwise."""
    from distill import pseudo_label
    from distill.errors import UserError

    log(f"compare: the teacher's outputs for {rows} training inputs (sequence-level KD)")
    code = pseudo_label.main(["--model-type", "bart", "--teacher-local-path", teacher,
                              "--dataset-local-path", task_dir, "--output-dir", folder,
                              "--max-source-length", str(max_len), "--max-new-tokens", str(max_len),
                              "--num-beams", "1", "--max-samples", str(rows),
                              "--per-device-batch-size", "64", "--overwrite-output-dir"])
    if code != 0:
        raise UserError(f"making the pseudo-labels in {folder} failed (exit {code}); see the lines above")
    return folder


def make_teacher_cache(teacher: str, task_dir: str, folder: str, *, rows: int, max_len: int, how: str, k: int,
                       log=print) -> str:
    """A teacher cache (method `how`, K = `k`) over the first `rows` training rows and the
    validation rows, with the data options the students train with; an earlier identical one is
    continued (kept)."""
    from distill import cache_teacher
    from distill.errors import UserError

    log(f"compare: a {how} K={k} teacher cache over {rows} training rows")
    code = cache_teacher.main(["--model-type", "bart", "--teacher-local-path", teacher, "--dataset-local-path",
                               task_dir, "--cache-dir", folder, "--max-source-length", str(max_len),
                               "--max-target-length", str(max_len), "--max-train-samples", str(rows),
                               "--per-device-batch-size", "64", "--top-k", str(k), "--cache-method", how,
                               "--overwrite-cache"])
    if code != 0:
        raise UserError(f"building the teacher cache in {folder} failed (exit {code}); see the lines above")
    return folder


def summarize(runs: dict[str, float], methods: list[str], seeds: list[int]) -> dict:
    """{"teacher": score, "methods": {method: {"label", "scores", "mean", "min", "max", "spread",
    "gain_over_ce", "gain_exceeds_spread"}}} from `runs` keyed "METHOD-seedN" (and "teacher")."""
    out = {"teacher": runs.get("teacher"), "seeds": seeds, "methods": {}}
    for method in methods:
        scores = [runs[f"{method}-seed{s}"] for s in seeds]
        out["methods"][method] = {"label": {**METHODS, **CACHE_METHODS}[method]["label"], "scores": scores,
                                  "mean": statistics.fmean(scores), "min": min(scores),
                                  "max": max(scores), "spread": max(scores) - min(scores)}
    base = out["methods"].get("ce")
    for method, m in out["methods"].items():
        if base is None or method == "ce":
            continue
        m["gain_over_ce"] = m["mean"] - base["mean"]
        # the gap must beat the noise of both: the sum of the two spreads
        m["gain_exceeds_spread"] = m["gain_over_ce"] > m["spread"] + base["spread"]
    return out


def format_compare(result: dict) -> str:
    teacher = result["teacher"]
    lines = [f"| method | exact match, mean over seeds {result['seeds']} | min-max | kept of teacher "
             f"({teacher:.1f}) | vs CE only |", "|---|---|---|---|---|"]
    for method, m in result["methods"].items():
        gain = m.get("gain_over_ce")
        vs = "-" if gain is None else f"{gain:+.1f}" + (" (beyond spread)" if m["gain_exceeds_spread"] else "")
        lines.append(f"| {m['label']} | {m['mean']:.1f} | {m['min']:.1f}-{m['max']:.1f} | "
                     f"{m['mean'] / teacher:.1%} | {vs} |")
    return "\n".join(lines)


def write_compare(result: dict, out: str, name: str = "compare") -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    rows = result.get("labeled_rows")
    setting = (f"{rows} labeled training rows (the rest of the {result.get('training_rows')} training "
               "inputs unlabeled)" if rows else "every training row labeled")
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(f"# Distillation methods vs plain fine-tuning: {setting}\n\n" + format_compare(result) + "\n")
