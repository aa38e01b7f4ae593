"""float16 gradients survive the loss scale.

fp16 training multiplies the loss by a scale (DeepSpeed's dynamic loss scale: 2^15, 2^16, ...)
that reaches the losses in backward as the incoming gradient. Both losses compute their gradient
in the forward pass, and must keep its range until that scale is applied (kernels/_core.py,
"Float16 gradients": float16 with a power-of-two scale per row). Measured per element at a
realistic size (vocab 32128, 2048 tokens, hidden 256, teacher close to the student, labels the
teacher's top token, alpha 0.5, T 2): among the gradient entries that are normal float16 numbers
once scaled, at most 0.1% may be zero or off by more than 2% from a float64 reference, and none
may be inf.
"""
import pytest
import torch

from kernels import chunked_kl_div, fused_linear_distill_loss

N_TOK, VOCAB, HID = 2048, 32128, 256
ALPHA, TEMP = 0.5, 2.0
SCALES = (2.0**15, 2.0**16)
FP16_TINY = 2.0**-14  # the smallest normal float16
REL, MAX_BAD = 0.02, 1e-3
EVERY = 4  # the float64 reference checks every 4th token's and every 4th vocabulary row's gradient


def make(n_tok, vocab, hid, seed=0):
    """float16 student hidden states and lm_head (logits of std ~3), teacher logits from hidden
    states near the student's, labels = the teacher's top token, every 7th token masked."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tok, hid, generator=g)
    w = torch.randn(vocab, hid, generator=g) * (3.0 / hid**0.5)
    teacher = ((h + 0.5 * torch.randn(n_tok, hid, generator=g)) @ w.t()).half()
    labels = teacher.argmax(1)
    labels[::7] = -100
    return h.half(), w.half(), teacher, labels


def fused_reference(h, w, teacher, labels, every, chunk=256):
    """The float64 gradients of alpha CE + (1 - alpha) T^2 KL(teacher || student) (T = 2) for the
    hidden states of every `every`-th token and every `every`-th lm_head row, chunk by chunk in
    three reused float64 blocks (no tokens x vocab tensor)."""
    assert TEMP == 2.0  # r = q^2 below
    h64, w64 = h.double(), w.double()
    valid = labels != -100
    n = int(valid.sum())
    c_ce, c_kl = ALPHA / n, (1 - ALPHA) * TEMP / n
    grad_h = torch.empty(h64[::every].shape, dtype=torch.float64)
    grad_w = torch.zeros(w64[::every].shape, dtype=torch.float64)
    blocks = torch.empty(3, chunk, w.shape[0], dtype=torch.float64)
    done = 0
    for i in range(0, h.shape[0], chunk):
        j = min(i + chunk, h.shape[0])
        q, r, p = blocks[:, : j - i]
        # q = exp((s - max s) / T), r = q^2 = exp(s - max s) (the CE's softmax; T = 2), p the teacher's
        torch.mm(h64[i:j], w64.t(), out=q)
        q.sub_(q.amax(1, keepdim=True)).mul_(0.5).exp_()
        torch.mul(q, q, out=r)
        p.copy_(teacher[i:j])
        p.sub_(p.amax(1, keepdim=True)).mul_(0.5).exp_()
        # d loss / d logits = c_ce (softmax(s) - onehot) + c_kl (softmax(s / T) - softmax(t / T))
        g = r.mul_(c_ce / r.sum(1, keepdim=True))
        g.add_(q.mul_(c_kl / q.sum(1, keepdim=True))).sub_(p.mul_(c_kl / p.sum(1, keepdim=True)))
        idx = torch.nonzero(valid[i:j]).view(-1)
        g[idx, labels[i:j][idx]] -= c_ce
        g[~valid[i:j]] = 0
        mine = g[(-i) % every::every]  # the rows of tokens i + k with (i + k) % every == 0
        torch.mm(mine, w64, out=grad_h[done: done + mine.shape[0]])
        done += mine.shape[0]
        grad_w.addmm_(g[:, ::every].t(), h64[i:j])
    return grad_h, grad_w


def bad_entries(got, ref, scale):
    """(bad, normal, inf): of the entries of ref * scale that are normal float16 numbers, how
    many got (the float16 gradient, scale included) has at zero or more than REL away; and how
    many entries of got are inf. In float32, which holds float16 exactly and ref * scale far
    closer than REL."""
    want = (ref * scale).float()
    size = want.abs()
    normal = (size >= FP16_TINY) & (size <= torch.finfo(torch.float16).max)
    got = got.float()
    bad = normal & ((got == 0) | ((got - want).abs_() > size.mul_(REL)))
    return int(bad.sum()), int(normal.sum()), int(torch.isinf(got).sum())


def check(what, got, ref, scale):
    bad, normal, inf = bad_entries(got, ref, scale)
    assert inf == 0, f"{what} at scale {scale:g}: {inf} inf entries"
    assert normal > 1000, f"{what}: only {normal} entries are normal float16 numbers at scale {scale:g}"
    assert bad <= MAX_BAD * normal, (
        f"{what} at scale {scale:g}: {bad} of {normal} entries ({bad / normal:.2%}) are zero or off by > {REL:.0%}")


@pytest.fixture(scope="module")
def realistic():
    return make(N_TOK, VOCAB, HID)


def test_fused_fp16_gradients_survive_the_loss_scale(realistic, backend):
    if backend != "native":
        pytest.skip("the dtype handling is the fused loss's own, alike on every row step: at this size "
                    "it runs once (native); test_small_fp16_gradients_on_every_row_step covers all three")
    h, w, teacher, labels = realistic
    ref_h, ref_w = fused_reference(h, w, teacher, labels, EVERY)
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, _, _ = fused_linear_distill_loss(hg, wg, labels, teacher_logits=teacher, alpha=ALPHA, temperature=TEMP)
    for scale in SCALES:
        got_h, got_w = torch.autograd.grad(loss, (hg, wg), grad_outputs=torch.tensor(scale), retain_graph=True)
        assert got_h.dtype == got_w.dtype == torch.float16
        assert not torch.isinf(got_h).any() and not torch.isinf(got_w).any()
        check("student hidden gradient", got_h[::EVERY], ref_h, scale)
        check("lm_head gradient", got_w[::EVERY], ref_w, scale)


def test_chunked_kl_fp16_gradient_survives_the_loss_scale(realistic, backend):
    if backend != "native":
        pytest.skip("the dtype handling is chunked_kl_div's own, alike on every row step: at this size "
                    "it runs once (native); test_small_fp16_gradients_on_every_row_step covers all three")
    h, w, teacher, labels = realistic
    student = (h.float() @ w.float().t()).half()
    rows = slice(None, None, 2 * EVERY)  # each row's gradient is its own: a sample of rows will do
    # d (T^2 mean KL) / d s = T / n (softmax(s / T) - softmax(t / T)) on unmasked rows
    n = int((labels != -100).sum())
    q, p = (x[rows].double() for x in (student, teacher))
    for x in (q, p):
        x.sub_(x.amax(1, keepdim=True)).div_(TEMP).exp_()
        x.div_(x.sum(1, keepdim=True))
    ref = q.sub_(p).mul_(TEMP / n)
    ref[labels[rows] == -100] = 0
    s = student.clone().requires_grad_(True)
    loss = chunked_kl_div(s, teacher, labels, temperature=TEMP)
    for scale in SCALES:
        (got,) = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(scale), retain_graph=True)
        assert got.dtype == torch.float16 and not torch.isinf(got).any()
        check("student logits gradient", got[rows], ref, scale)


def test_small_fp16_gradients_on_every_row_step():
    """The same measure at a size every row step runs quickly (Triton under its interpreter)."""
    h, w, teacher, labels = make(128, 1500, 32, seed=1)
    ref_h, ref_w = fused_reference(h, w, teacher, labels, 1)
    hg, wg = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, _, _ = fused_linear_distill_loss(hg, wg, labels, teacher_logits=teacher, alpha=ALPHA,
                                           temperature=TEMP, chunk_size=50)
    for scale in SCALES:
        got_h, got_w = torch.autograd.grad(loss, (hg, wg), grad_outputs=torch.tensor(scale), retain_graph=True)
        check("student hidden gradient", got_h, ref_h, scale)
        check("lm_head gradient", got_w, ref_w, scale)


def test_fp16_gradients_keep_a_scale_per_row_until_backward():
    """What backward gets from the forward pass: for float16 inputs float16 gradients with one
    float32 power-of-two scale per row (applied with the incoming gradient, in backward); the
    inputs' own dtype and no scale otherwise (bfloat16 and float32 as before)."""
    h, w, teacher, labels = make(16, 50, 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        hg, wg = h.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
        b = torch.zeros(50, dtype=dtype, requires_grad=True)
        loss, _, _ = fused_linear_distill_loss(hg, wg, labels, student_bias=b, teacher_logits=teacher.to(dtype))
        saved = loss.grad_fn.saved_tensors
        assert [x.dtype for x in saved[::2]] == [dtype] * 3
        scales = saved[1::2]
        if dtype == torch.float16:
            assert [tuple(x.shape) for x in scales] == [(16, 1), (50, 1), (1, 1)]
            assert all(x.dtype == torch.float32 and bool((torch.log2(x) == torch.log2(x).round()).all())
                       for x in scales)  # powers of two
        else:
            assert scales == (None, None, None)
        assert [x.dtype for x in torch.autograd.grad(loss, (hg, wg, b))] == [dtype] * 3
        s = (h.float() @ w.float().t()).to(dtype).requires_grad_(True)
        kl = chunked_kl_div(s, teacher.to(dtype), labels)
        grad, scale = kl.grad_fn.saved_tensors
        assert grad.dtype == dtype and (scale is None) == (dtype != torch.float16)
        assert torch.autograd.grad(kl, s)[0].dtype == dtype
