"""distill.run_log: the run's lines through Python logging, to the console and OUTPUT_DIR/train.log;
--log-level; progress as a tqdm bar on a terminal, plain lines elsewhere; the `[rank N]` prefix."""
import contextlib
import io
import logging
import os
import sys

from distill import run_log
from distill.train import Logger, main

FAST = ["--max-steps", "6", "--per-device-batch-size", "8", "--skip-report", "--logging-steps", "2",
        "--max-source-length", "32", "--max-target-length", "8"]


def _argv(workspace, out, *extra):
    return ["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out] + FAST + list(extra)


def _run(argv):
    """main(argv) with stdout and stderr captured: not terminals, as in CI or `> run.txt 2>&1`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_a_run_without_a_terminal_prints_lines_and_train_log_keeps_them(workspace, tmp_path):
    out = str(tmp_path / "out")
    rc, stdout, stderr = _run(_argv(workspace, out))
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "\r" not in stdout + stderr  # no bar redraws: neither ours nor datasets' "tokenizing" bars
    progress = [line for line in stdout.splitlines() if line.startswith("distill: step ")]
    assert [line.split()[2] for line in progress] == ["2/6", "4/6", "6/6"], stdout
    assert all("loss=" in line and "tok_s=" in line for line in progress)
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines and all(line in log for line in lines)  # everything the console showed, in order
    assert log.index(lines[0]) < log.index(progress[0]) < log.index(lines[-1])
    assert "INFO [distill] distill: step 4/6" in log  # with the time and level
    # the libraries' warnings too (DeepSpeed's scheduler warning), which the console does not show
    assert "WARNING [DeepSpeed] Attempting to get learning rate" in log
    assert "Attempting to get learning rate" not in stdout + stderr


def test_log_level_warning_silences_info_lines(workspace, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "wandb", None)  # one warning line to see: a tracker that cannot start
    rc, stdout, stderr = _run(_argv(workspace, out, "--max-steps", "2", "--log-level", "warning",
                                    "--report-to", "wandb"))
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.splitlines() == ["warning: --report-to wandb: could not start (the wandb package is not "
                                   "installed (pip install wandb, or pip install 'seq2seq-distill[tracking]')); "
                                   "the run goes on without it"]
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "INFO [distill]" not in log and "WARNING [distill] warning: --report-to wandb" in log
    assert "model.safetensors" in os.listdir(out)  # the run itself is unchanged


def test_bad_log_level_is_one_line_exit_2(workspace, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(_argv(workspace, out, "--log-level", "loud")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --log-level: invalid choice: 'loud'")
    assert not os.path.exists(out)


def test_rank_lines_and_levels(capsys):
    console = run_log.start("warning")
    try:
        Logger(rank=1, world_size=2)("rank 0's line only")
        Logger(rank=1, world_size=2)("loaded 10 parameters", all_ranks=True)  # info: below the level
        Logger(rank=1, world_size=2)("warning: non-finite loss", all_ranks=True)
        Logger(rank=0, world_size=1)("warning: once", all_ranks=True)  # one rank: no prefix
        run_log.logger().error("[rank 1] error: boom")
    finally:
        console.close()
    printed = capsys.readouterr()
    assert printed.out == "[rank 1] warning: non-finite loss\nwarning: once\n"
    assert printed.err == "[rank 1] error: boom\n"


def test_on_a_terminal_a_bar_draws_and_the_lines_go_to_the_file_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_log, "terminal", lambda: True)
    path = tmp_path / "run" / "train.log"
    console = run_log.start("info")
    try:
        run_log.logger().info("before the file")
        assert not path.parent.exists()  # nothing written before attach_file
        handler = run_log.attach_file(str(path))
        with run_log.progress(total=4, initial=0, desc="distill") as bar:
            for _ in range(2):
                bar.update(1)
            bar.set_postfix(loss="1.234")
        run_log.logger().info("after the bar")
    finally:
        console.close()
    printed = capsys.readouterr()
    assert printed.out == "before the file\nafter the bar\n"
    assert "distill:" in printed.err and "\r" in printed.err  # tqdm's bar
    text = path.read_text()
    assert text.index("before the file") < text.index("distill: step 2/4 (50%)") < text.index("after the bar")
    assert "loss=1.234" in text
    # a closed run's file takes nothing more (the libraries' forwarding may still point at it)
    handler.handle(logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, "late", None, None))
    assert "late" not in path.read_text()
