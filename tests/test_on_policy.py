"""On-policy distillation (GKD): generated targets' labels, the per-micro-batch choice, runs on one
process and on two DeepSpeed CPU ranks (ZeRO-2 student, ZeRO-3 teacher), bad input."""
import json
import os
import re
import subprocess

import pytest
import torch

from distill.on_policy import BRANCHES, choose_targets, generate_labels, labels_from_sequences, seeded
from distill.train import main
from launch_env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 6


# ---- labels from generated sequences ------------------------------------------------------------

def test_labels_strip_decoder_start_and_mask_after_eos_or_pad_bart_ids():
    # BART: decoder start </s>=2 (also EOS), pad 1. generate pads finished rows with pad.
    seqs = torch.tensor([[2, 7, 8, 2, 1, 1],     # EOS at 3: kept, pads after it masked
                         [2, 9, 1, 4, 5, 6],     # a sampled pad ends the row (not kept)
                         [2, 3, 4, 5, 6, 7],     # never ended: all kept
                         [2, 2, 1, 1, 1, 1]])    # EOS first: one target
    labels = labels_from_sequences(seqs, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)
    assert labels.tolist() == [[7, 8, 2, -100, -100],
                               [9, -100, -100, -100, -100],
                               [3, 4, 5, 6, 7],
                               [2, -100, -100, -100, -100]]


def test_labels_t5_ids_start_equals_pad_eos_list_truncation_and_trailing_columns():
    # T5: decoder start = pad = 0, EOS 1; eos_token_id may be a list; max_new_tokens truncates.
    seqs = torch.tensor([[0, 5, 1, 0, 0, 0, 0],
                         [0, 6, 7, 9, 0, 0, 0]])
    labels = labels_from_sequences(seqs, decoder_start_token_id=0, eos_token_id=[1, 9], pad_token_id=0,
                                   max_new_tokens=4)
    assert labels.tolist() == [[5, 1, -100], [6, 7, 9]]  # the all-masked 4th column is dropped
    short = labels_from_sequences(torch.tensor([[0, 5, 6, 7, 8, 9]]), decoder_start_token_id=0,
                                  eos_token_id=1, pad_token_id=0, max_new_tokens=3)
    assert short.tolist() == [[5, 6, 7]]
    empty = labels_from_sequences(torch.tensor([[0, 0, 0]]), decoder_start_token_id=0, eos_token_id=1,
                                  pad_token_id=0)
    assert empty.tolist() == [[-100]]  # nothing generated: a (B, 1) all-masked row, loss 0


def test_choice_is_a_function_of_seed_and_index_with_the_ratios_shares():
    draws = [choose_targets(7, i, 0.5, 0.3) for i in range(2000)]
    assert draws == [choose_targets(7, i, 0.5, 0.3) for i in range(2000)]  # what every rank computes
    assert draws != [choose_targets(8, i, 0.5, 0.3) for i in range(2000)]
    share = {b: draws.count(b) / len(draws) for b in BRANCHES}
    assert abs(share["on_policy"] - 0.5) < 0.04 and abs(share["seq_kd"] - 0.3) < 0.04
    assert abs(share["dataset"] - 0.2) < 0.04
    assert {choose_targets(1, i, 1.0, 0.0) for i in range(200)} == {"on_policy"}
    assert {choose_targets(1, i, 0.0, 1.0) for i in range(200)} == {"seq_kd"}
    assert {choose_targets(1, i, 0.0, 0.0) for i in range(200)} == {"dataset"}


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_generation_samples_plainly_and_restores_the_mode(workspace, model_type):
    """The model's own generation config (beams, min_length, no-repeat n-grams of a summariser)
    does not apply: sampling at the temperature, at most max_new_tokens; train mode restored."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(workspace[model_type]).train()
    model.generation_config.update(num_beams=4, min_length=40, max_length=60, no_repeat_ngram_size=2)
    ids = torch.randint(5, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(generate_labels(model, ids, torch.ones_like(ids), temperature=1.0, max_new_tokens=NEW_TOKENS))
    assert model.training
    assert runs[0].shape[0] == 3 and 1 <= runs[0].shape[1] <= NEW_TOKENS
    assert torch.equal(runs[0], runs[1])  # sampling follows torch's seed
    valid = runs[0][runs[0] != -100]
    assert ((valid >= 0) & (valid < model.config.vocab_size)).all()


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded(123, torch.device("cpu")):
        a = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is untouched
    with seeded(123, torch.device("cpu")):
        assert torch.equal(torch.rand(5), a)
    with seeded(124, torch.device("cpu")):
        assert not torch.equal(torch.rand(5), a)


# ---- runs ---------------------------------------------------------------------------------------

def _argv(workspace, out, *extra, teacher="bart"):
    return ["--model-type", teacher, "--teacher-local-path", workspace[teacher], "--dataset-local-path",
            workspace["data"], "--dataset-input-column", "article", "--dataset-target-column", "highlights",
            "--output-dir", out, "--skip-report", "--per-device-batch-size", "8", "--max-source-length", "32",
            "--max-target-length", "16", "--on-policy-max-new-tokens", str(NEW_TOKENS), "--seed", "7",
            "--logging-steps", "2"] + list(extra)


def _metrics(out):
    return json.load(open(os.path.join(out, "metrics.json")))


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_every_micro_batch_on_policy(workspace, tmp_path, capsys, model_type):
    out = str(tmp_path / "out")
    assert main(_argv(workspace, out, "--on-policy-ratio", "1", "--max-steps", "4", teacher=model_type)) == 0
    metrics = _metrics(out)
    assert metrics["batches"] == {"dataset": 0, "on_policy": 4, "seq_kd": 0}
    logged = [h for h in metrics["history"] if "loss" in h]
    assert len(logged) == 2 and logged[-1]["batches"] == metrics["batches"]
    for h in logged:
        assert "ce" not in h  # no CE on generated targets
        assert torch.isfinite(torch.tensor(h["loss"]))
        # alpha is 0 on generated targets: the loss is T^2 times the divergence (default T = 2)
        assert h["loss"] == pytest.approx(4.0 * h["kl"], rel=1e-4, abs=1e-9)
    # the targets were the student's samples: at most NEW_TOKENS per row (dataset targets reach 16)
    assert 0 < metrics["tokens_seen"] <= 4 * 8 * NEW_TOKENS
    printed = capsys.readouterr().out
    assert "student samples 1" in printed and "micro-batches by targets: 0 dataset, 4 on-policy, 0 seq-KD" in printed


def test_mixture_follows_the_ratios_and_the_seed(workspace, tmp_path, capsys):
    out = str(tmp_path / "out")
    # 160 rows / 8 = 20 micro-batches: one epoch, micro-batch indices 0..19
    assert main(_argv(workspace, out, "--on-policy-ratio", "0.5", "--seq-kd-ratio", "0.5",
                      "--max-steps", "20", "--logging-steps", "5")) == 0
    expected = [choose_targets(7, i, 0.5, 0.5) for i in range(20)]
    counts = _metrics(out)["batches"]
    assert counts == {b: expected.count(b) for b in BRANCHES}
    assert counts["dataset"] == 0 and 5 <= counts["on_policy"] <= 15 and counts["on_policy"] + counts["seq_kd"] == 20
    assert (f"micro-batches by targets: 0 dataset, {counts['on_policy']} on-policy, {counts['seq_kd']} seq-KD"
            in capsys.readouterr().out)


def test_dataset_share_keeps_its_ce(workspace, tmp_path):
    out = str(tmp_path / "out")
    assert main(_argv(workspace, out, "--on-policy-ratio", "0.25", "--seq-kd-ratio", "0.25",
                      "--max-steps", "8", "--logging-steps", "8")) == 0
    metrics = _metrics(out)
    expected = [choose_targets(7, i, 0.25, 0.25) for i in range(8)]
    assert metrics["batches"] == {b: expected.count(b) for b in BRANCHES}
    (entry,) = [h for h in metrics["history"] if "loss" in h]
    assert ("ce" in entry) == (metrics["batches"]["dataset"] > 0) and entry["batches"] == metrics["batches"]


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--on-policy-ratio", "1.5"], "--on-policy-ratio 1.5 is outside [0, 1]"),
    (["--seq-kd-ratio", "-0.1"], "--seq-kd-ratio -0.1 is outside [0, 1]"),
    (["--on-policy-ratio", "0.7", "--seq-kd-ratio", "0.5"], "is more than 1"),
    (["--on-policy-ratio", "0.5", "--alpha", "1"], "--on-policy-ratio needs the teacher"),
    (["--seq-kd-ratio", "0.5", "--alpha", "1"], "--seq-kd-ratio needs the teacher"),
    (["--on-policy-temperature", "0"], "--on-policy-temperature 0.0 must be > 0"),
    (["--on-policy-max-new-tokens", "0"], "--on-policy-max-new-tokens 0 must be >= 1"),
])
def test_bad_input_one_line_exit_2(workspace, tmp_path, capsys, extra, needle):
    out = str(tmp_path / "out")
    assert main(_argv(workspace, out, "--max-steps", "2", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not os.path.exists(out)


# ---- two DeepSpeed CPU ranks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def eos_teacher(workspace, tmp_path_factory):
    """The tiny BART teacher with EOS made likely (final_logits_bias, p(EOS) about 0.4 a step), so
    samples end after 1-6 tokens and the two ranks' micro-batches mostly end at different lengths:
    the synced ZeRO-3 generation then steps a finished rank until the other is done."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("eos_teacher"))
    model = AutoModelForSeq2SeqLM.from_pretrained(workspace["bart"])
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = 5.0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(workspace["bart"]).save_pretrained(path)
    return path


def test_two_ranks_take_the_same_branches_and_do_not_deadlock(workspace, eos_teacher, tmp_path):
    out = str(tmp_path / "ds2")
    argv = _argv(workspace, out, "--teacher-local-path", eos_teacher, "--per-device-batch-size", "4",
                 "--max-steps", "8", "--on-policy-ratio", "0.5", "--seq-kd-ratio", "0.5")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # A deadlock shows as a timeout here instead of a hung suite.
    proc = subprocess.run(["deepspeed", "--master_port", free_port(), "--num_gpus", "2", "distill/train.py",
                           "--deepspeed", "ds_configs/zero2.json"]
                          + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "student ZeRO stage 2" in log and "teacher ZeRO stage 3" in log
    per_rank = dict(re.findall(r"\[rank (\d)\] micro-batches by targets: (\d+ dataset, \d+ on-policy, \d+ seq-KD)", log))
    assert set(per_rank) == {"0", "1"} and per_rank["0"] == per_rank["1"], log[-4000:]
    # 160 rows / (4 x 2 ranks) = 20 micro-batches per epoch; 8 steps = indices 0..7 on both ranks
    expected = [choose_targets(7, i, 0.5, 0.5) for i in range(8)]
    metrics = _metrics(out)
    assert metrics["world_size"] == 2 and metrics["batches"] == {b: expected.count(b) for b in BRANCHES}
    assert per_rank["0"] == f"0 dataset, {expected.count('on_policy')} on-policy, {expected.count('seq_kd')} seq-KD"
    assert min(expected.count("on_policy"), expected.count("seq_kd")) >= 1  # both generators ran
