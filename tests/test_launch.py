"""launch.sh: presets -> the exact command, per launcher branch, checked through --dry-run."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
TEACHERS = {  # preset -> (hub id, model type, student encoder layers, student decoder layers, trained on)
    "bart-base": ("facebook/bart-base", "bart", "6", "3", ""),
    "bart-large": ("facebook/bart-large", "bart", "12", "6", ""),
    "bart-large-cnn": ("facebook/bart-large-cnn", "bart", "12", "6", "cnn_dailymail"),
    "bart-large-xsum": ("facebook/bart-large-xsum", "bart", "12", "6", "xsum"),
    "bart-large-cnn-samsum": ("philschmid/bart-large-cnn-samsum", "bart", "12", "6", "samsum"),
    "t5-small": ("google-t5/t5-small", "t5", "6", "3", "cnn_dailymail wmt16-ro-en"),
    "t5-base": ("google-t5/t5-base", "t5", "12", "6", "cnn_dailymail wmt16-ro-en"),
    "t5-large": ("google-t5/t5-large", "t5", "24", "12", "cnn_dailymail wmt16-ro-en"),
    "flan-t5-small": ("google/flan-t5-small", "t5", "8", "4", "samsum cnn_dailymail xsum wmt16-ro-en"),
    "flan-t5-base": ("google/flan-t5-base", "t5", "12", "6", "samsum cnn_dailymail xsum wmt16-ro-en"),
    "flan-t5-large": ("google/flan-t5-large", "t5", "24", "12", "samsum cnn_dailymail xsum wmt16-ro-en"),
    "flan-t5-base-samsum": ("philschmid/flan-t5-base-samsum", "t5", "12", "6", "samsum"),
}
DATASETS = {  # preset -> (hub name, input column, target column, T5 prefix)
    "samsum": ("knkarthick/samsum", "dialogue", "summary", "summarize: "),
    "cnn_dailymail": ("cnn_dailymail:3.0.0", "article", "highlights", "summarize: "),
    "xsum": ("EdinburghNLP/xsum", "document", "summary", "summarize: "),
    "wmt16-ro-en": ("wmt16:ro-en", "translation.en", "translation.ro", "translate English to Romanian: "),
}


def launch(*args, cwd=None, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("NUM_GPUS", "CPU_RANKS", "CUDA_VISIBLE_DEVICES", "PYTHON", "DEEPSPEED", "HOSTFILE")}
    base.setdefault("NUM_GPUS", "0")
    base.update(env)
    return subprocess.run(["bash", LAUNCH, *args], capture_output=True, text=True, env=base,
                          cwd=cwd or ROOT, timeout=60)


def words(printed: str) -> list[str]:
    """Split a dry-run line the way bash would, proving the quoting is exact (nothing runs)."""
    assert len(printed.strip().splitlines()) == 1, printed  # eval would run a second line
    out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", printed.strip()],
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def flag(argv: list[str], name: str) -> str:
    """The value of the last occurrence of `name` (argparse keeps the last)."""
    idx = [i for i, a in enumerate(argv) if a == name]
    assert idx, f"{name} missing from {argv}"
    return argv[idx[-1] + 1]


@pytest.mark.parametrize("preset", sorted(TEACHERS))
def test_teacher_presets(preset):
    hub, kind, enc, dec, _ = TEACHERS[preset]
    res = launch(preset, "samsum", "--dry-run", "--no-finetune-teacher")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1  # one stage
    argv = words(res.stdout)
    assert argv[:2] == ["python", os.path.join(ROOT, "distill", "train.py")]
    assert flag(argv, "--teacher") == hub
    assert flag(argv, "--model-type") == kind
    assert flag(argv, "--num-encoder-layers") == enc and flag(argv, "--num-decoder-layers") == dec
    assert flag(argv, "--deepspeed") == os.path.join(ROOT, "ds_configs", "zero2.json")
    assert flag(argv, "--output-dir") == f"./runs/{preset}-samsum"
    if kind == "t5":
        assert flag(argv, "--source-prefix") == "summarize: "
        assert int(flag(argv, "--max-source-length")) <= 512
    else:
        assert "--source-prefix" not in argv  # BART was never trained with task prefixes


@pytest.mark.parametrize("preset", sorted(TEACHERS))
@pytest.mark.parametrize("dataset", ["samsum", "cnn_dailymail", "xsum", "wmt16-ro-en"])
def test_a_teacher_not_trained_on_the_dataset_is_fine_tuned_first(preset, dataset):
    hub, kind, enc, dec, trained_on = TEACHERS[preset]
    lines = launch(preset, dataset, "--dry-run", "--max-steps", "7").stdout.splitlines()
    if dataset in trained_on.split():
        assert len(lines) == 1 and "--teacher-local-path" not in words(lines[0])
        return
    assert len(lines) == 2
    tune, distill = words(lines[0]), words(lines[1])
    teacher_enc, teacher_dec = {"6": "6-6", "12": "12-12", "24": "24-24"}[enc].split("-")
    if preset.startswith("flan-t5-small"):
        teacher_enc = teacher_dec = "8"
    assert flag(tune, "--teacher") == hub and flag(tune, "--alpha") == "1"
    assert (flag(tune, "--num-encoder-layers"), flag(tune, "--num-decoder-layers")) == (teacher_enc, teacher_dec)
    assert flag(tune, "--learning-rate") == ("3e-5" if kind == "bart" else "3e-4")
    assert flag(tune, "--output-dir") == f"./runs/{preset}-{dataset}-teacher" and "--resume" in tune
    assert flag(tune, "--max-steps") == "7"  # the user's flags reach both stages
    assert flag(distill, "--teacher-local-path") == f"./runs/{preset}-{dataset}-teacher"
    assert flag(distill, "--num-decoder-layers") == dec and "--alpha" not in distill
    assert flag(distill, "--output-dir") == f"./runs/{preset}-{dataset}"


@pytest.mark.parametrize("preset", sorted(DATASETS))
def test_dataset_presets(preset):
    hub, source, target, prefix = DATASETS[preset]
    argv = words(launch("flan-t5-small", preset, "--dry-run").stdout)
    assert flag(argv, "--dataset") == hub
    assert flag(argv, "--dataset-input-column") == source
    assert flag(argv, "--dataset-target-column") == target
    assert flag(argv, "--source-prefix") == prefix
    assert int(flag(argv, "--max-target-length")) > 0
    assert flag(argv, "--output-dir") == f"./runs/flan-t5-small-{preset}"


def test_gpu_branch_uses_deepspeed_with_the_gpu_count():
    argv = words(launch("bart-large-xsum", "xsum", "--dry-run", NUM_GPUS="4").stdout)
    assert argv[:4] == ["deepspeed", "--num_gpus", "4", os.path.join(ROOT, "distill", "train.py")]


def test_cpu_branch_one_rank_is_plain_python_and_more_ranks_use_deepspeed():
    assert words(launch("bart-large-xsum", "xsum", "--dry-run", NUM_GPUS="0").stdout)[0] == "python"
    argv = words(launch("bart-large-xsum", "xsum", "--dry-run", NUM_GPUS="0", CPU_RANKS="2").stdout)
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"]


def test_gpus_counted_with_nvidia_smi_and_cuda_visible_devices(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: a)'\necho 'GPU 1: Fake (UUID: b)'\n")
    fake.chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    argv = words(launch("t5-base", "cnn_dailymail", "--dry-run", NUM_GPUS="", PATH=path).stdout)
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"]
    # A CUDA_VISIBLE_DEVICES choice is left to deepspeed, which ignores it under --num_gpus.
    argv = words(launch("t5-base", "cnn_dailymail", "--dry-run", NUM_GPUS="", PATH=path,
                        CUDA_VISIBLE_DEVICES="1").stdout)
    assert argv[0] == "deepspeed" and "--num_gpus" not in argv
    argv = words(launch("t5-base", "cnn_dailymail", "--dry-run", NUM_GPUS="", PATH=path,
                        CUDA_VISIBLE_DEVICES="").stdout)
    assert argv[0] == "python"


def test_extra_flags_pass_through_last_and_win():
    argv = words(launch("bart-large-cnn", "cnn_dailymail", "--num-decoder-layers", "2",
                        "--output-dir", "runs/mine", "--dry-run", "--alpha", "0.7").stdout)
    assert argv[-6:] == ["--num-decoder-layers", "2", "--output-dir", "runs/mine", "--alpha", "0.7"]
    assert flag(argv, "--num-decoder-layers") == "2" and flag(argv, "--output-dir") == "runs/mine"
    assert "--dry-run" not in argv


def test_hostile_arguments_stay_literal_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    nasty = [f"$(touch {marker})", f"`touch {marker}`", f"a b; touch {marker}", "it's \"quoted\"",
             "*", "--x=$HOME"]
    res = launch("flan-t5-small", "samsum", "--dry-run", "--source-prefix", *nasty)
    assert res.returncode == 0, res.stderr
    argv = words(res.stdout)
    assert argv[-len(nasty) - 1:] == ["--source-prefix", *nasty]
    assert not marker.exists()


def test_local_teacher_and_dataset_with_spaces(tmp_path):
    teacher = tmp_path / "my teacher $(x)"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 4}))
    data = tmp_path / "my data.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n')
    res = launch(str(teacher), str(data), "--dry-run", "--dataset-input-column", "text")
    assert len(res.stdout.splitlines()) == 1  # a local teacher is taken as fine-tuned
    argv = words(res.stdout)
    assert flag(argv, "--teacher-local-path") == str(teacher)
    assert flag(argv, "--model-type") == "t5"
    assert flag(argv, "--dataset-local-path") == str(data)
    assert flag(argv, "--dataset-input-column") == "text"
    assert flag(argv, "--output-dir") == "./runs/my teacher $(x)-my data"
    assert "--teacher" not in argv and "--dataset" not in argv
    assert "--num-decoder-layers" not in argv  # train.py's default student shape
    # --finetune-teacher fine-tunes it anyway, at its own depth read from its config
    tune = words(launch(str(teacher), str(data), "--dry-run", "--finetune-teacher").stdout.splitlines()[0])
    assert (flag(tune, "--num-encoder-layers"), flag(tune, "--num-decoder-layers")) == ("4", "4")


@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON that records each call's arguments and exits with the code FAKE_RC_<n> asks."""
    log = tmp_path / "calls"
    script = tmp_path / "python"
    script.write_text("#!/bin/bash\nn=$(( $(cat " + f"'{log}.n'" + " 2>/dev/null || echo 0) + 1 ))\n"
                      "echo $n > " + f"'{log}.n'" + "\nprintf '%s\\0' \"$@\" >> " + f"'{log}'" + "\necho >> " + f"'{log}'" + "\n"
                      'rc_var=FAKE_RC_$n; exit "${!rc_var:-0}"\n')
    script.chmod(0o755)

    def calls():
        if not log.exists():
            return []
        return [c.split("\0") for c in log.read_text().split("\0\n") if c]

    return str(script), calls


def test_stages_run_in_order_after_one_preflight_each(fake_python, tmp_path):
    python, calls = fake_python
    res = launch("bart-base", "samsum", "--output-dir", str(tmp_path / "run"), PYTHON=python)
    assert res.returncode == 0, res.stderr
    got = calls()
    assert [c[:2] for c in got] == [["-m", "distill.preflight"], ["-m", "distill.preflight"],
                                    [os.path.join(ROOT, "distill", "train.py"), "--deepspeed"],
                                    [os.path.join(ROOT, "distill", "train.py"), "--deepspeed"]]
    assert flag(got[2], "--alpha") == "1" and flag(got[3], "--teacher-local-path") == str(tmp_path / "run") + "-teacher"
    assert "stage 1/2: fine-tuning the teacher on samsum" in res.stderr


def test_a_failed_stage_or_preflight_stops_the_launch(fake_python, tmp_path):
    python, calls = fake_python
    res = launch("bart-base", "samsum", "--output-dir", str(tmp_path / "run"), PYTHON=python, FAKE_RC_3="5")
    assert res.returncode == 5 and len(calls()) == 3  # the fine-tune failed: no distill stage
    (tmp_path / "calls").unlink()
    (tmp_path / "calls.n").unlink()
    res = launch("bart-base", "samsum", "--output-dir", str(tmp_path / "run"), PYTHON=python, FAKE_RC_1="2")
    assert res.returncode == 2 and len(calls()) == 1  # bad options: no rank was started


def test_a_completed_fine_tuned_teacher_is_reused(fake_python, tmp_path):
    python, calls = fake_python
    done = tmp_path / "run-teacher"
    done.mkdir()
    (done / "model.safetensors").write_text("x")
    (done / "distill_config.json").write_text("{}")
    res = launch("bart-base", "samsum", "--output-dir", str(tmp_path / "run"), PYTHON=python)
    assert res.returncode == 0 and len(calls()) == 2  # preflight + distill
    assert flag(calls()[1], "--teacher-local-path") == str(done) and "reusing it" in res.stderr


@pytest.mark.parametrize("args,known", [(("gpt-5", "samsum"), "flan-t5-large"),
                                        (("bart-base", "imdb"), "wmt16-ro-en")])
def test_unknown_preset_lists_the_known_ones(args, known):
    res = launch(*args, "--dry-run")
    assert res.returncode == 2
    unknown = args[0] if args[0] == "gpt-5" else args[1]
    assert f"unknown {'teacher' if unknown == 'gpt-5' else 'dataset'} '{unknown}'" in res.stderr
    assert known in res.stderr and res.stdout == ""


def test_one_positional_argument_is_an_error():
    res = launch("bart-base")
    assert res.returncode == 2 and "TEACHER DATASET" in res.stderr


def test_hostfile_runs_deepspeeds_multi_node_launcher(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two machines\nnode-a slots=8\n\nnode-b slots=8\n")
    argv = words(launch("bart-large-xsum", "xsum", "--dry-run", NUM_GPUS="8", HOSTFILE=str(hosts)).stdout)
    assert argv[:4] == ["deepspeed", "--hostfile", str(hosts), os.path.join(ROOT, "distill", "train.py")]


@pytest.mark.parametrize("content,message", [
    (None, "is not a file"), ("node-a\n", "has no slots=N"), ("# nothing\n", "lists no host")])
def test_bad_hostfile_is_a_one_line_error(tmp_path, content, message):
    hosts = tmp_path / "hosts"
    if content is not None:
        hosts.write_text(content)
    res = launch("bart-base", "xsum", "--dry-run", HOSTFILE=str(hosts))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_gpu_and_rank_counts_are_refused():
    assert launch("bart-base", "xsum", "--dry-run", NUM_GPUS="two").returncode == 2
    assert launch("bart-base", "xsum", "--dry-run", CPU_RANKS="0").returncode == 2


def test_help_lists_presets_and_options():
    res = launch("--help")
    assert res.returncode == 0
    for name in [*TEACHERS, *DATASETS, "--dry-run", "NUM_GPUS", "CPU_RANKS", "HOSTFILE", "--smoke"]:
        assert name in res.stdout


def test_no_arguments_runs_the_demo_and_passes_flags(tmp_path):
    argv = words(launch("--dry-run", cwd=tmp_path).stdout)
    assert argv == ["python", "-m", "distill.demo"]
    argv = words(launch("--smoke", "--cache-dir", "a b", "--dry-run").stdout)
    assert argv == ["python", "-m", "distill.demo", "--smoke", "--cache-dir", "a b"]
