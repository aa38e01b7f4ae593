"""Faults during training, proven with real runs (`python main.py`, tiny BART with dropout, CPU fp32).

A resumed run must end exactly where an uninterrupted run with the same seed ends: same step count,
same per-step training losses (the whole history) and same final validation loss, within
REL_TOL = 1e-6 relative. Measured on CPU fp32: bit-identical when resuming at a save-steps boundary
(step 4); resuming at step 5 (after SIGTERM) is deterministic but differs by <= 2 ulp (abs 4.8e-7,
rel 1.7e-7) from step 8 on -- an optimizer-side rounding, far below any real divergence (a wrong
data order or RNG stream moves the loss by > 1e-3). Equal per-step
losses after the restart point show the data order, LR schedule, optimizer state and dropout RNG
all continued; the 12-step run crosses an epoch boundary at step 8.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from distill import checkpoint, faults, guard
from distill.errors import UserError
from launch_env import clean_env, free_port, process_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REL_TOL = 1e-6


def ckpt(out: str, step: int) -> str:
    return os.path.join(checkpoint.checkpoints_dir(out), f"step-{step:06d}")


def train_losses(metrics: dict) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in metrics["history"] if "loss" in h]


def assert_same_as_reference(metrics: dict, reference: dict) -> None:
    ref = reference["metrics"]
    assert metrics["steps"] == ref["steps"] == 12
    assert metrics["samples_seen"] == ref["samples_seen"]
    got, want = train_losses(metrics), train_losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 13))
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=REL_TOL), f"train loss differs at step {step}: {a} vs {b}"
    assert metrics["final_eval"]["eval_loss"] == pytest.approx(ref["final_eval"]["eval_loss"], rel=REL_TOL)


def error_lines(text: str) -> list[str]:
    # The error may follow the progress bar's last redraw on the same line (stderr, after \r).
    return re.findall(r"(?<![A-Za-z_])error: [^\r\n]*", text)


def resume_and_check(start, out: str, expect_from: str, reference: dict) -> None:
    run = start(out, "--resume")
    metrics = run.metrics()
    assert f"resumed from {expect_from} at step" in run.text()
    assert not [n for n in os.listdir(checkpoint.checkpoints_dir(out)) if n.startswith(".tmp-")]
    assert_same_as_reference(metrics, reference)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, found first (a kill -9 of the whole job)."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # three 2-rank runs: about 2 min on 2 CPU cores
def test_two_ranks_killed_with_sigkill_resume_exactly(run_args, tmp_path):
    """2 ranks (torchrun), dropout on: the whole job is SIGKILLed after a checkpoint, then
    `--resume` must give the uninterrupted 2-rank run's loss history and final eval loss (1e-6
    relative): each rank's RNG stream, the data position, the LR schedule and the optimizer state
    all continue. 64 rows, 2 x 8 per step: 4 steps per epoch, so the 12 steps cross two epochs."""
    def launch(out, *extra):
        log = open(str(tmp_path / f"{os.path.basename(out)}-{len(extra)}.log"), "w", encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                                 free_port(), "main.py", *run_args, "--output-dir", out, *extra],
                                cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        return proc, log

    def metrics(out):
        with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
            return json.load(fh)

    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "out")
    proc, log = launch(ref_out)
    assert proc.wait(300) == 0, open(log.name).read()[-3000:]
    proc, log = launch(out)
    marker = os.path.join(ckpt(out, 4), checkpoint.MARKER)
    deadline = time.time() + 240
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), open(log.name).read()[-3000:]
    kill_tree(proc.pid)  # the launcher and both ranks (torchrun starts them in their own sessions)
    proc.wait(60)
    latest = checkpoint.latest_checkpoint(out)
    assert latest is not None and latest.endswith(("step-000004", "step-000008"))  # 8 if the kill came late
    proc, log = launch(out, "--resume")
    assert proc.wait(300) == 0, open(log.name).read()[-3000:]
    assert f"resumed from {latest} at step" in open(log.name).read()
    got, want = metrics(out), metrics(ref_out)
    assert got["world_size"] == want["world_size"] == 2 and got["steps"] == want["steps"] == 12
    assert [s for s, _ in train_losses(got)] == [s for s, _ in train_losses(want)] == list(range(1, 13))
    for (step, a), (_, b) in zip(train_losses(got), train_losses(want)):
        assert a == pytest.approx(b, rel=REL_TOL), f"train loss differs at step {step}: {a} vs {b}"
    assert got["final_eval"]["eval_loss"] == pytest.approx(want["final_eval"]["eval_loss"], rel=REL_TOL)
    assert got["samples_seen"] == want["samples_seen"] and got["tokens_seen"] == want["tokens_seen"]


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(start, reference, tmp_path):
    out = str(tmp_path / "out")
    run = start(out, fault="kill_in_save@8")
    assert run.wait() == -signal.SIGKILL, run.text()[-3000:]
    root = checkpoint.checkpoints_dir(out)
    # The shards of step 8 were written, the rename never happened: resume must not see them.
    assert os.listdir(os.path.join(root, ".tmp-step-000008", checkpoint.TAG))
    assert not os.path.exists(ckpt(out, 8))
    assert checkpoint.latest_checkpoint(out) == ckpt(out, 4)
    assert os.path.exists(os.path.join(out, guard.LOCK_NAME))  # stale lock of the dead run: must not block
    resume_and_check(start, out, ckpt(out, 4), reference)


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_prints_how_to_resume_and_exits_3(start, reference, tmp_path, sig):
    out = str(tmp_path / "out")
    run = start(out)
    run.wait_for(os.path.join(ckpt(out, 4), checkpoint.MARKER))
    run.proc.send_signal(sig)
    assert run.wait() == 3, run.text()[-3000:]
    text = run.text()
    assert "--resume" in text and "Traceback" not in text
    latest = checkpoint.latest_checkpoint(out)
    stopped = json.load(open(os.path.join(latest, "trainer.json")))["step"]
    assert 4 < stopped < 12 and f"interrupted at step {stopped}" in text
    assert not os.path.exists(os.path.join(out, guard.LOCK_NAME))  # released on the way out
    if sig == signal.SIGTERM:  # both signals share one handler; one resume proves the checkpoint
        resume_and_check(start, out, latest, reference)


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_disk_full_while_saving_keeps_the_previous_checkpoint(start, reference, tmp_path):
    out = str(tmp_path / "out")
    run = start(out, fault="enospc_in_save@8")
    assert run.wait() == 2
    text = run.text()
    errors = error_lines(text)
    assert len(errors) == 1 and "Traceback" not in text
    assert "could not write checkpoint" in errors[0] and ".tmp-step-000008" in errors[0]
    assert "No space left on device" in errors[0] and f"{ckpt(out, 4)} is intact" in errors[0]
    assert sorted(os.listdir(checkpoint.checkpoints_dir(out))) == ["step-000004"]  # no half-written folder
    resume_and_check(start, out, ckpt(out, 4), reference)


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_nan_loss_is_skipped_then_too_many_in_a_row_save_and_stop(start, tmp_path):
    out = str(tmp_path / "out")
    # One bad micro-batch at step 3 (skipped, counted, run goes on), then NaN for good from step 7.
    run = start(out, "--max-bad-steps", "3", fault="nan@3,nan_from@7")
    assert run.wait() == 2, run.text()[-3000:]
    text = run.text()
    assert text.count("warning: non-finite loss at step 3;") == 1
    assert text.count("warning: non-finite loss at step 7;") == 3
    errors = error_lines(text)
    assert len(errors) == 1 and "Traceback" not in text
    assert "3 steps in a row" in errors[0] and "step 7" in errors[0] and "--learning-rate" in errors[0]
    state = json.load(open(os.path.join(ckpt(out, 6), "trainer.json")))  # saved before stopping
    assert state["step"] == 6 and state["counters"]["bad_steps"] == 4
    assert all(h["loss"] == h["loss"] for h in state["history"] if "loss" in h)  # no NaN got in


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_resume_after_a_skipped_micro_batch_continues_the_data_and_drops_the_abandoned_branch(start, tmp_path):
    """A dropped micro-batch (NaN at step 3) makes data run one micro-batch ahead of the step count.
    Resuming from step 4 must continue after the data trained, not where the step count points
    (that replays one micro-batch and changes every later loss). The resumed run saves at other
    steps (6, 9, 12): the first run's step-8 and step-12 checkpoints are an abandoned branch that
    a later --resume must never pick."""
    out = str(tmp_path / "out")
    first = start(out, fault="nan@3")
    assert first.wait() == 0, first.text()[-3000:]
    reference = first.metrics()
    assert reference["bad_steps"] == 1 and reference["steps"] == 12
    resumed = start(out, "--resume-from", ckpt(out, 4), "--save-steps", "3")
    assert resumed.wait() == 0, resumed.text()[-3000:]
    assert "checkpoints after it (step-000008, step-000012) belong to the run it branched from" in resumed.text()
    got, want = train_losses(resumed.metrics()), train_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 13))
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=REL_TOL), f"train loss differs at step {step}: {a} vs {b}"
    assert [os.path.basename(p) for p in checkpoint.complete_checkpoints(out)] == [
        "step-000006", "step-000009", "step-000012"]


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_nan_in_an_accumulation_window_drops_that_micro_batch_only(start, tmp_path):
    """Steps of 2 micro-batches (global batch 16): a NaN in the first micro-batch of step 3 and in
    the second of step 5 (the window's last: a zero backward keeps DeepSpeed's boundary) each drop
    one micro-batch; both steps still happen, 12 in all, on the same data as without the NaNs."""
    out = str(tmp_path / "out")
    run = start(out, "--global-batch-size", "16", fault="nan@3,nan_second@5")
    assert run.wait() == 0, run.text()[-3000:]
    text, metrics = run.text(), run.metrics()
    assert text.count("warning: non-finite loss at step 3;") == 1
    assert text.count("warning: non-finite loss at step 5;") == 1
    assert metrics["steps"] == 12 and metrics["bad_steps"] == 2
    assert metrics["samples_seen"] == 12 * 16 - 2 * 8
    assert all(h["loss"] == h["loss"] for h in metrics["history"] if "loss" in h)


def test_second_run_on_a_locked_output_dir_is_refused_before_writing(run_args, tmp_path, repo_root, child_env):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / guard.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 12345 on testhost\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a live first run holds
    try:
        proc = subprocess.run([sys.executable, "main.py", *run_args, "--output-dir", str(out)], cwd=repo_root,
                              env=child_env(), capture_output=True, text=True, timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output-dir")
    assert "in use by another run (pid 12345 on testhost" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(out) == [guard.LOCK_NAME]


def test_lock_in_process(tmp_path):
    out = str(tmp_path / "new")
    with guard.output_dir_lock(out, rank=0):
        assert os.path.isfile(os.path.join(out, guard.LOCK_NAME))
        with pytest.raises(UserError, match="in use by another run"):
            with guard.output_dir_lock(out, rank=0):
                pass
        with guard.output_dir_lock(out, rank=1):  # other ranks share rank 0's lock
            pass
    assert not os.path.exists(out)  # the lock made the folder; nothing else was written
    other = tmp_path / "other"
    other.mkdir()
    (other / guard.LOCK_NAME).write_text("pid 1 on a crashed host\n")  # left by a dead run
    with guard.output_dir_lock(str(other), rank=0):  # an unlocked lock file blocks nothing
        pass
    assert os.listdir(other) == []  # and the folder, which existed before, stays
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write in --output-dir"):  # not creatable, even as root
        with guard.output_dir_lock(str(tmp_path / "a_file" / "out"), rank=0):
            pass


@pytest.mark.slow  # real runs: 30-120 s on 2 CPU cores
def test_a_crashing_rank_ends_the_multi_rank_job_with_its_error(workspace, tmp_path, repo_root, child_env):
    out = str(tmp_path / "out")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", free_port(),
           "distill/train.py", "--model-type", "bart", "--teacher-local-path", workspace["bart"],
           "--dataset-local-path", workspace["data"], "--dataset-input-column", "article",
           "--dataset-target-column", "highlights", "--max-train-samples", "32", "--max-steps", "4",
           "--per-device-batch-size", "4", "--alpha", "0.5", "--skip-report", "--output-dir", out]
    # Own session: on a hang the whole launcher tree (launcher + ranks) is killed, not just the top.
    proc = subprocess.Popen(cmd, cwd=repo_root, env=child_env(DISTILL_FAULT="raise_on_rank1@2"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail("the job hung after rank 1 crashed:\n" + text[-3000:])
    assert proc.returncode != 0, text[-3000:]
    assert "InjectedFault: injected fault (DISTILL_FAULT): rank 1 crashed at step 2" in text


# ---- checkpoint protocol, unit level (a fake engine, no DeepSpeed) -------------------------------
class FakeEngine:
    device = "cpu"

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        import torch

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(client_state or {}, os.path.join(save_dir, tag, "client.pt"))
        if self.fail:
            raise self.fail

    def load_checkpoint(self, path, tag, **_):
        # DeepSpeed returns (None, None) when it finds nothing to load
        return (None, None) if self.fail else (os.path.join(path, tag), {})


def _save(out, step, engine):
    return checkpoint.save(engine, out, step, {"step": step}, rank=0, keep=2, barrier=lambda: None)


def test_rng_state_round_trips_and_loads_with_weights_only(tmp_path):
    import random

    import numpy as np
    import torch

    state = checkpoint.rng_state()
    torch.save({"rng": state}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]  # no NumPy pickles inside
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("fail", [RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"),
                                  PermissionError(13, "Permission denied", "/x/state/client.pt")])
def test_failed_save_keeps_the_complete_checkpoints(tmp_path, fail):
    out = str(tmp_path)
    _save(out, 4, FakeEngine())
    with pytest.raises(UserError) as info:
        _save(out, 8, FakeEngine(fail))
    message = str(info.value)
    assert "could not write checkpoint" in message and "MiB free" in message
    assert f"{ckpt(out, 4)} is intact" in message and "\n" not in message
    assert checkpoint.complete_checkpoints(out) == [ckpt(out, 4)]
    assert os.listdir(checkpoint.checkpoints_dir(out)) == ["step-000004"]


def test_old_checkpoints_are_retired_and_a_step_is_replaced_atomically(tmp_path):
    out = str(tmp_path)
    for step in (4, 8, 12):
        _save(out, step, FakeEngine())
    assert checkpoint.complete_checkpoints(out) == [ckpt(out, 8), ckpt(out, 12)]
    os.makedirs(os.path.join(checkpoint.checkpoints_dir(out), ".tmp-old-step-000002"))  # killed mid-delete
    _save(out, 8, FakeEngine())  # e.g. after --resume-from step 4: step 8 is written again
    # ... and step 12 belonged to the branch that run abandoned: gone, so --resume cannot pick it.
    assert sorted(os.listdir(checkpoint.checkpoints_dir(out))) == ["step-000008"]


def test_each_rank_saves_and_restores_its_own_rng(tmp_path):
    import torch

    out = str(tmp_path / "out")
    tmp = os.path.join(checkpoint.checkpoints_dir(out), ".tmp-step-000004")
    nxt = {}

    def barrier():  # at the first barrier every rank writes its part; rank 1's is simulated here
        if 1 not in nxt:
            torch.manual_seed(101)
            os.makedirs(tmp, exist_ok=True)
            torch.save(checkpoint.rng_state(), os.path.join(tmp, checkpoint.RNG_FILE.format(rank=1)))
            nxt[1] = torch.rand(3)  # what rank 1's stream gives next after the save
            torch.manual_seed(100)

    path = checkpoint.save(FakeEngine(), out, 4, {"step": 4, "world_size": 2}, rank=0, keep=2, barrier=barrier)
    nxt[0] = torch.rand(3)
    assert sorted(n for n in os.listdir(path) if n.startswith("rng-")) == ["rng-rank0.pt", "rng-rank1.pt"]
    for rank in (0, 1):
        torch.manual_seed(0)
        checkpoint.load(FakeEngine(), path, rank=rank, world_size=2)
        assert torch.equal(torch.rand(3), nxt[rank])  # its own stream, not rank 0's
    assert not torch.equal(nxt[0], nxt[1])


def test_resume_with_another_world_size_or_geometry_or_a_damaged_state_is_refused(tmp_path):
    out = str(tmp_path / "out")
    path = checkpoint.save(FakeEngine(), out, 4,
                           {"step": 4, "world_size": 2, "geometry": {"per_device_batch_size": 8,
                                                                    "gradient_accumulation_steps": 1}},
                           rank=0, keep=2, barrier=lambda: None)
    with pytest.raises(UserError, match=r"saved by a run on 2 rank\(s\); this run has 1: resume with 2"):
        checkpoint.load(FakeEngine(), path, rank=0, world_size=1)
    with pytest.raises(UserError, match="saved with --per-device-batch-size 8; this run has 4"):
        checkpoint.load(FakeEngine(), path, rank=0, world_size=2,
                        geometry={"per_device_batch_size": 4, "gradient_accumulation_steps": 1})
    with pytest.raises(UserError, match="could not load the engine state"):
        checkpoint.load(FakeEngine(fail=RuntimeError("x")), path, rank=0, world_size=2)
    assert checkpoint.load(FakeEngine(), path, rank=0, world_size=2)["step"] == 4


def test_fault_spec_parsing():
    assert faults.parse_faults(" nan@3, kill_in_save@8,raise_on_rank1@2 ") == {
        "nan": 3, "kill_in_save": 8, "raise_on_rank1": 2}
    assert faults.parse_faults("") == {}
    with pytest.raises(ValueError, match="cannot parse 'nan3'"):
        faults.parse_faults("nan3")
