"""End-to-end step benchmark: python -m distill.bench_step [--preset tiny|mid|base] [--json].

Does a distillation step cost more than what it replaces? Measured side by side in one process
on a teacher and a student built from configs (no download), with the same batch:

  teacher forward      the teacher's ordinary forward (full logits and its CE), no grad
  student plain step   the student's ordinary training step: forward with labels (full logits,
                       HF's CE), backward, AdamW step
  distill (fused)      this project's step: teacher decoder states (no grad), student decoder
                       states, kernels.fused_linear_distill_loss via distill.objective (no full
                       logits of either model), backward, AdamW step
  distill (naive)      the same with `--loss-impl naive` (full logits of both, plain torch loss)
  distill (cache)      training from a teacher cache (--teacher-cache): the batch's sparse targets
                       (topk, --cache-k, fp16) read back from a cache shard written for it in a
                       temporary folder (distill.teacher_cache; from the page cache, as a warm
                       cache is read), student decoder states, the sparse fused loss, backward,
                       AdamW step. No teacher runs; its ratio is against the student plain step.

The modes run round-robin (the order rotates) for --repeats rounds after a warm-up round, so
drift of a shared machine's speed hits every mode alike. The ratio is median(distill) /
(median(teacher forward) + median(student plain step)), i.e. computed from the printed times;
the range of the same ratio taken round by round shows the noise. Peak memory is the most any round of that mode
added above the memory held before it (process peak RSS on CPU, max_memory_allocated on CUDA).
Plain torch, one process, no DeepSpeed: the comparison is about the loss path, and ZeRO adds
the same communication to both sides.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from .kernel_ops import kernels
from .models import decoder_hidden, lm_head_of
from .objective import Objective

PRESETS = {
    # name: teacher config kwargs (distill.toy.tiny_config), student layers, batch, source/target lengths
    # (tiny steps take milliseconds and need many rounds to average out scheduler noise)
    "tiny": dict(model=dict(vocab_size=512, d_model=32, layers=4, heads=2, ffn=64), student_layers=2,
                 batch=8, source_len=32, target_len=16, repeats=30),
    "mid": dict(model=dict(vocab_size=50265, d_model=512, layers=6, heads=8, ffn=2048, max_positions=256),
                student_layers=3, batch=8, source_len=128, target_len=64, repeats=7),
    "base": dict(model=dict(vocab_size=50265, d_model=768, layers=6, heads=12, ffn=3072, max_positions=256),
                 student_layers=3, batch=8, source_len=256, target_len=128, repeats=5),
}
MODES = ["teacher_forward", "student_plain_step", "distill_fused", "distill_naive", "distill_cache"]


def build(preset: dict, model_type: str, seed: int):
    from transformers import AutoModelForSeq2SeqLM

    from .models import build_student, module_tensor_getter
    from .toy import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **preset["model"])
    teacher = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    n = preset["student_layers"]
    student, _ = build_student(cfg, module_tensor_getter(teacher), num_encoder_layers=n,
                               num_decoder_layers=n, log=lambda *_: None)
    student.train()
    g = torch.Generator().manual_seed(seed)
    v, b = cfg.vocab_size, preset["batch"]
    input_ids = torch.randint(4, v, (b, preset["source_len"]), generator=g)
    labels = torch.randint(4, v, (b, preset["target_len"]), generator=g)
    # ragged targets: the last quarter of every other row is padding
    labels[::2, -preset["target_len"] // 4:] = -100
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    return teacher, student, batch


def cached_targets(teacher, batch, k: int, folder: str):
    """A TeacherCache holding the batch's rows (the teacher's top-k targets, as cache_teacher
    makes them) and the batch's `cache_row`s."""
    from . import teacher_cache_files as files
    from .teacher_cache import TeacherCache, sparse_targets

    ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=am, labels=lab).logits
    mask = lab != -100
    got = sparse_targets(logits[mask].cpu(), "topk", k)
    rows = [(ids[i].tolist(), lab[i][mask[i]].tolist()) for i in range(ids.shape[0])]
    counts = mask.sum(1).cpu()
    tensors = {"row_keys": torch.tensor([list(files.row_key(a, b)) for a, b in rows], dtype=torch.uint8),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
               "labels": lab[mask].cpu().to(torch.int32), "ids": got["ids"],
               "logprobs": got["logprobs"].half(), "tail": got["tail"]}
    files.write_shard(folder, "train", 0, 0, tensors)
    manifest = {"identity": {"method": "topk", "top_k": k, "shard_size": len(rows),
                             "splits": {"train": {"rows": len(rows)}}}}
    cache = TeacherCache(folder, manifest, log=lambda *_: None)
    return cache, torch.tensor([cache.locate(a, b) for a, b in rows])


def make_steps(teacher, student, batch, alpha: float, temperature: float, cache=None):
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=am, labels=lab)

    def student_plain_step():
        student(input_ids=ids, attention_mask=am, labels=lab).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def distill(impl):
        objective = Objective(alpha=alpha, temperature=temperature, impl=impl)

        def step():
            with torch.no_grad():
                t_hidden = decoder_hidden(teacher, ids, am, lab)
            s_hidden = decoder_hidden(student, ids, am, lab)
            t_w, t_b = lm_head_of(teacher)
            loss, _, _ = objective(s_hidden, lm_head_of(student), lab, t_hidden,
                                   (t_w.detach(), None if t_b is None else t_b.detach()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def from_cache():
        objective = Objective(alpha=alpha, temperature=temperature)
        store, rows = cache
        t_ids, t_lp, t_tail = store.targets(rows, lab, temperature)
        s_hidden = decoder_hidden(student, ids, am, lab)
        loss, _, _ = objective.sparse(s_hidden, lm_head_of(student), lab, t_ids, t_lp, t_tail)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {"teacher_forward": teacher_forward, "student_plain_step": student_plain_step,
             "distill_fused": distill("fused"), "distill_naive": distill("naive")}
    if cache is not None:
        steps["distill_cache"] = from_cache
    return steps


def measure(steps: dict, repeats: int, device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mem = kernels.PeakMemory(device)
    times = {m: [] for m in steps}
    peaks = {m: 0.0 for m in steps}
    names = list(steps)
    for rnd in range(repeats + 1):  # round 0 is the warm-up (optimizer state, first touches)
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for m in order:
            mem.reset()
            t0 = time.perf_counter()
            steps[m]()
            sync()
            dt = time.perf_counter() - t0
            peaks[m] = max(peaks[m], mem.added_mb())
            if rnd:
                times[m].append(dt)
    med = {m: statistics.median(times[m]) for m in names}
    base = med["teacher_forward"] + med["student_plain_step"]
    per_round = [a + b for a, b in zip(times["teacher_forward"], times["student_plain_step"])]
    rows = []
    for m in names:
        r = {"mode": m, "time_s": med[m], "peak_mb": peaks[m]}
        if m == "distill_cache":  # no teacher runs: against the step it would replace
            r["x_student_plain_step"] = med[m] / med["student_plain_step"]
            each = [a / b for a, b in zip(times[m], times["student_plain_step"])]
            r["x_range"] = [min(each), max(each)]
        elif m.startswith("distill"):
            r["x_teacher_fwd_plus_student_step"] = med[m] / base
            each = [a / b for a, b in zip(times[m], per_round)]
            r["x_range"] = [min(each), max(each)]
        rows.append(r)
    return rows


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.bench_step", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny,mid", help="comma list of " + ",".join(PRESETS) + " (default tiny,mid)")
    p.add_argument("--model-type", choices=["bart", "t5"], default="bart")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds after one warm-up round (median); default per preset: "
                   + ", ".join(f"{k} {v['repeats']}" for k, v in PRESETS.items()))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-k", type=int, default=64, help="K of the distill_cache mode's topk cache")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    presets = args.preset.split(",")
    unknown = [x for x in presets if x not in PRESETS]
    if unknown:
        print(f"error: unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
           "row_step": kernels.rowsteps.describe(device),
           "alpha": args.alpha, "temperature": args.temperature}
    doc = {"environment": env, "presets": []}
    if not args.json:
        print(f"torch {env['torch']}, threads={args.threads}, device={args.device}, row step: {env['row_step']}, "
              f"alpha={args.alpha}, T={args.temperature}, medians over rounds after 1 warm-up round")
    for name in presets:
        preset = PRESETS[name]
        teacher, student, batch = build(preset, args.model_type, args.seed)
        teacher.to(device)
        student.to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        repeats = args.repeats or preset["repeats"]
        with tempfile.TemporaryDirectory() as folder:
            cache = cached_targets(teacher, batch, args.cache_k, folder)
            rows = measure(make_steps(teacher, student, batch, args.alpha, args.temperature, cache), repeats, device)
        tokens = int((batch["labels"] != -100).sum())
        info = {"preset": name, "model_type": args.model_type, "repeats": repeats, "teacher_params": count(teacher),
                "student_params": count(student), "vocab": teacher.config.vocab_size,
                "batch": preset["batch"], "source_len": preset["source_len"], "target_len": preset["target_len"],
                "target_tokens": tokens, "rows": rows}
        doc["presets"].append(info)
        if not args.json:
            print(f"\npreset {name}: {args.model_type} teacher {info['teacher_params'] / 1e6:.1f}M params, student "
                  f"{info['student_params'] / 1e6:.1f}M, vocab {info['vocab']}, batch {info['batch']} x source "
                  f"{info['source_len']} / target {info['target_len']} ({tokens} target tokens); {repeats} rounds")
            print(f"{'mode':22} {'time_s':>8} {'peak_MB':>9} {'x (teacher fwd + student step)':>31} "
                  f"{'per-round range':>16}   (distill_cache: x student plain step, K={args.cache_k})")
            for r in rows:
                ratio = r.get("x_teacher_fwd_plus_student_step", r.get("x_student_plain_step"))
                spread = "-" if ratio is None else "{:.2f}-{:.2f}".format(*r["x_range"])
                print(f"{r['mode']:22} {r['time_s']:8.3f} {r['peak_mb']:9.1f} "
                      f"{'-' if ratio is None else format(ratio, '.2f'):>31} {spread:>16}")
            sys.stdout.flush()
        del teacher, student
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
