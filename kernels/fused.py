"""fused_linear_distill_loss: lm_head matmul + CE + T^2 divergence, one block of tokens at a time.

Neither the student's logits nor (when the teacher comes as hidden states) the teacher's ever
exist for all tokens at once. Because the loss is a sum over tokens, each chunk's gradient
wrt its logits is final as soon as the chunk is done, so the forward pass also does the two
backward matmuls (grad hidden = G W, grad weight += G^T h, as Liger-Kernel does) and keeps only
those gradients for backward: no recomputation, which is what brings the whole loss close to
the time of its bare matmuls.

float16 inputs (kernels/_core.py, "Float16 gradients"): the matmuls take the float32 values of
float16 operands, the lm_heads through a float32 staging buffer of at most a quarter of a
scratch block each (`_Float32Rows`; the whole head at once when it fits), and the gradients of
float16 inputs are kept with one power-of-two scale per row until backward has applied the
incoming gradient (the loss scale).
"""
from __future__ import annotations

import torch

from . import rowsteps
from ._core import (check_divergence, check_ignore_index, check_temperature, chunk_grad, chunk_step,
                    default_fused_chunk_size, flatten_rows, index_labels, scale_rows_, scale_saved_grad)

# a float16 lm_head's float32 staging buffer holds at least this many bytes (tiny chunks)
MIN_STAGE_BYTES = 4 * 2**20


class _Float32Rows:
    """A (V, H) weight read as float32 row slices (v0, v1, rows): a float32 weight as it is, any
    other through one staging buffer of at most max_bytes (at least one row); when the whole
    weight fits, it is converted once and every call to slices() gives that one slice."""

    def __init__(self, weight, max_bytes):
        self.weight = weight
        vocab, width = weight.shape
        if weight.dtype == torch.float32:
            self.rows, self.buf = vocab, weight
            return
        self.rows = max(1, min(vocab, max_bytes // (4 * max(width, 1))))
        self.buf = torch.empty(self.rows, width, dtype=torch.float32, device=weight.device)
        if self.rows == vocab:
            self.buf.copy_(weight)

    def slices(self):
        vocab = self.weight.shape[0]
        if self.rows == vocab:
            yield 0, vocab, self.buf
            return
        for v0 in range(0, vocab, self.rows):
            v1 = min(v0 + self.rows, vocab)
            yield v0, v1, self.buf[: v1 - v0].copy_(self.weight[v0:v1])


def _logits_into(dst, hidden, weight, bias, staged=None):
    """dst (float32 block) = hidden @ weight.T + bias. With `staged` (the weight as _Float32Rows,
    given when an operand is float16) a float32 matmul per vocabulary slice, so the logits are
    never rounded to float16; otherwise the matmul in the inputs' dtype."""
    if staged is not None:
        h32 = hidden.float()
        for v0, v1, w in staged.slices():
            if bias is None:
                torch.mm(h32, w.t(), out=dst[:, v0:v1])
            else:
                torch.addmm(bias[v0:v1].float(), h32, w.t(), out=dst[:, v0:v1])
        return dst
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        if bias is None:
            torch.mm(hidden, weight.t(), out=dst)
        else:
            torch.addmm(bias.float(), hidden, weight.t(), out=dst)
        return dst
    dst.copy_(hidden @ weight.t().to(hidden.dtype))
    if bias is not None:
        dst.add_(bias.float())
    return dst


def _has_fp16(*tensors):
    return any(x is not None and x.dtype == torch.float16 for x in tensors)


class FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_logits, teacher_hidden, teacher_weight,
                teacher_bias, alpha, temperature, ignore_index, chunk_size, divergence, beta):
        shape = hidden.shape
        h_all = flatten_rows(hidden, "student_hidden")
        n_rows, width = h_all.shape
        vocab = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(f"student_weight must be (V, {width}), got shape {tuple(weight.shape)}")
        if bias is not None and bias.shape != (vocab,):
            raise ValueError(f"student_bias must be ({vocab},), got shape {tuple(bias.shape)}")
        lab = index_labels(labels)  # any integer dtype -> int64: what the row steps index with
        if lab.numel() != n_rows:
            raise ValueError(f"labels has {lab.numel()} positions, expected {n_rows} (one per token)")
        if teacher_logits is None and teacher_hidden is None:
            t_all = None  # alpha == 1: labels only; the divergence term is 0 (see below)
            divergence = "forward_kl"  # no teacher, no divergence: the path that skips it
        elif teacher_logits is not None:
            t_all = flatten_rows(teacher_logits, "teacher_logits", vocab)
            if t_all.shape[0] != n_rows:
                raise ValueError(f"teacher_logits has {t_all.shape[0]} rows, expected {n_rows}")
        else:
            t_all = flatten_rows(teacher_hidden, "teacher_hidden")
            if t_all.shape[0] != n_rows:
                raise ValueError(f"teacher_hidden has {t_all.shape[0]} rows, expected {n_rows}")
            if teacher_weight.shape != (vocab, t_all.shape[1]):
                raise ValueError(
                    f"teacher_weight must be ({vocab}, {t_all.shape[1]}), got {tuple(teacher_weight.shape)}"
                )

        valid = lab != ignore_index
        maskf = valid.to(torch.float32).view(-1, 1)
        safe_lab = torch.where(valid, lab, torch.zeros_like(lab)).view(-1, 1)
        if n_rows and bool(((safe_lab < 0) | (safe_lab >= vocab)).any()):
            bad = lab[valid & ((lab < 0) | (lab >= vocab))][0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {bad}")
        n_valid = int(valid.sum().item())
        denom = max(n_valid, 1)
        c_ce = alpha / denom
        c_kl = (1.0 - alpha) * temperature / denom  # d(T^2 D)/ds = T dD/d(s/T)
        inv_t = 1.0 / temperature
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        chunk = int(chunk_size or default_fused_chunk_size(vocab, n_rows))
        if chunk < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = min(chunk, max(n_rows, 1))

        dev = h_all.device
        f32 = dict(dtype=torch.float32, device=dev)
        # A row step (kernels/rowsteps.py) needs two scratch blocks; the eager path a third (a
        # fourth for "jsd").
        fast = rowsteps.pick(dev)
        s_buf = torch.empty(chunk, vocab, **f32)
        t_buf = torch.empty(chunk, vocab, **f32) if t_all is not None or fast is None else None
        u_buf = torch.empty(chunk, vocab, **f32) if fast is None else None
        w_buf = torch.empty(chunk, vocab, **f32) if fast is None and divergence == "jsd" else None
        # A float16 operand: float32 matmuls, each float16 lm_head staged in float32 slices of
        # at most a quarter of a scratch block (see the module docstring).
        stage_bytes = max(chunk * vocab, MIN_STAGE_BYTES)
        staged = _Float32Rows(weight, stage_bytes) if _has_fp16(h_all, weight) else None
        t_staged = (_Float32Rows(teacher_weight, stage_bytes)
                    if teacher_logits is None and t_all is not None and _has_fp16(t_all, teacher_weight) else None)
        grad_h = None
        if need_h:  # float32 when the matmuls are
            grad_h = torch.empty(h_all.shape, **f32) if staged is not None else torch.empty_like(h_all)
        # grad weight/bias are summed over every chunk: one float32 buffer, addmm_ in place.
        grad_w = torch.zeros(weight.shape, **f32) if need_w else None
        grad_b = torch.zeros(vocab, **f32) if need_b else None
        w_f32 = weight.dtype == torch.float32
        ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
        kl_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(0, n_rows, chunk):
            j = min(i + chunk, n_rows)
            r = j - i
            s = s_buf[:r]
            t = None if t_buf is None else t_buf[:r]
            h = h_all[i:j]
            _logits_into(s, h, weight, bias, staged)
            if t_all is None:
                # No teacher (alpha == 1): the eager path uses teacher := student, which makes
                # the forward KL exactly 0 and keeps one code path (its gradient weight c_kl is
                # 0); the row steps simply skip the teacher.
                if fast is None:
                    t.copy_(s)
            elif teacher_logits is not None:
                t.copy_(t_all[i:j])
            else:
                _logits_into(t, t_all[i:j], teacher_weight, teacher_bias, t_staged)
            m, lab_c = maskf[i:j], safe_lab[i:j]
            if fast is not None:
                row_ce, row_kl = fast(s, t, lab_c, m, inv_t, c_ce, c_kl, need_any, divergence, beta)
                ce_sum += (row_ce * m.view(-1)).sum()
                kl_sum += (row_kl * m.view(-1)).sum()
                g = s
            else:
                st = chunk_step(s, t, u_buf[:r], inv_t, labels=lab_c, divergence=divergence, beta=beta,
                                w=None if w_buf is None else w_buf[:r])
                ce_sum += (st["ce"] * m).sum()
                kl_sum += (st["kl"] * m).sum()
                if need_any:
                    g = chunk_grad(s, u_buf[:r], st, m, c_ce, c_kl, labels=lab_c)
            if not need_any:
                continue
            if need_b:
                grad_b.add_(g.sum(0))
            if need_h:
                if staged is not None:  # float32 G, never rounded to float16
                    for v0, v1, w in staged.slices():
                        if v0 == 0:
                            torch.mm(g[:, v0:v1], w, out=grad_h[i:j])
                        else:
                            grad_h[i:j].addmm_(g[:, v0:v1], w)
                elif w_f32 and h.dtype == torch.float32:
                    torch.mm(g, weight, out=grad_h[i:j])
                else:
                    grad_h[i:j].copy_(g.to(weight.dtype) @ weight)
            if need_w:
                grad_w.addmm_(g.t(), h if h.dtype == torch.float32 else h.float())
        ce = (ce_sum / denom).to(torch.float32)
        kl = (kl_sum / denom).to(torch.float32)
        loss = (alpha * ce_sum + (1.0 - alpha) * temperature**2 * kl_sum) / denom
        loss = loss.to(torch.float32)
        del s_buf, t_buf, u_buf, w_buf, staged, t_staged
        # Rounded to the inputs' dtypes now (dropping the float32 buffers before backward); for
        # float16 inputs after a power-of-two scale per row, which backward undoes together with
        # the incoming gradient (the loss scale).
        saved = []
        for grad, x in ((grad_h, hidden), (grad_w, weight), (grad_b, bias)):
            row_scale = None
            if grad is not None and x.dtype == torch.float16:
                row_scale = scale_rows_(grad.view(-1, grad.shape[-1]))  # (N, 1), (V, 1), (1, 1)
            saved += [None if grad is None else grad.to(x.dtype), row_scale]
        ctx.save_for_backward(*saved)
        ctx.shape = shape
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, s_h, grad_w, s_w, grad_b, s_b = ctx.saved_tensors
        grad_h, grad_w, grad_b = (scale_saved_grad(g, grad_loss, s)
                                  for g, s in ((grad_h, s_h), (grad_w, s_w), (grad_b, s_b)))
        if grad_h is not None:
            grad_h = grad_h.view(ctx.shape)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None


def fused_linear_distill_loss(student_hidden, student_weight, labels, *, teacher_logits=None,
                              teacher_hidden=None, teacher_weight=None, student_bias=None,
                              teacher_bias=None, alpha=0.5, temperature=1.0, ignore_index=-100,
                              chunk_size=None, divergence="forward_kl", beta=0.5):
    """alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher, student), never materialising logits.

    student_hidden: (N, H) or (B, T, H); student_weight: (V, H) (the lm_head); student_bias:
    optional (V,) (BART's final_logits_bias). labels: (N,) or (B, T), any integer dtype (a
    float or bool tensor is a TypeError); positions equal to ignore_index are masked, any other
    label outside [0, V) is a ValueError.
    The teacher is either teacher_logits (N, V) / (B, T, V) or teacher_hidden (N, H_t) with
    teacher_weight (V, H_t) and optional teacher_bias (V,); it never receives a gradient. With
    alpha == 1 the teacher may be omitted (labels only; kl is then 0).
    divergence: D is "forward_kl" (KL(teacher || student), the default), "reverse_kl"
    (KL(student || teacher)) or "jsd": beta KL(teacher || m) + (1 - beta) KL(student || m) with
    m = beta teacher + (1 - beta) student, as TRL's GKDTrainer.generalized_jsd_loss defines it;
    like TRL, "jsd" with beta == 0 is the forward KL and with beta == 1 the reverse KL. beta must
    be in [0, 1] (it is only used by "jsd").
    CE uses the T = 1 student logits; D uses softmax(./T) of both. Both are means over
    unmasked tokens (an all-masked batch gives 0 and zero gradients). Math in float32; for
    float16 inputs the matmuls too, and their gradients keep one power-of-two scale per row until
    backward applies the incoming gradient (the fp16 loss scale) and rounds them to float16.
    Returns (loss, ce, kl): loss carries the gradient; ce and kl are detached float32 scalars,
    kl the divergence D without the T^2 factor.
    """
    temperature = check_temperature(temperature)
    divergence, beta = check_divergence(divergence, beta)
    ignore_index = check_ignore_index(ignore_index)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is not None and teacher_hidden is not None:
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight, not both")
    if teacher_logits is None and teacher_hidden is None and alpha != 1.0:
        raise ValueError(f"alpha={alpha} < 1 needs a teacher: pass teacher_logits or teacher_hidden + teacher_weight")
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head, (V, H_t))")
    # The teacher is a constant here; detaching keeps autograd from tracking it at all.
    teacher = [None if x is None else x.detach() for x in (teacher_logits, teacher_hidden,
                                                           teacher_weight, teacher_bias)]
    return FusedLinearDistill.apply(student_hidden, student_weight, student_bias, labels, *teacher,
                                    alpha, temperature, ignore_index, chunk_size, divergence, beta)
