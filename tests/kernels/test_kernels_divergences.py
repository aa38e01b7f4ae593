"""The divergences (forward_kl, reverse_kl, jsd) of chunked_kl_div and fused_linear_distill_loss
against the plain-torch float64 reference, and their properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import chunked_kl_div, fused_linear_distill_loss, naive_distill_loss, naive_kl_div

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
LOW = [torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(got, ref):
    """max |got - ref| / max |ref|, in float64."""
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def make_logits(shape=(3, 5, 53), seed=0, scale=3.0, masked=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if masked:
        labels.view(-1)[::3] = -100
    return s, t, labels


def kl_and_grad(fn, s, t, labels, dtype, **kw):
    x = s.to(dtype).requires_grad_(True)
    out = fn(x, t.to(dtype), labels, **kw)
    (g,) = torch.autograd.grad(out, x)
    return out, g


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_matches_float64_reference(divergence, dtype, temperature, masked):
    s, t, labels = make_logits(masked=masked)
    # the reference sees exactly the rounded inputs ours sees
    s, t = s.to(dtype).double(), t.to(dtype).double()
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3)
    out, g = kl_and_grad(chunked_kl_div, s, t, labels, dtype, chunk_size=4, **kw)
    ref, g_ref = kl_and_grad(naive_kl_div, s, t, labels, torch.float64, **kw)
    assert out.dtype == torch.float32 and g.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(g, g_ref) < TOL[dtype]


N_TOK, H, HT, V = 13, 8, 6, 41


def make_fused(seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    d = dict(generator=g, dtype=torch.float64)
    x = dict(student_hidden=torch.randn(N_TOK, H, **d), student_weight=torch.randn(V, H, **d),
             student_bias=torch.randn(V, **d), teacher_hidden=torch.randn(N_TOK, HT, **d),
             teacher_weight=torch.randn(V, HT, **d), teacher_bias=torch.randn(V, **d),
             labels=torch.randint(0, V, (N_TOK,), generator=g))
    if masked:
        x["labels"][::4] = -100
    return x


def run_fused(fn, x, dtype, teacher_as="hidden", **kw):
    """(loss, ce, kl, grad hidden, grad weight, grad bias) of fn on x cast to dtype."""
    leaves = [x[k].to(dtype).requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")]
    if teacher_as == "hidden":
        teacher = {k: x[k].to(dtype) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    else:
        teacher = {"teacher_logits": F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"]).to(dtype)}
    loss, ce, kl = fn(leaves[0], leaves[1], x["labels"], student_bias=leaves[2], **teacher, **kw)
    return (loss, ce, kl, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("masked", [True, False])
def test_fused_matches_float64_reference(divergence, dtype, temperature, alpha, masked):
    x = make_fused(masked=masked)
    rounded = {k: (v if k == "labels" else v.to(dtype).double()) for k, v in x.items()}
    kw = dict(alpha=alpha, temperature=temperature, divergence=divergence, beta=0.7)
    ours = run_fused(fused_linear_distill_loss, x, dtype, chunk_size=5, **kw)
    ref = run_fused(naive_distill_loss, rounded, torch.float64, **kw)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < TOL[dtype]
    assert all(g.dtype == dtype for g in ours[3:])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_teacher_logits_and_batched_shapes(divergence):
    x = make_fused(seed=1)
    kw = dict(alpha=0.3, temperature=1.5, divergence=divergence, beta=0.4)
    ours = run_fused(fused_linear_distill_loss, x, torch.float32, teacher_as="logits", chunk_size=4, **kw)
    ref = run_fused(naive_distill_loss, x, torch.float64, teacher_as="logits", **kw)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ours, ref))
    s, t, labels = make_logits(shape=(2, 7, 29))  # (B, T, V) flattens to rows
    out, g = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, divergence=divergence, chunk_size=5)
    ref, g_ref = kl_and_grad(naive_kl_div, s, t, labels, torch.float64, divergence=divergence)
    assert rel_err(out, ref) < 1e-5 and rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_over_beta_matches_reference(beta, temperature):
    s, t, labels = make_logits(seed=2)
    kw = dict(temperature=temperature, divergence="jsd", beta=beta)
    out, g = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, chunk_size=3, **kw)
    ref, g_ref = kl_and_grad(naive_kl_div, s, t, labels, torch.float64, **kw)
    assert rel_err(out, ref) < 1e-5 and rel_err(g, g_ref) < 1e-5


def test_default_is_the_forward_kl_bit_for_bit():
    s, t, labels = make_logits(seed=3)
    a, ga = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, temperature=2.0, chunk_size=4)
    b, gb = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, temperature=2.0, chunk_size=4,
                        divergence="forward_kl", beta=0.9)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    x = make_fused()
    default = run_fused(fused_linear_distill_loss, x, torch.float32, temperature=2.0)
    explicit = run_fused(fused_linear_distill_loss, x, torch.float32, temperature=2.0, divergence="forward_kl")
    assert all(torch.equal(u, v) for u, v in zip(default, explicit))


@pytest.mark.parametrize("beta, same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_at_beta_0_and_1_is_the_forward_and_reverse_kl(beta, same_as):
    """As TRL's generalized_jsd_loss: the mixture formula would give 0 there."""
    s, t, labels = make_logits(seed=4)
    jsd = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, divergence="jsd", beta=beta)
    kl = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, divergence=same_as)
    assert torch.equal(jsd[0], kl[0]) and torch.equal(jsd[1], kl[1])
    ref = naive_kl_div(s, t, labels, divergence="jsd", beta=beta)
    assert ref.item() == pytest.approx(naive_kl_div(s, t, labels, divergence=same_as).item(), rel=1e-12)
    x = make_fused()
    a = run_fused(fused_linear_distill_loss, x, torch.float32, divergence="jsd", beta=beta)
    b = run_fused(fused_linear_distill_loss, x, torch.float32, divergence=same_as)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_teacher_and_student_give_zero(divergence):
    s, _, labels = make_logits(seed=5)
    out, g = kl_and_grad(chunked_kl_div, s, s, labels, torch.float32, temperature=1.7,
                         divergence=divergence, chunk_size=5)
    assert abs(out.item()) < 1e-6 and g.abs().max().item() < 1e-7
    x = make_fused()
    h, w, b = (x[k].float() for k in ("student_hidden", "student_weight", "student_bias"))
    loss, ce, kl = fused_linear_distill_loss(h, w, x["labels"], student_bias=b, teacher_hidden=h, teacher_weight=w,
                                             teacher_bias=b, alpha=0.0, temperature=2.0, divergence=divergence)
    assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-5 and ce.item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_swapping_roles(temperature):
    """reverse_kl(s, t) = forward_kl(t, s) and jsd_beta(s, t) = jsd_(1-beta)(t, s), hence
    jsd_0.5 is symmetric. Values only: the gradient goes to the student alone."""
    s, t, labels = make_logits(seed=6)
    s, t = s.float(), t.float()
    kw = dict(labels=labels, temperature=temperature, chunk_size=4)
    rev = chunked_kl_div(s, t, divergence="reverse_kl", **kw)
    assert rev.item() == pytest.approx(chunked_kl_div(t, s, divergence="forward_kl", **kw).item(), rel=1e-5)
    for beta in (0.2, 0.5):
        a = chunked_kl_div(s, t, divergence="jsd", beta=beta, **kw)
        assert a.item() == pytest.approx(chunked_kl_div(t, s, divergence="jsd", beta=1 - beta, **kw).item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_jsd_lies_between_zero_and_the_binary_entropy_of_beta(beta):
    """0 <= JSD_beta <= h(beta) = -beta log beta - (1 - beta) log(1 - beta) (log 2 at beta 0.5),
    reached when the two distributions do not overlap."""
    bound = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    s, t, labels = make_logits(seed=7)
    val = chunked_kl_div(s.float(), t.float(), labels, divergence="jsd", beta=beta).item()
    assert 0.0 < val < bound
    # disjoint: each row's student and teacher put their mass on different tokens
    s = torch.full((4, 50), -60.0)
    t = torch.full((4, 50), -60.0)
    s[:, :25] = 0.0
    t[:, 25:] = 0.0
    val = chunked_kl_div(s, t, divergence="jsd", beta=beta).item()
    assert val == pytest.approx(bound, rel=1e-5) and val <= bound * (1 + 1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_scales_as_t_squared(divergence):
    s, t, labels = make_logits(seed=8)
    s, t = s.float(), t.float()
    for temp in (0.5, 2.0):
        at_t = chunked_kl_div(s, t, labels, temperature=temp, divergence=divergence)
        pre = chunked_kl_div(s / temp, t / temp, labels, divergence=divergence)
        assert at_t.item() == pytest.approx(temp**2 * pre.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunk_size_does_not_change_the_result(divergence):
    s, t, labels = make_logits(shape=(53, 29), seed=9)
    base = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, divergence=divergence, chunk_size=1)
    for chunk in (4, 7, 52, None):
        got = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, divergence=divergence, chunk_size=chunk)
        assert rel_err(got[0], base[0]) < 1e-6 and rel_err(got[1], base[1]) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_gives_zero_and_huge_logits_stay_finite(divergence):
    s, t, labels = make_logits(seed=10)
    out, g = kl_and_grad(chunked_kl_div, s, t, torch.full_like(labels, -100), torch.float32, divergence=divergence)
    assert out.item() == 0.0 and torch.count_nonzero(g) == 0
    x = make_fused()
    x["labels"].fill_(-100)
    got = run_fused(fused_linear_distill_loss, x, torch.float32, divergence=divergence, chunk_size=4)
    assert all(torch.count_nonzero(v) == 0 for v in got)
    s = torch.where(s > 0, 1e4, -1e4)
    t = torch.where(t > 0, 1e4, -1e4)
    out, g = kl_and_grad(chunked_kl_div, s, t, labels, torch.float32, temperature=2.0, divergence=divergence,
                         chunk_size=3)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    assert rel_err(out, naive_kl_div(s, t, labels, temperature=2.0, divergence=divergence)) < 1e-4


def test_bad_divergence_or_beta_raise_one_line_errors():
    s, t, labels = make_logits()
    x = make_fused()
    h, w = x["student_hidden"].float(), x["student_weight"].float()
    calls = [lambda **kw: chunked_kl_div(s, t, labels, **kw), lambda **kw: naive_kl_div(s, t, labels, **kw),
             lambda **kw: fused_linear_distill_loss(h, w, x["labels"], teacher_logits=h @ w.t(), **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=r"divergence must be one of forward_kl, reverse_kl, jsd; got 'kl'"):
            call(divergence="kl")
        for beta in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got"):
                call(divergence="jsd", beta=beta)
        with pytest.raises(ValueError, match="beta must be a number"):
            call(divergence="jsd", beta="half")
