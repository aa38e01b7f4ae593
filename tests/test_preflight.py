"""Option checks before any rank starts work: once per job, in a fraction of a second, no torch."""
import os
import subprocess
import sys

import pytest

from distill import preflight
from distill.train import main
from launch_env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(workspace, out, *extra):
    return ["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out, "--max-steps", "2", "--skip-report", *extra]


def test_help_is_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["--help"]) == 0
    assert "--num-encoder-layers" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--teacher-local-path", "/nonexistent/teacher"], "/nonexistent/teacher"),
    (["--alpha", "2"], "--alpha 2.0"),
])
def test_option_errors_are_printed_by_rank_0_only(workspace, tmp_path, monkeypatch, capsys, extra, needle):
    out = str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(_argv(workspace, out, *extra)) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(_argv(workspace, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("extra, world, needle", [
    (["--custom-tokenizer-local-path", "/nonexistent/tok"], 1, "/nonexistent/tok"),
    (["--dataset-local-path", "/nonexistent/data.jsonl"], 1, "/nonexistent/data.jsonl"),
    (["--deepspeed", "/nonexistent/ds.json"], 1, "/nonexistent/ds.json"),
    (["--teacher-deepspeed", "/nonexistent/t.json"], 2, "/nonexistent/t.json"),  # read on 2 ranks only
    (["--global-batch-size", "24", "--per-device-batch-size", "8"], 2, "--global-batch-size 24"),
])
def test_preflight_catches_what_needs_no_library(workspace, tmp_path, capsys, extra, world, needle):
    out = str(tmp_path / "out")
    with pytest.raises(Exception) as info:
        preflight.check(_parse(_argv(workspace, out, *extra)), world)
    assert type(info.value).__name__ == "UserError" and needle in str(info.value)
    if world == 2:  # the same options pass on one rank
        preflight.check(_parse(_argv(workspace, out, *extra)), 1)


def _parse(argv):
    from distill.config import parse_args

    return parse_args(argv)


def test_preflight_cli_passes_good_options_without_importing_torch(workspace, tmp_path):
    """launch.sh runs this once before starting ranks: it must be quick (no torch, no DeepSpeed)."""
    code = ("import sys; from distill import preflight; rc = preflight.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    ok = subprocess.run([sys.executable, "-c", code, *_argv(workspace, str(tmp_path / "out"))],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.stdout.split() == ["0", "False", "False"], ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "distill.preflight",
                          *_argv(workspace, str(tmp_path / "out"), "--global-batch-size", "24",
                                 "--per-device-batch-size", "8")],
                         cwd=ROOT, env=dict(os.environ, WORLD_SIZE="2"), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --global-batch-size 24")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_two_ranks_report_a_missing_teacher_once(workspace, tmp_path):
    """torchrun with 2 ranks: one error line for the job, not one per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "0", "main.py",
                           *_argv(workspace, str(tmp_path / "out"), "--teacher-local-path", "/nonexistent/t")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: teacher folder /nonexistent/t") == 1, proc.stderr[-2000:]
    # torchrun itself prints a traceback of its ChildFailedError; the ranks exit 2 with no traceback
    assert "exitcode  : 2" in proc.stderr and "UserError" not in proc.stderr


def test_deepspeed_two_ranks_print_help_once():
    """`deepspeed --num_gpus 2 distill/train.py --help`: one help text for the job, not one per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "distill/train.py", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("usage: seq2seq-distill") == 1


def test_help_states_each_default_once():
    from distill.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "Default: the teacher's count" in text and "(default: None)" not in text
    assert "Default: half the teacher's (at least 1)." in text
