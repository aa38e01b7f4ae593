"""The memory bound of every divergence: no (tokens x vocab) tensor but the gradient itself.

Peak tensor memory is read from the profiler's CPU allocator events (every allocation and free,
summed in time order), so the check counts tensors at the allocator, not pages.
"""
import os

import pytest
import torch

from kernels import _core, chunked_kl_div, fused_linear_distill_loss, naive_kl_div

N_TOK, VOCAB, HID, CHUNK = 256, 1000, 32, 16
BLOCK = CHUNK * VOCAB * 4  # one float32 scratch block
FULL = N_TOK * VOCAB * 4  # one float32 (tokens x vocab) tensor


def peak_bytes(run):
    # torch.autograd.profiler, not torch.profiler: the latter imports triton (through dynamo),
    # and triton.language imported outside TRITON_INTERPRET=1 cannot run the Triton row step's
    # interpreter later in the session.
    from torch.autograd.profiler import profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no profiler start/stop lines on stderr
    run()  # warm-up: first-call set-up (the native build, Triton's interpreter) is not the loss's
    with profile(profile_memory=True) as prof:
        run()
    try:
        events = [e for e in prof.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type().name == "CPU"]
    except AttributeError:
        pytest.skip("this torch's profiler does not expose its allocator events")
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()  # negative for a free
        peak = max(peak, level)
    return peak


def inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N_TOK, VOCAB, generator=g) * 3
    t = torch.randn(N_TOK, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (N_TOK,), generator=g)
    labels[::5] = -100
    return s, t, labels


def scratch_blocks(backend, divergence, fused):
    """Scratch blocks each loss allocates (kernels/kl.py, kernels/fused.py): a row step (native,
    Triton) needs the student and teacher blocks (chunked_kl_div writes float32 student logits
    straight into the gradient, so only the teacher's); the eager path one more, and its "jsd"
    another."""
    n = 2 if fused else 1
    if backend == "eager":
        n += 2 if divergence == "jsd" else 1
    return n


def _one_divergence_under_the_interpreter(divergence, backend):
    """Triton's CPU interpreter takes 10-15 s a case here: its memory bounds are checked on jsd,
    which computes both KL directions; every divergence's exactness is in test_kernels."""
    if backend == "triton" and divergence != "jsd":
        pytest.skip("Triton under the interpreter: memory bounds checked on jsd (both KL directions)")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_kl_holds_the_gradient_and_a_few_blocks(divergence, backend):
    _one_divergence_under_the_interpreter(divergence, backend)
    s, t, labels = inputs()
    x = s.requires_grad_(True)

    def run(fn, **kw):
        return lambda: torch.autograd.grad(fn(x, t, labels, temperature=2.0, divergence=divergence, **kw), x)

    ours = peak_bytes(run(chunked_kl_div, chunk_size=CHUNK))
    # the gradient (the one full-size tensor it must return) plus the scratch blocks; the slack
    # covers the per-row vectors
    assert ours <= FULL + scratch_blocks(backend, divergence, fused=False) * BLOCK + BLOCK // 4, (ours, FULL, BLOCK)
    assert ours < peak_bytes(run(naive_kl_div)) / 2


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_never_holds_full_logits(divergence, backend):
    _one_divergence_under_the_interpreter(divergence, backend)
    s, t, labels = inputs()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N_TOK, HID, generator=g, requires_grad=True)
    w = torch.randn(VOCAB, HID, generator=g, requires_grad=True)

    def run():
        loss, _, _ = fused_linear_distill_loss(h, w, labels, teacher_logits=t, temperature=2.0, chunk_size=CHUNK,
                                               divergence=divergence)
        torch.autograd.grad(loss, (h, w))

    grads = (N_TOK + VOCAB) * HID * 4
    # the two gradients plus the scratch blocks, nothing of size N x V
    assert peak_bytes(run) <= grads + scratch_blocks(backend, divergence, fused=True) * BLOCK + BLOCK // 4


def test_chunked_kl_fp16_gradient_stays_float16(backend, monkeypatch):
    """float16 logits: the gradient is kept as float16 (with one float32 scale per row), as large
    as the logits; backward writes the scaled gradient into a new float16 tensor through a
    float32 scratch piece, while the scratch blocks of the forward pass are gone."""
    monkeypatch.setattr(_core, "SCALE_PIECE_BYTES", BLOCK)  # (4 MiB: larger than all of it here)
    s, t, labels = inputs()
    x, t16 = s.half().requires_grad_(True), t.half()

    def run():
        torch.autograd.grad(chunked_kl_div(x, t16, labels, temperature=2.0, chunk_size=CHUNK), x,
                            grad_outputs=torch.tensor(2.0**16))

    forward = (scratch_blocks(backend, "forward_kl", fused=False) + 1) * BLOCK  # + the student block
    # backward: the new gradient and the scratch piece; under Triton's interpreter the last
    # launch's blocks (student and teacher) are still referenced then (measured)
    backward = FULL // 2 + BLOCK + (2 * BLOCK if backend == "triton" else 0)
    assert peak_bytes(run) <= FULL // 2 + max(forward, backward) + BLOCK // 4


def test_fused_fp16_gradients_stay_float16_and_the_head_is_staged(backend, monkeypatch):
    """float16 inputs: the gradients are summed in float32 in the forward pass (as before) and
    kept as float16 (with one float32 scale per row) from forward to backward; the lm_head is
    read through one float32 staging buffer (a quarter of a block or MIN_STAGE_BYTES, at most
    the head's float32 size)."""
    from kernels.fused import MIN_STAGE_BYTES

    monkeypatch.setattr(_core, "SCALE_PIECE_BYTES", BLOCK)
    _, t, labels = inputs()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N_TOK, HID, generator=g).half().requires_grad_(True)
    w = torch.randn(VOCAB, HID, generator=g).half().requires_grad_(True)
    t16 = t.half()

    def run():
        loss, _, _ = fused_linear_distill_loss(h, w, labels, teacher_logits=t16, temperature=2.0, chunk_size=CHUNK)
        torch.autograd.grad(loss, (h, w), grad_outputs=torch.tensor(2.0**16))

    grads = (N_TOK + VOCAB) * HID * (4 + 2)  # float32 sums, then their float16 copies
    staging = min(VOCAB * HID * 4, max(BLOCK // 4, MIN_STAGE_BYTES))
    assert peak_bytes(run) <= grads + staging + scratch_blocks(backend, "forward_kl", fused=True) * BLOCK + BLOCK // 4
