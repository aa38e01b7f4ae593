"""One benchmark row (one loss on one case): inputs, timing, peak memory, error vs the reference.

Run as `python -m kernels._bench_worker '<json spec>'` so every row gets a fresh process and
allocator (a freed (tokens x vocab) tensor from an earlier row would otherwise hide or inflate
the next row's peak); kernels.bench starts these and collects the one JSON line each prints.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import torch

from . import native, rowsteps
from . import chunked_kl_div, fused_linear_distill_loss, naive_distill_loss, naive_kl_div
from .peak_memory import PeakMemory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA, TEMPERATURE = 0.5, 2.0


def make_inputs(case, device):
    g = torch.Generator().manual_seed(0)
    n, v, hs, ht = case["tokens"], case["vocab"], case["hidden"], case["teacher_hidden"]
    dt = DTYPES[case["dtype"]]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    x = dict(h=rnd(n, hs), w=rnd(v, hs, scale=3 / math.sqrt(hs)), th=rnd(n, ht),
             tw=rnd(v, ht, scale=3 / math.sqrt(ht)))
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::10] = -100  # padding positions the loss must skip
    x["labels"] = labels.to(device)
    return x


# The matmuls each row's loss must do (its floor): student logits, grad hidden, grad weight,
# and (True) the teacher's logits when the teacher comes as hidden states. Rows not listed (the
# KL-from-logits rows) do no matmul and have no floor.
FLOOR_TEACHER = {"floor": True, "naive": True, "fused_hidden": True, "fused_hidden_eager": True, "liger": True,
                 "fused_logits": False}


def floor_step(x, with_teacher):
    """The bare matmuls at full size, into preallocated outputs."""
    h, w, th, tw = x["h"], x["w"], x["th"], x["tw"]
    out = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    gh, gw = torch.empty_like(h), torch.empty_like(w)

    def step():
        with torch.no_grad():
            torch.mm(h, w.t(), out=out)
            if with_teacher:
                torch.mm(th, tw.t(), out=out)
            torch.mm(out, w, out=gh)
            torch.mm(out.t(), h, out=gw)
        return None, []
    return step


def liger_beta(divergence, beta):
    """The beta of Liger's generalised JSD that computes our `divergence`."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)


def build(row, case, x, liger_mode, divergence="forward_kl", beta=0.5):
    """-> (step() running forward+backward and returning (loss, [grads]), note)."""
    h, w, th, tw, lab = x["h"], x["w"], x["th"], x["tw"], x["labels"]
    div = dict(divergence=divergence, beta=beta)
    kw = dict(alpha=ALPHA, temperature=TEMPERATURE, **div)
    if row in ("naive_kl", "chunked_kl", "fused_logits"):
        with torch.no_grad():
            t_logits = th @ tw.t()
    if row in ("naive_kl", "chunked_kl"):
        with torch.no_grad():
            s_logits = (h @ w.t()).requires_grad_(True)
        fn = naive_kl_div if row == "naive_kl" else chunked_kl_div

        def step():
            s_logits.grad = None
            loss = fn(s_logits, t_logits, lab, temperature=TEMPERATURE, **div)
            loss.backward()
            return loss, [s_logits.grad]
        return step, ""
    if row == "floor":
        return floor_step(x, with_teacher=True), ""
    h.requires_grad_(True)
    w.requires_grad_(True)
    if row == "naive":
        def loss_fn():
            return naive_distill_loss(h, w, lab, teacher_hidden=th, teacher_weight=tw, **kw)[0]
    elif row in ("fused_hidden", "fused_hidden_eager"):
        def loss_fn():
            return fused_linear_distill_loss(h, w, lab, teacher_hidden=th, teacher_weight=tw, **kw)[0]
    elif row == "fused_logits":
        def loss_fn():
            return fused_linear_distill_loss(h, w, lab, teacher_logits=t_logits, **kw)[0]
    elif row == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Liger's beta follows TRL's: 0 makes its generalised JSD the forward KL(teacher ||
        # student), 1 the reverse KL. It has no T^2 factor, so that goes into the soft weight.
        # Its CE uses T = 1 logits, like ours.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=ALPHA, weight_soft_loss=(1 - ALPHA) * TEMPERATURE**2,
                                        beta=liger_beta(divergence, beta), temperature=TEMPERATURE,
                                        compiled=liger_mode == "compiled")

        def loss_fn():
            return liger(h, w, th, tw, lab)
    else:
        raise ValueError(f"unknown row {row!r}")

    def step():
        h.grad = w.grad = None
        loss = loss_fn()
        loss.backward()
        return loss, [h.grad, w.grad]
    return step, ("liger compiled=" + str(liger_mode == "compiled")) if row == "liger" else ""


def run_row(spec):
    """Run one row; an "_eager" row switches the faster row steps off for its own duration."""
    if not spec["row"].endswith("_eager"):
        return _run_row(spec)
    switches = {native.ENV_SWITCH: "0", rowsteps.TRITON_SWITCH: None}
    saved = {k: os.environ.get(k) for k in switches}
    try:
        _set_env(switches)
        return _run_row(spec)
    finally:
        _set_env(saved)


def _set_env(values):
    """Set each variable to its value; None unsets it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run_row(spec):
    case, row = spec["case"], spec["row"]
    device = torch.device(spec.get("device", "cpu"))
    torch.set_num_threads(spec["threads"])
    x = make_inputs(case, device)
    try:
        step, note = build(row, case, x, spec.get("liger", "compiled"), spec.get("divergence", "forward_kl"),
                           spec.get("beta", 0.5))
    except Exception as e:  # an optional competitor that cannot run here is a row, not a crash
        return {"row": row, "error": f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # This row's own matmul floor, timed alternately with the row in this same process: on a
    # shared machine the speed drifts by tens of percent between processes, so a ratio is
    # only meaningful between runs taken side by side. Its buffers exist before the memory
    # baseline is taken and are never counted in the row's peak.
    floor = None
    if row != "floor" and row in FLOOR_TEACHER:
        floor = floor_step(x, FLOOR_TEACHER[row])
        floor()
    mem = PeakMemory(device)
    try:
        mem.reset()
        loss, grads = step()  # warm-up (compiles, first-touch of pages); its peak counts too
        sync()
        peak = mem.added_mb()
        walls, cpus, floor_walls, floor_cpus = [], [], [], []
        for _ in range(spec["repeats"]):
            if floor is not None:
                t0, c0 = time.perf_counter(), time.process_time()
                floor()
                sync()
                floor_walls.append(time.perf_counter() - t0)
                floor_cpus.append(time.process_time() - c0)
            mem.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            loss, grads = step()
            sync()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            peak = max(peak, mem.added_mb())
    except Exception as e:
        return {"row": row, "error": f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    res = {"row": row, "time_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
           "peak_mb": peak, "note": note}
    if floor_walls:
        res["floor_time_s"] = statistics.median(floor_walls)
        res["time_x_floor"] = statistics.median(a / b for a, b in zip(walls, floor_walls))
        res["cpu_x_floor"] = statistics.median(a / b for a, b in zip(cpus, floor_cpus))
        res["floor_has_teacher"] = FLOOR_TEACHER[row]
    ref_path = spec.get("ref_path")
    if loss is not None and ref_path:
        got = [loss.detach().float().cpu()] + [g.float().cpu() for g in grads]
        if spec.get("is_ref"):
            torch.save(got, ref_path)
        elif os.path.exists(ref_path):
            ref = torch.load(ref_path, weights_only=True)
            res["max_abs_err"] = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    return res


if __name__ == "__main__":
    print(json.dumps(run_row(json.loads(sys.argv[1]))))
