"""The teacher-vs-student report on tiny random models: files, keys, bad input, the CLI.

No assertion looks at how fast anything is; the speed figures are only checked for presence,
sign and for being combined into ratios correctly.
"""
import json
import os

import pytest
import torch

from distill.errors import UserError
from distill.evaluate import format_table, main, run_report
from distill.metrics import METRICS, SPEED_KEYS
from distill.toy import save_tiny_teacher

TEXTS = [f"the cat number {i} sat on the mat and ate {i % 7} small fish today ." for i in range(30)]
FAST = dict(max_new_tokens=6, batch_size=4, speed_repeats=2, num_beams=2, log=lambda *a: None)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core box: a second OpenMP thread only spins and waits.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    teacher = save_tiny_teacher(str(root / "teacher"), "bart", TEXTS, vocab_size=300)
    student = save_tiny_teacher(str(root / "student"), "bart", TEXTS, vocab_size=300, layers=1,
                                seed=1)
    # a different family with its own tokenizer: each model must encode with its own
    t5 = save_tiny_teacher(str(root / "t5"), "t5", TEXTS, vocab_size=200, layers=1, seed=2)
    return teacher, student, t5


def test_report_files_and_keys(models, tmp_path):
    teacher, student, t5 = models
    out = tmp_path / "report"
    report = run_report(teacher, [student, t5], TEXTS[:5], TEXTS[:5], str(out), **FAST)

    assert set(report) >= {"main_metric", "speedup_b1", "speedup_b32", "quality_retention",
                           "models", "settings"}
    assert list(report["models"]) == ["teacher", "student", "student_2"]
    assert report["main_metric"] == "bleu"  # targets as long as the sources
    for name, m in report["models"].items():
        for key in METRICS:
            assert 0.0 <= m[key] <= 100.0
        for key in SPEED_KEYS:
            if key != "peak_memory_mb":  # None where RSS cannot be read
                assert m[key] is not None and m[key] > 0, (name, key)
        assert m["parameters"] > 0 and m["size_on_disk_mb"] > 0
        assert m["latency_greedy_b1_p90_ms"] >= m["latency_greedy_b1_p50_ms"]
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert s["parameters"] < t["parameters"]
    assert report["speedup_b1"] == pytest.approx(
        t["latency_greedy_b1_p50_ms"] / s["latency_greedy_b1_p50_ms"])
    assert report["speedup_b32"] == pytest.approx(
        s["throughput_samples_per_s"] / t["throughput_samples_per_s"])
    assert report["settings"]["n_samples"] == 5 and report["settings"]["speed_repeats"] == 2
    assert report["settings"]["device"] == "cpu" and report["settings"]["threads"] == 1
    assert report["settings"]["quality_decoding"] == "greedy"

    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| teacher" in md and "| student_2" in md and "greedy" in md
    png = (out / "quality_vs_speed.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    table = format_table(report)
    assert table.splitlines()[0].startswith("| model") and len(table.splitlines()) == 5


def test_quality_retention_uses_main_metric(models, tmp_path):
    teacher, _, _ = models
    # the teacher compared with itself: same outputs, so every quality ratio is exactly 1
    report = run_report(teacher, [teacher], TEXTS[:4], TEXTS[:4], str(tmp_path / "r"),
                        main_metric="chrf", skip_speed=True, **FAST)
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert report["main_metric"] == "chrf"
    assert {k: t[k] for k in METRICS} == {k: s[k] for k in METRICS}
    assert report["quality_retention"] == (1.0 if t["chrf"] > 0 else None)
    assert report["speedup_b1"] is None and report["speedup_b32"] is None
    assert all(t[k] is None for k in SPEED_KEYS)
    assert report["examples"][0]["teacher"] == report["examples"][0]["student"]
    assert (tmp_path / "r" / "quality_vs_speed.png").stat().st_size > 1000
    assert "-" in format_table(report)


@pytest.mark.parametrize("change, message", [
    (dict(students=["/nonexistent/student"]), "student folder"),
    (dict(students=[]), "no student"),
    (dict(teacher="/nonexistent/teacher"), "teacher folder"),
    (dict(sources=[], references=[]), "no evaluation samples"),
    (dict(references=["only one"]), "every input needs its target"),
    (dict(main_metric="bleurt"), "unknown metric"),
    (dict(speed_repeats=0), "speed_repeats"),
])
def test_bad_input_raises_before_writing(models, tmp_path, change, message):
    teacher, student, _ = models
    args = dict(FAST, teacher=teacher, students=[student], sources=TEXTS[:3],
                references=TEXTS[:3], output_dir=str(tmp_path / "out"))
    args.update(change)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_report(**args)
    assert not out.exists()


def test_unusable_student_folders(models, tmp_path):
    teacher, student, _ = models
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        run_report(teacher, [str(empty)], TEXTS[:2], TEXTS[:2], str(tmp_path / "o"), **FAST)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes(open(os.path.join(student, name), "rb").read())
    with pytest.raises(UserError, match="has no tokenizer"):
        run_report(teacher, [str(no_tokenizer)], TEXTS[:2], TEXTS[:2], str(tmp_path / "o"), **FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes(open(os.path.join(student, name), "rb").read())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load the student"):
        run_report(teacher, [str(broken)], TEXTS[:2], TEXTS[:2], str(tmp_path / "o"), **FAST)
    assert not (tmp_path / "o").exists()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_on_jsonl(models, tmp_path, capsys):
    teacher, student, _ = models
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", [{"doc": t, "summ": t[:20]} for t in TEXTS[:20]])
    _jsonl(data / "test.jsonl", [{"doc": t, "summ": t[:20]} for t in TEXTS[20:26]])
    out = tmp_path / "out"
    code = main(["--teacher", teacher, "--student", student, "--dataset-local-path", str(data),
                 "--dataset-input-column", "doc", "--dataset-target-column", "summ",
                 "--output-dir", str(out), "--max-eval-samples", "4", "--max-new-tokens", "6",
                 "--batch-size", "4", "--num-beams", "2", "--speed-repeats", "2",
                 "--main-metric", "rouge1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["n_samples"] == 4 and report["main_metric"] == "rouge1"
    assert report["examples"][0]["source"] == TEXTS[20]  # the test split, not train
    printed = capsys.readouterr().out
    assert "split 'test'" in printed and "| teacher" in printed


@pytest.mark.parametrize("extra, message", [
    (["--student", "/nonexistent/student"], "student folder"),
    (["--main-metric", "bleurt"], "unknown metric"),
    (["--split", "dev2"], "split 'dev2'"),
    (["--dataset-target-column", "missing"], "missing"),
    (["--max-eval-samples", "0"], "max-eval-samples"),
])
def test_cli_bad_input_returns_2(models, tmp_path, capsys, extra, message):
    teacher, student, _ = models
    data = tmp_path / "d.jsonl"
    _jsonl(data, [{"doc": t, "summ": t} for t in TEXTS])
    out = tmp_path / "out"
    argv = ["--teacher", teacher, "--student", student, "--dataset-local-path", str(data),
            "--dataset-input-column", "doc", "--dataset-target-column", "summ",
            "--output-dir", str(out), "--skip-speed"]
    # argparse keeps the last value of a repeated option, except --student which appends
    if extra[0] == "--student":
        argv = [a for a in argv if a != student]
        argv.remove("--student")
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_usage_error_returns_2(capsys):
    assert main(["--teacher", "x"]) == 2
    assert "required" in capsys.readouterr().err


def test_out_of_memory_becomes_user_error(models, tmp_path, monkeypatch):
    import distill.evaluate as evaluate

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "generate", oom)
    teacher, student, _ = models
    with pytest.raises(UserError, match="smaller --batch-size"):
        run_report(teacher, [student], TEXTS[:2], TEXTS[:2], str(tmp_path / "o"), **FAST)
    assert not (tmp_path / "o").exists()
