"""SIGTERM / Ctrl-C outside the training loop: data loading, teacher loading, the final eval, the
export and the report each end the run at once with one line, exit 143/130 (3 where the run has
a checkpoint to resume from), no traceback, and never a half-written model folder.

The signal is sent by the run itself as it enters the phase (DISTILL_FAULT=sigterm_in_PHASE@0,
distill/faults.py), so every case is deterministic; the loop's own handling (checkpoint at the
next step boundary) is tested in test_faults.py.
"""
from __future__ import annotations

import os
import signal

import pytest

from distill.signals import EXIT_CODES, Interrupted, Signals

PHASE_TEXT = {"data": "loading and tokenizing the data",
              "teacher": "loading the teacher and building the student",
              "eval": "running the final eval", "export": "exporting the student",
              "report": "writing the report"}


def _one_line(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("phase,sig", [("data", "sigterm"), ("teacher", "sigint"), ("export", "sigterm"),
                                       ("report", "sigterm")])
def test_signal_outside_the_loop_stops_at_once_with_one_line(start, tmp_path, phase, sig):
    out = str(tmp_path / "out")
    run = start(out, "--save-steps", "0", fault=f"{sig}_in_{phase}@0",
                drop=("--skip-report",) if phase == "report" else ())
    rc = run.wait()
    text = run.text()
    expected = EXIT_CODES[signal.SIGTERM if sig == "sigterm" else signal.SIGINT]
    assert rc == expected, f"rc {rc}:\n{text[-3000:]}"
    name = "SIGTERM" if sig == "sigterm" else "SIGINT"
    line = _one_line(text, f"interrupted by {name} while {PHASE_TEXT[phase]}")
    assert "no checkpoint was saved" in line
    weights = os.path.join(out, "model.safetensors")
    if phase in ("data", "teacher", "export"):
        assert not os.path.exists(weights)  # stopped before the export: no model at all
    else:  # the report comes after a complete export
        assert os.path.isfile(weights) and os.path.isfile(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, ".export-partial"))  # nothing was staged


@pytest.mark.slow
def test_signal_in_the_final_eval_with_a_checkpoint_exits_3_and_says_resume(start, tmp_path):
    out = str(tmp_path / "out")
    run = start(out, fault="sigterm_in_eval@0")  # --save-steps 4 of 12: checkpoints exist
    rc = run.wait()
    text = run.text()
    assert rc == 3, f"rc {rc}:\n{text[-3000:]}"
    line = _one_line(text, "interrupted by SIGTERM while running the final eval")
    assert "--resume" in line and "step-000012" in line
    # the checkpoint is the finished training: --resume goes straight to eval and export
    resumed = start(out, "--resume")
    assert resumed.wait() == 0, resumed.text()[-3000:]
    assert "resumed from" in resumed.text() and os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
def test_a_stopped_export_never_mixes_old_weights_with_new_files(start, tmp_path):
    """A complete run, then a second one into the same folder stopped once its export is staged:
    the folder still holds one consistent model (the first run's) and the next run cleans up."""
    out = str(tmp_path / "out")
    assert start(out, "--save-steps", "0").wait() == 0
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        first = fh.read()
    run = start(out, "--save-steps", "0", "--overwrite-output-dir", "--seed", "8",
                fault="sigterm_in_export_staged@0")
    assert run.wait() == 143, run.text()[-3000:]
    _one_line(run.text(), "interrupted by SIGTERM while exporting the student")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        assert fh.read() == first  # nothing of the stopped export was renamed in
    assert os.path.isdir(os.path.join(out, ".export-partial"))  # its staging is left ...
    assert start(out, "--save-steps", "0", "--overwrite-output-dir", "--seed", "8").wait() == 0
    assert not os.path.exists(os.path.join(out, ".export-partial"))  # ... and removed by the next run
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        assert fh.read() != first


def test_signals_raise_with_the_phase_and_restore_the_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    sig = Signals().install()
    try:
        sig.enter("loading the data")
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.phase == "loading the data" and info.value.exit_code == 143
        assert str(info.value) == "SIGTERM while loading the data"
    finally:
        sig.restore()
    assert signal.getsignal(signal.SIGTERM) is before
