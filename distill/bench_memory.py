"""python -m distill.bench_memory: each rank's peak memory by phase of a training run, with a
teacher of about 226 MiB against the same run with a tiny one, on 1 and on 2 CPU ranks.

    python -m distill.bench_memory [--ranks 1,2] [--steps 2]

Every run is `deepspeed --num_gpus N distill/train.py` through the final report (the same
student: 1+1 layers at hidden size 64, so what the run adds on top of the teacher stays small;
a generated task of 200 rows). The ranks' anonymous memory (RssAnon: their own tensors; the
checkpoint's mmap'd pages are page cache, not counted) is sampled every 20 ms and each sample is
put in the phase rank 0's output says the run is in:

    load     from the start: data, the teacher, the student built from it, the engines
    train    from "world size ..." (the engines are built) to the last step's progress line
    eval     to "final eval loss"
    export   to "distilled student written"
    report   to the end (the teacher's and the student's generations, the speed rounds)

Printed per world size and rank: the peak RssAnon MiB of each phase with the big teacher and
what it adds over the tiny-teacher run's same phase as a multiple of the big teacher's size (two
ranks partition it with ZeRO-3: 0.5 is the partition, the rest one gathered layer and the
teacher engine); then the same of RssFile (mapped files: the libraries, and on one rank the
fp32 teacher, which safetensors maps without a copy, so its weights show there, not in RssAnon). tests/robustness/test_memory.py asserts the
2-rank bound with the same sampler. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from distill.distributed import free_port

PHASES = ("load", "train", "eval", "export", "report")
# rank 0's line that starts each phase after "load"
_STARTS = {"train": re.compile(r"^world size \d+;"), "eval": re.compile(r"step (\d+)/\1 \(100%\)"),
           "export": re.compile(r"^final eval loss"), "report": re.compile(r"^distilled student written")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A launcher's variables would make a child think it is one rank of a bigger job; DISTILL_FAULT
# would inject a fault the run did not ask for.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "DISTILL_FAULT")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without launcher variables, offline, one thread per process (the ranks share
    the machine's cores), unbuffered output; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (children of all its threads, read from /proc), parents
    first; processes that end meanwhile are skipped."""
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return found


def _rank_and_memory(pid: int) -> tuple[int | None, int, int]:
    """(RANK from the process's environment or None, RssAnon bytes, RssFile bytes)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    with open(f"/proc/{pid}/status") as fh:
        status = fh.read()
    anon = int(status.split("RssAnon:")[1].split()[0]) * 1024
    file = int(status.split("RssFile:")[1].split()[0]) * 1024
    rank = env.get(b"RANK")
    return (None if rank is None else int(rank)), anon, file


def run_and_sample(cmd: list[str], env: dict, cwd: str = ROOT, timeout: float = 600):
    """Run `cmd`; sample the memory of every process under it every 20 ms. Returns the exit code,
    the output, and {rank: {phase: peak RssAnon bytes}} for the training ranks (the processes
    below the launcher with RANK in their environment), phases as rank 0's output marks them; the
    peaks of RssFile (mapped file pages: safetensors weights read without a copy) under the key
    (phase, "file")."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, dict[str, int]] = {}
    state = {"phase": "load"}
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            for phase, start in _STARTS.items():
                if PHASES.index(phase) > PHASES.index(state["phase"]) and start.search(line.strip()):
                    state["phase"] = phase

    def sample():
        while proc.poll() is None:
            phase = state["phase"]
            for pid in process_tree(proc.pid):
                if pid == proc.pid:
                    continue
                try:
                    rank, anon, file = _rank_and_memory(pid)
                except (OSError, IndexError, ValueError):
                    continue
                if rank is not None:
                    by_phase = peaks.setdefault(rank, {})
                    by_phase[phase] = max(by_phase.get(phase, 0), anon)
                    by_phase[phase, "file"] = max(by_phase.get((phase, "file"), 0), file)
            time.sleep(0.02)

    reader = threading.Thread(target=read, daemon=True)
    watcher = threading.Thread(target=sample, daemon=True)
    reader.start()
    watcher.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    watcher.join(timeout=5)
    return proc.returncode, "".join(lines), peaks


def train_command(ranks: int, port: str, teacher: str, data: str, out: str, steps: int) -> list[str]:
    return ["deepspeed", "--master_port", port, "--num_gpus", str(ranks), "distill/train.py",
            "--deepspeed", "ds_configs/zero2.json", "--model-type", "bart", "--teacher-local-path", teacher,
            "--dataset-local-path", data, "--output-dir", out,
            "--hidden-dim", "64", "--num-encoder-layers", "1", "--num-decoder-layers", "1",
            "--max-steps", str(steps), "--per-device-batch-size", "4", "--max-eval-samples", "8",
            "--max-source-length", "16", "--max-target-length", "8", "--report-samples", "8"]


def make_inputs(root: str) -> dict:
    """A generated task of 200 rows and two teachers with tokenizers trained on it: `big`
    (8+8 layers of d_model 512, about 226 MiB) and `tiny`."""
    from distill.demo_task import make_task
    from distill.toy import save_tiny_teacher

    data = os.path.join(root, "task")
    make_task(data, seed=0, n_train=200, n_validation=24, n_test=16)
    with open(os.path.join(data, "train.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    texts = [r["source"] for r in rows] + [r["target"] for r in rows]
    big = save_tiny_teacher(os.path.join(root, "big"), "bart", texts, vocab_size=160, d_model=512, layers=8,
                            heads=8, ffn=2048)
    tiny = save_tiny_teacher(os.path.join(root, "tiny"), "bart", texts, vocab_size=160)
    return {"data": data, "big": big, "tiny": tiny}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.bench_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma list of world sizes (CPU ranks)")
    p.add_argument("--steps", type=int, default=2, help="training steps of each run")
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.ranks.split(",")]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --ranks {args.ranks!r} must be a comma list of world sizes >= 1, e.g. 1,2", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps {args.steps} must be >= 1", file=sys.stderr)
        return 2
    env = clean_env()
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as root:
        inputs = make_inputs(root)
        size = os.path.getsize(os.path.join(inputs["big"], "model.safetensors"))
        print(f"teacher {size / mib:.0f} MiB (8+8 layers, d_model 512) against a tiny one; student 1+1 layers at "
              f"hidden 64; {args.steps} steps; one thread per rank. Per phase: peak RssAnon MiB with the big "
              "teacher (in brackets: what it adds over the tiny teacher's run, as a multiple of the teacher's "
              "size), then the same of RssFile (mapped files: libraries, and weights read from safetensors "
              "without a copy); "
              "-: the phase was shorter than one 20 ms sample")
        for ranks in sizes:
            peaks = {}
            for name in ("tiny", "big"):
                out = os.path.join(root, f"out-{ranks}-{name}")
                cmd = train_command(ranks, str(free_port()), inputs[name], inputs["data"], out, args.steps)
                rc, log, peaks[name] = run_and_sample(cmd, env)
                if rc != 0 or set(peaks[name]) != set(range(ranks)):
                    print(f"error: the {ranks}-rank run with the {name} teacher failed (exit {rc}):\n{log[-3000:]}",
                          file=sys.stderr)
                    return 1
            print(f"\n{ranks} rank(s), teacher ZeRO stage {3 if ranks > 1 else 0}")
            print("| rank | " + " | ".join(PHASES) + " |")
            print("|---" * (len(PHASES) + 1) + "|")
            for rank in range(ranks):
                cells = []
                for phase in PHASES:
                    big, tiny = peaks["big"][rank].get(phase), peaks["tiny"][rank].get(phase)
                    if big is None or tiny is None:
                        cells.append("-")
                        continue
                    file, file_tiny = peaks["big"][rank][phase, "file"], peaks["tiny"][rank][phase, "file"]
                    cells.append(f"{big / mib:.0f} ({(big - tiny) / size:+.2f}) / {file / mib:.0f} "
                                 f"({(file - file_tiny) / size:+.2f})")
                print(f"| {rank} | " + " | ".join(cells) + " |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
