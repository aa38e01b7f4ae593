"""fused_linear_distill_loss against the plain-torch float64 reference, and its properties."""
import pytest
import torch
import torch.nn.functional as F

from kernels import fused_linear_distill_loss, naive_distill_loss

N_TOK, H, HT, V = 13, 8, 6, 41


def rel_err(got, ref):
    """max |got - ref| / max |ref|, in float64."""
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def make(seed=0, shape=(N_TOK,), bias=True):
    g = torch.Generator().manual_seed(seed)
    d = dict(generator=g, dtype=torch.float64)
    x = dict(
        student_hidden=torch.randn(*shape, H, **d),
        student_weight=torch.randn(V, H, **d),
        student_bias=torch.randn(V, **d) if bias else None,
        teacher_hidden=torch.randn(*shape, HT, **d),
        teacher_weight=torch.randn(V, HT, **d),
        teacher_bias=torch.randn(V, **d) if bias else None,
        labels=torch.randint(0, V, shape, generator=g),
    )
    x["labels"].view(-1)[::4] = -100
    return x


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(fn, x, dtype, teacher_as, **kw):
    """Loss, ce, kl and grads (hidden, weight, bias) of fn on x cast to dtype."""
    leaves = {k: x[k].to(dtype).requires_grad_(True) for k in STUDENT if x[k] is not None}
    if teacher_as == "hidden":
        teacher = {k: x[k].to(dtype) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")
                   if x[k] is not None}
    else:
        teacher = {"teacher_logits": F.linear(x["teacher_hidden"], x["teacher_weight"],
                                              x["teacher_bias"]).to(dtype)}
    loss, ce, kl = fn(leaves["student_hidden"], leaves["student_weight"], x["labels"],
                      student_bias=leaves.get("student_bias"), **teacher, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss, ce, kl, grads


def compare(dtype, teacher_as, tol, x=None, **kw):
    x = x or make()
    # The reference sees exactly the rounded inputs ours sees, in float64.
    rounded = {k: (v if v is None or k == "labels" else v.to(dtype).double()) for k, v in x.items()}
    ours = run(fused_linear_distill_loss, x, dtype, teacher_as, **kw)
    ref = run(naive_distill_loss, rounded, torch.float64, teacher_as, **kw)
    for a, b in zip(ours[:3], ref[:3]):
        assert rel_err(a, b) < tol
    for a, b in zip(ours[3], ref[3]):
        assert a.dtype == dtype
        assert rel_err(a, b) < tol
    assert ours[1].dtype == ours[2].dtype == torch.float32
    assert not ours[1].requires_grad and not ours[2].requires_grad


@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.3, 2.0), (0.0, 0.7), (1.0, 3.0)])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_float32_matches_float64_reference(teacher_as, alpha, temperature, chunk_size):
    compare(torch.float32, teacher_as, 1e-5, alpha=alpha, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
def test_batched_shapes_and_no_bias(teacher_as):
    compare(torch.float32, teacher_as, 1e-5, x=make(shape=(3, 5), bias=False), temperature=2.0, chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
def test_low_precision_matches_reference(dtype, teacher_as):
    compare(dtype, teacher_as, 2e-2, temperature=2.0, chunk_size=4)


def test_alpha_one_equals_cross_entropy():
    x = make()
    h = x["student_hidden"].float().requires_grad_(True)
    w = x["student_weight"].float()
    loss, ce, _ = fused_linear_distill_loss(h, w, x["labels"], teacher_hidden=x["teacher_hidden"].float(),
                                            teacher_weight=x["teacher_weight"].float(), alpha=1.0,
                                            temperature=3.0, chunk_size=3)
    (g,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(h2 @ w.t(), x["labels"])
    (g2,) = torch.autograd.grad(ref, h2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and ce.item() == pytest.approx(ref.item(), rel=1e-6)
    assert rel_err(g, g2) < 1e-5


def test_alpha_one_without_teacher_equals_cross_entropy():
    """Labels-only training (the demo's teacher, CE-only baselines) needs no teacher at all."""
    x = make()
    h = x["student_hidden"].float().requires_grad_(True)
    w = x["student_weight"].float().requires_grad_(True)
    b = torch.randn(w.shape[0]).requires_grad_(True)
    loss, ce, kl = fused_linear_distill_loss(h, w, x["labels"], student_bias=b, alpha=1.0, chunk_size=3)
    grads = torch.autograd.grad(loss, (h, w, b))
    h2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    ref = F.cross_entropy(h2 @ w2.t() + b2, x["labels"])
    ref_grads = torch.autograd.grad(ref, (h2, w2, b2))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and kl.item() == 0.0
    assert all(rel_err(g, g2) < 1e-5 for g, g2 in zip(grads, ref_grads))


def test_identical_teacher_and_student_give_zero_kl():
    x = make()
    h, w, b = (x[k].float() for k in STUDENT)
    _, ce, kl = fused_linear_distill_loss(h, w, x["labels"], student_bias=b, teacher_hidden=h,
                                          teacher_weight=w, teacher_bias=b, temperature=2.0)
    assert abs(kl.item()) < 1e-6 and ce.item() > 0
    loss, _, kl = fused_linear_distill_loss(h, w, x["labels"], student_bias=b,
                                            teacher_logits=F.linear(h, w, b), alpha=0.0)
    assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-6


def test_temperature_scales_as_t_squared_kl():
    x = make()
    h, w = x["student_hidden"].float(), x["student_weight"].float()
    t = F.linear(x["teacher_hidden"], x["teacher_weight"]).float()
    for temp in (0.5, 2.0):
        loss, _, kl = fused_linear_distill_loss(h, w, x["labels"], teacher_logits=t, alpha=0.0, temperature=temp)
        _, _, kl_pre = fused_linear_distill_loss(h / temp, w, x["labels"], teacher_logits=t / temp, alpha=0.0)
        assert kl.item() == pytest.approx(kl_pre.item(), rel=1e-5)
        assert loss.item() == pytest.approx(temp**2 * kl_pre.item(), rel=1e-5)


def test_all_masked_gives_zero_and_zero_grads():
    x = make()
    x["labels"].fill_(-100)
    loss, ce, kl, grads = run(fused_linear_distill_loss, x, torch.float32, "hidden", chunk_size=4)
    assert loss.item() == 0.0 and ce.item() == 0.0 and kl.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
def test_huge_logits_stay_finite(teacher_as):
    x = make()
    x["student_weight"] = torch.where(x["student_weight"] > 0, 1e4, -1e4).double() / H
    x["teacher_weight"] = torch.where(x["teacher_weight"] > 0, 1e4, -1e4).double() / HT
    loss, ce, kl, grads = run(fused_linear_distill_loss, x, torch.float32, teacher_as, temperature=2.0, chunk_size=3)
    assert all(torch.isfinite(v).all() for v in (loss, ce, kl, *grads))


def test_chunk_size_does_not_change_the_result():
    x = make(shape=(2, 23))  # 46 tokens: 4, 7 and 10 do not divide it
    base = run(fused_linear_distill_loss, x, torch.float32, "hidden", temperature=1.5, chunk_size=1)
    for chunk in (4, 7, 10, 45, 46, 1000, None):
        got = run(fused_linear_distill_loss, x, torch.float32, "hidden", temperature=1.5, chunk_size=chunk)
        for a, b in zip(got[:3] + tuple(got[3]), base[:3] + tuple(base[3])):
            assert rel_err(a, b) < 1e-6


def test_no_gradient_to_teacher_and_output_grad_scales():
    x = make()
    th, tw, tb = (x[k].float().requires_grad_(True) for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    h = x["student_hidden"].float().requires_grad_(True)
    w = x["student_weight"].float().requires_grad_(True)
    loss, _, _ = fused_linear_distill_loss(h, w, x["labels"], teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    (2.5 * loss).backward()
    assert th.grad is None and tw.grad is None and tb.grad is None
    h1, w1 = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    fused_linear_distill_loss(h1, w1, x["labels"], teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)[0].backward()
    assert rel_err(h.grad, 2.5 * h1.grad) < 1e-6 and rel_err(w.grad, 2.5 * w1.grad) < 1e-6


def test_no_grad_forward_and_frozen_weight():
    x = make()
    h, w = x["student_hidden"].float(), x["student_weight"].float()
    kw = dict(teacher_hidden=x["teacher_hidden"].float(), teacher_weight=x["teacher_weight"].float())
    with torch.no_grad():
        loss, _, _ = fused_linear_distill_loss(h, w, x["labels"], **kw)
    ref, _, _ = naive_distill_loss(h, w, x["labels"], **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    hg = h.clone().requires_grad_(True)  # only the hidden states train
    fused_linear_distill_loss(hg, w, x["labels"], **kw)[0].backward()
    assert hg.grad is not None and torch.isfinite(hg.grad).all()


def test_bad_arguments_raise():
    x = make()
    h, w = x["student_hidden"].float(), x["student_weight"].float()
    with pytest.raises(ValueError, match="needs a teacher"):
        fused_linear_distill_loss(h, w, x["labels"])
    with pytest.raises(ValueError, match="not both"):
        fused_linear_distill_loss(h, w, x["labels"], teacher_logits=h @ w.t(), teacher_hidden=h,
                                  teacher_weight=w)
    with pytest.raises(ValueError, match="alpha"):
        fused_linear_distill_loss(h, w, x["labels"], teacher_logits=h @ w.t(), alpha=1.5)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_distill_loss(h, w, x["labels"], teacher_hidden=h)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_distill_loss(h, w, x["labels"][:3], teacher_logits=h @ w.t())


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_every_integer_label_dtype_gives_the_int64_result(dtype):
    """The row steps index with int64 labels; other widths are converted first (the native step
    once read int32 labels as int64 and crashed the process)."""
    x = make(seed=3)
    labels = x["labels"].clamp(min=0)  # uint8 cannot hold -100
    labels[::4] = 0 if dtype == torch.uint8 else -100
    kw = dict(teacher_hidden=x["teacher_hidden"].float(), teacher_weight=x["teacher_weight"].float(),
              temperature=2.0, chunk_size=5, ignore_index=0 if dtype == torch.uint8 else -100)
    h = x["student_hidden"].float().requires_grad_(True)
    w = x["student_weight"].float()
    want, want_ce, _ = fused_linear_distill_loss(h, w, labels, **kw)
    (want_g,) = torch.autograd.grad(want, h)
    got, got_ce, _ = fused_linear_distill_loss(h, w, labels.to(dtype), **kw)
    (got_g,) = torch.autograd.grad(got, h)
    assert got.item() == want.item() and got_ce.item() == want_ce.item() and torch.equal(got_g, want_g)


def test_non_integer_labels_and_ignore_index_are_refused():
    x = make()
    h, w = x["student_hidden"].float(), x["student_weight"].float()
    for bad in (x["labels"].float(), x["labels"] > 0):
        with pytest.raises(TypeError, match="integer class indices"):
            fused_linear_distill_loss(h, w, bad, alpha=1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        fused_linear_distill_loss(h, w, x["labels"], alpha=1.0, ignore_index=-100.0)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_distill_loss(h, w, torch.full_like(x["labels"], V).to(torch.int32), alpha=1.0)
