"""The files of a teacher-vs-student report: report.json, report.md and quality_vs_speed.png.

distill.evaluate measures; this module chooses what to show and formats it. Every model is
called by its name in report["models"] (the teacher's name, then each student's), the same in
the tables, the examples and the plot.
"""
from __future__ import annotations

import json
import os

from distill.errors import UserError
from distill.metrics import METRICS

N_EXAMPLES = 3  # worked examples in report.md and report.json
EXAMPLES_RULE = (f"up to {N_EXAMPLES} rows where the models' outputs differ, rows where some model "
                 f"writes the reference exactly first, each group in input order; the first rows "
                 f"when fewer differ")


def _fmt(value, spec=".1f"):
    return "-" if value is None else _cell(value) if spec is None else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a '|' in a name would split a markdown cell


def _given_name(name, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} name is {name!r}; expected a non-empty name, e.g. "
                        f"--student distilled=runs/distilled")
    return name.strip()


def name_models(teacher: str, teacher_name: str, students) -> list[tuple[str, str, str]]:
    """(name, role, path) of the teacher and each student, names unique.

    A student is a path (named after its folder) or a (name, path) pair. Given names (the
    teacher's, the pairs') must all differ: a clash there is an error. A folder's name that is
    already taken gets _2, _3, ... (runs/a/model and runs/b/model are both "model"), so a
    paths-only call never fails on names; report.md lists every name with its path.
    """
    teacher_name = _given_name(teacher_name, "teacher")
    items = []
    for item in students:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            items.append((_given_name(item[0], "student"), str(item[1]), True))
        elif isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            folder = os.path.basename(os.path.abspath(os.path.expanduser(path))) or path
            items.append((folder, path, False))
        else:
            raise TypeError(f"a student is a path or a (name, path) pair, not {item!r}")
    taken = [teacher_name]
    for name, path, given in items:
        if given and name in taken:
            raise UserError(f"two models are named {name!r}; give each --student its own "
                            f"NAME=DIR (the teacher is {teacher_name!r})")
        if given:
            taken.append(name)
    named = [(teacher_name, "teacher", teacher)]
    for name, path, given in items:
        if not given:
            base, n = name, 2
            while name in taken:
                name, n = f"{base}_{n}", n + 1
            taken.append(name)
        named.append((name, "student", path))
    return named


def pick_examples(references: list[str], predictions: dict[str, list[str]],
                  k: int = N_EXAMPLES) -> list[int]:
    """Row indices of the worked examples, as EXAMPLES_RULE says: rows where the models'
    outputs differ come first (those where some output equals the reference, after stripping,
    ahead of the rest), then rows where all agree; input order within each group."""
    def group(i):
        outputs = {p[i].strip() for p in predictions.values()}
        if len(outputs) == 1:
            return 2  # all agree: shows nothing about how the models differ
        return 0 if references[i].strip() in outputs else 1

    return sorted(range(len(references)), key=lambda i: (group(i), i))[:k]


def _markdown_table(columns) -> str:
    """`columns`: (header, cells) pairs; a padded markdown table."""
    rows = [[header for header, _ in columns]] + [list(r) for r in zip(*(c for _, c in columns))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows[1:]])


def format_table(report: dict) -> str:
    """A markdown table, one row per model by name, with the main metric, speed, memory and
    size, and each student's speedups and quality kept against the teacher. A column whose
    values are all missing is left out (speed with --skip-speed, beam latency with
    --num-beams 1, memory where it was not measured); report.json keeps those keys as null."""
    metric = report["main_metric"]
    s = report["settings"]
    models = report["models"]
    figures = [  # header, value of one model's figures, format
        ("params (M)", lambda m: m["parameters"] / 1e6, ".2f"),
        ("disk MB", lambda m: m["size_on_disk_mb"], ".1f"),
        (metric, lambda m: m[metric], ".2f"),
        ("greedy b1 p50 ms", lambda m: m["latency_greedy_b1_p50_ms"], ".1f"),
        (f"beam{s['num_beams']} b1 p50 ms", lambda m: m["latency_beam_b1_p50_ms"], ".1f"),
        (f"b{s['batch_size']} samples/s", lambda m: m["throughput_samples_per_s"], ".1f"),
        ("peak MB", lambda m: m["peak_memory_mb"], ".1f"),
        ("speedup b1", lambda m: m.get("speedup_b1"), ".2f"),
        (f"speedup b{s['batch_size']}", lambda m: m.get("speedup_b32"), ".2f"),
        # only where some student's speedups are against a teacher runtime (two baselines)
        ("speedup vs", lambda m: m.get("speedup_vs") if report.get("same_runtime") else None, None),
        ("quality kept", lambda m: m.get("quality_retention"), ".1%"),
    ]
    columns = [("model", [_cell(name) for name in models])]
    for header, get, spec in figures:
        values = [get(m) for m in models.values()]
        if any(v is not None for v in values):
            columns.append((header, [_fmt(v, spec) for v in values]))
    return _markdown_table(columns)


def _speed_lines(s) -> list[str]:
    if not s["speed_repeats"]:
        return ["- Speed and peak memory: not measured (--skip-speed)."]
    beam = (f"greedy and beam {s['num_beams']}" if s["num_beams"] > 1
            else "greedy only (beam latency not measured: --num-beams 1)")
    rounds = f"{s['speed_repeats']} round{'s' if s['speed_repeats'] > 1 else ''}"
    return [f"- Speed: {rounds} after warm-up, interleaved across models in a "
            f"rotating order, each model's turn opened by one untimed call. Batch-1 latency "
            f"p50/p90 over different inputs, {beam}; "
            f"throughput = {s['batch_size']} samples / median batch time. Generation stops at "
            f"EOS (see mean_new_tokens_b1 in report.json)."
            + (f" Runtime rows compute with {s['runtime_threads']} thread"
               f"{'s' if s['runtime_threads'] > 1 else ''}." if s.get("runtime_threads") else ""),
            f"- Peak memory: {s['memory_method']}."]


def _example_lines(report) -> list[str]:
    examples = report["examples"]
    agree = not any(len({t.strip() for t in ex["outputs"].values()}) > 1 for ex in examples)
    lines = [f"Chosen: {EXAMPLES_RULE}."
             + (" Here all models wrote the same on every row." if agree else ""), ""]
    for i, ex in enumerate(examples, 1):
        reference = ex["reference"].strip()
        lines += [f"{i}. row {ex['row']}: **source**: {ex['source'][:300]}",
                  f"   - **reference**: {ex['reference'][:300]}"]
        for name, text in ex["outputs"].items():
            mark = " (= reference)" if text.strip() == reference else ""
            lines.append(f"   - **{name}**{mark}: {text[:300] or '(empty)'}")
    return lines


def write_report(report, output_dir, log):
    """report.json, report.md (models, table, quality, how it was measured, examples) and the
    plot."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    s = report["settings"]
    models = report["models"]
    quality = _markdown_table([("model", [_cell(n) for n in models])] + [
        (k, [_fmt(m[k], ".2f") for m in models.values()]) for k in METRICS])
    teacher = next(n for n, m in models.items() if m["role"] == "teacher")
    headline = report["headline_student"]
    students = [n for n, m in models.items() if m["role"] == "student"]
    dtypes = {m["dtype"] for m in models.values() if m["dtype"]}
    lines = [
        f"# {teacher} vs {', '.join(students)}", "",
        *[f"- **{name}**: {m['role']}{' (headline)' if name == headline else ''}, "
          f"{m['parameters'] / 1e6:.3g}M parameters, from `{m['path']}`"
          for name, m in models.items()], "",
        f"Main metric: **{report['main_metric']}**. {headline} vs {teacher}: "
        f"speedup {_fmt(report['speedup_b1'], '.2f')}x at batch 1 (greedy p50), "
        f"{_fmt(report['speedup_b32'], '.2f')}x at batch {s['batch_size']} (samples/s); "
        f"quality kept {_fmt(report['quality_retention'], '.1%')}."
        + "".join(f" Served alike, {p['student']} vs {p['teacher']}: {_fmt(p['speedup_b1'], '.2f')}x at "
                  f"batch 1, {_fmt(p['speedup_b32'], '.2f')}x at batch {s['batch_size']}."
                  for p in report.get("same_runtime", [])), "",
        format_table(report), "", "## Quality (0-100)", "", quality, "",
        "## How it was measured", "",
        f"- {s['n_samples']} samples, device {s['device']} ({s['device_name']}), "
        f"{s['threads']} CPU threads, torch {s['torch']}, dtype {', '.join(sorted(dtypes))}"
        + (" (dtypes differ: speed ratios include that)" if len(dtypes) > 1 else "") + ".",
        f"- Quality: greedy decoding, up to {s['max_new_tokens']} new tokens, sources truncated "
        f"to {s['max_source_length']} tokens, prefix {s['source_prefix']!r}; each model uses its "
        f"own tokenizer. ROUGE F1 (rouge-score, stemmed), sacrebleu corpus BLEU and chrF.",
        *([f"- The teacher's outputs were {s['teacher_outputs_from']}; its speed and memory are not "
            "measured here (so neither are the speedups): run `python -m distill.evaluate` where one "
            "device holds the whole teacher."] if s.get("teacher_outputs_from") else []),
        *_speed_lines(s),
        "- Size: parameter count (tied weights once) and weight files on disk.", "",
        "## Examples", "", *_example_lines(report)]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(plot_spec(report), os.path.join(output_dir, "quality_vs_speed.png"))
    log(f"evaluate: wrote report.md, report.json, quality_vs_speed.png to {output_dir}")


def plot_spec(report) -> dict:
    """What the plot shows: one point per model (x, y, label "name, size", role), the axis
    labels and limits. Quality starts at 0, so the gap between points is the gap in score, and
    ends a little above the best score (at least 10, at most 105: scores are 0-100)."""
    metric = report["main_metric"]
    models = report["models"]
    timed = all(m["throughput_samples_per_s"] is not None for m in models.values())
    points = [{"name": name, "role": m["role"], "y": m[metric],
               "x": m["throughput_samples_per_s"] if timed else m["parameters"] / 1e6,
               "label": f"{name}, {m['parameters'] / 1e6:.3g}M params"}
              for name, m in models.items()]
    top = max(p["y"] for p in points)
    return {"points": points, "ylim": (0.0, min(105.0, max(10.0, 1.15 * top))),
            "xlabel": (f"throughput at batch {report['settings']['batch_size']} (samples/s)"
                       if timed else "parameters (millions), speed not measured"),
            "ylabel": f"{metric} (0-100)",
            "title": "quality vs speed" if timed else "quality vs size"}


def _plot(spec, path):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, p in enumerate(spec["points"]):
        teacher = p["role"] in ("teacher", "teacher-runtime")
        color = ("black" if p["role"] == "teacher" else "dimgray" if teacher
                 else colors[i % len(colors)])
        ax.scatter(p["x"], p["y"], s=80 if teacher else 60, marker="s" if teacher else "o",
                   color=color, zorder=3)
        # Each point is named in the legend ("name, size"): text next to points overlaps when
        # models of one size sit close together, as a student and its baseline do.
        handles.append(Line2D([], [], marker="s" if teacher else "o", color=color, linestyle="",
                              label=p["label"]))
    ax.set_ylim(*spec["ylim"])
    ax.margins(x=0.15)
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(spec["ylabel"])
    ax.set_title(spec["title"])
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
