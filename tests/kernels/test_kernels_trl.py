"""The divergences against TRL's own: GKDTrainer.generalized_jsd_loss, on the same logits.

TRL's beta == 0 is the forward KL(teacher || student), beta == 1 the reverse KL(student ||
teacher) and 0 < beta < 1 the generalised JSD; reduction "batchmean" with labels is the mean
over the unmasked (label != -100) tokens, as ours. TRL divides the logits by T but has no T^2
factor, so the two agree at T = 1 and ours is T^2 times TRL's otherwise.
"""
import warnings

import pytest
import torch

pytest.importorskip("trl", reason="trl is a test-only dependency (CI installs it: .ci/run)")

from kernels import chunked_kl_div, fused_linear_distill_loss, naive_kl_div  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that trl.experimental is experimental
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 0.20
    except ImportError:
        from trl import GKDTrainer

trl_loss = GKDTrainer.generalized_jsd_loss  # a staticmethod

# (our divergence, our beta, TRL's beta)
CASES = [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.1, 0.1), ("jsd", 0.5, 0.5),
         ("jsd", 0.9, 0.9), ("jsd", 0.0, 0.0), ("jsd", 1.0, 1.0)]
IDS = [f"{d}-{b}" for d, b, _ in CASES]


def rel_err(got, ref):
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def make(seed=0, shape=(3, 6, 97)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, 4:] = -100  # padding at the end of a sequence
    labels[2, ::3] = -100
    return s, t, labels


def value_and_grad(fn, s, *args, **kw):
    x = s.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(out, x)
    return out, g


@pytest.mark.parametrize("divergence, beta, trl_beta", CASES, ids=IDS)
def test_chunked_kl_matches_trl_at_temperature_1(divergence, beta, trl_beta):
    s, t, labels = make()
    ref, g_ref = value_and_grad(trl_loss, s, t, labels, beta=trl_beta, temperature=1.0)
    out, g = value_and_grad(chunked_kl_div, s.float(), t.float(), labels, divergence=divergence, beta=beta,
                            chunk_size=4)
    assert rel_err(out, ref) < 1e-5 and rel_err(g, g_ref) < 1e-5
    # the float64 reference agrees with TRL to float64 rounding
    ref64 = naive_kl_div(s, t, labels, divergence=divergence, beta=beta)
    assert ref64.item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("divergence, beta, trl_beta", CASES, ids=IDS)
def test_fused_loss_matches_trl_at_temperature_1(divergence, beta, trl_beta):
    s, t, labels = make(seed=1)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    w = torch.randn(97, 16, generator=g, dtype=torch.float64)
    h64, w64 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = trl_loss(h64 @ w64.t(), t, labels, beta=trl_beta, temperature=1.0)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    loss, _, kl = fused_linear_distill_loss(h32, w32, labels, teacher_logits=t.float(), alpha=0.0,
                                            divergence=divergence, beta=beta, chunk_size=5)
    grads = torch.autograd.grad(loss, (h32, w32))
    assert rel_err(loss, ref) < 1e-5 and rel_err(kl, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("divergence, beta, trl_beta", CASES[:5], ids=IDS[:5])
def test_at_other_temperatures_ours_is_t_squared_times_trl(divergence, beta, trl_beta):
    s, t, labels = make(seed=3)
    ref = trl_loss(s, t, labels, beta=trl_beta, temperature=2.0)
    out = chunked_kl_div(s.float(), t.float(), labels, temperature=2.0, divergence=divergence, beta=beta)
    assert out.item() == pytest.approx(4.0 * ref.item(), rel=1e-5)
