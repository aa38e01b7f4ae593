"""End to end through `distill.train.main`, one test per seed command, plus bad input.

Hub names are monkeypatched to the local tiny teachers/datasets (the Hub is not reachable here);
everything else is the real path: config -> tokenizer/teacher/student -> data -> DeepSpeed engines
(one CPU rank) -> loop -> export. The student must reload with from_pretrained and generate.
"""
import json
import os

import pytest

from distill import models
from distill.train import main

FAST = ["--max-steps", "6", "--per-device-batch-size", "8", "--skip-report", "--logging-steps", "2",
        "--max-source-length", "32", "--max-target-length", "16"]


@pytest.fixture
def hub(monkeypatch, workspace):
    """Map the seed commands' hub names to the local stand-ins."""
    import datasets

    names = {"facebook/bart-base": workspace["bart"], "t5-base": workspace["t5"]}
    real_resolve = models.resolve_source
    monkeypatch.setattr(models, "resolve_source",
                        lambda hub_name, local, what: real_resolve(None, local or names[hub_name], what))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    real_load = datasets.load_dataset

    def load_dataset(name, config=None, **kwargs):
        assert name in ("cnn_dailymail", "samsum"), name
        files = {s: os.path.join(workspace["data"], f"{s}.jsonl") for s in ("train", "validation", "test")}
        return real_load("json", data_files=files)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return names


def _vocab(teacher_dir) -> str:
    return str(json.load(open(os.path.join(teacher_dir, "config.json")))["vocab_size"])


def _check_output(out):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    for name in ("model.safetensors", "config.json", "generation_config.json", "distill_config.json",
                 "metrics.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not any(f.endswith(".bin") for f in os.listdir(out))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert metrics["steps"] == 6 and len(losses) == 3 and metrics["samples_seen"] == 48
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    enc = tok(["the cat sat on the mat"], return_tensors="pt")
    generated = model.generate(**enc, max_new_tokens=5)
    assert generated.shape[0] == 1 and generated.shape[1] >= 2
    return metrics, model


def test_seed_command_bart_hub_names(hub, workspace, tmp_path):
    out = str(tmp_path / "distilled_model")
    rc = main(["--model-type", "bart", "--teacher", "facebook/bart-base", "--num-encoder-layers", "3",
               "--num-decoder-layers", "3", "--hidden-dim", "32", "--vocab-size", _vocab(workspace["bart"]), "--dataset",
               "cnn_dailymail", "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--dataset-local-path", "None", "--output-dir", out] + FAST)
    assert rc == 0
    metrics, model = _check_output(out)
    assert model.config.encoder_layers == 3 and model.config.decoder_layers == 3
    assert metrics["student"]["init"] == "teacher"
    assert metrics["student"]["encoder_layers_copied"] == [0, 2, 3]  # 4 -> 3: spread, first and last kept
    cfg = json.load(open(os.path.join(out, "distill_config.json")))
    assert cfg["teacher"] == "facebook/bart-base" and cfg["alpha"] == 0.5


def test_seed_command_t5_hub_names_resized_student(hub, workspace, tmp_path):
    out = str(tmp_path / "distilled_model")
    rc = main(["--model-type", "t5", "--teacher", "t5-base", "--num-encoder-layers", "3",
               "--num-decoder-layers", "3", "--hidden-dim", "16", "--vocab-size", _vocab(workspace["t5"]), "--dataset",
               "cnn_dailymail", "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--dataset-local-path", "None", "--output-dir", out, "--source-prefix", "summarize: "] + FAST)
    assert rc == 0
    metrics, model = _check_output(out)
    assert model.config.d_model == 16 and metrics["student"]["init"] == "random"


def test_seed_command_local_teacher_and_local_dataset(workspace, tmp_path):
    out = str(tmp_path / "distilled_model")
    rc = main(["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--num-encoder-layers", "3",
               "--num-decoder-layers", "3", "--hidden-dim", "32", "--vocab-size", _vocab(workspace["bart"]), "--dataset",
               "cnn_dailymail", "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--dataset-local-path", workspace["data"], "--output-dir", out] + FAST)
    assert rc == 0
    _check_output(out)


def test_seed_command_local_wins_custom_tokenizer_samsum(workspace, tmp_path):
    """--teacher and --teacher-local-path both given: the folder wins (no hub access is made)."""
    out = str(tmp_path / "out")
    rc = main(["--model-type", "bart", "--teacher", "facebook/bart-base", "--teacher-local-path", workspace["bart"],
               "--custom-tokenizer-local-path", workspace["bart"], "--dataset", "samsum",
               "--dataset-local-path", workspace["plain"], "--dataset-input-column", "source",
               "--dataset-target-column", "target", "--output-dir", out, "--alpha", "1.0"] + FAST)
    assert rc == 0
    metrics, _ = _check_output(out)
    assert all(h["kl"] == 0 for h in metrics["history"] if "kl" in h)  # alpha = 1: teacher not run


def test_labels_only_from_random_weights_needs_no_teacher_weights(workspace, tmp_path, capsys):
    """--alpha 1 --student-init random: the baseline of training the small model alone. Only the
    teacher's config and tokenizer are read, so a folder without weights works."""
    import shutil

    recipe = tmp_path / "recipe"
    shutil.copytree(workspace["bart"], recipe)
    for name in os.listdir(recipe):
        if name.endswith((".safetensors", ".bin")):
            os.remove(recipe / name)
    out = str(tmp_path / "out")
    rc = main(_argv(workspace, out, "--teacher-local-path", str(recipe), "--alpha", "1", "--student-init",
                    "random", "--num-decoder-layers", "1") + ["--max-steps", "2"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "teacher weights not loaded" in printed.out and "copied teacher layers" not in printed.out
    assert "model trained on labels only (alpha = 1) written to" in printed.out
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["student"]["init"] == "random" and metrics["teacher_memory_rank0"] is None
    # DeepSpeed's scheduler warning goes to the run's library.log, not the console
    assert "Attempting to get learning rate" not in printed.out + printed.err
    assert "Attempting to get learning rate" in open(os.path.join(out, "library.log")).read()
    card = open(os.path.join(out, "README.md")).read()
    assert "trained on labels only" in card and "Distilled" not in card and "random initial weights" in card


def test_divergence_option_reaches_the_loss(workspace, tmp_path):
    out = str(tmp_path / "jsd")
    assert main(_argv(workspace, out, "--divergence", "jsd", "--jsd-beta", "0.3")) == 0
    used = json.load(open(os.path.join(out, "distill_config.json")))
    assert (used["divergence"], used["jsd_beta"]) == ("jsd", 0.3)
    assert "jsd(teacher, student)" in open(os.path.join(out, "README.md")).read()


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_other_loss_impls_run(workspace, tmp_path, impl):
    out = str(tmp_path / impl)
    rc = main(["--model-type", "t5", "--teacher-local-path", workspace["t5"], "--dataset-local-path",
               workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--output-dir", out, "--loss-impl", impl] + FAST)
    assert rc == 0
    _check_output(out)


def test_loss_falls_and_report_is_written(workspace, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--dataset-local-path",
               workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--output-dir", out, "--max-steps", "30", "--per-device-batch-size", "8", "--learning-rate",
               "3e-3", "--logging-steps", "5", "--report-samples", "4", "--eval-steps", "15",
               "--max-target-length", "8"])
    assert rc == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert any("eval_loss" in h for h in metrics["history"])
    report = json.load(open(os.path.join(out, "report", "report.json")))
    assert {"main_metric", "speedup_b1", "speedup_b32", "quality_retention", "models"} <= set(report)


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------

def _bad(capsys, argv, needle, out):
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)
    after = sorted(os.listdir(out)) if os.path.isdir(out) else None
    assert before == after


def _argv(workspace, out, *extra, teacher="bart"):
    return ["--model-type", teacher, "--teacher-local-path", workspace[teacher], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out, "--max-steps", "2", "--skip-report"] + list(extra)


@pytest.mark.parametrize("extra, needle", [
    (["--dataset-input-column", "body"], "body"),
    (["--model-type", "t5"], "model_type"),
    (["--vocab-size", "5000"], "vocab"),
    (["--hidden-dim", "37"], "hidden size 37"),
    (["--num-encoder-layers", "9"], "got 9, the teacher has 4"),
    (["--alpha", "1.2"], "--alpha 1.2"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--teacher-local-path", "/nonexistent/teacher"], "/nonexistent/teacher"),
    (["--dataset-local-path", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--deepspeed", "/nonexistent/ds.json"], "/nonexistent/ds.json"),
    (["--bf16", "--fp16"], "--bf16 and --fp16"),
    (["--student-init", "zeros"], "zeros"),
    (["--divergence", "kl2"], "kl2"),
    (["--jsd-beta", "1.5"], "--jsd-beta 1.5"),
    (["--global-batch-size", "12", "--per-device-batch-size", "8"], "--global-batch-size 12"),
])
def test_bad_input_one_line_exit_2(workspace, tmp_path, capsys, extra, needle):
    out = str(tmp_path / "out")
    _bad(capsys, _argv(workspace, out, *extra), needle, out)
    assert not os.path.exists(out)


def test_column_error_lists_existing_columns(workspace, tmp_path, capsys):
    out = str(tmp_path / "out")
    _bad(capsys, _argv(workspace, out, "--dataset-target-column", "summary"), "highlights", out)


def test_empty_dataset(workspace, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = str(tmp_path / "out")
    _bad(capsys, _argv(workspace, out, "--dataset-local-path", str(empty)), "empty", out)


def test_non_empty_output_dir_is_not_overwritten(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _bad(capsys, _argv(workspace, str(out)), "--overwrite-output-dir", str(out))
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}', "stage 3"),
])
def test_bad_deepspeed_config(workspace, tmp_path, capsys, content, needle):
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    out = str(tmp_path / "out")
    _bad(capsys, _argv(workspace, out, "--deepspeed", str(ds)), needle, out)


def test_unreachable_hub_teacher_fails_fast_with_fix(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = str(tmp_path / "out")
    argv = _argv(workspace, out, "--teacher-local-path", "None", "--teacher", "facebook/bart-base")
    _bad(capsys, argv, "--teacher-local-path", out)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--num-encoder-layers" in capsys.readouterr().out


def _needs(prec):
    from distill.distributed import precision_supported

    return pytest.mark.skipif(not precision_supported(prec),
                              reason=f"DeepSpeed's accelerator on this machine cannot train in {prec} "
                                     "(e.g. a CPU without fp16 instructions)")


@pytest.mark.parametrize("prec, other", [("fp16", "--bf16"), ("bf16", "--fp16")])
def test_unsupported_precision_is_one_line_naming_the_alternatives(workspace, tmp_path, capsys,
                                                                   monkeypatch, prec, other):
    # Runs on any machine: the capability is faked off, the message and exit code are real.
    from distill import distributed

    real = distributed.precision_supported
    monkeypatch.setattr(distributed, "precision_supported", lambda p: p != prec and real(p))
    out = str(tmp_path / "out")
    assert main(_argv(workspace, out, f"--{prec}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"error: --{prec}: this device") and "Traceback" not in "\n".join(err)
    assert "fp32" in err[-1] and ((other in err[-1]) == real(other[2:])), err[-1]
    assert not os.path.exists(out)


@pytest.mark.parametrize("extra, expect", [
    pytest.param(["--bf16"], "bf16", marks=_needs("bf16")),
    pytest.param(["--fp16"], "fp16", marks=_needs("fp16")),
    (["--deepspeed", os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs", "zero2_offload.json")],
     "DeepSpeedCPUAdam"),
])
def test_precisions_and_offload_config(workspace, tmp_path, extra, expect):
    out = str(tmp_path / "out")
    rc = main(["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--dataset-local-path",
               workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
               "--output-dir", out] + FAST + extra)
    assert rc == 0
    metrics, _ = _check_output(out)
    assert expect in (metrics["precision"], metrics["optimizer"].rsplit(".", 1)[-1])


def test_overwrite_removes_an_earlier_runs_checkpoints(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / "checkpoints" / "step-000099"
    stale.mkdir(parents=True)
    (stale / "COMPLETE").write_text("")
    assert main(_argv(workspace, str(out), "--overwrite-output-dir")) == 0
    assert not (out / "checkpoints").exists()  # a later --resume cannot take the old run's state
    assert "removed the earlier run's checkpoints" in capsys.readouterr().out


def test_model_card_says_how_the_student_learned_from_the_teacher():
    from types import SimpleNamespace

    from distill.export import model_card

    base = dict(teacher_local_path="/t", teacher=None, dataset_local_path="/d", dataset=None, input_column="s",
                target_column="t", model_type="bart", temperature=1.0, loss_impl="fused", learning_rate=1e-3,
                seed=0, on_policy_ratio=0.0, seq_kd_ratio=0.0, divergence="forward_kl")
    info = {"init": "teacher"}
    metrics = {"history": [{"step": 1, "loss": 0.5}], "final_eval": {"eval_loss": 0.4}}
    seq_kd = model_card(SimpleNamespace(**base, alpha=1.0, target_source="teacher"), info, metrics)
    assert "# Distilled" in seq_kd and "the teacher's outputs (sequence-level KD)" in seq_kd
    assert "no teacher signal" not in seq_kd and "Final train loss (CE) 0.5000" in seq_kd
    labels = model_card(SimpleNamespace(**base, alpha=1.0, target_source="reference"), info, metrics)
    assert "trained on labels only" in labels and "Distilled" not in labels
    gkd = model_card(SimpleNamespace(**dict(base, on_policy_ratio=0.5), alpha=0.5, target_source="reference"),
                     info, metrics)
    assert "0.5 of the micro-batches on the student's own samples" in gkd
    assert "(CE -, KL -)" in gkd and "nan" not in gkd  # figures the run did not log: "-", never nan
