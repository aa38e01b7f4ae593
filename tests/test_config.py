"""DistillConfig: the seed flags, literal None, --config files, and one-line errors."""
import json

import pytest

from distill.config import DistillConfig, parse_args
from distill.errors import UserError

SEED = ("--model-type bart --teacher facebook/bart-base --num-encoder-layers 3 --num-decoder-layers 3 "
        "--hidden-dim 512 --vocab-size 50265 --dataset cnn_dailymail --dataset-input-column article "
        "--dataset-target-column highlights --dataset-local-path None --output-dir ./distilled_model").split()


def test_seed_command_parses_with_literal_none():
    cfg = parse_args(SEED)
    assert cfg.model_type == "bart" and cfg.teacher == "facebook/bart-base"
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.hidden_dim, cfg.vocab_size) == (3, 3, 512, 50265)
    assert cfg.dataset_local_path is None and cfg.teacher_local_path is None
    assert (cfg.input_column, cfg.target_column) == ("article", "highlights")


def test_none_for_optional_ints_and_bool_flags():
    cfg = parse_args(["--teacher", "t", "--dataset", "d", "--hidden-dim", "None", "--bf16", "--resume", "false"])
    assert cfg.hidden_dim is None and cfg.bf16 is True and cfg.resume is False


def test_deepspeed_launcher_local_rank_is_accepted():
    assert parse_args(SEED + ["--local_rank=1"]).local_rank == 1
    assert parse_args(SEED + ["--local-rank", "0"]).local_rank == 0


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_and_flags_override_it(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"teacher": "x/y", "dataset": "samsum", "alpha": 0.3, "dataset-input-column": "dialogue",
              "max_steps": 7}
    path.write_text(json.dumps(values) if suffix == ".json" else "\n".join(f"{k}: {v}" for k, v in values.items()))
    cfg = parse_args(["--config", str(path), "--alpha", "0.9"])
    assert cfg.teacher == "x/y" and cfg.max_steps == 7 and cfg.input_column == "dialogue"
    assert cfg.alpha == 0.9  # the command line wins


@pytest.mark.parametrize("argv, needle", [
    (["--alpha", "1.5"], "--alpha 1.5 is outside [0, 1]"),
    (["--alpha", "-0.1"], "outside [0, 1]"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 are both on"),
    (["--num-encoder-layers", "0"], "--num-encoder-layers 0 must be >= 1"),
    (["--model-type", "gpt2"], "invalid choice"),
    (["--max-steps", "nope"], "invalid int value"),
    (["--validation-ratio", "1"], "--validation-ratio 1.0 must be in (0, 1)"),
    (["--teacher-zero-stage", "2"], "invalid choice"),
])
def test_bad_values_are_one_line_user_errors(argv, needle):
    with pytest.raises(UserError) as err:
        parse_args(["--teacher", "t", "--dataset", "d"] + argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_teacher_and_dataset():
    with pytest.raises(UserError, match="no teacher given"):
        parse_args(["--dataset", "d"])
    with pytest.raises(UserError, match="no dataset given"):
        parse_args(["--teacher", "t"])


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="could not be parsed"):
        parse_args(["--config", str(bad)])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"teacher": "t", "dataset": "d", "learning_rat": 1}))
    with pytest.raises(UserError, match="unknown option 'learning_rat'"):
        parse_args(["--config", str(unknown)])


def test_every_field_has_help_and_a_flag():
    import dataclasses

    from distill.config import build_parser
    helptext = build_parser().format_help()
    for f in dataclasses.fields(DistillConfig):
        assert f.metadata["help"]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in helptext
    assert "T^2" in helptext  # --temperature says why the KL is scaled
