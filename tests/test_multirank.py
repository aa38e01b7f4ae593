"""Multi-rank runs through the real launchers on CPU ranks (DeepSpeed's CPU accelerator, gloo).

These are the slow tests of the suite (each launch imports torch/DeepSpeed in every rank): the
ZeRO-3 teacher partitioning, the ZeRO-2 student, the DistributedSampler and the all-reduced
logging only really run with more than one rank.
"""
import json
import os
import subprocess
import sys

from launch_env import clean_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(workspace, out, teacher="bart"):
    return ["--model-type", teacher, "--teacher-local-path", workspace[teacher], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out, "--skip-report", "--max-source-length", "32", "--max-target-length", "16",
            "--logging-steps", "2", "--learning-rate", "3e-3", "--seed", "7"]


def launch(cmd, timeout=420):
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def losses(out):
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    return [h["loss"] for h in metrics["history"] if "loss" in h], metrics


def varied_length_data(folder) -> str:
    """Targets of 1 to 12 words: micro-batches then differ a lot in target tokens, which is where
    a per-micro-batch token mean would weigh tokens unequally."""
    import random

    # The tiny teachers' tokenizers were trained on these words (tests/conftest.py).
    vocab = "the cat dog bird sat ran flew on under mat home tree fast slow red blue green one two".split()
    rng = random.Random(5)
    os.makedirs(folder)
    for split, n in (("train", 96), ("validation", 16), ("test", 8)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for _ in range(n):
                words = [rng.choice(vocab) for _ in range(rng.randint(4, 12))]
                row = {"article": " ".join(words), "highlights": " ".join(words[:rng.randint(1, len(words))])}
                fh.write(json.dumps(row) + "\n")
    return folder


def launch_two_nodes(args, timeout=420):
    """The same command on two "nodes" of one rank each (two torchrun agents on this machine,
    --nnodes 2, one rendezvous): what a user runs on each machine of a 2-node job, the output
    folder on a filesystem both see."""
    from launch_env import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"] + args,
                              cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return max(p.returncode for p in procs), "\n".join(outs)


def student_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model.safetensors"))


def test_gradient_is_the_token_mean_of_the_global_batch_however_it_is_split(workspace, tmp_path):
    """Global batch 8 taken as 1 micro-batch of 8 on 1 rank (the plain token mean), as 4
    micro-batches of 2 on 1 rank, and as 2 micro-batches of 2 on each of 2 ranks (torchrun), on
    targets of 1 to 12 words: same data per step, so the students must end the same. Weighting
    each micro-batch's own token mean equally (the bug transformers fixed with
    num_items_in_batch) left the split runs' weights 3e-4 from the reference on average (8e-3 at
    most); the token-weighted steps end 7e-10 (1.4e-7) away. The 2 ranks also run as 2 nodes of
    one rank each (torchrun --nnodes 2, c10d rendezvous on 127.0.0.1), which must train the same
    weights and log the same losses as 2 ranks of one node."""
    data = varied_length_data(str(tmp_path / "data"))
    runs = {"one_micro_batch": (1, "8"), "accum_4": (1, "2"), "two_ranks_accum_2": (2, "2"),
            "two_nodes_accum_2": ("nodes", "2")}
    weights, evals = {}, {}
    for name, (ranks, per_device) in runs.items():
        out = str(tmp_path / name)
        args = ["main.py"] + common(workspace, out) + [
            "--dataset-local-path", data, "--max-steps", "6", "--global-batch-size", "8",
            "--per-device-batch-size", per_device, "--alpha", "0.5"]
        if ranks == "nodes":
            rc, log = launch_two_nodes(args)
        else:
            launcher = ([sys.executable] if ranks == 1 else
                        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                         "--master_port", free_port()])
            rc, log = launch(launcher + args)
        assert rc == 0, log[-4000:]
        weights[name] = student_weights(out)
        evals[name] = losses(out)[1]["final_eval"]["eval_loss"]
        assert losses(out)[1]["world_size"] == (1 if ranks == 1 else 2)
    ref = weights["one_micro_batch"]
    for name in ("accum_4", "two_ranks_accum_2", "two_nodes_accum_2"):
        # Only rounding may differ (sums in another order); Adam's first steps, which move each
        # weight by about the learning rate (3e-3) whatever its gradient, amplify it a little.
        diff = max(float((weights[name][k] - ref[k]).abs().max()) for k in ref)
        mean = sum(float((weights[name][k] - ref[k]).abs().sum()) for k in ref) / sum(v.numel() for v in ref.values())
        assert mean < 1e-7 and diff < 1e-5, (name, mean, diff)
        assert abs(evals[name] - evals["one_micro_batch"]) < 1e-5 * evals["one_micro_batch"], evals
    curve = {name: losses(str(tmp_path / name))[0] for name in ("two_ranks_accum_2", "two_nodes_accum_2")}
    assert len(curve["two_nodes_accum_2"]) == 3
    for a, b in zip(curve["two_ranks_accum_2"], curve["two_nodes_accum_2"]):
        assert abs(a - b) <= 1e-6 * abs(a), curve


def test_world_size_that_does_not_divide_global_batch(workspace, tmp_path):
    out = str(tmp_path / "bad")
    rc, log = launch(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "distill/train.py"] + common(workspace, out)
                     + ["--max-steps", "2", "--per-device-batch-size", "4", "--global-batch-size", "12"])
    assert rc != 0
    assert "--global-batch-size 12 is not a multiple of --per-device-batch-size 4 x world size 2" in log
    assert "Traceback" not in log
    assert not os.path.exists(out)
