"""Benchmark the distillation losses: python -m kernels.bench [--quick | --full] [--json].

Rows per case and divergence (--divergence forward_kl,reverse_kl,jsd; default forward_kl): the
naive torch loss (lm_head matmul + log_softmax + divergence + CE), our fused loss with the
teacher as hidden states and as logits, Liger-Kernel's LigerFusedLinearJSDLoss (with the beta
that gives the same divergence: 0 for the forward KL) when installed, and the divergence alone
from logits (naive_kl_div vs chunked_kl_div), plus the fused loss on the eager torch chunk step
(the path used when the native row step is switched off or cannot be built). Columns: forward+backward time (median of
--repeats after one warm-up; wall and process CPU time), its ratio to the naive baseline of the
same run, its ratio to its own matmul floor (the bare full-size matmuls that loss must do, timed
alternately with it in the same process: median of the per-pair ratios), the peak memory the
loss adds above its inputs, and the max abs error (loss and gradients) against the naive
baseline. Each row runs in a fresh subprocess. Timings are only comparable within one run: the
machine's speed drifts, and glibc malloc settings (MALLOC_* env) alone move the naive loss 2-4x.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

import torch

from . import rowsteps
from ._bench_worker import liger_beta, run_row
from ._core import DIVERGENCES

# --quick runs the harness end to end on a toy case (256 tokens, vocab 1000): there the fixed cost
# of each call (Python, dispatch, chunk set-up) outweighs the little matmul work, so the
# ratios it prints say nothing about the kernels. Its max_abs_err column is still a real check.
QUICK_NOTE = ("smoke test of the harness only: the sizes are far too small for the timings to reflect "
              "the kernels, so its times and ratios (x_naive, x_floor, mem_x_naive) mean nothing; "
              "max_abs_err still checks the results")
HIDDEN = {512: 768, 1024: 1024}  # student hidden -> teacher hidden
TARGET = dict(vocab=50265, tokens=4096, hidden=512, dtype="fp32")
ROWS = ["floor", "naive", "fused_hidden", "fused_hidden_eager", "fused_logits", "liger", "naive_kl", "chunked_kl"]
REF = {"fused_hidden": "naive", "fused_hidden_eager": "naive", "fused_logits": "naive", "liger": "naive",
       "chunked_kl": "naive_kl"}
LABEL = {
    "floor": "matmul floor (bare lm_head matmuls)",
    "naive": "naive torch (teacher hidden)",
    "fused_hidden": "fused_linear_distill_loss (teacher hidden)",
    "fused_hidden_eager": "  same, eager torch chunk step",
    "fused_logits": "fused_linear_distill_loss (teacher logits)",
    "liger": "Liger LigerFusedLinearJSDLoss beta=0",
    "naive_kl": "naive_kl_div (from logits)",
    "chunked_kl": "chunked_kl_div (from logits)",
}


def _case(vocab, tokens, hidden, dtype):
    return dict(vocab=vocab, tokens=tokens, hidden=hidden, teacher_hidden=HIDDEN.get(hidden, hidden), dtype=dtype)


def cases_from(args):
    if args.quick:
        return [dict(vocab=1000, tokens=256, hidden=64, teacher_hidden=96, dtype="fp32")]
    if args.full or args.vocab or args.tokens or args.hidden or args.dtype:
        grid = itertools.product(args.vocab or [32128, 50265], args.tokens or [1024, 4096],
                                 args.hidden or [512, 1024], args.dtype or ["fp32", "bf16"])
        return [_case(*c) for c in grid]
    # Default: the target case plus a few cheap neighbours (the full grid takes long on a CPU).
    return [_case(**TARGET), _case(32128, 1024, 512, "fp32"), _case(50265, 1024, 1024, "fp32"),
            _case(50265, 1024, 512, "bf16")]


def run_case(case, args, tmp, divergence="forward_kl"):
    results = {}
    for row in args.rows:
        ref_row = REF.get(row, row)
        ref_name = "ref_{vocab}_{tokens}_{hidden}_{dtype}_".format(**case) + f"{divergence}_{ref_row}.pt"
        spec = dict(case=case, row=row, threads=args.threads, repeats=args.repeats, device=args.device,
                    liger=args.liger, is_ref=row in ("naive", "naive_kl"), divergence=divergence,
                    beta=args.jsd_beta, ref_path=os.path.join(tmp, ref_name))
        if row == "liger" and args.liger == "off":
            results[row] = {"row": row, "error": "n/a: skipped (--liger off)"}
            continue
        if args.in_process:
            res = run_row(spec)
        else:
            # the worker under this package's own name: kernels from a checkout, or the
            # installed seq2seq_distill_kernels (where `kernels` may be Hugging Face's package)
            proc = subprocess.run([sys.executable, "-m", f"{__package__}._bench_worker", json.dumps(spec)],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
                res = {"row": row, "error": f"n/a: worker exit {proc.returncode}: {tail}"}
            else:
                res = json.loads(lines[-1])
        results[row] = res
    for row, res in results.items():
        base = results.get(REF.get(row, row))
        if "time_s" not in res:
            continue
        if base and "time_s" in base and row not in ("floor", "naive", "naive_kl"):
            res["time_x_naive"] = res["time_s"] / base["time_s"]
            res["cpu_x_naive"] = res["cpu_s"] / base["cpu_s"]
            res["mem_x_naive"] = res["peak_mb"] / max(base["peak_mb"], 1e-9)
    return results


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def divergence_name(divergence, beta):
    return f"jsd (beta {beta:g})" if divergence == "jsd" else divergence


def print_table(case, results, out=None, note=None, divergence="forward_kl", beta=0.5):
    """One case's rows; `note` (e.g. QUICK_NOTE) is printed above and below the table."""
    out = out or sys.stdout
    print(f"\ncase: vocab={case['vocab']} tokens={case['tokens']} hidden={case['hidden']} "
          f"(teacher {case['teacher_hidden']}) dtype={case['dtype']} divergence={divergence_name(divergence, beta)}",
          file=out)
    if note:
        print(f"NOTE: {note}", file=out)
    head = f"{'row':44} {'time_s':>8} {'cpu_s':>8} {'x_naive':>8} {'x_floor':>8} {'peak_MB':>9} {'mem_x_naive':>11} {'max_abs_err':>11}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for row, r in results.items():
        label = LABEL[row]
        if row == "liger" and divergence != "forward_kl":
            label = f"Liger LigerFusedLinearJSDLoss beta={liger_beta(divergence, beta):g}"
        if "error" in r:
            print(f"{label:44} {r['error']}", file=out)
            continue
        print(f"{label:44} {r['time_s']:8.3f} {r['cpu_s']:8.3f} {_fmt(r.get('time_x_naive'), '8.2f'):>8} "
              f"{_fmt(r.get('time_x_floor'), '8.2f'):>8} {r['peak_mb']:9.1f} {_fmt(r.get('mem_x_naive'), '11.3f'):>11} "
              f"{_fmt(r.get('max_abs_err'), '11.2e'):>11}", file=out)
    if note:
        print(f"NOTE: {note}", file=out)


def environment(args):
    return {"torch": torch.__version__, "threads": args.threads, "device": args.device,
            "row_step": rowsteps.describe(torch.device(args.device)),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults",
            "alpha": 0.5, "temperature": 2.0, "divergences": args.divergence, "jsd_beta": args.jsd_beta,
            "repeats": args.repeats}


def main(argv=None) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one tiny case, in-process, eager Liger: a smoke test of the harness whose ratios mean nothing")
    p.add_argument("--full", action="store_true", help="the whole grid: vocab x tokens x hidden x dtype")
    p.add_argument("--vocab", type=ints, help="comma list, e.g. 32128,50265 (selects a grid)")
    p.add_argument("--tokens", type=ints, help="comma list, e.g. 1024,4096")
    p.add_argument("--hidden", type=ints, help="student hidden sizes: 512 (teacher 768), 1024 (teacher 1024)")
    p.add_argument("--dtype", type=lambda s: s.split(","), help="comma list of fp32,bf16,fp16")
    p.add_argument("--rows", type=lambda s: s.split(","), default=ROWS, help="comma list of " + ",".join(ROWS))
    p.add_argument("--divergence", type=lambda s: s.split(","), default=["forward_kl"],
                   help="comma list of " + ",".join(DIVERGENCES) + " (one table per case and divergence)")
    p.add_argument("--jsd-beta", type=float, default=0.5, help="jsd's beta, in [0, 1] (default 0.5)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--liger", choices=["compiled", "eager", "off"], default=None,
                   help="how to run Liger's loss (default compiled; eager with --quick)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per row (peaks less isolated)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = p.parse_args(argv)
    args.liger = args.liger or ("eager" if args.quick else "compiled")
    args.in_process = args.in_process or args.quick
    if args.quick:
        args.repeats = min(args.repeats, 5)
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    unknown = sorted(set(args.divergence) - set(DIVERGENCES))
    if unknown:
        p.error(f"unknown divergences {unknown}; choose from {','.join(DIVERGENCES)}")
    if not 0.0 <= args.jsd_beta <= 1.0:
        p.error(f"--jsd-beta must be in [0, 1], got {args.jsd_beta}")
    env = environment(args)
    note = QUICK_NOTE if args.quick else None
    if not args.json:
        if note:
            print(f"--quick: {note}")
        print(f"torch {env['torch']}, threads={env['threads']}, device={env['device']}, "
              f"malloc: {env['malloc_env']}, alpha=0.5, T=2, median of {args.repeats} after 1 warm-up, "
              f"row step: {env['row_step']}")
    doc = {"environment": env, "cases": []}
    if note:
        doc["note"] = note
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases_from(args):
            for divergence in args.divergence:
                results = run_case(case, args, tmp, divergence)
                doc["cases"].append({"case": case, "divergence": divergence, "rows": list(results.values())})
                if not args.json:
                    print_table(case, results, note=note, divergence=divergence, beta=args.jsd_beta)
                    sys.stdout.flush()
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
