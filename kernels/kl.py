"""chunked_kl_div: T^2 * KL(teacher || student) (or another divergence) from logits, one block of
tokens at a time.

A plain `kl_div(log_softmax(s/T), log_softmax(t/T))` keeps three or four float32 (tokens x
vocab) tensors alive through backward. Here the forward walks over row chunks with two
float32 (chunk x vocab) scratch blocks (three on the eager path, four there for "jsd"; see
kernels/rowsteps.py) and, when the student logits need a gradient, writes
that gradient chunk by chunk during the forward pass: it is the only full-size tensor the loss
allocates, and backward only scales it. It is kept in the logits' dtype; for float16 logits with
one power-of-two scale per row, which backward undoes together with the incoming gradient (the
loss scale; kernels/_core.py, "Float16 gradients"), into a new tensor.
"""
from __future__ import annotations

import torch

from . import rowsteps
from ._core import (check_divergence, check_ignore_index, check_temperature, chunk_grad, chunk_step, default_chunk_size,
                    flatten_rows, index_labels, scale_rows_, scale_saved_grad)


def _valid_mask(labels, n_rows, ignore_index, device):
    if labels is None:
        return torch.ones(n_rows, 1, device=device)
    lab = index_labels(labels)  # any integer dtype; only compared with ignore_index here
    if lab.numel() != n_rows:
        raise ValueError(f"labels has {lab.numel()} positions, expected {n_rows} (one per logits row)")
    return (lab != ignore_index).to(torch.float32).view(-1, 1)


class ChunkedKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature, ignore_index, chunk_size, divergence,
                beta):
        shape = student_logits.shape
        s_all = flatten_rows(student_logits, "student_logits")
        n_rows, vocab = s_all.shape
        t_all = flatten_rows(teacher_logits, "teacher_logits", vocab)
        if t_all.shape[0] != n_rows:
            raise ValueError(
                f"teacher_logits has {t_all.shape[0]} rows, student_logits {n_rows}: shapes must match"
            )
        inv_t = 1.0 / temperature
        maskf = _valid_mask(labels, n_rows, ignore_index, s_all.device)
        n_valid = int(maskf.sum().item())
        c_kl = temperature / max(n_valid, 1)  # d(T^2 D_mean)/ds = T dD/d(s/T) / n
        need_grad = ctx.needs_input_grad[0]
        chunk = int(chunk_size or default_chunk_size(vocab, n_rows))
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = min(chunk, max(n_rows, 1))

        f32 = dict(dtype=torch.float32, device=s_all.device)
        # When the logits are float32 the gradient block itself serves as the student buffer.
        grad = torch.empty_like(s_all) if need_grad else None
        direct = need_grad and s_all.dtype == torch.float32
        row_scale = torch.empty(n_rows, 1, **f32) if need_grad and s_all.dtype == torch.float16 else None
        s_buf = None if direct else torch.empty(chunk, vocab, **f32)
        t_buf = torch.empty(chunk, vocab, **f32)
        fast = rowsteps.pick(s_all.device)
        u_buf = torch.empty(chunk, vocab, **f32) if fast is None else None  # eager path only
        w_buf = torch.empty(chunk, vocab, **f32) if fast is None and divergence == "jsd" else None
        total = torch.zeros((), dtype=torch.float64, device=s_all.device)
        for i in range(0, n_rows, chunk):
            j = min(i + chunk, n_rows)
            r = j - i
            s = grad[i:j] if direct else s_buf[:r]
            t = t_buf[:r]
            s.copy_(s_all[i:j])
            t.copy_(t_all[i:j])
            if fast is not None:
                _, row_kl = fast(s, t, None, maskf[i:j], inv_t, 0.0, c_kl, need_grad, divergence, beta)
                total += (row_kl * maskf[i:j].view(-1)).sum()
            else:
                u = u_buf[:r]
                st = chunk_step(s, t, u, inv_t, divergence=divergence, beta=beta,
                                w=None if w_buf is None else w_buf[:r])
                total += (st["kl"] * maskf[i:j]).sum()
                if need_grad:
                    chunk_grad(s, u, st, maskf[i:j], 0.0, c_kl)
            if need_grad:
                if row_scale is not None:
                    row_scale[i:j] = scale_rows_(s)
                if not direct:
                    grad[i:j].copy_(s)
        loss = (total * (temperature**2 / max(n_valid, 1))).to(torch.float32)
        if need_grad:
            ctx.save_for_backward(grad, row_scale)
        ctx.shape = shape
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad, row_scale = ctx.saved_tensors
        return scale_saved_grad(grad, grad_out, row_scale).view(ctx.shape), None, None, None, None, None, None, None


def chunked_kl_div(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                   ignore_index=-100, chunk_size=None, divergence="forward_kl", beta=0.5):
    """T^2 * mean over unmasked tokens of D(p, q), p = softmax(teacher/T), q = softmax(student/T).

    student_logits, teacher_logits: (N, V) or (B, T, V), any float dtype (they may differ).
    labels: optional (N,) or (B, T), any integer dtype (a float or bool tensor is a TypeError);
    positions equal to ignore_index are left out of the mean.
    Without labels every token counts. An all-masked batch gives 0 with a zero gradient.
    Math is in float32; the gradient flows to student_logits only (for float16 logits it keeps
    one power-of-two scale per row until backward applies the incoming gradient, the fp16 loss
    scale, and rounds it to float16). Returns a float32 scalar.
    chunk_size: rows per block (default: a few MB of float32 logits per block).
    divergence: D is "forward_kl" (KL(p || q), the default), "reverse_kl" (KL(q || p)) or "jsd":
    beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, as TRL's
    GKDTrainer.generalized_jsd_loss defines it (TRL has no T^2 factor); like TRL, "jsd" with
    beta == 0 is the forward KL and with beta == 1 the reverse KL. beta must be in [0, 1].
    """
    temperature = check_temperature(temperature)
    divergence, beta = check_divergence(divergence, beta)
    ignore_index = check_ignore_index(ignore_index)
    if teacher_logits.requires_grad:
        teacher_logits = teacher_logits.detach()  # never a gradient to the teacher
    return ChunkedKLDiv.apply(student_logits, teacher_logits, labels, temperature, ignore_index, chunk_size,
                              divergence, beta)
