"""Runtime export (CTranslate2, ONNX Runtime) on tiny random BART and T5 students, through the
real converters: the parity check, the folders, evaluate's runtime rows, training's
--export-runtime, and bad input.

The students' weights are redrawn with a wide spread: a freshly initialised model emits one
token (EOS, padding or one word) every time, which would make every parity check pass trivially. No
assertion looks at how fast anything is.
"""
import hashlib
import json
import os
import re
import shutil
import sys

import pytest
import torch

from distill import runtime
from distill.errors import UserError
from distill.export_runtime import check_parity, main
from distill.toy import save_tiny_teacher

pytest.importorskip("ctranslate2")
pytest.importorskip("onnxruntime")

WORDS = "the cat dog bird sat ran on under mat tree red blue one two three".split()
ROWS = [{"source": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 4 + i % 5)),
         "target": " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3))} for i in range(40)]
FAST = ["--parity-samples", "8", "--max-new-tokens", "6", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    yield
    torch.set_num_threads(before)


def _student(folder, model_type, **generation):
    """A tiny student with spread-out weights, a distill_config.json naming its data, and the
    given generation-config fields."""
    from transformers import AutoModelForSeq2SeqLM

    save_tiny_teacher(folder, model_type, [r["source"] for r in ROWS] + [r["target"] for r in ROWS],
                      vocab_size=120, layers=1)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms' scales too: T5 otherwise repeats one token
            p.normal_(1.0 if p.dim() == 1 and name.endswith("weight") else 0.0, 0.3)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    data = os.path.join(os.path.dirname(folder), f"{os.path.basename(folder)}-data")
    os.makedirs(data, exist_ok=True)
    for split, rows in (("train", ROWS[:24]), ("validation", ROWS[24:])):
        with open(os.path.join(data, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "distill_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"dataset": None, "dataset_local_path": data, "input_column": "source",
                   "target_column": "target", "source_prefix": "", "max_source_length": 32,
                   "max_target_length": 6}, fh)
    return folder


def _files(folder):
    """The student's own files and their hashes (the runtime/ folder is not the student)."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {t: _student(str(root / t), t) for t in ("bart", "t5")}


def _greedy_texts(folder, sources, max_new_tokens=6):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(sources, return_tensors="pt", padding=True, truncation=True, max_length=32,  # the student's
              return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_float_and_int8_exports_pass_parity(students, model_type, capsys):
    student = students[model_type]
    before = _files(student)
    assert main([student, "--to", "ct2,onnx"] + FAST) == 0
    assert main([student, "--to", "ct2,onnx", "--quantization", "int8"] + FAST) == 0
    assert _files(student) == before  # the PyTorch student is never written
    root = os.path.join(student, "runtime")
    assert sorted(os.listdir(root)) == ["ct2", "ct2-int8", "onnx", "onnx-int8"]  # no staging left
    sources = [r["source"] for r in ROWS[24:30]]
    expected = _greedy_texts(student, sources)
    assert len(set(expected)) > 2  # the student writes varied outputs: parity is not trivial
    for name in ("ct2", "onnx"):
        manifest = runtime.read_manifest(os.path.join(root, name))
        assert manifest["parity"]["identical"] == manifest["parity"]["samples"] == 8
        model, _ = runtime.load(os.path.join(root, name))
        assert model.generate_texts(sources, batch_size=4, max_new_tokens=6) == expected
    for name in ("ct2-int8", "onnx-int8"):
        parity = runtime.read_manifest(os.path.join(root, name))["parity"]
        assert abs(parity["runtime"] - parity["student"]) <= 1.0 and parity["metric"]


def test_generation_config_rules_are_applied_alike(tmp_path):
    # forced BOS, a minimum length, n-gram blocking and a repetition penalty: each runtime must
    # apply them as transformers does, or the float32 parity check (same token ids) fails
    student = _student(str(tmp_path / "rules"), "bart", forced_bos_token_id=7, min_length=5,
                       no_repeat_ngram_size=2, repetition_penalty=1.5)
    assert main([student, "--to", "ct2,onnx"] + FAST) == 0
    outputs = _greedy_texts(student, [r["source"] for r in ROWS[24:28]])
    model, _ = runtime.load(os.path.join(student, "runtime", "onnx"))
    ids = model.generate_ids([[0, 9, 10, 2]], 6)[0]
    assert ids[0] == 7 and len(ids) == 6 and ids[-1] == 2  # forced BOS, no early EOS, forced EOS
    assert model.generate_texts([r["source"] for r in ROWS[24:28]], max_new_tokens=6) == outputs


def test_evaluate_reports_a_row_per_runtime(students, tmp_path):
    from distill.evaluate import run_report
    from distill.report_files import plot_spec

    student = students["bart"]
    assert main([student, "--to", "ct2,onnx"] + FAST) == 0
    root = os.path.join(student, "runtime")
    sources, refs = [r["source"] for r in ROWS[24:30]], [r["target"] for r in ROWS[24:30]]
    report = run_report(student, [student, os.path.join(root, "ct2"), os.path.join(root, "onnx")], sources,
                        refs, str(tmp_path / "report"), max_new_tokens=6, batch_size=4, num_beams=2,
                        speed_repeats=1, log=lambda *a: None)
    rows = report["models"]
    assert list(rows) == ["teacher", "bart", "ct2", "onnx"]
    metric = report["main_metric"]
    for name in ("ct2", "onnx"):
        m = rows[name]
        assert m[metric] == rows["bart"][metric]  # float32: the same outputs
        assert m["latency_greedy_b1_p50_ms"] > 0 and m["throughput_samples_per_s"] > 0
        assert m["size_on_disk_mb"] > 0 and m["parameters"] == rows["bart"]["parameters"]
        assert m["peak_memory_mb"] is None  # not torch's allocations: not counted
        assert m["dtype"] == "float32"
    assert rows["ct2"]["latency_beam_b1_p50_ms"] > 0
    assert rows["onnx"]["latency_beam_b1_p50_ms"] is None  # greedy only
    assert [p["name"] for p in plot_spec(report)["points"]] == list(rows)
    assert os.path.isfile(tmp_path / "report" / "quality_vs_speed.png")


def test_failed_parity_keeps_the_earlier_folder_and_the_student(students, monkeypatch, capsys):
    student = students["t5"]
    assert main([student, "--to", "ct2"] + FAST) == 0
    kept = _files(os.path.join(student, "runtime", "ct2"))
    before = _files(student)
    real = runtime.Ct2Model.generate_ids
    monkeypatch.setattr(runtime.Ct2Model, "generate_ids",
                        lambda self, *a, **k: [ids + [5] for ids in real(self, *a, **k)])
    capsys.readouterr()
    assert main([student, "--to", "ct2"] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: ct2 failed its parity check: \d of 8 greedy outputs differ .*", err), err
    assert "\n" not in err
    assert _files(os.path.join(student, "runtime", "ct2")) == kept
    assert _files(student) == before
    assert not [n for n in os.listdir(os.path.join(student, "runtime")) if n.startswith(".")]


def test_quantized_rule_is_the_main_metric_within_a_point():
    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(map(str, i)) for i in ids]

    refs = ["1 2", "3 4", "5 6", "7 8"]
    same = [[1, 2], [3, 4], [5, 6], [7, 8]]
    other = same[:3] + [[7, 9]]  # one output of four wrong: exact_match 75 against 100
    with pytest.raises(UserError, match="exact_match 75.00 against the PyTorch student's 100.00"):
        check_parity("ct2-int8", "int8", same, other, Tok(), refs, refs, "exact_match")
    record = check_parity("ct2-int8", "int8", same, same, Tok(), refs, refs, "exact_match")
    assert record["identical"] == 4 and record["runtime"] == record["student"] == 100.0
    with pytest.raises(UserError, match="1 of 4 greedy outputs differ"):
        check_parity("ct2", None, same, other, Tok(), refs, refs)


def test_stale_runtime_folder_is_refused(tmp_path, students):
    student = str(tmp_path / "copy")
    shutil.copytree(students["bart"], student, ignore=shutil.ignore_patterns("runtime"))
    assert main([student, "--to", "ct2"] + FAST) == 0
    with open(os.path.join(student, "model.safetensors"), "ab") as fh:
        fh.write(b" ")  # the student was trained again
    with pytest.raises(UserError, match="earlier version of the student"):
        runtime.load(os.path.join(student, "runtime", "ct2"))


@pytest.mark.parametrize("case, needle", [
    ("missing-package", "pip install ctranslate2==4.8.5"),
    ("model-type", "'marian' model; the runtime export supports bart, mbart, t5, mt5"),
    ("unknown-to", "unknown runtime 'tflite'"),
    ("not-a-folder", "is not a folder"),
    ("not-a-student", "is not a student folder"),
    ("runtime-folder", "is a runtime folder"),
    ("onnx-float16", "not available for onnx"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, needle, students, tmp_path, monkeypatch, capsys):
    student = str(tmp_path / "student")
    shutil.copytree(students["bart"], student, ignore=shutil.ignore_patterns("runtime"))
    to = "ct2"
    if case == "missing-package":
        monkeypatch.setitem(sys.modules, "ctranslate2", None)
    elif case == "model-type":
        config = json.load(open(os.path.join(student, "config.json")))
        json.dump({**config, "model_type": "marian"}, open(os.path.join(student, "config.json"), "w"))
    elif case == "unknown-to":
        to = "ct2,tflite"
    elif case == "not-a-folder":
        student = str(tmp_path / "missing")
    elif case == "not-a-student":
        os.remove(os.path.join(student, "model.safetensors"))
    elif case == "runtime-folder":
        open(os.path.join(student, runtime.MANIFEST), "w").write("{}")
    elif case == "onnx-float16":
        to = "onnx,ct2"
    before = _files(student) if os.path.isdir(student) else None
    extra = ["--quantization", "float16"] if case == "onnx-float16" else []
    assert main([student, "--to", to] + extra + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    if before is not None:
        assert _files(student) == before and not os.path.exists(os.path.join(student, "runtime"))


def test_training_exports_runtimes_before_the_report(tmp_path, monkeypatch, capsys):
    from distill.config import parse_args
    from distill.train import main as train_main

    with pytest.raises(UserError, match="--export-quantization int8 is given without --export-runtime"):
        parse_args(["--teacher", "t", "--dataset", "d", "--export-quantization", "int8"])
    teacher = _student(str(tmp_path / "teacher"), "bart")
    out = str(tmp_path / "run")
    # onnx fails its check: ct2 is still exported and reported, the run ends with exit 2
    real = runtime.OnnxModel.generate_ids
    monkeypatch.setattr(runtime.OnnxModel, "generate_ids",
                        lambda self, *a, **k: [[5] + ids for ids in real(self, *a, **k)])
    rc = train_main(["--model-type", "bart", "--teacher-local-path", teacher, "--dataset-local-path",
                     teacher + "-data", "--output-dir", out, "--max-steps", "2", "--per-device-batch-size", "4",
                     "--max-source-length", "32", "--max-target-length", "6", "--report-samples", "4",
                     "--export-runtime", "onnx,ct2"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: onnx failed its parity check")
    assert sorted(os.listdir(os.path.join(out, "runtime"))) == ["ct2"]
    assert runtime.read_manifest(os.path.join(out, "runtime", "ct2"))["parity"]["samples"] == 16  # the validation rows
    report = json.load(open(os.path.join(out, "report", "report.json")))
    assert list(report["models"]) == ["teacher", "run", "ct2"]


def _teacher_copy(students, tmp_path):
    """A teacher folder (a copy of the BART student, its own weights file) with its CTranslate2
    export beside it, as the demo writes it: not inside the teacher's folder."""
    from distill.export_runtime import export_runtimes

    teacher = str(tmp_path / "teacher")
    shutil.copytree(students["bart"], teacher, ignore=shutil.ignore_patterns("runtime"))
    rows = ROWS[24:32]
    written = export_runtimes(teacher, ["ct2"], None, [r["source"] for r in rows], [r["target"] for r in rows],
                              max_source_length=32, max_new_tokens=6, batch_size=4,
                              root=str(tmp_path / "teacher-runtime"), log=lambda *a: None)
    assert written == [str(tmp_path / "teacher-runtime" / "ct2")]
    assert not os.path.exists(os.path.join(teacher, "runtime"))  # the teacher's folder is not written
    return teacher, written[0]


def test_runtime_students_are_timed_against_the_teacher_in_the_same_runtime(students, tmp_path, monkeypatch):
    from distill.evaluate import run_report
    from distill.report_files import format_table

    student = students["bart"]
    assert main([student, "--to", "ct2"] + FAST) == 0
    assert main([student, "--to", "ct2", "--quantization", "int8"] + FAST) == 0
    teacher, teacher_ct2 = _teacher_copy(students, tmp_path)
    threads = []
    real_load = runtime.load
    monkeypatch.setattr(runtime, "load", lambda *a, **k: threads.append(k.get("threads")) or real_load(*a, **k))
    root = os.path.join(student, "runtime")
    sources, refs = [r["source"] for r in ROWS[24:30]], [r["target"] for r in ROWS[24:30]]
    report = run_report(teacher, [student, os.path.join(root, "ct2"), os.path.join(root, "ct2-int8")], sources,
                        refs, str(tmp_path / "report"), max_new_tokens=6, batch_size=4, num_beams=1,
                        speed_repeats=2, teacher_runtimes=[teacher_ct2], runtime_threads=1, log=lambda *a: None)
    rows = report["models"]
    assert list(rows) == ["teacher", "bart", "ct2", "ct2-int8", "teacher [ct2]"]
    assert rows["teacher [ct2]"]["role"] == "teacher-runtime" and "speedup_b1" not in rows["teacher [ct2]"]
    assert rows["bart"]["speedup_vs"] == "teacher"
    # float32 and int8 students against the float32 teacher export (no int8 teacher given)
    for name in ("ct2", "ct2-int8"):
        m, base = rows[name], rows["teacher [ct2]"]
        assert m["speedup_vs"] == "teacher [ct2]"
        assert m["speedup_b1"] == pytest.approx(base["latency_greedy_b1_p50_ms"] / m["latency_greedy_b1_p50_ms"])
        assert m["speedup_b32"] == pytest.approx(m["throughput_samples_per_s"] / base["throughput_samples_per_s"])
        mine, theirs = m[report["main_metric"]], rows["teacher"][report["main_metric"]]  # the PyTorch teacher's
        assert m["quality_retention"] == (pytest.approx(mine / theirs) if theirs else None)
    assert [(p["runtime"], p["student"], p["teacher"]) for p in report["same_runtime"]] == [
        ("ct2", "ct2", "teacher [ct2]"), ("ct2", "ct2-int8", "teacher [ct2]")]  # the teacher's runtime
    assert threads == [1, 1, 1] and report["settings"]["runtime_threads"] == 1
    assert "| speedup vs" in format_table(report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Served alike, ct2 vs teacher [ct2]:" in md and "Runtime rows compute with 1 thread." in md

    # without a teacher runtime: every student against the PyTorch teacher, as before
    plain = run_report(teacher, [student, os.path.join(root, "ct2")], sources, refs, str(tmp_path / "plain"),
                       max_new_tokens=6, batch_size=4, num_beams=1, speed_repeats=1, log=lambda *a: None)
    assert {m["speedup_vs"] for m in plain["models"].values() if m["role"] == "student"} == {"teacher"}
    assert plain["same_runtime"] == [] and "speedup vs" not in format_table(plain)


@pytest.mark.parametrize("case, needle", [
    ("not-runtime", "is not a runtime folder (no runtime.json); export the teacher with"),
    ("other-weights", "was exported from other weights than the teacher"),
    ("twice", "are both ct2; give one teacher folder per runtime and quantization"),
    ("threads", "runtime_threads is 0; expected an integer >= 1"),
])
def test_bad_teacher_runtime_is_one_line_exit_2_and_writes_nothing(case, needle, students, tmp_path, capsys):
    from distill.evaluate import main as evaluate_main

    teacher, teacher_ct2 = _teacher_copy(students, tmp_path)
    given = {"not-runtime": [teacher], "other-weights": [teacher_ct2], "twice": [teacher_ct2, teacher_ct2],
             "threads": [teacher_ct2]}[case]
    if case == "other-weights":
        with open(os.path.join(teacher, "model.safetensors"), "ab") as fh:
            fh.write(b" ")  # the teacher was trained again after its export
    out = tmp_path / "report"
    argv = ["--teacher", teacher, "--student", students["bart"], "--dataset-local-path", students["bart"] + "-data",
            "--dataset-input-column", "source", "--dataset-target-column", "target", "--output-dir", str(out),
            "--max-new-tokens", "6", "--skip-speed", "--split", "validation"]
    argv += [a for path in given for a in ("--teacher-runtime", path)]
    if case == "threads":
        argv += ["--runtime-threads", "0"]
    capsys.readouterr()  # the export's own output
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not out.exists()
