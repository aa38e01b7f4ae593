"""The teacher cache: `python -m distill.cache_teacher` and training with --teacher-cache.

The teacher is the workspace's tiny random T5 (vocabulary 34); K is kept small. One process runs
in-process through main(); the kill and the 2-rank runs are subprocesses.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from distill import cache_teacher, models, teacher_cache_files as files
from distill.teacher_cache import sample_weights
from distill.train import main as train_main
from launch_env import clean_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8


def data_args(workspace, *extra, teacher=None):
    return ["--model-type", "t5", "--teacher-local-path", teacher or workspace["t5"], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--max-source-length", "32", "--max-target-length", "16", "--max-train-samples", "96",
            "--per-device-batch-size", "8"] + list(extra)


def cache_args(workspace, out, *extra, teacher=None):
    # 96 train rows in shards of 40: 40, 40, 16; validation 24: one shard.
    return data_args(workspace, "--cache-dir", out, "--top-k", str(K), "--shard-size", "40", *extra,
                     teacher=teacher)


def train_args(workspace, out, cache, *extra):
    return data_args(workspace, "--output-dir", out, "--max-steps", "2", "--skip-report", "--logging-steps", "1",
                     "--teacher-cache", cache, *extra)


def shard_bytes(folder):
    """name -> (metadata, {tensor name: raw bytes}) of every shard (the header's key order is not
    fixed: safetensors writes its metadata map in any order)."""
    out = {}
    for n in sorted(os.listdir(folder)):
        if n.endswith(".safetensors"):
            tensors, meta = files.read_shard(os.path.join(folder, n))
            out[n] = (meta, {k: t.contiguous().view(torch.uint8).numpy().tobytes() for k, t in tensors.items()})
    return out


@pytest.fixture(scope="module")
def cache(workspace, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "topk")
    assert cache_teacher.main(cache_args(workspace, out)) == 0
    return out


# ---- the build ----------------------------------------------------------------------------------

def test_manifest_shards_and_size(cache, workspace):
    manifest = files.read_manifest(cache)
    assert manifest["complete"] is True
    ident = manifest["identity"]
    assert (ident["top_k"], ident["method"], ident["dtype"]) == (K, "topk", "fp16")
    assert {s: v["rows"] for s, v in ident["splits"].items()} == {"train": 96, "validation": 24}
    assert sorted(shard_bytes(cache)) == ["train-00000.safetensors", "train-00001.safetensors",
                                          "train-00002.safetensors", "validation-00000.safetensors"]
    stats = manifest["info"]["this_run"]
    assert stats["bytes"] / stats["tokens"] <= 6 * K + 16  # the bound, per target token


def test_cached_targets_are_the_teachers(cache, workspace):
    """A shard's rows hold the teacher's top-K ids and log-probabilities (fp16) and the exact
    log tail mass, for the target tokens training feeds it."""
    from distill.data import Seq2SeqCollator

    tensors, meta = files.read_shard(os.path.join(cache, "train-00001.safetensors"))
    assert (meta["split"], meta["start"], meta["end"]) == ("train", "40", "80")
    tokenizer = models.load_tokenizer(workspace["t5"], None)
    teacher = models.load_teacher(workspace["t5"], "t5")
    from distill.config import DistillConfig
    from distill.training_data import training_splits

    cfg = DistillConfig(**{"model_type": "t5", "teacher_local_path": workspace["t5"],
                           "dataset_local_path": workspace["data"], "input_column": "article",
                           "target_column": "highlights", "max_source_length": 32, "max_target_length": 16,
                           "max_train_samples": 96})
    _, tokenized = training_splits(cfg, workspace["t5"], tokenizer, log=lambda m: None)
    rows = [tokenized["train"][i] for i in range(40, 43)]
    batch = Seq2SeqCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).logits
    mask = batch["labels"] != -100
    logp = torch.log_softmax(logits[mask].double(), -1)
    n = int(mask.sum())
    assert [bytes(k) for k in tensors["row_keys"][:3].numpy()] == [
        files.row_key(r["input_ids"], r["labels"]) for r in rows]
    assert torch.equal(tensors["labels"][:n].long(), batch["labels"][mask])
    top = logp.topk(K, -1)
    assert torch.equal(tensors["ids"][:n].long(), top.indices)
    assert torch.allclose(tensors["logprobs"][:n].double(), top.values, atol=2e-3, rtol=1e-3)
    tail = logp.scatter(1, top.indices, float("-inf")).logsumexp(1)
    assert torch.allclose(tensors["tail"][:n].double(), tail, atol=1e-5)


def test_sample_weights_are_the_draws_counts_at_t1_and_importance_weights_otherwise():
    ids = torch.tensor([[5, 3, 5, 5], [1, 2, 3, 4]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]]))
    out_ids, x = sample_weights(ids, lp, 1.0)
    w = torch.softmax(x, 1)
    assert out_ids.tolist() == [[3, 5, 5, 5], [1, 2, 3, 4]]
    assert torch.allclose(w, torch.tensor([[0.25, 0.75, 0, 0], [0.25, 0.25, 0.25, 0.25]]))
    _, x2 = sample_weights(ids, lp, 2.0)  # count * p^(1/T - 1), normalised, through softmax(x / T)
    w2 = torch.softmax(x2 / 2.0, 1)
    want = torch.tensor([1 * 0.2 ** -0.5, 3 * 0.5 ** -0.5])
    assert torch.allclose(w2[0, :2], want / want.sum())


# ---- training from it ---------------------------------------------------------------------------

def test_training_from_the_cache_never_loads_the_teacher(cache, workspace, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(models, "load_teacher", refuse)
    out = str(tmp_path / "student")
    # the report too: the build kept the teacher's greedy outputs for the report's rows
    argv = [a for a in train_args(workspace, out, cache) if a != "--skip-report"]
    assert train_main(argv) == 0
    log = capsys.readouterr().out
    assert "the teacher is not loaded for training" in log and "teacher not loaded (targets from the cache, topk K=8)" in log
    assert "report: the teacher's outputs made by the teacher cache's build" in log
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 2 and metrics["teacher_memory_rank0"] is None
    assert all(h["kl"] > 0 for h in metrics["history"] if "kl" in h)
    report = json.load(open(os.path.join(out, "report", "report.json")))
    made = files.read_report_outputs(cache)
    assert made["split"] == "test" and len(made["outputs"]) == 16
    assert report["models"]["teacher"]["exact_match"] is not None


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_student_from_the_teachers_files_equals_the_student_from_the_loaded_teacher(workspace, model_type):
    from distill import pseudo_label_files

    source = workspace[model_type]
    config = models.load_teacher_config(source, model_type)
    teacher = models.load_teacher(source, model_type, config=config)
    get = models.file_tensor_getter(pseudo_label_files.teacher_fingerprint(source)["paths"], config)
    kw = dict(num_encoder_layers=2, num_decoder_layers=1, log=lambda m: None)
    a, _ = models.build_student(config, get, **kw)
    b, _ = models.build_student(config, models.module_tensor_getter(teacher), **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def full_cache(workspace, tmp_path_factory):
    """A cache of the whole vocabulary (K = V)."""
    full = str(tmp_path_factory.mktemp("cache") / "full")
    vocab = models.load_teacher_config(workspace["t5"], "t5").vocab_size  # 34: the toy tokenizer's
    assert cache_teacher.main(cache_args(workspace, full)[:-4] + ["--top-k", str(vocab), "--shard-size", "200"]) == 0
    return full


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_whole_vocabulary_cache_gives_the_live_teachers_loss(workspace, full_cache, tmp_path, divergence):
    """K = V: the sparse objective is the full divergence, so a run from the cache logs the same
    losses as the run with the live teacher (up to the fp16 rounding of the cached values)."""
    full = full_cache
    live, cached = str(tmp_path / "live"), str(tmp_path / "cached")
    extra = ["--divergence", divergence]
    assert train_main(train_args(workspace, live, full)[:-2] + extra) == 0
    assert train_main(train_args(workspace, cached, full) + extra) == 0
    h_live = json.load(open(os.path.join(live, "metrics.json")))["history"]
    h_cache = json.load(open(os.path.join(cached, "metrics.json")))["history"]
    assert len(h_live) == len(h_cache) == 2
    for a, b in zip(h_live, h_cache):
        for key in ("loss", "ce", "kl"):
            assert a[key] == pytest.approx(b[key], rel=2e-3), (key, a, b)


def test_sample_cache_trains(workspace, tmp_path, capsys):
    out = str(tmp_path / "sample")
    assert cache_teacher.main(cache_args(workspace, out, "--cache-method", "sample", "--cache-dtype", "bf16")) == 0
    tensors, _ = files.read_shard(os.path.join(out, "validation-00000.safetensors"))
    assert "tail" not in tensors and tensors["logprobs"].dtype == torch.bfloat16
    student = str(tmp_path / "student")
    assert train_main(train_args(workspace, student, out, "--divergence", "jsd")) == 0
    assert "sample K=8" in capsys.readouterr().out
    # no teacher mass off the draws: the reverse KL would be infinite, so it is refused
    other = str(tmp_path / "reverse")
    _refused(capsys, train_main, train_args(workspace, other, out, "--divergence", "reverse_kl"),
             "the reverse KL is infinite", other, out)


# ---- resume after a kill, and two ranks ---------------------------------------------------------

KILL_ON_SECOND_SHARD = """
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("train-00001.safetensors"):  # written to its temporary name: die before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from distill.cache_teacher import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_then_resume_on_two_ranks_equals_an_uninterrupted_build_and_trains_on_two_ranks(
        cache, workspace, tmp_path, capsys):
    out = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SHARD] + cache_args(workspace, out),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    names = sorted(os.listdir(out))
    assert "train-00000.safetensors" in names and "train-00001.safetensors" not in names
    assert files.read_manifest(out)["complete"] is False
    student = str(tmp_path / "student")
    assert train_main(train_args(workspace, student, out)) == 2
    assert "is incomplete" in capsys.readouterr().err and not os.path.exists(student)
    first = os.stat(os.path.join(out, "train-00000.safetensors")).st_mtime_ns

    # The rest is made by 2 ranks with the teacher partitioned (ZeRO-3): the same bytes.
    proc = subprocess.run(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "--module",
                           "distill.cache_teacher"] + cache_args(workspace, out),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "1 of 4 shards are complete" in log
    held = re.findall(r"\[rank (\d)\] teacher parameters on this rank: ([\d,]+) of ([\d,]+)", log)
    assert {r for r, _, _ in held} == {"0", "1"}, log[-4000:]
    assert os.stat(os.path.join(out, "train-00000.safetensors")).st_mtime_ns == first
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert files.read_manifest(out)["complete"] is True
    assert shard_bytes(out) == shard_bytes(cache)

    # Two ranks train from it: no rank loads the teacher.
    proc = subprocess.run(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "distill/train.py"]
                          + train_args(workspace, student, out), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "teacher parameters on this rank" not in log and "teacher not loaded (targets from the cache" in log
    assert json.load(open(os.path.join(student, "metrics.json")))["world_size"] == 2


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------

def _refused(capsys, run, argv, needle, *folders):
    before = {f: sorted(os.listdir(f)) if os.path.isdir(f) else None for f in folders}
    assert run(argv) == 2
    # one error line, last (after the tokenizing bars when the data had to be read to see it)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert errors == [err[-1]] and needle in err[-1] and "Traceback" not in "\n".join(err), err
    assert {f: sorted(os.listdir(f)) if os.path.isdir(f) else None for f in folders} == before


@pytest.mark.parametrize("extra,needle", [
    (["--max-target-length", "12"], "was built with --max-target-length 16"),
    (["--max-source-length", "24"], "was built with --max-source-length 32"),
    (["--source-prefix", "x: "], "was built with --source-prefix"),
    (["--max-train-samples", "120"], "does not hold 24 of 120 train rows"),
    (["--alpha", "1"], "--teacher-cache does not work with --alpha 1"),
    (["--loss-impl", "naive"], "--teacher-cache does not work with --loss-impl naive"),
    (["--hidden-loss-weight", "1"], "--teacher-cache does not work with --hidden-loss-weight"),
])
def test_training_with_a_cache_that_does_not_match_is_refused(cache, workspace, tmp_path, capsys, extra, needle):
    out = str(tmp_path / "student")
    _refused(capsys, train_main, train_args(workspace, out, cache) + extra, needle, out, cache)


def test_a_cache_from_another_teacher_is_refused(cache, workspace, tmp_path, capsys):
    other = str(tmp_path / "other")  # the same teacher with one weight changed
    teacher = models.load_teacher(workspace["t5"], "t5")
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] += 0.5
    teacher.save_pretrained(other)
    models.load_tokenizer(workspace["t5"], None).save_pretrained(other)
    out = str(tmp_path / "student")
    argv = train_args(workspace, out, cache)
    argv[argv.index(workspace["t5"])] = other
    _refused(capsys, train_main, argv, "was built by another teacher", out, cache)


@pytest.mark.parametrize("damage,needle", [
    (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "is damaged"),
    (lambda p: _flip_last_byte(p), "fails its checksum"),
    (os.remove, "is missing"),
])
def test_a_damaged_or_missing_shard_is_named(cache, workspace, tmp_path, capsys, damage, needle):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)
    shard = os.path.join(copy, "train-00001.safetensors")
    damage(shard)
    out = str(tmp_path / "student")
    before = sorted(os.listdir(copy))
    assert train_main(train_args(workspace, out, copy)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1] and "train-00001.safetensors" in err[-1], err
    assert not os.path.exists(out) and sorted(os.listdir(copy)) == before


def _flip_last_byte(path):
    with open(path, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))


@pytest.mark.parametrize("argv_change,needle", [
    (lambda a, ws, tmp: a + ["--top-k", "0"], "--top-k 0 must be >= 1"),
    (lambda a, ws, tmp: a + ["--top-k", "35"], "--top-k 35 is larger than the teacher's vocabulary (34 tokens)"),
    (lambda a, ws, tmp: a + ["--cache-method", "random"], "--cache-method"),
])
def test_build_bad_options(workspace, tmp_path, capsys, argv_change, needle):
    out = str(tmp_path / "c")
    _refused(capsys, cache_teacher.main, argv_change(cache_args(workspace, out), workspace, tmp_path), needle, out)


def test_a_folder_that_is_not_a_cache(workspace, tmp_path, capsys, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "student")
    _refused(capsys, train_main, train_args(workspace, out, str(empty)), "has no manifest.json", out)
    # a rebuild into the same folder with other options is refused, then replaced on request
    _refused(capsys, cache_teacher.main, cache_args(workspace, cache, "--top-k", "4"),
             "came from other settings (top_k: 8 there, 4 now)", cache)


def test_resume_from_the_cache_continues_exactly(cache, workspace, tmp_path):
    """A run from the cache resumed at step 2 of 4 logs the uninterrupted run's losses."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    argv = train_args(workspace, full, cache)
    argv[argv.index("--max-steps") + 1] = "4"
    assert train_main(argv + ["--save-steps", "2"]) == 0
    step2 = os.path.join(full, "checkpoints", "step-000002")
    argv = train_args(workspace, resumed, cache)
    argv[argv.index("--max-steps") + 1] = "4"
    assert train_main(argv + ["--resume-from", step2]) == 0
    h_full = json.load(open(os.path.join(full, "metrics.json")))["history"]
    h_resumed = json.load(open(os.path.join(resumed, "metrics.json")))["history"]
    tail = [h for h in h_full if h["step"] > 2]
    assert len(tail) == 2 and [h["step"] for h in h_resumed][-2:] == [3, 4]
    for a, b in zip(tail, h_resumed[-2:]):
        for key in ("loss", "ce", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
