"""The student: its config from the teacher's, which teacher layers it copies, and building it.

The student is built from the teacher's config. When its hidden size and vocabulary match the
teacher's, it starts as a copy of the teacher's embeddings, norms, head and a spread-out subset of
its layers (DistilBART's "shrink and fine-tune"); otherwise it starts at random. The copy is by
parameter name: layer i of a student stack reads the teacher's layer pick_layers(...)[i], every
other tensor (embeddings, positions, final norms, lm_head, BART's final_logits_bias) its namesake.
"""
from __future__ import annotations

import re

from distill import zero
from distill.config import is_unset
from distill.errors import UserError

_BART_LIKE = {"bart", "mbart"}

# Head sizes of a resized student must be multiples of 8: PyTorch's fused attention kernels
# (flash / memory-efficient SDPA) want that alignment, and anything narrower is not worth a head.
HEAD_DIM_MULTIPLE = 8


def pick_layers(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layers a student of `n_student` layers copies, spread evenly.

    Student layer i takes teacher layer round_half_up(i * (n_teacher-1) / (n_student-1)): first and
    last are always kept, a one-layer student takes layer 0. This reproduces most of the
    hand-made LAYERS_TO_COPY table of transformers' seq2seq-distillation (12->1,3,6; 16->1,2,3,4,6;
    6->1,2; n->n). It differs by one position where that table was tuned by hand (12->4 gives
    [0,4,7,11], 16->8 [0,2,4,6,9,11,13,15]) and for 12->2, where the table's [0,6] drops the last
    layer; we give [0,11].
    """
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"a student of {n_student} layers cannot copy from a teacher of {n_teacher}; "
                        f"expected 1 to {n_teacher} layers")
    if n_student == 1:
        return [0]
    span, steps = n_teacher - 1, n_student - 1
    # Integer round-half-up so 12->3 picks 6 (as DistilBART) with no float ties.
    return [(2 * i * span + steps) // (2 * steps) for i in range(n_student)]


def _family(config) -> str:
    return "bart" if config.model_type in _BART_LIKE else "t5"


def _layer_names(config) -> tuple[str, str]:
    return ("encoder_layers", "decoder_layers") if _family(config) == "bart" else (
        "num_layers", "num_decoder_layers")


def layer_counts(config) -> tuple[int, int]:
    """(encoder layers, decoder layers) of a BART/mBART/T5/mT5 config."""
    enc, dec = _layer_names(config)
    return getattr(config, enc), getattr(config, dec)


def _pick_heads(hidden: int, teacher_heads: int, teacher_head_dim: int) -> int | None:
    """Keep the teacher's head size when it divides `hidden`; else the most heads (up to the
    teacher's count) whose size is a multiple of HEAD_DIM_MULTIPLE; None when there is none."""
    if hidden % teacher_head_dim == 0:
        return hidden // teacher_head_dim
    for heads in range(min(teacher_heads, hidden // HEAD_DIM_MULTIPLE), 0, -1):
        if hidden % heads == 0 and (hidden // heads) % HEAD_DIM_MULTIPLE == 0:
            return heads
    return None


def student_config(teacher_config, *, num_encoder_layers=None, num_decoder_layers=None,
                   hidden_dim=None, vocab_size=None):
    """The teacher's config with fewer layers and optionally another hidden size or vocabulary.

    Defaults: the teacher's encoder depth, half its decoder layers (at least 1), its hidden size
    and vocabulary. The encoder runs once per input and the decoder once per generated token, so
    decoder depth is what generation latency pays for (DistilBART's 12-6 shape).
    A different hidden size scales the FFN width in proportion and picks the head count with
    `_pick_heads` (so a size works iff the teacher's head size or 8 divides it); T5's d_kv follows.
    """
    import copy

    t_enc, t_dec = layer_counts(teacher_config)
    layers = {}
    for stack, given, teacher_n in (("encoder", num_encoder_layers, t_enc),
                                    ("decoder", num_decoder_layers, t_dec)):
        default = teacher_n if stack == "encoder" else max(1, teacher_n // 2)
        n = default if is_unset(given) else int(given)
        if not 1 <= n <= teacher_n:
            raise UserError(f"student {stack} layers: got {n}, the teacher has {teacher_n}; expected "
                            f"1 to {teacher_n}; pass --num-{stack}-layers in that range")
        layers[stack] = n
    cfg = copy.deepcopy(teacher_config)
    enc_name, dec_name = _layer_names(cfg)
    setattr(cfg, enc_name, layers["encoder"])
    setattr(cfg, dec_name, layers["decoder"])
    if not is_unset(vocab_size):
        if int(vocab_size) < 1:
            raise UserError(f"--vocab-size {vocab_size}: expected a positive vocabulary size")
        cfg.vocab_size = int(vocab_size)
    t_hidden = teacher_config.d_model
    hidden = t_hidden if is_unset(hidden_dim) else int(hidden_dim)
    if hidden != t_hidden:
        if hidden < 1:
            raise UserError(f"--hidden-dim {hidden}: expected a positive hidden size")
        scale = hidden / t_hidden
        cfg.d_model = hidden
        if _family(cfg) == "bart":
            for side in ("encoder", "decoder"):
                t_heads = getattr(teacher_config, f"{side}_attention_heads")
                setattr(cfg, f"{side}_attention_heads", _heads_or_fail(hidden, t_heads, t_hidden // t_heads))
                ffn = f"{side}_ffn_dim"
                setattr(cfg, ffn, max(1, round(getattr(teacher_config, ffn) * scale)))
        else:
            heads = _heads_or_fail(hidden, teacher_config.num_heads, teacher_config.d_kv)
            cfg.num_heads, cfg.d_kv = heads, hidden // heads
            cfg.d_ff = max(1, round(teacher_config.d_ff * scale))
    return cfg


def _heads_or_fail(hidden: int, teacher_heads: int, teacher_head_dim: int) -> int:
    heads = _pick_heads(hidden, teacher_heads, teacher_head_dim)
    if heads is None:
        low = hidden // HEAD_DIM_MULTIPLE * HEAD_DIM_MULTIPLE
        near = f"{low} or {low + HEAD_DIM_MULTIPLE}" if low else str(HEAD_DIM_MULTIPLE)
        raise UserError(f"student hidden size {hidden} cannot be split into attention heads: expected "
                        f"a multiple of the teacher's head size {teacher_head_dim} or of "
                        f"{HEAD_DIM_MULTIPLE} (head sizes must be multiples of {HEAD_DIM_MULTIPLE}); "
                        f"pass e.g. --hidden-dim {near}")
    return heads


def config_summary(cfg) -> dict:
    """The shape of a model config in family-neutral names (build_student's info["config"])."""
    enc, dec = layer_counts(cfg)
    bart = _family(cfg) == "bart"
    return {"model_type": cfg.model_type, "hidden_dim": cfg.d_model, "encoder_layers": enc,
            "decoder_layers": dec, "vocab_size": cfg.vocab_size,
            "attention_heads": cfg.encoder_attention_heads if bart else cfg.num_heads,
            "ffn_dim": cfg.encoder_ffn_dim if bart else cfg.d_ff}


# A parameter of layer N of a stack: BART "model.encoder.layers.3.fc1.weight",
# T5 "encoder.block.2.layer.1.DenseReluDense.wi.weight".
_LAYER_KEY = re.compile(r"^(|.*\.)(encoder|decoder)\.(layers|block)\.(\d+)\.(.+)$")


def _teacher_name(name: str, picks: dict[str, list[int]]) -> str:
    m = _LAYER_KEY.match(name)
    if not m:
        return name  # embeddings, positions, final norms, lm_head, final_logits_bias
    prefix, stack, kind, index, rest = m.groups()
    return f"{prefix}{stack}.{kind}.{picks[stack][int(index)]}.{rest}"


def _copy_from_teacher(student, get_teacher_tensor, picks: dict[str, list[int]]) -> None:
    import torch

    # named_parameters() lists tied weights once (lm_head shares the embedding), and the teacher
    # ties the same way, so each teacher tensor is asked for once and only the picked layers are.
    # T5 keeps its relative attention bias in block 0, which always maps to teacher block 0.
    persistent = set(student.state_dict().keys())
    targets = list(student.named_parameters())
    targets += [(n, b) for n, b in student.named_buffers() if n in persistent]
    with torch.no_grad():
        for name, target in targets:
            source_name = _teacher_name(name, picks)
            tensor = get_teacher_tensor(source_name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise RuntimeError(f"teacher tensor {source_name} has shape {tuple(tensor.shape)}, "
                                   f"student {name} expects {tuple(target.shape)}")
            target.copy_(tensor)


def build_student(teacher_config, get_teacher_tensor, *, num_encoder_layers=None,
                  num_decoder_layers=None, hidden_dim=None, vocab_size=None, init="teacher",
                  log=print):
    """A student (train mode, float32) and an info dict; the module docstring gives the rule.

    `get_teacher_tensor(name)` returns the full teacher tensor for a parameter or persistent
    buffer name of the teacher; it is called once per name, for the picked layers only, and
    never with `init="random"` (then it may be None: the teacher's weights are not needed).
    Must run outside distill.zero.zero3_loading: the student is an ordinary (ZeRO-2) model.
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM

    if zero.zero3_loading_active():
        raise RuntimeError("build_student ran inside a ZeRO-3 loading scope (zero.zero3_loading); "
                           "the student would be partitioned; build it after that scope is gone")
    cfg = student_config(teacher_config, num_encoder_layers=num_encoder_layers,
                         num_decoder_layers=num_decoder_layers, hidden_dim=hidden_dim,
                         vocab_size=vocab_size)
    # float32 whatever the teacher's dtype: DeepSpeed keeps master weights and casts for bf16/fp16.
    student = AutoModelForSeq2SeqLM.from_config(cfg, dtype=torch.float32)
    reasons = ["--student-init random was asked"] if init == "random" else []
    if cfg.d_model != teacher_config.d_model:
        reasons.append(f"hidden size {cfg.d_model} differs from the teacher's {teacher_config.d_model}")
    if cfg.vocab_size != teacher_config.vocab_size:
        reasons.append(f"vocabulary size {cfg.vocab_size} differs from the teacher's "
                       f"{teacher_config.vocab_size}")
    if len(reasons) > (init == "random"):
        reasons[-1] += ", so teacher weights do not fit"
    enc_copied = dec_copied = None
    if reasons:
        log(f"student initialised at random: {' and '.join(reasons)}")
    else:
        (t_enc, t_dec), (s_enc, s_dec) = layer_counts(teacher_config), layer_counts(cfg)
        enc_copied, dec_copied = pick_layers(t_enc, s_enc), pick_layers(t_dec, s_dec)
        _copy_from_teacher(student, get_teacher_tensor, {"encoder": enc_copied, "decoder": dec_copied})
        log(f"encoder: copied teacher layers {enc_copied}")
        log(f"decoder: copied teacher layers {dec_copied}")
    # The teacher's size without loading it: a skeleton on the meta device holds no memory.
    with torch.device("meta"):
        teacher_params = AutoModelForSeq2SeqLM.from_config(teacher_config).num_parameters()
    student.train()
    info = {"init": "random" if reasons else "teacher", "encoder_layers_copied": enc_copied,
            "decoder_layers_copied": dec_copied, "teacher_params": teacher_params,
            "student_params": student.num_parameters(), "config": config_summary(cfg)}
    for role, config in (("teacher", teacher_config), ("student", cfg)):
        enc, dec = layer_counts(config)
        info.update({f"{role}_encoder_layers": enc, f"{role}_decoder_layers": dec,
                     f"{role}_hidden": config.d_model})
    return student, info


def check_vocab(tokenizer, teacher_config, student_cfg, alpha: float) -> None:
    """Refuse vocabularies that cannot work: KL needs the same token ids on both sides."""
    if student_cfg.vocab_size != teacher_config.vocab_size and alpha < 1:
        raise UserError(f"student vocabulary size {student_cfg.vocab_size} differs from the teacher's "
                        f"{teacher_config.vocab_size}, but alpha={alpha} < 1 distills logits token by "
                        f"token, which needs a shared vocabulary; drop --vocab-size to keep the "
                        f"teacher's or pass --alpha 1.0 (labels only)")
    if len(tokenizer) > student_cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary holds "
                        f"{student_cfg.vocab_size}, so some ids have no embedding; pass --vocab-size "
                        f"{len(tokenizer)} or more, or a tokenizer that fits")
