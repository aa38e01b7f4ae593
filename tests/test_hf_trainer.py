"""DistillationSeq2SeqTrainer (distill/hf_trainer.py): the project's loss in a Hugging Face Trainer.

Its loss and gradients equal the objective's and the written-out reference's (kernels/naive.py),
with and without num_items_in_batch; alpha=1 is the model's own CE as Seq2SeqTrainer computes it;
Trainer.train() lowers the loss on tiny BART and T5 models; under the Trainer's DeepSpeed
integration (ZeRO-2, 2 CPU ranks) it trains, the ranks agree, and alpha=1 trains the same weights
as a plain Seq2SeqTrainer. Run as a script, this file is one of those ranks (rank_main).
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402  (after the offline switch: the hub library reads it at import)
import torch  # noqa: E402

from distill import DistillationSeq2SeqTrainer  # noqa: E402
from distill.errors import UserError  # noqa: E402
from distill.models import decoder_hidden, lm_head_of  # noqa: E402
from distill.objective import Objective  # noqa: E402
from kernels import naive_distill_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat dog bird sat ran flew on under mat home tree fast slow red blue green one two".split()


def make_rows(tokenizer, n=32, seed=0):
    """Sources of 3-9 words, targets of their first 1-6: batches differ in target tokens, and the
    collator pads labels with -100."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        rows.append({"input_ids": tokenizer(" ".join(words))["input_ids"],
                     "labels": tokenizer(" ".join(words[:rng.randint(1, min(6, len(words)))]))["input_ids"]})
    return rows


def token_sum_ce(outputs, labels, num_items_in_batch=None):
    """Trainer's compute_loss_func contract: CE summed over the real tokens / num_items_in_batch."""
    import torch.nn.functional as F

    total = F.cross_entropy(outputs["logits"].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                            reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


def training_args(output_dir, **overrides):
    from transformers import Seq2SeqTrainingArguments

    kwargs = dict(output_dir=str(output_dir), report_to="none", save_strategy="no", disable_tqdm=True,
                  use_cpu=True, seed=0)
    kwargs.update(overrides)
    return Seq2SeqTrainingArguments(**kwargs)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread (spinning OpenMP threads of several
    processes slow each other down many times over)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    """Per family: tokenizer, teacher (d_model 32, 2 layers), student (d_model 16, 1 layer),
    rows. Tests take deep copies of the models."""
    from transformers import AutoModelForSeq2SeqLM

    from distill.toy import tiny_config, train_tokenizer

    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(8)) for i in range(64)]
    out = {}
    for model_type in ("bart", "t5"):
        tok = train_tokenizer(texts, model_type, vocab_size=96)
        torch.manual_seed(0)
        teacher = AutoModelForSeq2SeqLM.from_config(tiny_config(model_type, len(tok)))
        torch.manual_seed(1)
        student = AutoModelForSeq2SeqLM.from_config(tiny_config(model_type, len(tok), d_model=16, layers=1, ffn=32))
        if model_type == "bart":  # a non-zero final_logits_bias, so that the loss must add it
            for i, m in enumerate((teacher, student)):
                m.final_logits_bias.copy_(torch.randn(m.final_logits_bias.shape,
                                                      generator=torch.Generator().manual_seed(i)))
        out[model_type] = {"tok": tok, "teacher": teacher, "student": student, "rows": make_rows(tok)}
    return out


def setup(toy, model_type, n_rows=6):
    from transformers import DataCollatorForSeq2Seq

    t = toy[model_type]
    student, teacher = copy.deepcopy(t["student"]), copy.deepcopy(t["teacher"])
    collator = DataCollatorForSeq2Seq(t["tok"], model=student)
    batch = collator(t["rows"][:n_rows])
    assert (batch["labels"] == -100).any()
    return student, teacher, collator, batch


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("model_type,divergence", [("bart", "forward_kl"), ("t5", "jsd"), ("bart", "reverse_kl")])
def test_loss_and_gradients_equal_the_objective_and_the_reference(toy, tmp_path, model_type, divergence):
    student, teacher, _, batch = setup(toy, model_type)
    trainer = DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                         alpha=0.3, temperature=2.0, divergence=divergence, jsd_beta=0.3)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Neither lm_head module runs: the logits are made chunk by chunk inside the kernel.
    heads_run = []
    for m in (student, teacher):
        m.get_output_embeddings().register_forward_hook(lambda *a: heads_run.append(1))
    labels, n_tokens = batch["labels"], int((batch["labels"] != -100).sum())
    for num_items in (None, n_tokens + 7):  # + 7: as if other micro-batches of the step held tokens too
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
        loss.backward()
        got = grads(student)
        student.zero_grad()
        hidden = decoder_hidden(student, batch["input_ids"], batch["attention_mask"], labels)
        with torch.no_grad():
            t_hidden = decoder_hidden(teacher, batch["input_ids"], batch["attention_mask"], labels)
        (s_w, s_b), (t_w, t_b) = lm_head_of(student), lm_head_of(teacher)
        ref, _, _ = naive_distill_loss(hidden, s_w, labels, teacher_hidden=t_hidden, teacher_weight=t_w,
                                       student_bias=s_b, teacher_bias=t_b, alpha=0.3, temperature=2.0,
                                       divergence=divergence, beta=0.3)
        objective, _, _ = Objective(0.3, 2.0, impl="fused", divergence=divergence, beta=0.3)(
            hidden, (s_w, s_b), labels, t_hidden, (t_w, t_b))
        torch.testing.assert_close(objective, ref, rtol=1e-5, atol=1e-6)
        # Trainer's reduction: the token sum over num_items_in_batch (the kernel's mean otherwise).
        scale = 1.0 if num_items is None else n_tokens / num_items
        (ref * scale).backward()
        torch.testing.assert_close(loss.detach(), ref.detach() * scale, rtol=1e-5, atol=1e-6)
        assert_same_grads(got, grads(student))
    assert not heads_run
    # What evaluation gets: the same loss and, when it keeps them, the student's own logits.
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
        torch.testing.assert_close(outputs["logits"], student(**batch).logits, rtol=1e-5, atol=1e-5)
        trainer._logits_wanted = False
        assert set(trainer.compute_loss(student, batch, return_outputs=True)[1]) == {"loss"}


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_alpha_one_is_the_models_own_cross_entropy(toy, tmp_path, model_type):
    """Without num_items_in_batch: the model's own loss (a token mean). With it: Trainer's
    token-sum / num_items_in_batch, through Trainer's own compute_loss_func path. (BART's and T5's
    forward in transformers 5 ignore num_items_in_batch: their loss stays a mean.)"""
    from transformers import Seq2SeqTrainer

    student, _, _, batch = setup(toy, model_type)
    reference = copy.deepcopy(student)
    ours = DistillationSeq2SeqTrainer(model=student, teacher_model=None, args=training_args(tmp_path), alpha=1.0)
    plain = Seq2SeqTrainer(model=reference, args=training_args(tmp_path), compute_loss_func=token_sum_ce)
    n_tokens = int((batch["labels"] != -100).sum())
    for num_items in (None, n_tokens + 5):
        student.zero_grad(), reference.zero_grad()
        loss = ours.compute_loss(student, batch, num_items_in_batch=num_items)
        want = (reference(**batch).loss if num_items is None else
                plain.compute_loss(reference, dict(batch), num_items_in_batch=num_items))
        loss.backward(), want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
        assert_same_grads(grads(student), grads(reference))


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_trainer_train_lowers_the_loss(toy, tmp_path, model_type):
    student, teacher, collator, _ = setup(toy, model_type)
    teacher_before = copy.deepcopy(teacher.state_dict())
    rows = toy[model_type]["rows"]
    args = training_args(tmp_path, max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         learning_rate=1e-2, logging_steps=4, per_device_eval_batch_size=32)
    trainer = DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                         eval_dataset=rows, data_collator=collator, alpha=0.5, temperature=2.0)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and logged[-1] < logged[0], logged
    assert after < 0.9 * before, (before, after)
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_gradient_accumulation_gives_the_loss_and_gradient_of_the_whole_batch(toy, tmp_path):
    """One step on the same 8 rows, as 1 micro-batch of 8 and as 2 of 4 (targets of different
    lengths): num_items_in_batch makes the logged loss and the gradient norm the same."""
    logged = {}
    for batch_size, accumulation in ((8, 1), (4, 2)):
        student, teacher, collator, _ = setup(toy, "t5")
        args = training_args(tmp_path / str(accumulation), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=1)
        trainer = DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, args=args, alpha=0.5,
                                             train_dataset=toy["t5"]["rows"][:8], data_collator=collator)
        trainer.train()
        logged[accumulation] = next(h for h in trainer.state.log_history if "loss" in h)
    for key in ("loss", "grad_norm"):
        assert logged[1][key] == pytest.approx(logged[2][key], rel=1e-5), logged


def test_readme_example_runs(toy, tmp_path):
    """The README's lines (the block that builds DistillationSeq2SeqTrainer), run on a toy teacher."""
    from transformers import DataCollatorForSeq2Seq

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Using the loss from a Hugging Face Trainer script"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = next(b for b in blocks if "DistillationSeq2SeqTrainer(" in b)
    t = toy["bart"]
    model = copy.deepcopy(t["teacher"])
    namespace = {"model": model, "tokenizer": t["tok"], "train_dataset": t["rows"],
                 "data_collator": DataCollatorForSeq2Seq(t["tok"], model=model),
                 "training_args": training_args(tmp_path / "out", max_steps=2, per_device_train_batch_size=8)}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.teacher_model is model
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("kwargs,expected", [
    ({"alpha": 1.5}, "alpha=1.5 is outside [0, 1]; use e.g. alpha=0.5"),
    ({"alpha": float("nan")}, "alpha=nan is outside [0, 1]"),
    ({"temperature": 0}, "temperature=0 must be a finite number > 0; use e.g. temperature=2.0"),
    ({"temperature": -1.0}, "temperature=-1.0 must be a finite number > 0"),
    ({"divergence": "kl"}, "divergence='kl' is not one of forward_kl, reverse_kl, jsd; use e.g."),
    ({"jsd_beta": 2}, "jsd_beta=2 is outside [0, 1]"),
    ({"teacher": None}, "alpha=0.5 < 1 distills from a teacher, but teacher_model is None; pass teacher_model="),
    ({"vocab": True}, "the student's lm_head has 100 outputs but the teacher's"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1 is not supported"),
])
def test_bad_input_is_one_line_naming_the_fix(toy, tmp_path, kwargs, expected):
    student, teacher, _, _ = setup(toy, "bart")
    kwargs = dict(kwargs)
    if kwargs.pop("vocab", False):
        student.resize_token_embeddings(100)
    if "teacher" in kwargs:
        teacher = kwargs.pop("teacher")
    args = training_args(tmp_path, label_smoothing_factor=kwargs.pop("label_smoothing_factor", 0.0))
    with pytest.raises(UserError) as err:
        DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, args=args, **kwargs)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert message.startswith("DistillationSeq2SeqTrainer: ")


def test_import_distill_stays_light():
    import distill.hf_trainer

    assert DistillationSeq2SeqTrainer is distill.hf_trainer.DistillationSeq2SeqTrainer
    code = "import sys, distill; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def deepspeed_cpu_unavailable() -> str | None:
    try:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # noqa: F401
    except Exception as e:  # not installed, or an install without its CPU accelerator
        return f"DeepSpeed's CPU accelerator is not available ({type(e).__name__}: {e})"
    return None


@pytest.mark.slow  # one 2-rank launch, four short runs: 40-70 s on 2 CPU cores, most of it imports
def test_trains_under_the_trainers_deepspeed_zero2_on_two_cpu_ranks(toy, tmp_path):
    """torchrun, 2 ranks, ds_configs/zero2.json through Seq2SeqTrainingArguments(deepspeed=...),
    gradient accumulation 2, targets of 1-6 words: the ranks end with the same weights;
    alpha=1 trains the weights Seq2SeqTrainer trains with the token-sum CE as its
    compute_loss_func (so num_items_in_batch and the rank scaling are Trainer's own); alpha=0.5
    (in bf16, the teacher cast too) lowers the loss, and evaluation runs through the engine. Also
    without DeepSpeed (the Trainer's DDP): it trains and the ranks agree. A ZeRO-3 config is
    refused in one line."""
    reason = deepspeed_cpu_unavailable()
    if reason:
        pytest.skip(reason)
    from safetensors.torch import load_file

    from launch_env import clean_env, free_port

    t = toy["bart"]
    folder = tmp_path / "models"
    t["student"].save_pretrained(folder / "student")
    t["teacher"].save_pretrained(folder / "teacher")
    t["tok"].save_pretrained(folder / "tokenizer")
    (folder / "rows.json").write_text(json.dumps(t["rows"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           os.path.abspath(__file__), str(folder), str(tmp_path / "out")]
    env = clean_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    runs = {r: json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert runs[0] == runs[1]  # the logged losses (averaged over ranks), the eval loss, the wrappers
    assert runs[0]["world_size"] == 2 and runs[0]["zero_stage"] == 2
    assert runs[0]["dtypes"] == ["torch.bfloat16", "torch.bfloat16"]  # DeepSpeed's bf16 student, and the teacher
    assert runs[0]["distill_wrapper"] == "DeepSpeedEngine"
    assert runs[0]["ddp_wrapper"] == "DistributedDataParallel"
    weights = {(name, r): load_file(str(tmp_path / "out" / f"{name}_rank{r}.safetensors"))
               for name in ("plain", "alpha1", "distill", "ddp") for r in (0, 1)}
    for name in ("plain", "alpha1", "distill", "ddp"):
        w0, w1 = weights[name, 0], weights[name, 1]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name
    plain, ours = weights["plain", 0], weights["alpha1", 0]
    # Only rounding differs (another summation order); Adam's first steps amplify it a little.
    assert max(float((plain[k] - ours[k]).abs().max()) for k in plain) < 1e-5
    for a, b in zip(runs[0]["losses"]["plain"], runs[0]["losses"]["alpha1"]):
        assert abs(a - b) <= 1e-5 * abs(a), runs[0]["losses"]
    for name in ("distill", "ddp"):
        curve = runs[0]["losses"][name]
        assert len(curve) == 4 and curve[-1] < curve[0], (name, curve)
    assert runs[0]["eval_loss"] < runs[0]["losses"]["distill"][0], runs[0]
    assert "ZeRO stage 3 partitions the lm_heads this loss reads whole; use a ZeRO stage 2 config" \
        in runs[0]["zero3_error"], runs[0]


def rank_main(folder: str, out: str) -> None:
    """One rank of test_trains_under_the_trainers_deepspeed_zero2_on_two_cpu_ranks: four short
    runs from the same student (ours at alpha=0.5 under DDP; then under DeepSpeed ZeRO-2: plain
    Seq2SeqTrainer, ours at alpha=1, ours at alpha=0.5), each rank writing its final weights and
    the logged losses."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer

    from distill import DistillationSeq2SeqTrainer

    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    rows = json.load(open(os.path.join(folder, "rows.json")))
    teacher = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(folder, "teacher"))
    result = {"losses": {}}
    # "plain": Seq2SeqTrainer with the token-sum CE as compute_loss_func, Trainer's own
    # num_items_in_batch path (BART's forward ignores num_items_in_batch, see the alpha=1 test).
    # "ddp": no DeepSpeed config, the Trainer's DistributedDataParallel (gloo); first, because a
    # DeepSpeed run leaves accelerate in DeepSpeed mode for the rest of the process.
    for name, alpha in (("ddp", 0.5), ("plain", None), ("alpha1", 1.0), ("distill", 0.5)):
        student = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(folder, "student"))
        deepspeed = None if name == "ddp" else os.path.join(ROOT, "ds_configs", "zero2.json")
        # "distill" in bf16: DeepSpeed casts the student, the teacher follows it.
        args = training_args(os.path.join(out, name), deepspeed=deepspeed, bf16=name == "distill",
                             per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=8, learning_rate=1e-2, logging_steps=2, per_device_eval_batch_size=16)
        common = dict(model=student, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, model=student))
        trainer = (Seq2SeqTrainer(compute_loss_func=token_sum_ce, **common) if alpha is None else
                   DistillationSeq2SeqTrainer(teacher_model=teacher, alpha=alpha, temperature=2.0, **common))
        trainer.train()
        if name == "distill":  # evaluation through the engine (HF refuses it before train() under ZeRO-2)
            result["eval_loss"] = trainer.evaluate(eval_dataset=rows)["eval_loss"]
            result["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
            result["dtypes"] = [str(next(m.parameters()).dtype) for m in (trainer.model, trainer.teacher_model)]
        result["losses"][name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result[f"{name}_wrapper"] = type(trainer.model_wrapped).__name__
        weights = {k: p.detach().float().clone() for k, p in trainer.model.named_parameters()}
        save_file(weights, os.path.join(out, f"{name}_rank{dist.get_rank()}.safetensors"))
    result["world_size"] = dist.get_world_size()
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
    try:
        DistillationSeq2SeqTrainer(model=student, teacher_model=teacher, train_dataset=rows,
                                   args=training_args(os.path.join(out, "zero3"), deepspeed=zero3))
    except UserError as e:
        result["zero3_error"] = str(e)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
