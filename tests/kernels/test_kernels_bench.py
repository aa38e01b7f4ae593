"""The benchmark's --quick smoke case runs end to end and its rows agree with the baseline."""
import json
import os

import pytest

from kernels import bench


def test_quick_bench_json(capsys, backend):
    assert bench.main(["--quick", "--json", "--repeats", "1", "--liger", "off"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["note"] == bench.QUICK_NOTE
    assert doc["environment"]["threads"] == 2 and "malloc_env" in doc["environment"]
    (case,) = doc["cases"]
    rows = {r["row"]: r for r in case["rows"]}
    assert set(rows) == set(bench.ROWS)
    assert rows["liger"]["error"].startswith("n/a")
    assert doc["environment"]["row_step"] == {"native": "native", "eager": "eager (SEQ2SEQ_DISTILL_NATIVE=0)",
                                              "triton": "triton (interpreted)"}[backend]
    for name in ("fused_hidden", "fused_hidden_eager", "fused_logits", "chunked_kl"):
        r = rows[name]
        assert r["time_s"] > 0 and r["peak_mb"] >= 0 and r["max_abs_err"] < 1e-4
        assert "time_x_naive" in r and "mem_x_naive" in r
    assert "time_x_floor" in rows["fused_hidden"] and "time_x_floor" not in rows["chunked_kl"]
    assert rows["fused_hidden"]["floor_has_teacher"] and not rows["fused_logits"]["floor_has_teacher"]
    assert rows["fused_hidden"]["floor_time_s"] > 0
    # the eager row switched the native step off for itself only
    assert os.environ.get("SEQ2SEQ_DISTILL_NATIVE") == ("0" if backend == "eager" else None)
    assert os.environ.get("SEQ2SEQ_DISTILL_TRITON") == ("1" if backend == "triton" else None)


def test_quick_bench_each_divergence(capsys, backend):
    if backend == "triton":  # about a minute under the interpreter; its divergences are exact by test_kernels
        pytest.skip("the Triton row step's divergences are checked by test_kernels; its bench run by the json test")
    argv = ["--quick", "--json", "--repeats", "1", "--liger", "off", "--rows", "naive,fused_hidden,naive_kl,chunked_kl",
            "--divergence", "reverse_kl,jsd", "--jsd-beta", "0.3"]
    assert bench.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["environment"]["divergences"] == ["reverse_kl", "jsd"] and doc["environment"]["jsd_beta"] == 0.3
    assert [c["divergence"] for c in doc["cases"]] == ["reverse_kl", "jsd"]
    for case in doc["cases"]:
        rows = {r["row"]: r for r in case["rows"]}
        # each divergence is checked against the naive loss with that same divergence
        assert rows["fused_hidden"]["max_abs_err"] < 1e-4 and rows["chunked_kl"]["max_abs_err"] < 1e-4


def test_unknown_divergence_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--divergence", "kl"])
    assert "unknown divergences ['kl']; choose from forward_kl,reverse_kl,jsd" in capsys.readouterr().err


def test_quick_tables_say_their_ratios_mean_nothing(capsys, backend):
    if backend == "triton":  # the tables' text does not depend on the row step
        pytest.skip("the tables are the same for every row step; the Triton bench run is the json test")
    assert bench.main(["--quick", "--repeats", "1", "--liger", "off", "--rows", "floor,fused_hidden"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "smoke test" in bench.QUICK_NOTE and "mean nothing" in bench.QUICK_NOTE
    assert lines[0] == "--quick: " + bench.QUICK_NOTE  # the header, before any figure
    table = lines.index(next(ln for ln in lines if ln.startswith("case:")))
    assert lines[table + 1] == lines[-1] == "NOTE: " + bench.QUICK_NOTE  # above and below the table
    assert bench.LABEL["fused_hidden"] in out


def test_full_size_tables_carry_no_smoke_note(capsys):
    results = {"floor": {"row": "floor", "time_s": 1.0, "cpu_s": 2.0, "peak_mb": 0.0}}
    bench.print_table(dict(vocab=5, tokens=2, hidden=3, teacher_hidden=4, dtype="fp32"), results)
    assert "NOTE" not in capsys.readouterr().out


def test_table_prints_every_row(capsys):
    results = {"floor": {"row": "floor", "time_s": 1.0, "cpu_s": 2.0, "peak_mb": 0.0},
               "liger": {"row": "liger", "error": "n/a: not installed"}}
    bench.print_table(dict(vocab=5, tokens=2, hidden=3, teacher_hidden=4, dtype="fp32"), results)
    out = capsys.readouterr().out
    assert "matmul floor" in out and "n/a: not installed" in out and "vocab=5" in out
