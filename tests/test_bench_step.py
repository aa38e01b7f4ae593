"""The end-to-end step benchmark runs, measures the modes it names, and rejects bad input."""
import json
import subprocess
import sys

from distill import bench_step
from distill.kernel_ops import kernels  # the copy distill calls (seq2seq_distill_kernels)


def test_tiny_preset_json(capsys, monkeypatch):
    calls = []
    real = kernels.fused_linear_distill_loss

    def counting(*a, **k):
        calls.append(k.get("teacher_hidden") is not None)
        return real(*a, **k)

    monkeypatch.setattr(kernels, "fused_linear_distill_loss", counting)
    assert bench_step.main(["--preset", "tiny", "--repeats", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["environment"]["row_step"] == "native"
    (p,) = doc["presets"]
    assert p["preset"] == "tiny" and p["vocab"] == 512 and p["student_params"] < p["teacher_params"]
    assert p["repeats"] == 2
    assert p["target_tokens"] == 8 * 16 - 4 * 4  # every other row has its last quarter padded
    rows = {r["mode"]: r for r in p["rows"]}
    assert list(rows) == bench_step.MODES
    assert all(r["time_s"] > 0 and r["peak_mb"] >= 0 for r in rows.values())
    assert "x_teacher_fwd_plus_student_step" in rows["distill_fused"]
    assert "x_teacher_fwd_plus_student_step" not in rows["teacher_forward"]
    # 1 warm-up + 2 timed rounds of the fused mode, each with the teacher given as hidden states
    assert calls == [True] * 3


def test_fused_and_naive_steps_compute_the_same_loss():
    teacher, student, batch = bench_step.build(bench_step.PRESETS["tiny"], "t5", seed=1)
    from distill.models import decoder_hidden, lm_head_of
    from distill.objective import Objective

    ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    t_hidden = decoder_hidden(teacher, ids, am, lab).detach()
    s_hidden = decoder_hidden(student, ids, am, lab)
    t_w, t_b = lm_head_of(teacher)
    head = (t_w.detach(), t_b)
    fused = Objective(0.5, 2.0, "fused")(s_hidden, lm_head_of(student), lab, t_hidden, head)[0]
    naive = Objective(0.5, 2.0, "naive")(s_hidden, lm_head_of(student), lab, t_hidden, head)[0]
    assert abs(fused.item() - naive.item()) <= 1e-5 * abs(naive.item())


def test_unknown_preset_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "distill.bench_step", "--preset", "tiny,huge"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: unknown preset 'huge'; choose from tiny, mid, base\n"


def test_bench_memory_bad_options_are_one_line_exit_2(capsys):
    from distill import bench_memory

    for argv, needle in ((["--ranks", "two"], "--ranks 'two' must be a comma list"),
                         (["--ranks", "0"], "--ranks '0' must be a comma list"),
                         (["--steps", "0"], "--steps 0 must be >= 1")):
        assert bench_memory.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
