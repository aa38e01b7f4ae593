"""The demo's generated task (deterministic, well-formed, no leakage) and its end-to-end smoke run."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from distill import demo, demo_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def make(tmp_path, name, seed):
    return demo_task.make_task(str(tmp_path / name), seed=seed, n_train=300, n_validation=40, n_test=60)


def test_same_seed_same_files_and_another_seed_differs(tmp_path):
    a, b, c = make(tmp_path, "a", 3), make(tmp_path, "b", 3), make(tmp_path, "c", 4)
    for split in ("train", "validation", "test"):
        with open(a[split], "rb") as fa, open(b[split], "rb") as fb, open(c[split], "rb") as fc:
            first = fa.read()
            assert first == fb.read()
            assert first != fc.read()


def test_split_sizes_and_fields(tmp_path):
    paths = make(tmp_path, "t", 0)
    assert sorted(paths) == ["test", "train", "validation"]
    sizes = {split: len(read(path)) for split, path in paths.items()}
    assert sizes == {"train": 300, "validation": 40, "test": 60}
    for row in read(paths["train"]):
        assert set(row) == {"source", "target"}


def test_references_are_spoken_words(tmp_path):
    rows = [r for p in make(tmp_path, "t", 1).values() for r in read(p)]
    for row in rows:
        assert re.search(r"\d", row["source"]), row  # every sentence has something to normalise
        assert not re.search(r"[\d$€£%°/:]", row["target"]), row  # ... and all of it was written out
        assert row["target"].endswith(".") and row["target"][0].isupper()
        assert "  " not in row["target"]


def test_no_source_repeats_within_or_across_splits(tmp_path):
    paths = make(tmp_path, "t", 2)
    sources = {split: [r["source"] for r in read(p)] for split, p in paths.items()}
    everything = sum(sources.values(), [])
    assert len(set(everything)) == len(everything)
    assert not set(sources["train"]) & set(sources["test"])


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty-two"),
    (100, "one hundred"), (105, "one hundred and five"), (999, "nine hundred and ninety-nine"),
    (1000, "one thousand"), (1005, "one thousand and five"), (2300, "two thousand three hundred"),
    (9071, "nine thousand and seventy-one"), (4510, "four thousand five hundred and ten")])
def test_cardinal(n, words):
    assert demo_task.cardinal(n) == words


@pytest.mark.parametrize("n,words,written", [
    (1, "first", "1st"), (2, "second", "2nd"), (3, "third", "3rd"), (4, "fourth", "4th"),
    (11, "eleventh", "11th"), (12, "twelfth", "12th"), (13, "thirteenth", "13th"),
    (20, "twentieth", "20th"), (21, "twenty-first", "21st"), (32, "thirty-second", "32nd"),
    (58, "fifty-eighth", "58th"), (99, "ninety-ninth", "99th")])
def test_ordinal(n, words, written):
    assert demo_task.ordinal(n) == words and demo_task.ordinal_suffix(n) == written


@pytest.mark.parametrize("y,words", [
    (1950, "nineteen fifty"), (1905, "nineteen oh five"), (1999, "nineteen ninety-nine"),
    (2000, "two thousand"), (2007, "two thousand and seven"), (2010, "twenty ten"),
    (2024, "twenty twenty-four")])
def test_year(y, words):
    assert demo_task.year(y) == words


def test_decimal_clock_and_a_whole_sentence():
    assert demo_task.decimal("3.05") == "three point zero five"
    assert demo_task.decimal("12") == "twelve"
    assert demo_task.clock(9, 0) == "nine o'clock" and demo_task.clock(9, 5) == "nine oh five"
    assert demo_task.clock(14, 30) == "fourteen thirty"
    rng = random.Random(0)
    examples = [demo_task.make_example(rng) for _ in range(2000)]
    parcel = [e for e in examples if e["source"].startswith("The parcel weighs 1 kg ")]
    for e in parcel:  # exactly one takes the singular
        assert e["target"].startswith("The parcel weighs one kilogram and ships on the ")


def test_cached_teacher_is_reused_without_training(tmp_path, monkeypatch):
    sizes = dict(demo.SMOKE)
    cached = tmp_path / "cache" / f"teacher-{demo._teacher_key(sizes, 0)}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "_train", lambda *a, **k: pytest.fail("trained despite the cache"))
    got = demo.get_teacher(str(tmp_path / "task"), str(tmp_path / "cache"), sizes, 0, force=False,
                           log=lambda *_: None)
    assert got == str(cached)
    # Another recipe (seed, sizes) must not hit this cache entry.
    assert demo._teacher_key(sizes, 1) != demo._teacher_key(sizes, 0)
    assert demo._teacher_key(dict(sizes, teacher_steps=31), 0) != demo._teacher_key(sizes, 0)
    # ... but the students' settings do not concern the teacher.
    assert demo._teacher_key(dict(sizes, student_steps=99, alpha=0.1), 0) == demo._teacher_key(sizes, 0)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    assert demo.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv(demo.CACHE_ENV)
    assert demo.default_cache_dir().endswith(os.path.join(".cache", "seq2seq-distill"))


def test_missing_teacher_folder_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = demo.main(["--teacher-local-path", str(tmp_path / "nope"), "--output-dir", str(out),
                      "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --teacher-local-path") and err.count("\n") == 1
    assert not out.exists()


def test_a_failed_training_run_ends_the_demo_with_its_exit_code(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise demo._StageFailed(2)

    monkeypatch.setattr(demo, "_train", failing)
    code = demo.main(["--smoke", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    assert not [p for p in os.listdir(tmp_path / "c") if not p.endswith(".partial")]  # nothing cached


def test_a_signal_between_training_runs_stops_the_demo_with_one_line(tmp_path, monkeypatch, capsys):
    import signal

    def task_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the demo makes the task

    monkeypatch.setattr(demo, "make_task", task_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert demo.main(["--smoke", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted by SIGTERM while generating the text-normalisation task")
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_check_targets_reports_each_promise():
    def report(teacher, student, ce, b1, b32):
        return {"main_metric": "exact_match", "speedup_b1": b1, "speedup_b32": b32,
                "quality_retention": student / teacher,
                "models": {"teacher": {"exact_match": teacher}, "distilled": {"exact_match": student},
                           "CE-only": {"exact_match": ce}}}

    assert all(ok for _, ok in demo.check_targets(report(95.0, 93.5, 90.0, 3.5, 3.0), "distilled", "CE-only"))
    missed = [ok for _, ok in demo.check_targets(report(85.0, 70.0, 75.0, 2.5, 1.5), "distilled", "CE-only")]
    assert missed == [False, False, False, False]
    # each promise on its own edge: retention 97.9%, speedup 2.9x at b32, a gain of 2.9 points
    edges = [ok for _, ok in demo.check_targets(report(95.0, 93.0, 90.1, 3.5, 2.9), "distilled", "CE-only")]
    assert edges == [True, False, False, False]
    # served alike (both in CTranslate2): the speed promise is judged on that pair when measured
    served = dict(report(95.0, 93.5, 90.0, 2.5, 2.9), settings={"runtime_threads": 1}, same_runtime=[
        {"runtime": "ct2", "student": "distilled [ct2]", "teacher": "teacher [ct2]", "speedup_b1": 3.4,
         "speedup_b32": 3.1}])
    lines = demo.check_targets(served, "distilled", "CE-only", "distilled [ct2]")
    assert lines[1] == ("student greedy speedup served alike (ct2, 1 thread each): b1 3.40x, b32 3.10x >= 3x", True)
    served["same_runtime"][0]["speedup_b32"] = 2.9
    assert not demo.check_targets(served, "distilled", "CE-only", "distilled [ct2]")[1][1]
    # not measured (ctranslate2 missing): PyTorch's figures, named as such
    assert demo.check_targets(served, "distilled", "CE-only", "other")[1] == (
        "student greedy speedup in transformers' generate: b1 2.50x, b32 2.90x >= 3x", False)


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    """`python -m distill.demo --smoke` from nothing: teacher, two students, report."""
    env = dict(os.environ, HOME=str(tmp_path), HF_HUB_OFFLINE="1",
               SEQ2SEQ_DISTILL_CACHE=str(tmp_path / "cache"))
    # Keep DeepSpeed's compiled ops where they are: a new HOME would rebuild them (minutes).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "distill.demo", "--smoke", "--output-dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    for key in ("speedup_b1", "speedup_b32", "quality_retention", "models"):
        assert key in report
    # the distilled student and the teacher are also served alike (CTranslate2, parity-checked)
    assert set(report["models"]) == {"teacher", "distilled", "CE-only (teacher init)", "distilled [ct2]",
                                     "teacher [ct2]"}
    assert [p["student"] for p in report["same_runtime"]] == ["distilled [ct2]"]
    assert report["settings"]["runtime_threads"] == demo.SERVE_THREADS
    assert os.listdir(tmp_path / "cache")  # the teacher was cached for the next run
    assert not [p for p in os.listdir(tmp_path / "cache") if os.path.isdir(tmp_path / "cache" / p / "runtime")]
    # Only the task, the teacher's outputs and its export, the two students and the report are left.
    assert sorted(p for p in os.listdir(out) if os.path.isdir(out / p)) == [
        "student-ce-only", "student-distilled", "task", "teacher-outputs", "teacher-runtime"]
    assert os.listdir(out / "student-distilled" / "runtime") == ["ct2"]
    # Each stage says what it did: both students start from the teacher's layers; the distilled
    # one trains on the teacher's outputs for every input, the CE-only one on the labeled rows.
    log = res.stdout
    assert log.count("copied teacher layers") == 4  # both students: encoder + decoder
    assert log.count("student initialised at random: --student-init random") == 1  # the teacher
    sizes = demo.SMOKE
    assert "rows with the teacher's outputs as targets" in log
    with open(out / "student-ce-only" / "distill_config.json", encoding="utf-8") as f:
        assert json.load(f)["max_train_samples"] == sizes["labeled_rows"]
    # Not a terminal: the loop's progress is plain lines on stdout, no bar (distill/run_log.py).
    bars = [line for line in re.split(r"[\r\n]", res.stdout) if "train (labels only)" in line]
    assert bars and not any("kl=" in line for line in bars)
    card = (out / "student-ce-only" / "README.md").read_text()
    assert "labels only" in card and "Distilled" not in card
    assert "Distilled" in (out / "student-distilled" / "README.md").read_text()


def test_noise_corrupts_that_share_of_train_references_in_one_slot_and_leaves_test_clean(tmp_path):
    clean = demo_task.make_task(str(tmp_path / "clean"), seed=5, n_train=600, n_validation=60, n_test=60)
    noisy = demo_task.make_task(str(tmp_path / "noisy"), seed=5, n_train=600, n_validation=60, n_test=60,
                                noise=0.3)
    with open(clean["test"], "rb") as a, open(noisy["test"], "rb") as b:
        assert a.read() == b.read()  # the test measures the task, not the annotators
    a, b = read(clean["train"]), read(noisy["train"])
    assert [r["source"] for r in a] == [r["source"] for r in b]
    changed = [(x["target"], y["target"]) for x, y in zip(a, b) if x["target"] != y["target"]]
    assert 0.22 * len(a) < len(changed) < 0.38 * len(a)
    kinds = set()
    for ref, bad in changed:
        if re.search(r"\d", bad):
            kinds.add("unnormalised")
        elif any(bad.split() == ref.split()[:i] + ref.split()[i + 1:]
                 for i, w in enumerate(ref.split()) if w == "and" and i and ref.split()[i - 1] in ("hundred", "thousand")):
            kinds.add("no_and")
        else:
            kinds.add("slip")
            # one word differs (a hyphenated number counts as its parts)
            diff = [p for p, q in zip(ref.replace("-", " ").split(), bad.replace("-", " ").split()) if p != q]
            assert len(diff) == 1, (ref, bad)
    assert kinds == set(demo_task.NOISE_KINDS)
    with pytest.raises(ValueError, match="noise"):
        demo_task.make_task(str(tmp_path / "x"), noise=1.0)


def test_compare_summary_means_spreads_and_gains():
    from distill import demo_compare

    runs = {"teacher": 98.0, "ce-seed0": 90.0, "ce-seed1": 91.0, "ce-seed2": 89.0,
            "kd-seed0": 95.0, "kd-seed1": 94.0, "kd-seed2": 96.0}
    result = demo_compare.summarize(runs, ["ce", "kd"], [0, 1, 2])
    ce, kd = result["methods"]["ce"], result["methods"]["kd"]
    assert (ce["mean"], ce["spread"], kd["mean"], kd["spread"]) == (90.0, 2.0, 95.0, 2.0)
    assert kd["gain_over_ce"] == 5.0 and kd["gain_exceeds_spread"]  # 5 > 2 + 2
    close = demo_compare.summarize(dict(runs, **{"kd-seed0": 91.0, "kd-seed1": 92.0, "kd-seed2": 93.0}),
                                   ["ce", "kd"], [0, 1, 2])
    assert not close["methods"]["kd"]["gain_exceeds_spread"]  # +2 is within the spreads
    table = demo_compare.format_compare(result)
    assert "+5.0 (beyond spread)" in table and "96.9%" in table  # 95 / 98
    with pytest.raises(Exception, match="unknown method"):
        demo_compare.parse_methods("ce,magic")
    assert demo_compare.parse_seeds("3, 4") == [3, 4]


def test_compare_trains_each_method_and_seed_with_its_options_and_scarce_labels(tmp_path, monkeypatch):
    from distill import demo_compare, evaluate

    calls = []

    def fake_train(teacher, task, folder, layers, **options):
        calls.append((os.path.basename(folder), options))

    def fake_report(teacher, students, sources, references, out, **kw):
        return {"models": {"teacher": {"exact_match": 90.0},
                           **{name: {"exact_match": 80.0 + len(name)} for name, _ in students}}}

    monkeypatch.setattr(evaluate, "run_report", fake_report)
    monkeypatch.setattr(demo_compare, "make_pseudo_labels", lambda *a, **k: "/pseudo")
    budget = dict(steps=10, lr=1e-3, rows=640, sizes={})
    result = demo_compare.run_compare(fake_train, "/teacher", "/task", str(tmp_path), [{"source": "a", "target": "b"}],
                                      layers=(2, 1), budget=budget, methods=["ce", "seq_kd"], seeds=[0, 1],
                                      max_len=8, labeled_rows=64, log=lambda *_: None)
    by_folder = dict(calls)
    assert sorted(by_folder) == ["ce-seed0-labels64", "ce-seed1-labels64", "seq_kd-seed0-labels64",
                                 "seq_kd-seed1-labels64"]
    # references only for the labeled rows; the teacher's outputs for every training input
    assert by_folder["ce-seed0-labels64"]["max_train_samples"] == 64
    assert by_folder["seq_kd-seed1-labels64"]["pseudo_labels"] == "/pseudo"
    assert "max_train_samples" not in by_folder["seq_kd-seed1-labels64"] or \
        by_folder["seq_kd-seed1-labels64"]["max_train_samples"] == 640
    assert by_folder["seq_kd-seed1-labels64"]["seed"] == 1 and by_folder["ce-seed0-labels64"]["alpha"] == 1.0
    assert result["labeled_rows"] == 64 and (tmp_path / "compare-labels64.md").is_file()


@pytest.mark.parametrize("value", ["x", "0", "-3", "99999"])
def test_bad_labeled_rows_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, value):
    out = tmp_path / "out"
    code = demo.main(["--labeled-rows", value, "--output-dir", str(out), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --labeled-rows {value}") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "c").exists()


def test_labeled_rows_values():
    assert demo.parse_labeled_rows(None, demo.FULL) == demo.FULL["labeled_rows"]
    assert demo.parse_labeled_rows("all", demo.FULL) == demo.ALL_LABELED
    assert demo.parse_labeled_rows("500", demo.FULL) == 500


def test_served_alike_is_skipped_with_a_line_without_ctranslate2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # not installed
    lines = []
    assert demo.export_served("teacher", "student", str(tmp_path), str(tmp_path), log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("served speed not measured: the ct2 runtime needs")
    assert "pip install ctranslate2" in lines[0] and not os.listdir(tmp_path)  # nothing written
