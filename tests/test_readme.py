"""README.md tells the truth about the CLI: every option and preset is documented."""
import dataclasses
import os
import re
import subprocess

from distill.config import DistillConfig, _flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_every_train_option_is_documented():
    missing = [_flag(f) for f in dataclasses.fields(DistillConfig) if f"`{_flag(f)}`" not in README]
    assert not missing


def test_every_evaluate_option_is_documented():
    from distill.evaluate import build_parser

    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert not [f for f in sorted(flags) if f not in README]


def test_every_launch_preset_is_documented():
    text = subprocess.run(["bash", "launch.sh", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    presets = re.findall(r"^  ([a-z0-9][a-z0-9_-]*)\s{2,}\S", text, flags=re.M)
    assert len(presets) >= 14
    assert not [p for p in presets if f"| {p} |" not in README]


def test_quick_start_commands_and_no_placeholders():
    assert "bash launch.sh" in README and "python -m pytest -q tests" in README
    assert not re.search(r"\b[A-Z]+_(SECTION|TABLE)\b", README)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "python -m pytest -q tests" in ci


def test_every_benchmark_option_is_documented():
    import sys

    for module in ("kernels.bench", "distill.bench_step"):
        text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        flags = set(re.findall(r"(--[a-z][a-z-]*)", text)) - {"--help"}
        assert len(flags) >= 9, (module, flags)
        assert not [f for f in sorted(flags) if f"`{f}" not in README], module
