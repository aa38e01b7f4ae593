"""chunked_kl_div against the plain-torch float64 reference, and its properties."""
import math

import pytest
import torch

from kernels import chunked_kl_div, naive_kl_div


def rel_err(got, ref):
    """max |got - ref| / max |ref|, in float64."""
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def make(shape=(2, 7, 37), seed=0, scale=3.0, mask_some=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if mask_some:
        labels.view(-1)[::3] = -100
    return s, t, labels


def ours_and_ref(s, t, labels, dtype, **kw):
    s_in = s.to(dtype).requires_grad_(True)
    # The reference sees exactly the rounded inputs ours sees.
    s_ref = s_in.detach().double().requires_grad_(True)
    ref = naive_kl_div(s_ref, t.to(dtype).double(), labels, **kw)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    out = chunked_kl_div(s_in, t.to(dtype), labels, **kw)
    (g,) = torch.autograd.grad(out, s_in)
    assert out.dtype == torch.float32 and g.dtype == dtype and g.shape == s_in.shape
    return out, ref, g, g_ref


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("chunk_size", [1, 3, None, 1000])
@pytest.mark.parametrize("use_labels", [True, False])
def test_float32_matches_float64_reference(temperature, chunk_size, use_labels):
    s, t, labels = make()
    out, ref, g, g_ref = ours_and_ref(s, t, labels if use_labels else None, torch.float32,
                                      temperature=temperature, chunk_size=chunk_size)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(dtype):
    s, t, labels = make(shape=(3, 5, 101), seed=1)
    out, ref, g, g_ref = ours_and_ref(s, t, labels, dtype, temperature=2.0, chunk_size=4)
    assert rel_err(out, ref) < 2e-2
    assert rel_err(g, g_ref) < 2e-2


def test_golden_value_2x3x5():
    # Student logits are all 0, so q = uniform(1/5). Teacher logits [ln 2, 0, 0, 0, 0] give
    # p = [2, 1, 1, 1, 1] / 6, and KL(p || q) = sum p ln(5 p)
    #   = (1/3) ln(5/3) + (2/3) ln(5/6) = 0.17027520792 - 0.12154770454 = 0.04872750338.
    # Positions (0,0), (0,1), (1,0) have that teacher; (0,2), (1,1) have teacher = student
    # (KL 0); (1,2) is masked (label -100), so its wild teacher row must not count.
    # Mean over the 5 unmasked tokens: 3 * 0.04872750338 / 5 = 0.02923650203 (T = 1).
    # At T = 2: p = softmax([ln 2 / 2, 0, ...]) = [sqrt 2, 1, 1, 1, 1] / (4 + sqrt 2), and
    # KL = ln 5 - ln(4 + sqrt 2) + sqrt 2 ln sqrt 2 / (4 + sqrt 2)
    #    = 1.60943791 - 1.68902764 + 0.09052636 = 0.01093664, and T^2 * 3/5 * KL = 0.02624794.
    s = torch.zeros(2, 3, 5)
    t = torch.zeros(2, 3, 5)
    for b, i in [(0, 0), (0, 1), (1, 0)]:
        t[b, i, 0] = math.log(2.0)
    t[1, 2] = torch.tensor([9.0, 9.0, 9.0, 0.0, 0.0])
    labels = torch.tensor([[1, 2, 3], [4, 0, -100]])
    assert chunked_kl_div(s, t, labels).item() == pytest.approx(0.02923650203, rel=1e-6)
    r2 = math.sqrt(2.0)
    golden_t2 = 4 * 3 / 5 * (math.log(5) - math.log(4 + r2) + r2 * math.log(r2) / (4 + r2))
    assert golden_t2 == pytest.approx(0.02624794, rel=1e-6)
    assert chunked_kl_div(s, t, labels, temperature=2.0, chunk_size=4).item() == pytest.approx(golden_t2, rel=1e-5)


def test_identical_teacher_and_student_give_zero():
    s, _, labels = make()
    x = s.float().requires_grad_(True)
    out = chunked_kl_div(x, s.float(), labels, temperature=1.7, chunk_size=5)
    out.backward()
    assert abs(out.item()) < 1e-6
    assert x.grad.abs().max().item() < 1e-7


def test_temperature_scales_as_t_squared_kl():
    s, t, labels = make()
    s, t = s.float(), t.float()
    for temp in (0.5, 2.0, 4.0):
        at_t = chunked_kl_div(s, t, labels, temperature=temp)
        pre_scaled = chunked_kl_div(s / temp, t / temp, labels, temperature=1.0)
        assert at_t.item() == pytest.approx(temp**2 * pre_scaled.item(), rel=1e-5)
    assert chunked_kl_div(s, t, labels, temperature=2.0).item() != pytest.approx(
        chunked_kl_div(s, t, labels).item(), rel=1e-3)


def test_all_masked_gives_zero_not_nan():
    s, t, labels = make()
    x = s.float().requires_grad_(True)
    out = chunked_kl_div(x, t.float(), torch.full_like(labels, -100), chunk_size=4)
    out.backward()
    assert out.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_huge_logits_stay_finite():
    s, t, labels = make(scale=1.0)
    s = torch.where(s > 0, 1e4, -1e4).float().requires_grad_(True)
    t = torch.where(t > 0, 1e4, -1e4).float()
    out = chunked_kl_div(s, t, labels, temperature=2.0, chunk_size=3)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    ref = naive_kl_div(s.detach().double(), t.double(), labels, temperature=2.0)
    assert rel_err(out, ref) < 1e-4


def test_chunk_size_does_not_change_the_result():
    s, t, labels = make(shape=(53, 29), seed=3)
    s, t = s.float(), t.float()
    results = []
    for chunk in (1, 4, 7, 10, 52, 53, 100, None):  # 4, 7, 10 do not divide 53
        x = s.clone().requires_grad_(True)
        out = chunked_kl_div(x, t, labels.view(-1), chunk_size=chunk)
        out.backward()
        results.append((out.detach(), x.grad))
    for out, g in results[1:]:
        assert rel_err(out, results[0][0]) < 1e-6
        assert rel_err(g, results[0][1]) < 1e-6


def test_no_gradient_to_teacher_and_output_grad_scales():
    s, t, labels = make()
    x = s.float().requires_grad_(True)
    teacher = t.float().requires_grad_(True)
    (3.0 * chunked_kl_div(x, teacher, labels)).backward()
    assert teacher.grad is None
    y = s.float().requires_grad_(True)
    chunked_kl_div(y, t.float(), labels).backward()
    assert rel_err(x.grad, 3.0 * y.grad) < 1e-6


def test_bad_arguments_raise_one_line_errors():
    s, t, _ = make()
    with pytest.raises(ValueError, match="temperature"):
        chunked_kl_div(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="rows"):
        chunked_kl_div(s, t[:1])
    with pytest.raises(ValueError, match="labels"):
        chunked_kl_div(s, t, torch.zeros(3, dtype=torch.long))


def test_labels_of_any_integer_dtype_mask_alike_and_floats_are_refused():
    s, t, labels = make()
    want = chunked_kl_div(s.float(), t.float(), labels, chunk_size=4)
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert chunked_kl_div(s.float(), t.float(), labels.to(dtype), chunk_size=4).item() == want.item()
    with pytest.raises(TypeError, match="integer class indices"):
        chunked_kl_div(s.float(), t.float(), labels.float())
