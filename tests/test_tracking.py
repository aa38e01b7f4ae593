"""--report-to: TensorBoard, W&B (offline) and MLflow through their own libraries, read back with
their own readers (EventAccumulator, the offline run's file, MlflowClient); a tracker that cannot
start is one warning line and the run goes on; an unknown name is a one-line error, exit 2.

One tiny run (module fixture) with all three trackers serves the read-back tests; it also puts a
secret in the options and on the command line, which no tracker may keep.
"""
import contextlib
import glob
import io
import json
import os
import sys

import pytest

from distill import tracking
from distill.train import main

SECRET = "tok-s3cr3t-4242-abcdef"
STEPS = ["--max-steps", "6", "--per-device-batch-size", "8", "--logging-steps", "2", "--eval-steps", "3",
         "--max-source-length", "32", "--max-target-length", "8"]


def _argv(workspace, out, *extra):
    return ["--model-type", "bart", "--teacher-local-path", workspace["bart"], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out] + list(extra)


def _run(argv):
    """main(argv) with stdout and stderr captured (not terminals, as in CI or `> run.txt`)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tracked(workspace, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tracked") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("MY_SERVICE_TOKEN", SECRET)  # a secret by its name: redacted wherever it shows
        argv = _argv(workspace, out, *STEPS, "--report-samples", "2", "--source-prefix", SECRET + " ",
                     "--report-to", "tensorboard,wandb,mlflow")
        mp.setattr(sys, "argv", ["main.py"] + argv)  # what wandb would record as the command line
        rc, stdout, stderr = _run(argv)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    return {"out": out, "stdout": stdout, "stderr": stderr}


def test_tensorboard_events_read_back(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = glob.glob(os.path.join(tracked["out"], "tensorboard", "*"))
    events = EventAccumulator(folder, size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert {"train/ce", "train/kl", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= scalars
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]  # the periodic eval, then the final one
    metrics = json.load(open(os.path.join(tracked["out"], "metrics.json")))
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(metrics["final_eval"]["eval_loss"], rel=1e-5)
    assert events.Scalars("final/samples_seen")[0].value == 48
    assert {"report/speedup_b1", "report/teacher/exact_match", "report/student/parameters"} <= scalars
    options = events.Tensors("options/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard,wandb,mlflow"' in options and SECRET not in options


def test_mlflow_store_read_back(tracked, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's switch for a folder store
    client = MlflowClient(tracking_uri="file:" + os.path.join(tracked["out"], "mlruns"))
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]
    expected = {"train/lr", "train/grad_norm", "eval/loss", "final/tokens_seen", "report/speedup_b32"}
    assert expected <= set(run.data.metrics)
    params = run.data.params
    assert params["alpha"] == "0.5" and params["max_steps"] == "6"
    assert SECRET not in json.dumps(params) and "<redacted>" in params["source_prefix"]


def test_wandb_offline_run_folder(tracked):
    pytest.importorskip("wandb")
    (folder,) = glob.glob(os.path.join(tracked["out"], "wandb", "offline-run-*"))
    (data,) = [open(p, "rb").read() for p in glob.glob(os.path.join(folder, "run-*.wandb"))]
    for name in (b"train/loss", b"train/grad_norm", b"eval/loss", b"final/steps", b"report/speedup_b1",
                 b"max_source_length"):
        assert name in data, name
    # nothing wandb keeps for this run holds the secret (config redacted, no command line kept)
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            assert SECRET.encode() not in open(path, "rb").read(), path
    assert f"wandb: offline run in {folder}" in tracked["stdout"]


def test_a_tracker_that_cannot_start_is_one_warning_and_the_run_goes_on(workspace, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")  # the tracker that starts
    out = str(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "wandb", None)  # the package is missing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracking")  # MLflow refuses to start
    rc, stdout, stderr = _run(_argv(workspace, out, *STEPS, "--skip-report", "--report-to",
                                    "wandb,mlflow,tensorboard"))
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    warnings = [line for line in stdout.splitlines() if line.startswith("warning: --report-to")]
    assert len(warnings) == 2, warnings
    assert "wandb: could not start (the wandb package is not installed (pip install wandb" in warnings[0]
    assert "mlflow: could not start (" in warnings[1] and "nosuchscheme" in warnings[1]
    assert all(w.endswith("the run goes on without it") for w in warnings) and "Traceback" not in stderr
    # nothing lost: the run's files, and the tracker that started, have everything
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 6 and len([h for h in metrics["history"] if "loss" in h]) == 3
    assert glob.glob(os.path.join(out, "tensorboard", "*", "events.out.tfevents.*"))
    assert not os.path.exists(os.path.join(out, "wandb")) and not os.path.exists(os.path.join(out, "mlruns"))
    log = open(os.path.join(out, "train.log")).read()
    assert all(w in log for w in warnings)


@pytest.mark.parametrize("value", ["wandbb", "tensorboard,comet"])
def test_unknown_report_to_is_one_line_exit_2(workspace, tmp_path, capsys, value):
    out = str(tmp_path / "out")
    rc = main(_argv(workspace, out, "--report-to", value))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --report-to {value}: unknown tracker")
    assert "tensorboard, wandb, mlflow" in err[0]
    assert not os.path.exists(out)


class _Failing(tracking.Tracker):
    name = "tensorboard"

    def __init__(self):
        self.closed = None

    def options(self, options):
        pass

    def scalars(self, figures, step):
        raise OSError("disk full")

    def close(self, ok):
        self.closed = ok


def test_a_tracker_failing_mid_run_is_dropped_after_one_warning(capsys):
    from distill import run_log

    console = run_log.start("info")
    try:
        trackers, failing = tracking.Trackers(), _Failing()
        trackers.active.append(failing)
        for step in (1, 2):
            trackers.log({"step": step, "loss": 1.0}, step)
        trackers.close()
    finally:
        console.close()
    assert capsys.readouterr().out == ("warning: --report-to tensorboard: scalars failed (OSError: disk full); "
                                       "the run goes on without it\n")
    assert failing.closed is False and trackers.active == []


def test_figures_are_named_by_where_they_come_from():
    entry = {"step": 4, "loss": 1.5, "lr": 1e-3, "batches": {"dataset": 3, "on_policy": 1}, "ce": float("nan")}
    assert tracking.flatten(entry) == {"train/loss": 1.5, "train/lr": 1e-3, "train/batches/dataset": 3.0,
                                       "train/batches/on_policy": 1.0}
    assert tracking.flatten({"eval_loss": 2.0, "eval_tokens": 10}) == {"eval/loss": 2.0, "eval/tokens": 10.0}
    report = {"speedup_b1": 2.0, "speedup_b32": None, "quality_retention": 0.9, "main_metric": "rougeLsum",
              "models": {"t": {"role": "teacher", "rougeLsum": 0.5, "path": "/t"},
                         "s": {"role": "student", "rougeLsum": 0.45, "dtype": "float32"}}}
    assert tracking.report_figures(report) == {"report/speedup_b1": 2.0, "report/quality_retention": 0.9,
                                               "report/teacher/rougeLsum": 0.5, "report/student/rougeLsum": 0.45}
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to(None) == []
    assert tracking.parse_report_to(" TensorBoard , mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert tracking.parse_report_to(["wandb"]) == ["wandb"] and tracking.parse_report_to("mlflow, ") == ["mlflow"]
