"""The sparse-teacher loss (kernels/sparse.py) against its float64 reference, and what the
objective must be: the full forward KL when the support is the whole vocabulary, 0 when the
student is the teacher, >= 0 always."""
import pytest
import torch

from kernels import fused_linear_distill_loss, fused_linear_sparse_distill_loss, naive_kl_div, naive_sparse_distill_loss

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
def test_matches_the_float64_reference(alpha, temperature, k, chunk):
    args = problem(k)
    hidden, weight, bias, labels, _, ids, lp = args
    kw = dict(alpha=alpha, temperature=temperature)
    got = kernel(hidden, weight, bias, labels, ids, lp, chunk_size=chunk, **kw)
    want = reference(hidden, weight, bias, labels, ids, lp, **kw)
    for name, a, b in zip(("loss", "ce", "kl", "grad hidden", "grad weight", "grad bias"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (name, (a.double() - b).abs().max())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_whole_vocabulary_as_support_is_the_full_forward_kl(temperature):
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


def test_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    hidden, weight, bias, labels, teacher, ids, lp = problem(8)
    # student logits = teacher logits: hidden states that give them exactly (an identity lm_head)
    same = fused_linear_sparse_distill_loss(teacher, torch.eye(V), labels, teacher_ids=ids, teacher_logprobs=lp,
                                            alpha=0.0)[2]
    assert abs(float(same)) < 1e-6
    other = fused_linear_sparse_distill_loss(hidden, weight, labels, teacher_ids=ids, teacher_logprobs=lp,
                                             alpha=0.0)[2]
    assert float(other) > 0.01


def test_a_fully_masked_batch_gives_zero_and_zero_gradients():
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
