"""Sequence-level KD: `python -m distill.pseudo_label` and training on its outputs.

The teacher is the workspace's tiny random T5 (its greedy/beam outputs differ from row to row);
outputs are kept short (--max-new-tokens 8). One process runs in-process through main(); the
kill, the 2-rank runs and the file entry run as subprocesses.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from distill import data, pseudo_label, pseudo_label_files as files
from distill.errors import UserError
from distill.train import main as train_main
from launch_env import clean_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label_args(workspace, out, *extra, data_path=None):
    # shard size 48 with batch 8: shards of 6, 6, 6 and 2 batches in train and one of 3 in
    # validation, so on 2 ranks one rank makes dummy calls and one round has a rank without a shard.
    return ["--model-type", "t5", "--teacher-local-path", workspace["t5"],
            "--dataset-local-path", data_path or workspace["data"], "--dataset-input-column", "article",
            "--dataset-target-column", "highlights", "--output-dir", out, "--max-source-length", "32",
            "--max-new-tokens", "8", "--shard-size", "48", "--per-device-batch-size", "8",
            "--num-beams", "2"] + list(extra)


def train_args(workspace, out, labels, *extra, data_path=None):
    return ["--model-type", "t5", "--teacher-local-path", workspace["t5"], "--dataset-local-path",
            data_path or workspace["data"], "--dataset-input-column", "article", "--dataset-target-column",
            "highlights", "--output-dir", out, "--max-source-length", "32", "--max-target-length", "16",
            "--max-steps", "2", "--per-device-batch-size", "8", "--skip-report", "--logging-steps", "1",
            "--pseudo-labels", labels] + list(extra)


def shard_texts(folder):
    return {n: open(os.path.join(folder, n), encoding="utf-8").read()
            for n in sorted(os.listdir(folder)) if n.endswith(".jsonl")}




@pytest.fixture(scope="module")
def labels(workspace, tmp_path_factory):
    """Pseudo-labels of the workspace's data by the T5 teacher, made by one uninterrupted run."""
    out = str(tmp_path_factory.mktemp("pl") / "labels")
    assert pseudo_label.main(label_args(workspace, out)) == 0
    return out


# ---- one process, end to end ------------------------------------------------------------------

def test_manifest_and_shards(labels, workspace):
    manifest = files.read_manifest(labels)
    identity = manifest["identity"]
    assert manifest["complete"] is True and manifest["info"]["world_size"] == 1
    assert identity["generation"]["num_beams"] == 2 and identity["generation"]["max_new_tokens"] == 8
    assert identity["teacher_sha256"] == files.teacher_fingerprint(workspace["t5"])["sha256"]
    assert {s: i["rows"] for s, i in identity["splits"].items()} == {"train": 160, "validation": 24}
    assert sorted(shard_texts(labels)) == [f"train-0000{i}.jsonl" for i in range(4)] + ["validation-00000.jsonl"]
    rows = [r for split, r in files.iter_rows(labels, manifest) if split == "train"]
    source = [json.loads(line) for line in open(os.path.join(workspace["data"], "train.jsonl"))]
    assert [r["row"] for r in rows] == list(range(160))
    assert [(r["source"], r["target"]) for r in rows] == [(s["article"], s["highlights"]) for s in source]
    assert all(r["teacher"].strip() for r in rows) and len({r["teacher"] for r in rows}) > 3


def test_training_on_teacher_and_mixed_targets(labels, workspace, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    out = str(tmp_path / "teacher")
    assert train_main(train_args(workspace, out, labels, "--target-source", "teacher")) == 0
    printed = capsys.readouterr().out
    assert "data: train: 160 rows with the teacher's outputs as targets" in printed
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.num_decoder_layers == 2
    out = str(tmp_path / "mixed")
    assert train_main(train_args(workspace, out, labels, "--target-source", "mixed")) == 0
    assert "data: train: 160 rows with their reference + 160 with the teacher's output" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "distill_config.json")))["target_source"] == "mixed"


def test_apply_pseudo_labels_semantics():
    from datasets import Dataset, DatasetDict

    def ds(pairs):
        return Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})

    teacher = {"a": "A", "b": "ref b", "c": "C", "v": "V"}.get
    raw = DatasetDict(train=ds([("a", "ref a"), ("b", "ref b")]), validation=ds([("c", "ref c"), ("v", None)]),
                      test=ds([("a", "ref a"), ("x", None)]))
    only = data.apply_pseudo_labels(raw, teacher, "teacher", "here", log=lambda m: None)
    assert only["train"]["target"] == ["A", "ref b"]
    assert only["validation"]["target"] == ["ref c", "V"]  # references kept where present
    assert only["test"]["target"] == ["ref a"]  # the report's references: rows without one go
    mixed = data.apply_pseudo_labels(raw, teacher, "mixed", "here", log=lambda m: None)
    assert list(zip(mixed["train"]["source"], mixed["train"]["target"])) == [
        ("a", "ref a"), ("b", "ref b"), ("a", "A")]  # b's output equals its reference: once
    with pytest.raises(UserError, match="1 of 2 train rows have no teacher output in here"):
        data.apply_pseudo_labels(DatasetDict(train=ds([("a", "r"), ("zz", "r")]), validation=ds([("c", "r")])),
                                 teacher, "teacher", "here", log=lambda m: None)


# ---- resume after a kill ------------------------------------------------------------------------

KILL_ON_SECOND_SHARD = """
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("train-00001.jsonl"):  # the temporary file is written: die before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from distill.pseudo_label import main
sys.exit(main(sys.argv[1:]))
"""


def test_rerun_after_kill_continues_and_equals_an_uninterrupted_run(labels, workspace, tmp_path, capsys):
    out = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SHARD] + label_args(workspace, out),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    names = sorted(os.listdir(out))
    assert "train-00000.jsonl" in names and "train-00001.jsonl" not in names
    assert any(n.startswith(".tmp-") for n in names)  # the shard being written when it died
    assert files.read_manifest(out)["complete"] is False
    # training refuses the unfinished folder
    student = str(tmp_path / "student")
    assert train_main(train_args(workspace, student, out, "--target-source", "teacher")) == 2
    assert "is incomplete" in capsys.readouterr().err and not os.path.exists(student)

    first = os.stat(os.path.join(out, "train-00000.jsonl")).st_mtime_ns
    assert pseudo_label.main(label_args(workspace, out)) == 0
    assert "1 of 5 shards are complete" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "train-00000.jsonl")).st_mtime_ns == first  # kept, not remade
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert files.read_manifest(out)["complete"] is True
    assert shard_texts(out) == shard_texts(labels)
    # a third run has nothing left to do
    assert pseudo_label.main(label_args(workspace, out)) == 0
    assert "5 of 5 shards are complete" in capsys.readouterr().out and shard_texts(out) == shard_texts(labels)


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------

def _refused(capsys, run, argv, needle, *folders):
    before = {f: sorted(os.listdir(f)) if os.path.isdir(f) else None for f in folders}
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert {f: sorted(os.listdir(f)) if os.path.isdir(f) else None for f in folders} == before


def test_teacher_targets_need_pseudo_labels(workspace, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = train_args(workspace, out, "None", "--target-source", "teacher")
    _refused(capsys, train_main, argv, "--target-source teacher needs the teacher's outputs; pass --pseudo-labels", out)
    argv = train_args(workspace, out, str(tmp_path))
    _refused(capsys, train_main, argv, "--target-source is reference", out)


def test_folder_without_manifest_is_refused(workspace, tmp_path, capsys):
    out, empty = str(tmp_path / "out"), str(tmp_path / "empty")
    os.makedirs(empty)
    _refused(capsys, train_main, train_args(workspace, out, empty, "--target-source", "mixed"),
             "has no manifest.json", out, empty)


def test_pseudo_labels_of_another_teacher_are_refused(labels, workspace, tmp_path, capsys):
    other = str(tmp_path / "other_teacher")
    shutil.copytree(workspace["t5"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(other, "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # same architecture and tokenizer, other weights
    save_file(weights, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    argv = train_args(workspace, out, labels, "--target-source", "teacher", "--teacher-local-path", other)
    _refused(capsys, train_main, argv, "were made by another teacher", out, labels)


@pytest.mark.parametrize("extra, needle", [
    (["--source-prefix", "summarize: "], "were made with --source-prefix \"\""),
    (["--max-source-length", "64"], "were made with --max-source-length 32"),
])
def test_pseudo_labels_made_with_other_inputs_are_refused(labels, workspace, tmp_path, capsys, extra, needle):
    out = str(tmp_path / "out")
    _refused(capsys, train_main, train_args(workspace, out, labels, "--target-source", "teacher", *extra),
             needle, out, labels)


def test_rerun_with_other_options_is_refused_then_overwritten(labels, workspace, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(labels, out)
    _refused(capsys, pseudo_label.main, label_args(workspace, out, "--num-beams", "1"),
             "generation.num_beams: 2 there, 1 now", out)
    with open(os.path.join(out, "keep.txt"), "w") as fh:
        fh.write("not ours")
    argv = label_args(workspace, out, "--num-beams", "1", "--max-samples", "8", "--overwrite-output-dir")
    assert pseudo_label.main(argv) == 0
    assert sorted(shard_texts(out)) == ["train-00000.jsonl", "validation-00000.jsonl"]
    assert os.path.isfile(os.path.join(out, "keep.txt"))  # only the old pseudo-labels were removed


@pytest.mark.parametrize("extra, needle", [
    (["--temperature", "0.7"], "--temperature only applies to sampling; add --do-sample"),
    (["--splits", "train,dev"], "--splits 'train,dev'"),
    (["--splits", "test", "--max-samples", "0"], "--max-samples 0 must be >= 1"),
    (["--num-beams", "0"], "--num-beams 0 must be >= 1"),
    (["--teacher-local-path", "/nonexistent/teacher"], "/nonexistent/teacher"),
    (["--dataset-local-path", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
])
def test_pseudo_label_bad_options(workspace, tmp_path, capsys, extra, needle):
    out = str(tmp_path / "out")
    _refused(capsys, pseudo_label.main, label_args(workspace, out, *extra), needle, out)
    assert not os.path.exists(out)


def test_not_empty_folder_without_manifest_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(capsys, pseudo_label.main, label_args(workspace, str(out), "--max-samples", "4"),
             "is not empty and holds no pseudo-labels", str(out))


# ---- inputs without references ------------------------------------------------------------------

def test_inputs_only_file(workspace, tmp_path, capsys):
    inputs = tmp_path / "unlabeled.jsonl"
    rows = [json.loads(line) for line in open(os.path.join(workspace["data"], "train.jsonl"))]
    inputs.write_text("".join(json.dumps({"article": r["article"]}) + "\n" for r in rows[:64]))
    out = str(tmp_path / "labels")
    assert pseudo_label.main(label_args(workspace, out, data_path=str(inputs))) == 0
    manifest = files.read_manifest(out)
    assert manifest["info"]["with_reference"] == {"train": 0}
    assert all(r["target"] is None and r["teacher"] for _, r in files.iter_rows(out, manifest))
    student = str(tmp_path / "student")
    capsys.readouterr()
    assert train_main(train_args(workspace, student, out, "--target-source", "teacher", data_path=str(inputs))) == 0
    assert "no 'highlights' column; inputs only" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(student, "model.safetensors"))
    # references are needed for mixed targets (and the default)
    _refused(capsys, train_main, train_args(workspace, str(tmp_path / "m"), out, "--target-source", "mixed",
                                            data_path=str(inputs)), "column 'highlights' not found")


# ---- two CPU ranks ------------------------------------------------------------------------------

def test_two_ranks_partitioned_teacher_same_outputs_as_one(workspace, tmp_path, capsys):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    greedy = ["--num-beams", "1"]
    assert pseudo_label.main(label_args(workspace, one, *greedy)) == 0
    proc = subprocess.run(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "--module",
                           "distill.pseudo_label"] + label_args(workspace, two, *greedy),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # ZeRO-3: each rank holds about half of the teacher (the ranks' lines may interleave)
    held = re.findall(r"\[rank (\d)\] teacher parameters on this rank: ([\d,]+) of ([\d,]+)", log)
    assert {r for r, _, _ in held} == {"0", "1"}, log[-4000:]
    assert all(0.4 <= int(a.replace(",", "")) / int(b.replace(",", "")) <= 0.6 for _, a, b in held)
    assert shard_texts(two) == shard_texts(one)
    assert files.read_manifest(two)["info"]["world_size"] == 2
    assert files.read_manifest(two)["identity"] == files.read_manifest(one)["identity"]

    # (training on them on 2 ranks is the same data path as on one: test_training_on_teacher_and_mixed_targets)


def test_file_entry_and_help():
    proc = subprocess.run([sys.executable, "distill/pseudo_label.py", "--help"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--num-beams" in proc.stdout and "--pseudo-labels" not in proc.stdout


def test_pseudo_labels_of_another_tokenizer_are_refused(labels, workspace, tmp_path, capsys):
    from distill.toy import train_tokenizer

    other = str(tmp_path / "tokenizer")
    train_tokenizer(["completely different words for another vocabulary"] * 20 + ["the cat sat"] * 5, "t5",
                    vocab_size=60).save_pretrained(other)
    out = str(tmp_path / "out")
    argv = train_args(workspace, out, labels, "--target-source", "teacher", "--custom-tokenizer-local-path", other)
    _refused(capsys, train_main, argv, "were made with another tokenizer", out, labels)


def test_saved_dataset_without_target_column_gives_null_targets(tmp_path):
    from datasets import Dataset

    saved = str(tmp_path / "saved")
    Dataset.from_dict({"article": ["a b", "c d", " "]}).save_to_disk(saved)
    raw = data.load_raw_splits(None, saved, "article", "highlights", require_target=False,
                               split_off_validation=False, log=lambda m: None)
    assert list(raw) == ["train"]  # no validation split is cut out of train
    assert list(raw["train"]["source"]) == ["a b", "c d"] and list(raw["train"]["target"]) == [None, None]
    with pytest.raises(UserError, match="column 'highlights' not found"):
        data.load_raw_splits(None, saved, "article", "highlights", log=lambda m: None)
