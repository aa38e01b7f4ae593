"""Fuzzing the losses' inputs: every case gives the float64 reference's answer or a clean Python error.

hypothesis draws the cases: the kernel (fused with the teacher as hidden states or as logits, or
chunked_kl_div), shapes (vocab 1 to past the C step's 1024-wide sum blocks), float dtypes, label
dtypes (int8, int16, int32, int64, uint8, and float32, which must be refused), ignore_index,
labels out of range, and NaN / +-inf put into hidden states, weights and logits. The cases run in
a worker process, on the native C row step and on the eager torch one: a segfault or an abort
kills the worker, not pytest, and fails the test with the case that did it (a new worker takes
the next case). Where gcc has them, the worker's C step is built with AddressSanitizer and UBSan,
so a stray read or an undefined float -> int conversion stops it too, crash or not. The worker
compares with kernels.naive_distill_loss / naive_kl_div run in float64 on the same rounded
inputs: no output (loss, ce, kl, gradient entry) may be finite where the reference's is not;
where the reference's is finite, ours must be within float rounding of it, or (only when a NaN
or inf was put into the inputs) non-finite too, since a masked row enters our sums multiplied
by 0, and 0 * NaN is NaN.
"""
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE_TIMEOUT_S = 120  # the first case also builds the native step when its cache is cold

WORKER = r'''
import json, os, sys, traceback
import torch
torch.set_num_threads(2)  # the C step splits rows over threads: more threads than rows happens too
from kernels import chunked_kl_div, fused_linear_distill_loss, native, naive_distill_loss, naive_kl_div
if sys.argv[1:] == ["--sanitize"]:  # the C step built with AddressSanitizer + UBSan (see Worker)
    native.FLAGS = native.FLAGS + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                                   "-fno-omit-frame-pointer"]

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LABEL_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                "uint8": torch.uint8, "float32": torch.float32}
# max |ours - reference| / max |reference|. The math is float32 whatever the input dtype, and a
# batch of one or two confident rows has a gradient that float32 only knows to about 1e-4 of its
# largest entry (p and q both near 1 at the same token: q - p cancels); the values here are far
# below what a misread label, a wrong mask or a stray memory read gives (order 1).
TOL = {"float64": 1e-3, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def make(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, v, h, ht = c["tokens"], c["vocab"], c["hidden"], c["hidden"] + 1
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    x = {}
    if c["kernel"] == "chunked":
        x["student_logits"], x["teacher_logits"] = rnd(n, v), rnd(n, v)
    else:
        x["student_hidden"], x["student_weight"] = rnd(n, h), rnd(v, h, scale=h ** -0.5)
        if c["bias"]:
            x["student_bias"] = rnd(v, scale=0.5)
        if c["kernel"] == "fused_logits":
            x["teacher_logits"] = rnd(n, v)
        elif c["kernel"] == "fused_hidden":
            x["teacher_hidden"], x["teacher_weight"] = rnd(n, ht), rnd(v, ht, scale=ht ** -0.5)
    x = {k: t.to(DTYPES[c["dtype"]]) for k, t in x.items()}
    for name, kind, pos in c["inject"]:
        if name in x:
            x[name].view(-1)[pos % x[name].numel()] = BAD[kind]
    ldt = LABEL_DTYPES[c["label_dtype"]]
    top = v if ldt.is_floating_point else min(v, torch.iinfo(ldt).max + 1)
    labels = torch.randint(0, top, (n,), generator=g)
    ii = c["ignore_index"]
    fits = ldt.is_floating_point or torch.iinfo(ldt).min <= ii <= torch.iinfo(ldt).max
    for pos in c["masked"]:
        if fits:
            labels[pos % n] = ii
    if c["bad_label"] is not None:
        bad = v if c["bad_label"] == "high" else -3
        if (ldt.is_floating_point or torch.iinfo(ldt).min <= bad <= torch.iinfo(ldt).max) and bad != ii:
            labels[c["bad_label_pos"] % n] = bad
    labels = labels.to(ldt).reshape(c["batch"], -1) if c["batch"] else labels.to(ldt)
    return x, labels


def expected(c, labels):
    if labels.dtype.is_floating_point:
        return "TypeError"
    lab = labels.long().reshape(-1)
    lab = lab[lab != c["ignore_index"]]
    if c["kernel"] != "chunked" and bool(((lab < 0) | (lab >= c["vocab"])).any()):
        return "ValueError"
    return "ok"


def run(c, x, labels, fn):
    """(loss, ce, kl, grads) of fn on x; grads for the student's leaves, in x's order."""
    x = {k: t.detach().clone().requires_grad_(k.startswith("student")) for k, t in x.items()}
    leaves = [t for k, t in x.items() if k.startswith("student")]
    kw = dict(temperature=c["temperature"], ignore_index=c["ignore_index"], divergence=c["divergence"],
              beta=c["beta"])
    if c["kernel"] == "chunked":
        loss = fn(x["student_logits"], x["teacher_logits"], labels, chunk_size=c["chunk"], **kw)
        ce = kl = loss.detach()
    else:
        loss, ce, kl = fn(x.pop("student_hidden"), x.pop("student_weight"), labels, alpha=c["alpha"],
                          chunk_size=c["chunk"], **x, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), ce, kl], list(grads)


def compare(what, got, ref, tol, spread_ok):
    """None, or what is wrong with got. Where ref is not finite, got must not be finite either.
    spread_ok (a NaN or inf was put into the inputs): got may also be non-finite where ref is
    finite, since a masked row is multiplied by 0 in our sums rather than left out, and 0 * NaN
    is NaN (the reference's cross-entropy leaves it out; its own divergence term and gradients
    do not). Elsewhere got must be within tol of ref, relative to ref's largest entry."""
    got, ref = got.detach().double().reshape(-1), ref.detach().double().reshape(-1)
    if got.shape != ref.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    if bool((torch.isfinite(got) & ~fin).any()):
        return f"{what}: finite where the reference is not ({got[~fin][:4].tolist()} vs {ref[~fin][:4].tolist()})"
    both = fin & torch.isfinite(got)
    if not spread_ok and not bool(both.equal(fin)):
        lost = fin & ~both
        return f"{what}: not finite where the reference is ({got[lost][:4].tolist()} vs {ref[lost][:4].tolist()})"
    if not bool(both.any()):
        return None
    scale = max(float(ref[fin].abs().max()), 1e-3 if got.numel() == 1 else 1e-8)
    err = float((got[both] - ref[both]).abs().max()) / scale
    return None if err <= tol else f"{what}: error {err:.3g} > {tol} (got {got[:4].tolist()}, ref {ref[:4].tolist()})"


def check(c):
    """(None or what went wrong, the outcome the case calls for)."""
    x, labels = make(c)
    want = expected(c, labels)
    ref = None
    if want == "ok":
        ref_fn = naive_kl_div if c["kernel"] == "chunked" else naive_distill_loss
        ref = run(c, {k: t.double() for k, t in x.items()}, labels.long(), ref_fn)
    ours_fn = chunked_kl_div if c["kernel"] == "chunked" else fused_linear_distill_loss
    for backend in ("native", "eager"):
        os.environ["SEQ2SEQ_DISTILL_NATIVE"] = "1" if backend == "native" else "0"
        try:
            got = run(c, x, labels, ours_fn)
        except Exception as e:
            if type(e).__name__ == want and "\n" not in str(e):
                continue
            return f"{backend}: expected {want}, got {type(e).__name__}: {e}", want
        if want != "ok":
            return f"{backend}: expected {want}, got a result", want
        for g, t in zip(got[1], x.values()):
            if g.dtype != t.dtype:
                return f"{backend}: gradient dtype {g.dtype} for a {t.dtype} input", want
        names = ["loss", "ce", "kl"] + [f"grad {k}" for k in x if k.startswith("student")]
        for name, a, b in zip(names, got[0] + got[1], ref[0] + ref[1]):
            why = compare(name, a, b, TOL[c["dtype"]], spread_ok=any(name in x for name, _, _ in c["inject"]))
            if why:
                return f"{backend}: {why}", want
    return None, want


for line in sys.stdin:
    case = json.loads(line)
    try:
        why, want = check(case)
    except Exception:
        why, want = "the harness failed: " + traceback.format_exc(), None
    print(json.dumps({"ok": why is None, "why": why, "expected": want}), flush=True)
'''


def sanitizer_env(cache):
    """With gcc and its AddressSanitizer and UBSan runtimes, the environment that runs the worker's
    C step under both (a read outside a tensor's memory or an undefined float -> int conversion
    then stops the worker with the sanitizer's report, where it could otherwise go unnoticed);
    None without them, or when python with torch does not start under them."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return None
        libs.append(path)
    env = dict(CC=gcc, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="print_stacktrace=1", SEQ2SEQ_DISTILL_CACHE=str(cache))
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env},
                               capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    return env if probe.returncode == 0 else None


class Worker:
    """One python process running WORKER, fed one JSON case per line; started again after a crash."""

    def __init__(self, sanitize=None):
        self.proc = None
        self.sanitize = sanitize  # sanitizer_env(...) or None
        self.stderr = tempfile.TemporaryFile(mode="w+")

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQ2SEQ_DISTILL_", "TRITON_"))}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="2", **(self.sanitize or {}))
        self.stderr.seek(0)
        self.stderr.truncate()
        argv = [sys.executable, "-c", WORKER] + (["--sanitize"] if self.sanitize else [])
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr)

    def ask(self, case):
        if self.proc is None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died before reading the case: the report below says how
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            self.proc.kill()
        rc = self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()
        # a sanitizer's report starts with the line that matters; otherwise the end tells most
        start = max(err.find("runtime error:"), err.find("ERROR: AddressSanitizer"))
        tail = err[start:start + 3000] if start >= 0 else err[-3000:]
        self.proc = None
        how = f"timed out after {CASE_TIMEOUT_S} s" if not ready else f"died with exit code {rc}"
        return {"ok": False, "why": f"the worker {how} (a negative code is the signal: -11 SIGSEGV, "
                                    f"-6 SIGABRT); its stderr:\n{tail}"}

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(sanitize=sanitizer_env(tmp_path_factory.mktemp("sanitized-native")))
    yield w
    w.close()


KERNELS = ["fused_hidden", "fused_logits", "fused_no_teacher", "chunked"]


@st.composite
def cases(draw):
    kernel = draw(st.sampled_from(KERNELS))
    tokens = draw(st.integers(1, 9))
    vocab = draw(st.sampled_from([1, 2, 3, 7, 41, 300, 1030, 2100]))
    alpha = 1.0 if kernel == "fused_no_teacher" else draw(st.sampled_from([0.0, 0.5, 1.0]))
    inject_into = ["student_logits", "teacher_logits"] if kernel == "chunked" else [
        "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_logits"]
    return dict(
        kernel="fused" if kernel == "fused_no_teacher" else kernel, tokens=tokens, vocab=vocab,
        hidden=draw(st.integers(1, 8)), bias=draw(st.booleans()),
        batch=draw(st.sampled_from([0, 1] + ([tokens] if tokens > 1 else []))),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"])),
        label_dtype=draw(st.sampled_from(["int64", "int32", "int16", "int8", "uint8", "float32"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, 5, 127, 255, 2**40])),
        masked=draw(st.lists(st.integers(0, 20), max_size=3)),
        bad_label=draw(st.sampled_from([None, None, None, "high", "low"])), bad_label_pos=draw(st.integers(0, 20)),
        inject=draw(st.lists(st.tuples(st.sampled_from(inject_into), st.sampled_from(["nan", "inf", "-inf"]),
                                       st.integers(0, 10**6)), max_size=2)),
        alpha=alpha, temperature=draw(st.sampled_from([1.0, 2.0, 0.5])),
        divergence=draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])), beta=0.3,
        chunk=draw(st.sampled_from([None, 1, 3])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def explicit(**kw):
    """A case with quiet defaults, for the examples that are always run."""
    base = dict(kernel="fused_hidden", tokens=6, vocab=41, hidden=4, bias=False, batch=0, dtype="float32",
                label_dtype="int64", ignore_index=-100, masked=[1], bad_label=None, bad_label_pos=0, inject=[],
                alpha=0.5, temperature=2.0, divergence="forward_kl", beta=0.3, chunk=None, seed=0)
    base.update(kw)
    return base


@settings(max_examples=250, deadline=None, database=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing case is printed whole
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
# the process-killers of the past: int32 labels read as int64 by the C step, NaN logits cast to int
@example(case=explicit(label_dtype="int32", kernel="fused", alpha=1.0, vocab=2100, tokens=9))
@example(case=explicit(label_dtype="int32", vocab=1030))
@example(case=explicit(label_dtype="uint8", ignore_index=0, masked=[2, 3]))
@example(case=explicit(label_dtype="float32"))
@example(case=explicit(kernel="chunked", label_dtype="float32"))
@example(case=explicit(inject=[["student_hidden", "nan", 5]], divergence="jsd"))
@example(case=explicit(kernel="chunked", inject=[["teacher_logits", "inf", 7]], divergence="reverse_kl"))
@example(case=explicit(bad_label="high"))
def test_every_case_is_right_or_a_clean_error(case, worker, backend):
    if backend != "native":
        pytest.skip("the worker runs each case on the native and the eager row step itself")
    verdict = worker.ask(case)
    assert verdict["ok"], f"{verdict['why']}\ncase: {json.dumps(case)}"
