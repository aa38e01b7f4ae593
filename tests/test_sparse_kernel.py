"""The sparse-teacher loss (kernels/sparse.py) against its float64 reference, and what the
objective must be: the full forward KL when the support is the whole vocabulary, 0 when the
student is the teacher, >= 0 always. The forward-KL tests run twice, through the native C row
step and through the torch block (the `row_step` fixture checks which one ran)."""
import pytest
import torch

from kernels import fused_linear_distill_loss, fused_linear_sparse_distill_loss, naive_kl_div, naive_sparse_distill_loss
from kernels import native

N, H, V = 37, 16, 50


def problem(k, seed=0, masked=(3, 4, 20)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(masked)] = -100
    teacher = torch.randn(N, V, generator=g) * 2.0
    logprobs_all = torch.log_softmax(teacher, dim=-1)
    # The teacher's K most likely tokens, shuffled within the row (no order is assumed).
    top = logprobs_all.topk(k, dim=-1).indices
    top = top.gather(1, torch.argsort(torch.rand(N, k, generator=g), dim=1))
    return hidden, weight, bias, labels, teacher, top, logprobs_all.gather(1, top)


@pytest.fixture(params=["native", "torch"])
def row_step(request, monkeypatch):
    """The forward KL's block through the native C row step or the torch ops; afterwards, that
    the native one ran exactly when it was meant to."""
    if request.param == "torch":
        monkeypatch.setenv("SEQ2SEQ_DISTILL_NATIVE", "0")
    elif native.get_sparse() is None:
        pytest.skip(f"no native row step on this machine: {native.status()}")
    calls = []
    real = native.sparse_rowstep
    monkeypatch.setattr(native, "sparse_rowstep", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield request.param
    assert bool(calls) == (request.param == "native")


def kernel(hidden, weight, bias, labels, ids, lp, **kw):
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss, ce, kl = fused_linear_sparse_distill_loss(h, w, labels, teacher_ids=ids, teacher_logprobs=lp,
                                                    student_bias=b, **kw)
    loss.backward()
    return loss, ce, kl, h.grad, w.grad, b.grad


def reference(hidden, weight, bias, labels, ids, lp, **kw):
    h, w, b = (x.double().requires_grad_() for x in (hidden, weight, bias))
    loss, ce, kl = naive_sparse_distill_loss(h @ w.t() + b, labels, ids, lp.double(), **kw)
    loss.backward()
    return loss, ce, kl, h.grad, w.grad, b.grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k,chunk", [(1, None), (8, 5), (8, None), (49, 7)])
def test_matches_the_float64_reference(alpha, temperature, k, chunk, row_step):
    args = problem(k)
    hidden, weight, bias, labels, _, ids, lp = args
    kw = dict(alpha=alpha, temperature=temperature)
    got = kernel(hidden, weight, bias, labels, ids, lp, chunk_size=chunk, **kw)
    want = reference(hidden, weight, bias, labels, ids, lp, **kw)
    for name, a, b in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (name, (a.double() - b).abs().max())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_whole_vocabulary_as_support_is_the_full_forward_kl(temperature, row_step):
    hidden, weight, bias, labels, teacher, ids, lp = problem(V)
    got = kernel(hidden, weight, bias, labels, ids, lp, alpha=0.5, temperature=temperature)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    full = fused_linear_distill_loss(h, w, labels, teacher_logits=teacher, student_bias=b, alpha=0.5,
                                     temperature=temperature)
    full[0].backward()
    kl = naive_kl_div(hidden @ weight.t() + bias, teacher, labels, temperature=temperature) / temperature**2
    assert torch.allclose(got[2], kl, rtol=1e-5)
    for a, b in zip(got[:3] + got[3:], full[:3] + (h.grad, w.grad, b.grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_zero_when_the_student_is_the_teacher_and_positive_otherwise(row_step):
    hidden, weight, bias, labels, teacher, ids, lp = problem(8)
    # student logits = teacher logits: hidden states that give them exactly (an identity lm_head)
    same = fused_linear_sparse_distill_loss(teacher, torch.eye(V), labels, teacher_ids=ids, teacher_logprobs=lp,
                                            alpha=0.0)[2]
    assert abs(float(same)) < 1e-6
    other = fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=lp,
                                             alpha=0.0)[2]
    assert float(other) > 0.01


def test_a_fully_masked_batch_gives_zero_and_zero_gradients(row_step):
    hidden, weight, bias, labels, _, ids, lp = problem(8, masked=range(N))
    loss, ce, kl, gh, gw, gb = kernel(hidden, weight, bias, labels, ids, lp)
    assert float(loss.detach()) == float(ce) == float(kl) == 0.0
    assert not gh.any() and not gw.any() and not gb.any()


def test_shapes_batch_and_sequence():
    hidden, weight, bias, labels, _, ids, lp = problem(8)
    flat = fused_linear_sparse_distill_loss(hidden[:36], weight, labels[:36], teacher_ids=ids[:36],
                                            teacher_logprobs=lp[:36])[0]
    shaped = fused_linear_sparse_distill_loss(hidden[:36].view(4, 9, H), weight, labels[:36].view(4, 9),
                                              teacher_ids=ids[:36].view(4, 9, 8), teacher_logprobs=lp[:36].view(4, 9, 8))[0]
    assert torch.allclose(flat, shaped)


@pytest.mark.parametrize("change,message", [
    (lambda ids, lp: (torch.cat([ids[:, :1], ids[:, :7]], 1), lp), "repeat a token"),
    (lambda ids, lp: (ids.masked_fill(ids == ids[0, 0], V), lp), "must be in [0, 50)"),
    (lambda ids, lp: (ids[:, :4], lp), "the same shape"),
    (lambda ids, lp: (ids[:5], lp[:5]), "expected 37"),
    (lambda ids, lp: (ids.float(), lp), "integer"),
])
def test_bad_teacher_rows_are_refused(change, message):
    hidden, weight, _, labels, _, ids, lp = problem(8)
    ids, lp = change(ids, lp)
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace(")", r"\)")):
        fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=lp)


def test_k_larger_than_the_vocabulary_is_refused():
    hidden, weight, _, labels, _, _, _ = problem(8)
    ids = torch.arange(V + 1).repeat(N, 1)
    with pytest.raises(ValueError, match="1 <= K <= vocabulary size 50"):
        fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=ids.float())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_an_exact_tail_mass_matches_the_reference(temperature, row_step):
    """teacher_tail_logmass (what a cache stores from the full logits) replaces 1 - sum(p)."""
    hidden, weight, bias, labels, teacher, ids, lp = problem(8)
    logits = teacher.double()
    tail = (logits.scatter(1, ids, float("-inf")).logsumexp(1) - logits.logsumexp(1)).float()
    kw = dict(alpha=0.3, temperature=temperature)
    got = kernel(hidden, weight, bias, labels, ids, lp, teacher_tail_logmass=tail, **kw)
    want = reference(hidden, weight, bias, labels, ids, lp, teacher_tail_logmass=tail.double(), **kw)
    for name, a, b in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (name, (a.double() - b).abs().max())
    # and it is what 1 - sum(p) gives, up to float32 rounding, when the log-probabilities are exact
    derived = kernel(hidden, weight, bias, labels, ids, lp, **kw)
    assert torch.allclose(got[0], derived[0], rtol=1e-4)


def test_no_tail_is_the_forward_kl_to_the_support_weights(row_step):
    """tail -inf: the support weights are the whole target, the forward KL to a distribution that
    is zero off the support (a sampled teacher), padding repeats with -inf changing nothing."""
    hidden, weight, bias, labels, _, ids, _ = problem(8)
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(N, 8, generator=g) + 0.1
    lp = (weights / weights.sum(1, keepdim=True)).log()
    no_tail = torch.full((N,), float("-inf"))
    got = kernel(hidden, weight, bias, labels, ids, lp, teacher_tail_logmass=no_tail, alpha=0.0)
    log_q = torch.log_softmax((hidden @ weight.t() + bias).double(), dim=1).gather(1, ids)
    per_token = (lp.double().exp() * (lp.double() - log_q)).sum(1)
    mask = labels != -100
    assert torch.allclose(got[2].double(), per_token[mask].mean(), rtol=1e-5)
    # the same row padded to K = 10 by repeating its first id with zero mass
    ids_p = torch.cat([ids, ids[:, :2]], 1)
    lp_p = torch.cat([lp, torch.full((N, 2), float("-inf"))], 1)
    padded = kernel(hidden, weight, bias, labels, ids_p, lp_p, teacher_tail_logmass=no_tail, alpha=0.0)
    for a, b in zip(got, padded):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_sure_of_the_support_keeps_its_tail_gradient_finite(row_step, temperature):
    """Student logits on the support 120 above the rest: its off-support mass (e^-120) is below
    float32's range, yet loss and gradients are finite and match the float64 reference (the tail
    bucket's gradient is at most m_t per entry, never m_t / m_s of an underflowed m_s)."""
    hidden, weight, bias, labels, teacher, ids, lp = problem(8)
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(9))
    logits.scatter_add_(1, ids[:, :3], torch.full((N, 3), 120.0))
    tail = (teacher.double().scatter(1, ids, float("-inf")).logsumexp(1) - teacher.double().logsumexp(1)).float()
    eye, zero = torch.eye(V), torch.zeros(V)
    got = kernel(logits, eye, zero, labels, ids, lp, teacher_tail_logmass=tail, alpha=0.5, temperature=temperature)
    want = reference(logits, eye, zero, labels, ids, lp, teacher_tail_logmass=tail.double(), alpha=0.5,
                     temperature=temperature)
    for name, a, b in zip(("loss", "ce", "kl", "grad hidden"), got, want):
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (name, (a.double() - b).abs().max())


def test_a_bad_tail_is_refused():
    hidden, weight, _, labels, _, ids, lp = problem(8)
    with pytest.raises(ValueError, match="log-masses"):
        fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=lp,
                                         teacher_tail_logmass=torch.full((N,), 0.5))
    with pytest.raises(ValueError, match="expected 37"):
        fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=lp,
                                         teacher_tail_logmass=torch.zeros(5))


def test_fp16_gradients_survive_the_loss_scale(row_step):
    """float16 inputs: the gradients keep a per-row scale until backward applies the incoming
    gradient (the fp16 loss scale), as the fused loss's do: at 2^16 none is inf, and the entries
    that are normal float16 numbers once scaled are within 2% of the float64 gradient."""
    g = torch.Generator().manual_seed(3)
    n, hid, vocab, k = 512, 64, 4096, 16
    h = torch.randn(n, hid, generator=g)
    w = torch.randn(vocab, hid, generator=g) * (3.0 / hid**0.5)
    teacher = torch.log_softmax((h + 0.5 * torch.randn(n, hid, generator=g)) @ w.t(), -1)
    lp, ids = teacher.topk(k, -1)
    labels = ids[:, 0].clone()
    labels[::7] = -100
    h16, w16 = h.half().requires_grad_(), w.half().requires_grad_()
    loss = fused_linear_sparse_distill_loss(h16, w16, labels, teacher_ids=ids, teacher_logprobs=lp.half(),
                                            alpha=0.5, temperature=2.0)[0]
    h64, w64 = h.half().double().requires_grad_(), w.half().double().requires_grad_()
    ref = naive_sparse_distill_loss(h64 @ w64.t(), labels, ids, lp.half().double(), alpha=0.5, temperature=2.0)[0]
    ref_h, ref_w = torch.autograd.grad(ref, (h64, w64))
    for scale in (2.0**15, 2.0**16):
        got_h, got_w = torch.autograd.grad(loss, (h16, w16), grad_outputs=torch.tensor(scale), retain_graph=True)
        for got, want in ((got_h, ref_h), (got_w, ref_w)):
            assert got.dtype == torch.float16 and not torch.isinf(got).any()
            want = want * scale
            normal = (want.abs() >= 2.0**-14) & (want.abs() <= 65504)
            bad = normal & ((got.double() - want).abs() > 0.02 * want.abs())
            assert int(normal.sum()) > 1000 and int(bad.sum()) <= 1e-3 * int(normal.sum()), (scale, int(bad.sum()))


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k,chunk", [(8, 5), (49, None)])
def test_other_divergences_match_the_float64_reference(divergence, beta, temperature, k, chunk):
    """With the tail mass given exactly, as a cache stores it: the reverse KL's log(m_s / m_t)
    magnifies the float32 rounding of 1 - sum(p) when the tail is small (K = 49 of 50)."""
    hidden, weight, bias, labels, teacher, ids, lp = problem(k)
    logits = teacher.double()
    tail = (logits.scatter(1, ids, float("-inf")).logsumexp(1) - logits.logsumexp(1)).float()
    kw = dict(alpha=0.3, temperature=temperature, divergence=divergence, beta=beta, teacher_tail_logmass=tail)
    got = kernel(hidden, weight, bias, labels, ids, lp, chunk_size=chunk, **kw)
    want = reference(hidden, weight, bias, labels, ids, lp, **dict(kw, teacher_tail_logmass=tail.double()))
    for name, a, b in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (name, (a.double() - b).abs().max())


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_whole_vocabulary_support_gives_the_fused_losss_divergence(divergence, beta, temperature):
    """K = V: the coarsened distributions are the full ones, so each divergence is the fused
    loss's own (an independent implementation), loss and gradients."""
    hidden, weight, bias, labels, teacher, ids, lp = problem(V)
    kw = dict(alpha=0.4, temperature=temperature, divergence=divergence, beta=beta)
    got = kernel(hidden, weight, bias, labels, ids, lp, **kw)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    full = fused_linear_distill_loss(h, w, labels, teacher_logits=teacher, student_bias=b, **kw)
    full[0].backward()
    for name, a, c in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"),
                          got, full[:3] + (h.grad, w.grad, b.grad)):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6), (name, (a - c).abs().max())


def test_reverse_kl_without_a_teacher_tail_is_infinite_and_jsd_is_not():
    """A sampled cache has no tail (m_t = 0): where the student puts mass off the support the
    reverse KL is infinite (what training refuses), the JSD stays finite."""
    hidden, weight, bias, labels, _, ids, lp = problem(8)
    no_tail = torch.full((N,), float("-inf"))
    w8 = torch.softmax(lp, 1).log()
    rev = fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=w8,
                                           teacher_tail_logmass=no_tail, alpha=0.0, divergence="reverse_kl")[2]
    jsd = fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=w8,
                                           teacher_tail_logmass=no_tail, alpha=0.0, divergence="jsd")[2]
    assert torch.isinf(rev) and torch.isfinite(jsd) and float(jsd) > 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_padding_changes_no_divergence(divergence):
    """A row padded by repeating its ids with log-probability -inf gives the same loss and
    gradients as the row itself, for every divergence (the padding places are no outcomes of
    the coarsened distributions; counted, they would add the student's mass there twice)."""
    hidden, weight, bias, labels, teacher, ids, lp = problem(8)
    tail = (teacher.double().scatter(1, ids, float("-inf")).logsumexp(1) - teacher.double().logsumexp(1)).float()
    kw = dict(teacher_tail_logmass=tail, alpha=0.2, temperature=2.0, divergence=divergence)
    got = kernel(hidden, weight, bias, labels, ids, lp, **kw)
    ids_p = torch.cat([ids, ids[:, 1:3]], 1)
    lp_p = torch.cat([lp, torch.full((N, 2), float("-inf"))], 1)
    padded = kernel(hidden, weight, bias, labels, ids_p, lp_p, **kw)
    ref = reference(hidden, weight, bias, labels, ids_p, lp_p, **{**kw, "teacher_tail_logmass": tail.double()})
    for name, a, b, c in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"), got, padded, ref):
        assert torch.isfinite(b).all(), name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (name, (a - b).abs().max())
        assert torch.allclose(b.double(), c, rtol=1e-5, atol=1e-6), (name, (b.double() - c).abs().max())
