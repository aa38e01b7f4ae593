"""The objective: properties, and the hidden-state path equals the model's own logits."""
import pytest
import torch
import torch.nn.functional as F

from distill.models import decoder_hidden, lm_head_of
from distill.objective import Objective
from kernels import naive_logits_loss


def _logits(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_alpha_one_is_plain_cross_entropy():
    s, labels = _logits(0), torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    loss, ce, kl = naive_logits_loss(s, None, labels, alpha=1.0, temperature=2.0)
    expected = F.cross_entropy(s.view(-1, 11), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert kl.item() == 0.0


def test_identical_teacher_and_student_give_zero_kl():
    s = _logits(1)
    _, _, kl = naive_logits_loss(s, s.clone(), torch.randint(0, 11, (2, 5)), alpha=0.5, temperature=3.0)
    assert abs(kl.item()) < 1e-6


def test_all_masked_batch_gives_zero_not_nan():
    s = _logits(2).requires_grad_(True)
    labels = torch.full((2, 5), -100)
    loss, ce, kl = naive_logits_loss(s, _logits(3), labels, alpha=0.5, temperature=2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


def test_kl_is_forward_kl_and_loss_scales_it_by_t_squared():
    s, t, labels = _logits(4), _logits(5), torch.randint(0, 11, (2, 5))
    T = 2.5
    loss, _, kl = naive_logits_loss(s, t, labels, alpha=0.0, temperature=T)
    p = F.softmax(t / T, -1)
    manual = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(kl, manual)
    torch.testing.assert_close(loss, manual * T * T)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
@pytest.mark.parametrize("impl", ["fused", "chunked", "naive"])
def test_hidden_state_path_equals_loss_from_model_logits(workspace, model_type, impl):
    """Loss from decoder hidden states + lm_head (bias for BART, d_model**-0.5 scaling for T5)
    equals the loss computed from the model's own logits."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    student = AutoModelForSeq2SeqLM.from_pretrained(workspace[model_type]).eval()
    teacher = AutoModelForSeq2SeqLM.from_pretrained(workspace[model_type]).eval()
    with torch.no_grad():  # make the two differ and give BART's final_logits_bias a value
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if hasattr(student, "final_logits_bias"):
            student.final_logits_bias.normal_()
    input_ids = torch.randint(5, student.config.vocab_size, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    labels = torch.randint(5, student.config.vocab_size, (2, 4))
    labels[1, 2:] = -100
    with torch.no_grad():
        want_s = student(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        want_t = teacher(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    expected = naive_logits_loss(want_s, want_t, labels, alpha=0.3, temperature=2.0)
    with torch.no_grad():
        t_hidden = decoder_hidden(teacher, input_ids, mask, labels)
        s_hidden = decoder_hidden(student, input_ids, mask, labels)
    got = Objective(0.3, 2.0, impl)(s_hidden, lm_head_of(student), labels, t_hidden, lm_head_of(teacher))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_every_impl_follows_the_chosen_divergence(impl, divergence, beta):
    """The objective passes --divergence/--jsd-beta to its implementation: fused and chunked equal
    the naive reference of the same divergence (values and student gradients), and differ from
    the forward KL when another divergence is asked for."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    w, tw = torch.randn(11, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100

    def run(impl_, div):
        h = hidden.clone().requires_grad_(True)
        loss, ce, kl = Objective(0.5, 2.0, impl_, divergence=div, beta=beta)(h, (w, None), labels, teacher_hidden, (tw, None))
        loss.backward()
        return loss.detach(), kl, h.grad

    ref, got, forward = run("naive", divergence), run(impl, divergence), run("naive", "forward_kl")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)
    if divergence != "forward_kl":
        assert abs(ref[1].item() - forward[1].item()) > 1e-4
