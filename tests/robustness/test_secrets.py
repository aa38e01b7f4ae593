"""Files the run writes (distill_config.json, metrics.json, README.md, checkpoints' trainer.json)
never carry tokens or secrets: neither token-looking values nor values of environment variables
whose names say TOKEN/KEY/SECRET/PASSWORD."""
from __future__ import annotations

import json
import os

import pytest

from distill import export

HF_LIKE = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNm1234"
GH_LIKE = "ghp_" + "0123456789abcdefghijABCDEFGHIJ"
ENV_SECRET = "correct-horse-battery-staple"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", ENV_SECRET)
    monkeypatch.setenv("DB_PASSWORD", "pw-" + "9" * 10)
    monkeypatch.setenv("HF_TOKEN", HF_LIKE)
    monkeypatch.setenv("SOME_TOKEN", "short")  # under 6 characters: too common to redact safely


def test_redact_nested_values_from_env_and_token_patterns(secret_env):
    data = {"teacher": f"org/{ENV_SECRET}", "nested": [{"url": f"https://x.co/?token={HF_LIKE}"}],
            "gh": f"key {GH_LIKE} end", "pw": "pw-" + "9" * 10, "n": 3, "ok": None, "t": ("a", ENV_SECRET)}
    out = export.redact(data)
    text = json.dumps(out)
    for secret in (ENV_SECRET, HF_LIKE, GH_LIKE, "pw-" + "9" * 10):
        assert secret not in text
    assert out["teacher"] == f"org/{export.REDACTED}" and out["gh"] == f"key {export.REDACTED} end"
    assert out["n"] == 3 and out["ok"] is None


def test_redact_leaves_ordinary_values_alone(secret_env):
    data = {"model_type": "bart", "path": "/data/short/hf_model", "lr": 5e-4, "flag": "short",
            "input_column": "article"}
    assert export.redact(data) == data


def test_model_card_and_config_dump_are_redacted(secret_env, tmp_path):
    from distill.config import parse_args

    cfg = parse_args(["--model-type", "bart", "--teacher", f"org/{ENV_SECRET}", "--dataset", HF_LIKE,
                      "--source-prefix", f"use {GH_LIKE}: ", "--output-dir", str(tmp_path / "o")])
    card = export.model_card(cfg, {}, {"history": [], "final_eval": {}})
    export.write_json(str(tmp_path / "c.json"), cfg.to_dict())
    dumped = (tmp_path / "c.json").read_text()
    for text in (card, dumped):
        for secret in (ENV_SECRET, HF_LIKE, GH_LIKE):
            assert secret not in text
    assert json.loads(dumped)["dataset"] == export.REDACTED
    assert f"org/{export.REDACTED}" in card


def test_real_run_writes_no_secret(reference):
    """The shared reference run had HF_TOKEN and MY_API_KEY in its environment and secrets in
    --dataset / --teacher (see conftest.reference)."""
    out = reference["out"]
    written = {}
    for folder, _, files in os.walk(out):
        for name in files:
            if name.endswith((".json", ".md", ".txt", ".yaml", ".lock")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    written[os.path.relpath(path, out)] = fh.read()
    assert {"distill_config.json", "metrics.json", "README.md"} <= set(written)
    for rel, text in written.items():
        for secret in reference["secrets"]:
            assert secret not in text, f"{secret!r} leaked into {rel}"
    config = json.loads(written["distill_config.json"])
    assert config["dataset"] == export.REDACTED and config["teacher"] == f"org/{export.REDACTED}"


@pytest.mark.parametrize("secret", ["https://bob:hunter2x@example.org/data", "github_pat_11ABCDEFGHIJKLMNOPQRSTUV_xyz",
                                    "AKIAABCDEFGHIJKLMNOP", "Bearer abc.def-1234567890"])
def test_redact_catches_more_secret_shapes(secret):
    from distill.export import redact

    out = redact({"teacher": f"x {secret} y"}, [])["teacher"]
    assert "hunter2x" not in out and "ABCDEFGHIJKLMNOP" not in out and "1234567890" not in out
    assert out.startswith("x ") and out.endswith(" y") and "<redacted>" in out
