"""The teacher-vs-student report on tiny random models: files, keys, names, columns, examples,
bad input, the CLI.

No assertion looks at how fast anything is; the speed figures are only checked for presence,
sign and for being combined into ratios correctly.
"""
import json
import os

import pytest
import torch

from distill.errors import UserError
from distill.evaluate import format_table, main, parse_student, run_report
from distill.metrics import METRICS, SPEED_KEYS
from distill.report_files import name_models, pick_examples, plot_spec
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
    student = save_tiny_teacher(str(root / "bart-small"), "bart", TEXTS, vocab_size=300,
                                layers=1, seed=1)
    # a different family with its own tokenizer: each model must encode with its own
    t5 = save_tiny_teacher(str(root / "t5-small"), "t5", TEXTS, vocab_size=200, layers=1, seed=2)
    return teacher, student, t5


def test_report_files_and_keys(models, tmp_path):
    teacher, student, t5 = models
    out = tmp_path / "report"
    # one student by its folder, one by a given name
    report = run_report(teacher, [student, ("t5 baseline", t5)], TEXTS[:5], TEXTS[:5], str(out),
                        **FAST)

    assert set(report) >= {"main_metric", "speedup_b1", "speedup_b32", "quality_retention",
                           "headline_student", "models", "settings"}
    assert list(report["models"]) == ["teacher", "bart-small", "t5 baseline"]
    assert report["headline_student"] == "bart-small"
    assert [m["role"] for m in report["models"].values()] == ["teacher", "student", "student"]
    assert report["models"]["t5 baseline"]["path"] == t5
    assert report["main_metric"] == "bleu"  # targets as long as the sources
    for name, m in report["models"].items():
        for key in METRICS:
            assert 0.0 <= m[key] <= 100.0
        for key in SPEED_KEYS:  # num_beams=2: the beam latency is measured too
            assert m[key] is not None and m[key] > 0, (name, key)
        # the generation's own tensors count, not only the weights
        assert m["peak_memory_mb"] > m["weights_mb"], name
        assert m["parameters"] > 0 and m["size_on_disk_mb"] > 0
        assert m["latency_greedy_b1_p90_ms"] >= m["latency_greedy_b1_p50_ms"]
    t, s = report["models"]["teacher"], report["models"]["bart-small"]
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
    for name in ("teacher", "bart-small", "t5 baseline"):
        assert f"| {name} " in md and f"**{name}**" in md, name
    assert "student_2" not in md
    assert "# teacher vs bart-small, t5 baseline" in md and "greedy and beam 2" in md
    assert "bart-small vs teacher: speedup" in md
    png = (out / "quality_vs_speed.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("| model") and len(lines) == 5
    assert "beam2 b1 p50 ms" in lines[0] and "peak MB" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(report["models"])

    spec = plot_spec(report)
    assert [p["name"] for p in spec["points"]] == list(report["models"])
    assert [p["role"] for p in spec["points"]] == ["teacher", "student", "student"]
    for p, m in zip(spec["points"], report["models"].values()):
        assert p["label"].startswith(p["name"]) and f"{m['parameters'] / 1e6:.3g}M" in p["label"]
        assert p["x"] == m["throughput_samples_per_s"] and p["y"] == m["bleu"]
    best = max(m["bleu"] for m in report["models"].values())
    assert spec["ylim"][0] == 0.0 and best <= spec["ylim"][1] <= 105.0


def test_quality_retention_uses_main_metric(models, tmp_path):
    teacher, _, _ = models
    # the teacher compared with itself: same outputs, so every quality ratio is exactly 1; the
    # student's folder name is the teacher's name, so it gets a suffix (a paths-only call)
    report = run_report(teacher, [teacher], TEXTS[:4], TEXTS[:4], str(tmp_path / "r"),
                        main_metric="chrf", skip_speed=True, **FAST)
    assert list(report["models"]) == ["teacher", "teacher_2"]
    assert report["headline_student"] == "teacher_2"
    t, s = report["models"]["teacher"], report["models"]["teacher_2"]
    assert (t["role"], s["role"]) == ("teacher", "student")
    assert report["main_metric"] == "chrf"
    assert {k: t[k] for k in METRICS} == {k: s[k] for k in METRICS}
    assert report["quality_retention"] == (1.0 if t["chrf"] > 0 else None)
    assert report["speedup_b1"] is None and report["speedup_b32"] is None
    assert all(t[k] is None for k in SPEED_KEYS)  # keys kept, as null
    # all outputs agree on every row: the examples fall back to the first rows
    assert [ex["row"] for ex in report["examples"]] == [0, 1, 2]
    assert report["examples"][0]["outputs"]["teacher"] == report["examples"][0]["outputs"][
        "teacher_2"]
    assert (tmp_path / "r" / "quality_vs_speed.png").stat().st_size > 1000
    table = format_table(report)
    for header in ("greedy b1", "beam", "samples/s", "peak MB", "speedup"):
        assert header not in table, header  # nothing measured: no column
    assert "chrf" in table.splitlines()[0]
    # a random tiny teacher may write nothing: chrF 0, no ratio, so no column either
    assert ("quality kept" in table) == (t["chrf"] > 0)
    assert "not measured (--skip-speed)" in (tmp_path / "r" / "report.md").read_text()


def test_teacher_outputs_made_elsewhere_are_scored_without_loading_it(models, tmp_path, monkeypatch):
    """The trainer's report with a partitioned teacher: its outputs come in, the teacher is never
    loaded (quality from them, no speed, size from its config), the student is measured as usual."""
    import distill.evaluate as ev

    teacher, student, _ = models
    loaded = []
    real_load = ev._load
    monkeypatch.setattr(ev, "_load", lambda path, role, *a: loaded.append(role) or real_load(path, role, *a))
    refs = TEXTS[:4]
    given = [refs[0], refs[1], "something else", refs[3]]
    report = run_report(teacher, [student], TEXTS[:4], refs, str(tmp_path / "r"), main_metric="exact_match",
                        teacher_outputs=given, teacher_outputs_from="generated on 2 ranks", **FAST)
    assert loaded == ["student"]
    t = report["models"]["teacher"]
    assert t["exact_match"] == 75.0 and t["latency_greedy_b1_p50_ms"] is None and t["dtype"] is None
    from transformers import AutoModelForSeq2SeqLM
    assert t["parameters"] == sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(teacher).parameters())
    assert report["models"]["bart-small"]["latency_greedy_b1_p50_ms"] is not None
    assert report["speedup_b1"] is None and report["settings"]["teacher_outputs_from"] == "generated on 2 ranks"
    assert "The teacher's outputs were generated on 2 ranks" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(UserError, match="3 teacher outputs for 4 sources"):
        run_report(teacher, [student], TEXTS[:4], refs, str(tmp_path / "r2"), teacher_outputs=given[:3], **FAST)
    assert not (tmp_path / "r2").exists()


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


def test_given_names_must_differ(models, tmp_path):
    teacher, student, t5 = models
    out = tmp_path / "out"
    with pytest.raises(UserError, match="two models are named 'x'"):
        run_report(teacher, [("x", student), ("x", t5)], TEXTS[:2], TEXTS[:2], str(out), **FAST)
    with pytest.raises(UserError, match="two models are named 'teacher'"):
        run_report(teacher, [("teacher", student)], TEXTS[:2], TEXTS[:2], str(out), **FAST)
    with pytest.raises(UserError, match="student name is ' '"):
        run_report(teacher, [(" ", student)], TEXTS[:2], TEXTS[:2], str(out), **FAST)
    assert not out.exists()


def test_folder_names_are_made_unique():
    named = name_models("hub/bart", "big", ["runs/a/model", "runs/b/model/", ("model_2", "c"),
                                            "runs/big", "~/x/model"])
    assert named == [("big", "teacher", "hub/bart"), ("model", "student", "runs/a/model"),
                     ("model_3", "student", "runs/b/model/"), ("model_2", "student", "c"),
                     ("big_2", "student", "runs/big"), ("model_4", "student", "~/x/model")]


def test_parse_student(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    odd = tmp_path / "lr=1e-4"  # '=' in a folder's name: an existing folder is taken as is
    odd.mkdir()
    assert parse_student(str(plain)) == str(plain)
    assert parse_student(str(odd)) == str(odd)
    assert parse_student(f"distilled={plain}") == ("distilled", str(plain))
    assert parse_student(f" kd ={odd}") == ("kd", str(odd))
    with pytest.raises(UserError, match="student folder '.*missing' \\(named 'kd'\\) not found"):
        parse_student(f"kd={tmp_path / 'missing'}")
    with pytest.raises(UserError, match="student folder '.*missing' not found"):
        parse_student(str(tmp_path / "missing"))


def test_examples_are_rows_where_models_differ():
    refs = ["a", "b", "c", "d", "e", "f"]
    preds = {"teacher": ["a", "b", "x", "d", "e", "f"],
             "kd": ["a", "y", "x", "d ", "z", "f"],
             "ce": ["a", "b", "w", "d", "e", "q"]}
    # rows 1, 4, 5 differ with some model right; row 2 differs with all wrong; 0 and 3 agree
    # (3 only after stripping)
    assert pick_examples(refs, preds) == [1, 4, 5]
    assert pick_examples(refs, preds, k=5) == [1, 4, 5, 2, 0]
    assert pick_examples(refs, {"teacher": refs, "kd": list(refs)}) == [0, 1, 2]  # all agree
    assert pick_examples(refs[:2], {"teacher": refs[:2]}, k=3) == [0, 1]


def _fake_report(**figures):
    model = dict(parameters=2_000_000, size_on_disk_mb=8.0, rougeLsum=30.0, **dict.fromkeys(
        SPEED_KEYS), speedup_b1=None, speedup_b32=None, quality_retention=None)
    return {"main_metric": "rougeLsum", "settings": {"num_beams": 1, "batch_size": 32},
            "models": {"teacher": dict(model, role="teacher"),
                       "kd|small": dict(model, role="student", **figures)}}


def test_table_drops_columns_with_nothing_measured():
    bare = format_table(_fake_report()).splitlines()[0]
    assert [c.strip() for c in bare.strip("|").split("|")] == [
        "model", "params (M)", "disk MB", "rougeLsum"]
    # one model measured is enough to keep a column; the other shows "-"
    table = format_table(_fake_report(peak_memory_mb=12.5, quality_retention=0.9))
    header = table.splitlines()[0]
    assert "peak MB" in header and "quality kept" in header and "beam" not in header
    assert "12.5" in table and "90.0%" in table and "kd\\|small" in table


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_on_jsonl(models, tmp_path, capsys):
    teacher, student, _ = models
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", [{"doc": t, "summ": t[:20]} for t in TEXTS[:20]])
    _jsonl(data / "test.jsonl", [{"doc": t, "summ": t[:20]} for t in TEXTS[20:26]])
    out = tmp_path / "out"
    code = main(["--teacher", teacher, "--student", f"distilled={student}", "--student", student,
                 "--dataset-local-path", str(data),
                 "--dataset-input-column", "doc", "--dataset-target-column", "summ",
                 "--output-dir", str(out), "--max-eval-samples", "4", "--max-new-tokens", "6",
                 "--batch-size", "4", "--num-beams", "1", "--speed-repeats", "1",
                 "--main-metric", "rouge1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "distilled", "bart-small"]
    assert report["headline_student"] == "distilled"
    assert report["settings"]["n_samples"] == 4 and report["main_metric"] == "rouge1"
    # the same weights twice: all agree, so the examples are the first rows of the test split
    assert report["examples"][0]["source"] == TEXTS[20]
    assert report["examples"][0]["row"] == 0
    assert set(report["examples"][0]["outputs"]) == {"teacher", "distilled", "bart-small"}
    # greedy only: the beam keys stay in report.json as null, the column goes
    for m in report["models"].values():
        assert m["latency_beam_b1_p50_ms"] is None and m["latency_greedy_b1_p50_ms"] > 0
    printed = capsys.readouterr().out
    assert "split 'test'" in printed
    for name in ("| teacher", "| distilled", "| bart-small"):
        assert name in printed, name
    assert "greedy b1 p50 ms" in printed and "beam" not in printed
    md = (out / "report.md").read_text()
    assert "beam1" not in md and "greedy only" in md and "**distilled**" in md


@pytest.mark.parametrize("extra, message", [
    (["--student", "/nonexistent/student"], "student folder"),
    (["--student", "kd=/nonexistent/student"], "student folder '/nonexistent/student' (named 'kd')"),
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


def test_size_on_disk_counts_the_model_not_its_checkpoints(tmp_path):
    from distill.evaluate import _size_on_disk

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000001" / "mp_rank_00_model_states.pt").write_bytes(b"y" * 5000)
    assert _size_on_disk(str(tmp_path)) == 1000
