"""Memory in every phase: a 226 MiB teacher against a tiny one, the same tiny student.

2 CPU ranks, the teacher partitioned (ZeRO-3): each rank's anonymous memory (RssAnon: the rank's
own tensors; the checkpoint's mmap'd pages are page cache, not counted) is sampled through the
whole run (data, teacher loading, the student built from it, training, the final eval, the
export and the report; distill/bench_memory.py's sampler, which prints the same figures by
phase). With the teacher partitioned, a rank holds its half of it plus what ZeRO-3 gathers for
one layer at a time. Measured 2026-12-03: at most 0.60 x the teacher above the tiny run on
either rank (0.5 is the partition itself; the rest is one gathered layer and the teacher
engine). Before: 3.3 and 3.7 x (gathered layers kept live by the teacher config's reuse distance,
and glibc keeping freed gathers in its heap). Issue 13 asks for <= 0.6; the assert allows 0.65,
so run-to-run noise of a few MiB does not fail it while any full copy of the teacher (+1.0) or
any kept gather still does.

1 rank: the teacher is whole (its fp32 safetensors mapped: RssFile), once, also in the report.
"""
from __future__ import annotations

import json
import os

import pytest

from distill.bench_memory import run_and_sample, train_command
from launch_env import clean_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def sampled_runs(workspace, teachers, ranks: int) -> dict[str, tuple[dict, str]]:
    """The same `ranks`-rank run through the report with each teacher: {name: ({rank: {phase or
    (phase, "file"): peak bytes}}, output dir)}."""
    runs = {}
    for name in ("tiny", "big"):
        out = str(teachers["root"] / f"out{ranks}-{name}")
        cmd = train_command(ranks, free_port(), teachers[name], workspace["data"], out, 2) + [
            "--dataset-input-column", "article", "--dataset-target-column", "highlights"]
        rc, log, by_phase = run_and_sample(cmd, clean_env())
        assert rc == 0, log[-4000:]
        assert set(by_phase) == set(range(ranks)), by_phase
        runs[name] = by_phase, out
    return runs


@pytest.mark.slow  # two 2-rank runs with the report: about 2 min on 2 CPU cores
def test_no_rank_holds_more_than_its_share_of_a_zero3_teacher_in_any_phase(workspace, teachers):
    size = os.path.getsize(os.path.join(teachers["big"], "model.safetensors"))
    assert size >= 200 * 2**20
    runs = sampled_runs(workspace, teachers, 2)
    # each rank's peak over the whole run
    peaks = {name: {rank: max(v for k, v in phases.items() if isinstance(k, str)) for rank, phases in by_phase.items()}
             for name, (by_phase, _) in runs.items()}
    for rank in (0, 1):
        extra = peaks["big"][rank] - peaks["tiny"][rank]
        assert extra <= 0.65 * size, (f"rank {rank}: {extra / 2**20:.0f} MiB above the tiny-teacher run "
                                     f"with a {size / 2**20:.0f} MiB teacher", peaks)
    # The report still has the teacher's quality, from outputs the ranks generated together.
    with open(os.path.join(runs["big"][1], "report", "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    assert "partitioned" in report["settings"]["teacher_outputs_from"]
    teacher = report["models"]["teacher"]
    assert teacher["parameters"] > 50e6 and teacher["rougeLsum"] is not None
    assert teacher["latency_greedy_b1_p50_ms"] is None and report["speedup_b1"] is None


@pytest.mark.slow  # two 1-rank runs with the report: about 1 min on 2 CPU cores
def test_one_rank_never_holds_two_copies_of_the_teacher(workspace, teachers):
    """One rank holds the whole teacher (fp32 safetensors: mapped file pages, RssFile). The
    report loads the teacher again: the training run's copy must be gone by then (a name in the
    run's frame kept it: two copies, +2.0 x the teacher, measured before the fix)."""
    size = os.path.getsize(os.path.join(teachers["big"], "model.safetensors"))
    peaks = {name: by_phase[0] for name, (by_phase, _) in sampled_runs(workspace, teachers, 1).items()}

    def held(name, phase):  # the rank's own tensors and its mapped files
        return peaks[name][phase] + peaks[name][phase, "file"]

    assert all(("report", "file") in p for p in peaks.values()), peaks
    phases = [ph for ph in ("load", "train", "eval", "export", "report") if all(ph in p for p in peaks.values())]
    for phase in phases:  # the report's phase always; the others where both runs sampled them
        extra = held("big", phase) - held("tiny", phase)
        assert extra <= 1.4 * size, (phase, f"{extra / 2**20:.0f} MiB above the tiny-teacher run with a "
                                            f"{size / 2**20:.0f} MiB teacher", peaks)
