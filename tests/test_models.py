"""Teacher/tokenizer loading, layer picking, student construction and their one-line errors."""
import re

import pytest
import torch
from hypothesis import given, strategies as st

from distill import hub, models
from distill.config import is_unset
from distill.errors import UserError
from distill.models import (build_student, check_vocab, load_teacher, load_teacher_config,
                            load_tokenizer, module_tensor_getter, pick_layers, resolve_source,
                            student_config)
from distill.toy import save_tiny_teacher

TEXTS = [f"the cat number {i} sat on the mat {i * 7} and looked at bird {i % 13}" for i in range(200)]
TEACHER_LAYERS = 6
NO_SUCH_HUB_ID = "distill-tests/no-such-teacher-7f3a"


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module", params=["bart", "t5"])
def teacher_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"teacher_{request.param}")
    return save_tiny_teacher(str(path), request.param, TEXTS, layers=TEACHER_LAYERS), request.param


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return save_tiny_teacher(str(tmp_path_factory.mktemp("bart")), "bart", TEXTS, layers=4)


# --- small helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("value,unset", [(None, True), ("", True), ("None", True), ("none", True), (" ", True),
                                         ("facebook/bart-base", False), (0, False)])
def test_is_unset(value, unset):
    assert is_unset(value) is unset


def test_resolve_source_prefers_local_path(tmp_path):
    assert resolve_source("facebook/bart-base", str(tmp_path), "teacher") == str(tmp_path)
    assert resolve_source("facebook/bart-base", "None", "teacher") == "facebook/bart-base"


def test_resolve_source_missing_local_path_names_it(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError) as err:
        resolve_source("facebook/bart-base", missing, "teacher")
    assert missing in _one_line(err) and "--teacher-local-path" in str(err.value)


def test_resolve_source_nothing_given():
    with pytest.raises(UserError) as err:
        resolve_source(None, "", "teacher")
    assert _one_line(err) == "no teacher given: pass --teacher HUB_ID or --teacher-local-path DIR"


# --- pick_layers ---------------------------------------------------------------------------

# Entries of LAYERS_TO_COPY in transformers' seq2seq-distillation make_student.py that the
# general rule reproduces (the others are hand-tuned; see pick_layers' docstring).
REFERENCE = {(12, 1): [0], (12, 3): [0, 6, 11], (12, 6): [0, 2, 4, 7, 9, 11],
             (16, 1): [0], (16, 2): [0, 15], (16, 3): [0, 8, 15], (16, 4): [0, 5, 10, 15],
             (16, 6): [0, 3, 6, 9, 12, 15], (6, 1): [0], (6, 2): [0, 5]}


@pytest.mark.parametrize("n_teacher,n_student", sorted(REFERENCE))
def test_pick_layers_reproduces_distilbart_table(n_teacher, n_student):
    assert pick_layers(n_teacher, n_student) == REFERENCE[(n_teacher, n_student)]


def test_pick_layers_documented_choices():
    assert pick_layers(12, 2) == [0, 11]  # the table's [0, 6] would drop the last layer
    assert pick_layers(12, 4) == [0, 4, 7, 11]
    assert pick_layers(12, 12) == list(range(12))


@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_pick_layers_spread_first_and_last(sizes):
    n_teacher, n_student = sizes
    picks = pick_layers(n_teacher, n_student)
    assert len(picks) == n_student and picks[0] == 0
    assert picks == sorted(set(picks)) and all(0 <= p < n_teacher for p in picks)
    if n_student >= 2:
        assert picks[-1] == n_teacher - 1


@pytest.mark.parametrize("n_student", [0, 7])
def test_pick_layers_out_of_range(n_student):
    with pytest.raises(UserError) as err:
        pick_layers(6, n_student)
    assert f"{n_student} layers" in _one_line(err) and "1 to 6" in str(err.value)


# --- loading -------------------------------------------------------------------------------

def test_load_teacher_is_frozen_eval_and_takes_dtype(teacher_dir):
    path, model_type = teacher_dir
    teacher = load_teacher(path, model_type, dtype=torch.bfloat16)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert len(load_tokenizer(path)) <= teacher.config.vocab_size


def test_load_tokenizer_from_custom_path(bart_dir, tmp_path):
    tokenizer = load_tokenizer("ignored/hub-name", bart_dir)
    assert tokenizer("the cat").input_ids[0] == 0  # BART's <s>
    with pytest.raises(UserError) as err:
        load_tokenizer(bart_dir, str(tmp_path / "missing"))
    assert "--custom-tokenizer-local-path" in _one_line(err) and "missing" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_tokenizer(bart_dir, str(tmp_path / "empty"))
    text = _one_line(err)
    assert f"cannot load the tokenizer from folder {tmp_path / 'empty'}" in text and "tokenizer.json" in text


def test_model_type_mismatch_names_both_and_fix(bart_dir):
    with pytest.raises(UserError) as err:
        load_teacher_config(bart_dir, "t5")
    text = _one_line(err)
    assert "--model-type t5" in text and "'bart'" in text and "pass --model-type bart" in text


def test_unknown_model_type_flag(bart_dir):
    with pytest.raises(UserError) as err:
        load_teacher_config(bart_dir, "gpt2")
    assert "'gpt2'" in _one_line(err) and "bart, mbart, t5, mt5" in str(err.value)


def test_folder_without_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_teacher(str(tmp_path / "empty"), "bart")
    assert str(tmp_path / "empty") in _one_line(err) and "has no config.json" in str(err.value)


def test_broken_config_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        load_teacher_config(str(tmp_path), "bart")
    assert f"cannot load the teacher from folder {tmp_path}" in _one_line(err)


def test_folder_without_weights_is_one_line_error(bart_dir, tmp_path):
    import shutil
    folder = shutil.copytree(bart_dir, tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        load_teacher(str(folder), "bart")
    assert f"cannot load the teacher from folder {folder}" in _one_line(err)


def test_unreachable_hub_offline_names_teacher_and_local_flags(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_teacher_config(NO_SUCH_HUB_ID, "bart")
    assert NO_SUCH_HUB_ID in _one_line(err) and "--teacher-local-path" in str(err.value)
    with pytest.raises(UserError) as err:
        load_tokenizer(NO_SUCH_HUB_ID)
    assert NO_SUCH_HUB_ID in _one_line(err) and "--custom-tokenizer-local-path" in str(err.value)


def test_hub_name_without_offline_mode_fails_as_user_error(monkeypatch):
    # The real path: with no internet the probe fails and the error comes at once; with internet
    # the Hub answers 404 for this name. Either way: a UserError naming it and the local flag.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.unreachable_reason.cache_clear()
    try:
        with pytest.raises(UserError) as err:
            load_teacher_config(NO_SUCH_HUB_ID, "bart")
    finally:
        hub.unreachable_reason.cache_clear()
    assert NO_SUCH_HUB_ID in _one_line(err) and "--teacher-local-path" in str(err.value)


# --- student_config ------------------------------------------------------------------------

def test_student_config_defaults_keep_encoder_halve_decoder(teacher_dir):
    path, model_type = teacher_dir
    cfg = load_teacher_config(path, model_type)
    student = student_config(cfg)
    summary = models.config_summary(student)
    assert (summary["encoder_layers"], summary["decoder_layers"]) == (TEACHER_LAYERS, TEACHER_LAYERS // 2)
    assert (summary["hidden_dim"], summary["vocab_size"]) == (cfg.d_model, cfg.vocab_size)
    assert models.layer_counts(cfg) == (TEACHER_LAYERS, TEACHER_LAYERS)  # teacher untouched


def _big_config(model_type):
    from transformers import BartConfig, T5Config
    if model_type == "bart":  # bart-large's shape: 16 heads of 64
        return BartConfig(d_model=1024, encoder_attention_heads=16, decoder_attention_heads=16,
                          encoder_ffn_dim=4096, decoder_ffn_dim=4096, encoder_layers=12,
                          decoder_layers=12)
    return T5Config(d_model=1024, num_heads=16, d_kv=64, d_ff=4096, num_layers=12)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
@pytest.mark.parametrize("hidden,heads,ffn", [(512, 8, 2048), (200, 5, 800), (1280, 20, 5120)])
def test_student_config_resized_heads_divide(model_type, hidden, heads, ffn):
    cfg = student_config(_big_config(model_type), hidden_dim=hidden)
    summary = models.config_summary(cfg)
    assert (summary["hidden_dim"], summary["attention_heads"], summary["ffn_dim"]) == (hidden, heads, ffn)
    if model_type == "t5":
        assert cfg.d_kv * cfg.num_heads == hidden
    else:
        assert hidden % cfg.decoder_attention_heads == 0 and cfg.decoder_ffn_dim == ffn


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_student_config_no_head_count_fits(model_type):
    with pytest.raises(UserError) as err:
        student_config(_big_config(model_type), hidden_dim=37)  # prime: only 1 head of 37 or 37 of 1
    text = _one_line(err)
    assert "hidden size 37" in text and "multiple of" in text and "--hidden-dim 32 or 40" in text


@pytest.mark.parametrize("kwargs,stack,got", [({"num_encoder_layers": 7}, "encoder", 7),
                                             ({"num_decoder_layers": 0}, "decoder", 0)])
def test_student_config_layer_count_errors(teacher_dir, kwargs, stack, got):
    path, model_type = teacher_dir
    with pytest.raises(UserError) as err:
        student_config(load_teacher_config(path, model_type), **kwargs)
    text = _one_line(err)
    assert f"{stack} layers: got {got}" in text and "the teacher has 6" in text and "1 to 6" in text and f"--num-{stack}-layers" in text


# --- build_student -------------------------------------------------------------------------

def _layer_index(name):
    m = re.search(r"(encoder|decoder)\.(layers|block)\.(\d+)\.", name)
    return (m.group(1), int(m.group(3))) if m else None


def test_build_student_copies_picked_layers(teacher_dir):
    path, model_type = teacher_dir
    teacher = load_teacher(path, model_type)
    asked = []
    tensors = module_tensor_getter(teacher)

    def getter(name):
        asked.append(name)
        return tensors(name)

    lines = []
    student, info = build_student(teacher.config, getter, num_encoder_layers=3, num_decoder_layers=2,
                                  log=lines.append)
    picks = {"encoder": [0, 3, 5], "decoder": [0, 5]}
    assert info["init"] == "teacher" and student.training
    assert (info["encoder_layers_copied"], info["decoder_layers_copied"]) == (picks["encoder"], picks["decoder"])
    assert lines == ["encoder: copied teacher layers [0, 3, 5]", "decoder: copied teacher layers [0, 5]"]
    assert info["student_params"] < info["teacher_params"] == teacher.num_parameters()
    # Only the picked teacher layers were asked for, each tensor once.
    assert len(asked) == len(set(asked))
    assert {_layer_index(n) for n in asked} - {None} == {(s, i) for s, ids in picks.items() for i in ids}

    teacher_sd = teacher.state_dict()
    checked = 0
    for name, tensor in student.state_dict().items():
        where = _layer_index(name)
        if where is None:
            source = name  # embeddings, positions, final norms, lm_head, final_logits_bias
        else:
            stack, i = where
            source = re.sub(rf"({stack}\.(layers|block))\.{i}\.", rf"\g<1>.{picks[stack][i]}.", name)
        assert torch.equal(tensor, teacher_sd[source]), name
        checked += 1
    assert checked == len(student.state_dict())
    if model_type == "t5":  # T5's relative attention bias lives in block 0 of each stack
        key = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert torch.equal(student.state_dict()[key], teacher_sd[key])


def test_student_runs_forward_and_generate(teacher_dir):
    path, model_type = teacher_dir
    teacher = load_teacher(path, model_type)
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["the cat sat on the mat", "a bird"], return_tensors="pt", padding=True)
    labels = tokenizer(["the mat", "bird 3"], return_tensors="pt", padding=True).input_ids
    for kwargs in ({"num_encoder_layers": 2, "num_decoder_layers": 1}, {"hidden_dim": 48}):
        student, _ = build_student(teacher.config, module_tensor_getter(teacher), log=lambda _: None,
                                   **kwargs)
        out = student(**batch, labels=labels)
        assert out.logits.shape[:2] == labels.shape and torch.isfinite(out.loss)
        out.loss.backward()
        student.eval()
        generated = student.generate(**batch, max_new_tokens=4, do_sample=False)
        assert generated.shape[0] == 2 and generated.shape[1] <= 5


def test_build_student_resized_is_random_and_says_why(teacher_dir):
    path, model_type = teacher_dir
    cfg = load_teacher_config(path, model_type)

    def no_teacher(name):
        raise AssertionError(f"asked for {name}")

    lines = []
    student, info = build_student(cfg, no_teacher, hidden_dim=48, log=lines.append)
    assert info["init"] == "random" and info["encoder_layers_copied"] is None
    assert info["config"]["attention_heads"] == 3  # the teacher's head size 16 kept
    assert len(lines) == 1 and "hidden size 48 differs from the teacher's 32" in lines[0]
    if model_type == "t5":
        assert student.config.d_kv == 16
    _, info = build_student(cfg, no_teacher, vocab_size=cfg.vocab_size + 8, log=lines.append)
    assert info["init"] == "random" and "vocabulary size" in lines[-1]


def test_build_student_random_init_asked_needs_no_teacher_weights(teacher_dir):
    path, model_type = teacher_dir
    cfg = load_teacher_config(path, model_type)
    lines = []
    student, info = build_student(cfg, None, num_decoder_layers=1, init="random", log=lines.append)
    assert info["init"] == "random" and info["decoder_layers_copied"] is None
    assert lines == ["student initialised at random: --student-init random was asked"]
    assert models.layer_counts(student.config) == (TEACHER_LAYERS, 1)


def test_build_student_umt5_copies_per_layer_bias():
    from transformers import AutoModelForSeq2SeqLM, UMT5Config
    cfg = UMT5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=4,
                     decoder_start_token_id=0)
    teacher = AutoModelForSeq2SeqLM.from_config(cfg)
    student, info = build_student(cfg, module_tensor_getter(teacher), num_encoder_layers=2,
                                  log=lambda _: None)
    key = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    assert info["encoder_layers_copied"] == [0, 3]
    assert torch.equal(student.state_dict()[key.format(1)], teacher.state_dict()[key.format(3)])


# --- check_vocab ---------------------------------------------------------------------------

def test_check_vocab(bart_dir):
    cfg = load_teacher_config(bart_dir, "bart")
    tokenizer = load_tokenizer(bart_dir)
    check_vocab(tokenizer, cfg, student_config(cfg), alpha=0.5)  # shared vocabulary: fine
    bigger = student_config(cfg, vocab_size=cfg.vocab_size + 8)
    check_vocab(tokenizer, cfg, bigger, alpha=1.0)  # labels only: the vocabularies need not match
    with pytest.raises(UserError) as err:
        check_vocab(tokenizer, cfg, bigger, alpha=0.5)
    text = _one_line(err)
    assert f"{cfg.vocab_size + 8} differs from the teacher's {cfg.vocab_size}" in text
    assert "alpha=0.5" in text and "--alpha 1.0" in text
    small = student_config(cfg, vocab_size=len(tokenizer) - 1)
    with pytest.raises(UserError) as err:
        check_vocab(tokenizer, cfg, small, alpha=1.0)
    assert f"tokenizer has {len(tokenizer)} tokens" in _one_line(err)
    assert f"--vocab-size {len(tokenizer)} or more" in str(err.value)
