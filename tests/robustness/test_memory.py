"""Memory in every phase with the teacher partitioned over 2 CPU ranks (ZeRO-3).

The same run twice, with a teacher of about 235 MB and with a tiny one, and the same tiny student
(--hidden-dim 64: what the run adds on top of the teacher stays small). Each rank's anonymous
memory (RssAnon: the rank's own tensors; the checkpoint's mmap'd pages are page cache, not
counted) is sampled through the whole run: data, teacher loading, the student built from it,
training, the final eval, the export and the report. With the teacher partitioned, a rank holds
its half of it plus what ZeRO-3 gathers for one layer at a time.

Measured 2026-12-02 (226 MiB teacher, 8+8 layers of d_model 512): 0.54 and 0.60 x the teacher
above the tiny run on ranks 0 and 1 (0.5 is the partition itself; the rest is one gathered layer
and the teacher engine). Before: 3.3 and 3.7 x (gathered layers kept live by the teacher config's
reuse distance, and glibc keeping freed gathers in its heap). Issue 13 asks for <= 0.6; the
assert allows 0.65, so run-to-run noise of a few MiB does not fail it while any full copy of
the teacher (+1.0) or any kept gather still does.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from launch_env import clean_env, free_port, process_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_and_sample(cmd: list[str], timeout: float = 600) -> tuple[int, str, dict[int, int]]:
    """Run `cmd`; sample RssAnon (bytes) of every process under it every 20 ms. Returns the exit
    code, the output, and the peak RssAnon of each training rank (the processes below the launcher
    with RANK in their environment) keyed by rank."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peaks: dict[int, int] = {}

    def sample():
        while proc.poll() is None:
            for pid in process_tree(proc.pid):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
                    with open(f"/proc/{pid}/status") as fh:
                        anon = int(fh.read().split("RssAnon:")[1].split()[0]) * 1024
                except (OSError, IndexError, ValueError):
                    continue
                rank = env.get(b"RANK")
                if rank is not None and pid != proc.pid:
                    peaks[int(rank)] = max(peaks.get(int(rank), 0), anon)
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, _ = proc.communicate(timeout=timeout)
    watcher.join(timeout=5)
    return proc.returncode, out, peaks


@pytest.fixture(scope="module")
def teachers(workspace, tmp_path_factory):
    from distill.toy import save_tiny_teacher

    root = tmp_path_factory.mktemp("memory")
    rows = [json.loads(line) for line in open(os.path.join(workspace["data"], "train.jsonl"))]
    texts = [r["article"] for r in rows]
    big = save_tiny_teacher(str(root / "big"), "bart", texts, vocab_size=160, d_model=512, layers=8, heads=8,
                            ffn=2048)
    tiny = save_tiny_teacher(str(root / "tiny"), "bart", texts, vocab_size=160)
    return {"big": big, "tiny": tiny, "root": root}


@pytest.mark.slow  # two 2-rank runs with the report: about 2 min on 2 CPU cores
def test_no_rank_holds_more_than_its_share_of_a_zero3_teacher_in_any_phase(workspace, teachers):
    size = os.path.getsize(os.path.join(teachers["big"], "model.safetensors"))
    assert size >= 200 * 2**20
    peaks, reports = {}, {}
    for name in ("tiny", "big"):
        out = str(teachers["root"] / f"out-{name}")
        cmd = ["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "distill/train.py", "--deepspeed", "ds_configs/zero2.json",
               "--model-type", "bart", "--teacher-local-path", teachers[name],
               "--dataset-local-path", workspace["data"], "--dataset-input-column", "article",
               "--dataset-target-column", "highlights", "--output-dir", out,
               "--hidden-dim", "64", "--num-encoder-layers", "1", "--num-decoder-layers", "1",
               "--max-steps", "2", "--per-device-batch-size", "4", "--max-eval-samples", "8",
               "--max-source-length", "16", "--max-target-length", "8", "--report-samples", "8"]
        rc, log, peaks[name] = run_and_sample(cmd)
        assert rc == 0, log[-4000:]
        assert set(peaks[name]) == {0, 1}, peaks
        with open(os.path.join(out, "report", "report.json"), encoding="utf-8") as fh:
            reports[name] = json.load(fh)
    for rank in (0, 1):
        extra = peaks["big"][rank] - peaks["tiny"][rank]
        assert extra <= 0.65 * size, (f"rank {rank}: {extra / 2**20:.0f} MiB above the tiny-teacher run "
                                     f"with a {size / 2**20:.0f} MiB teacher", peaks)
    # The report still has the teacher's quality, from outputs the ranks generated together.
    report = reports["big"]
    assert "partitioned" in report["settings"]["teacher_outputs_from"]
    teacher = report["models"]["teacher"]
    assert teacher["parameters"] > 50e6 and teacher["rougeLsum"] is not None
    assert teacher["latency_greedy_b1_p50_ms"] is None and report["speedup_b1"] is None
