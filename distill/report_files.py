"""The files of a teacher-vs-student report: report.json, report.md and quality_vs_speed.png.

distill.evaluate measures; this module only formats what it measured.
"""
from __future__ import annotations

import json
import os

from distill.metrics import METRICS


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """A markdown table (one row per model) with the main metric, speed, memory and size,
    followed by the first student's speedups and quality retention."""
    metric = report["main_metric"]
    s = report["settings"]
    header = ["model", "params (M)", "disk MB", f"{metric}", "greedy b1 p50 ms",
              f"beam{s['num_beams']} b1 p50 ms", f"b{s['batch_size']} samples/s", "peak MB",
              "speedup b1", f"speedup b{s['batch_size']}", "quality kept"]
    rows = []
    for name, m in report["models"].items():
        rows.append([name, _fmt(m["parameters"] / 1e6, ".2f"), _fmt(m["size_on_disk_mb"]),
                     _fmt(m[metric], ".2f"), _fmt(m["latency_greedy_b1_p50_ms"]),
                     _fmt(m["latency_beam_b1_p50_ms"]), _fmt(m["throughput_samples_per_s"]),
                     _fmt(m["peak_memory_mb"]), _fmt(m.get("speedup_b1"), ".2f"),
                     _fmt(m.get("speedup_b32"), ".2f"), _fmt(m.get("quality_retention"), ".1%")])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_report(report, output_dir, log):
    """report.json, report.md (table, quality, how it was measured, examples) and the plot."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    s = report["settings"]
    quality = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    quality += ["| " + name + " | " + " | ".join(_fmt(m[k], ".2f") for k in METRICS) + " |"
                for name, m in report["models"].items()]
    dtypes = {m["dtype"] for m in report["models"].values()}
    lines = [
        "# Teacher vs student", "",
        f"Main metric: **{report['main_metric']}**. First student vs teacher: "
        f"speedup {_fmt(report['speedup_b1'], '.2f')}x at batch 1 (greedy p50), "
        f"{_fmt(report['speedup_b32'], '.2f')}x at batch {s['batch_size']} (samples/s); "
        f"quality kept {_fmt(report['quality_retention'], '.1%')}.", "",
        format_table(report), "", "## Quality (0-100)", "", *quality, "",
        "## How it was measured", "",
        f"- {s['n_samples']} samples, device {s['device']} ({s['device_name']}), "
        f"{s['threads']} CPU threads, torch {s['torch']}, dtype {', '.join(sorted(dtypes))}"
        + (" (dtypes differ: speed ratios include that)" if len(dtypes) > 1 else "") + ".",
        f"- Quality: greedy decoding, up to {s['max_new_tokens']} new tokens, sources truncated "
        f"to {s['max_source_length']} tokens, prefix {s['source_prefix']!r}; each model uses its "
        f"own tokenizer. ROUGE F1 (rouge-score, stemmed), sacrebleu corpus BLEU and chrF.",
        f"- Speed: {s['speed_repeats']} rounds after warm-up, interleaved across models in a "
        f"rotating order. Batch-1 latency p50/p90 over different inputs (greedy, beam "
        f"{s['num_beams']}); throughput = {s['batch_size']} samples / median batch time. "
        f"Generation stops at EOS (see mean_new_tokens_b1 in report.json).",
        f"- Peak memory: {s['memory_method']}.",
        "- Size: parameter count (tied weights once) and weight files on disk.", "",
        "## Examples", ""]
    for i, ex in enumerate(report["examples"], 1):
        lines.append(f"{i}. **source**: {ex['source'][:300]}")
        for key, text in ex.items():
            if key != "source":
                lines.append(f"   - **{key}**: {text[:300]}")
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(report, os.path.join(output_dir, "quality_vs_speed.png"))
    log(f"evaluate: wrote report.md, report.json, quality_vs_speed.png to {output_dir}")


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    metric = report["main_metric"]
    models = report["models"]
    timed = all(m["throughput_samples_per_s"] is not None for m in models.values())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, m in models.items():
        x = m["throughput_samples_per_s"] if timed else m["parameters"] / 1e6
        ax.scatter(x, m[metric], s=60, marker="s" if m["role"] == "teacher" else "o")
        ax.annotate(name, (x, m[metric]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel(f"throughput at batch {report['settings']['batch_size']} (samples/s)"
                  if timed else "parameters (millions), speed not measured")
    ax.set_ylabel(f"{metric} (0-100)")
    ax.set_title("quality vs speed" if timed else "quality vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
