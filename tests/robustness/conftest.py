"""Real subprocess runs of the trainer on a tiny BART, shared by the fault and secret tests.

Every run uses RUN_ARGS: 12 steps of batch 8 over 64 rows (8 steps per epoch, so a run crosses an
epoch boundary), checkpoints every 4 steps, per-step loss logging. The teacher (so the student)
has dropout 0.1: a resumed run only matches an uninterrupted one if the RNG really continues.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from launch_env import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(ROOT, "main.py")
FAKE_HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
FAKE_API_KEY = "plain-secret-value-4711"

@pytest.fixture(scope="session")
def dropout_teacher(workspace, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rob") / "bart_dropout")
    shutil.copytree(workspace["bart"], path)
    conf_path = os.path.join(path, "config.json")
    with open(conf_path, encoding="utf-8") as fh:
        conf = json.load(fh)
    conf.update(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    with open(conf_path, "w", encoding="utf-8") as fh:
        json.dump(conf, fh)
    return path


@pytest.fixture(scope="session")
def run_args(workspace, dropout_teacher):
    return ["--model-type", "bart", "--teacher-local-path", dropout_teacher,
            "--dataset-local-path", workspace["data"], "--dataset-input-column", "article",
            "--dataset-target-column", "highlights", "--max-train-samples", "64", "--max-steps", "12",
            "--per-device-batch-size", "8", "--save-steps", "4", "--save-total-limit", "3",
            "--logging-steps", "1", "--alpha", "0.5", "--skip-report", "--seed", "7"]


class Run:
    """A `python main.py` child with stdout+stderr in a file."""

    def __init__(self, args: list[str], out: str, env: dict[str, str], log: str):
        self.out, self.log_path = out, log
        self._fh = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, MAIN, *args, "--output-dir", out], cwd=ROOT, env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def wait_for(self, path: str, timeout: float = 180) -> None:
        """Poll until `path` exists (the child is still running) or fail with the child's log."""
        end = time.time() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                pytest.fail(f"run ended (rc {self.proc.returncode}) before {path} appeared:\n{self.text()[-3000:]}")
            if time.time() > end:
                self.proc.kill()
                pytest.fail(f"{path} did not appear within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def metrics(self) -> dict:
        """Assert the run succeeded; return its metrics.json."""
        rc = self.wait()
        assert rc == 0, f"rc {rc}:\n{self.text()[-4000:]}"
        with open(os.path.join(self.out, "metrics.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()


@pytest.fixture
def start(run_args, tmp_path):
    """start(out, *extra_args, fault=None, env=None, drop=()) -> Run; `drop`: flags of RUN_ARGS
    (without values) to leave out, e.g. ("--skip-report",)."""
    counter = [0]

    def _start(out: str, *extra: str, fault: str | None = None, env: dict | None = None,
               drop: tuple[str, ...] = ()) -> Run:
        counter[0] += 1
        extra_env = dict(env or {})
        if fault:
            extra_env["DISTILL_FAULT"] = fault
        base = [a for a in run_args if a not in drop]
        return Run([*base, *extra], out, clean_env(**extra_env), str(tmp_path / f"run{counter[0]}.log"))

    return _start


@pytest.fixture
def child_env():
    """child_env(**extra) -> an environment for a fresh one-process run (no launcher variables)."""
    return clean_env


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def reference(run_args, tmp_path_factory):
    """One uninterrupted run: the yardstick for every resumed run. It also carries secrets in its
    environment and secret values in options, for the secret tests."""
    root = tmp_path_factory.mktemp("reference")
    out = str(root / "out")
    env = clean_env(HF_TOKEN="hf_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa9876", MY_API_KEY=FAKE_API_KEY)
    # --teacher / --dataset are ignored next to the local paths, but land in distill_config.json.
    run = Run([*run_args, "--dataset", FAKE_HF_TOKEN, "--teacher", f"org/{FAKE_API_KEY}"], out, env,
              str(root / "run.log"))
    metrics = run.metrics()
    secrets = [FAKE_HF_TOKEN, FAKE_API_KEY, env["HF_TOKEN"]]
    return {"out": out, "metrics": metrics, "log": run.text(), "secrets": secrets}
