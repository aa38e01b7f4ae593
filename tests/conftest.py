"""Shared fixtures: tiny BART/T5 teachers and small datasets, built once per test session.

Nothing is downloaded: tokenizers are trained on the generated text (distill.toy), teachers are
random tiny models built from configs, and the data is a small deterministic copy task that a
tiny model visibly learns in a few steps.
"""
from __future__ import annotations

import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def pytest_configure(config):
    # slow: an end-to-end run of a minute or more (the demo, multi-rank launches); still in CI.
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more (run in CI too)")


WORDS = ("the cat dog bird sat ran flew on under mat home tree fast slow red blue green "
         "one two three four five").split()


def make_rows(n: int, seed: int, source_key: str = "source", target_key: str = "target") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        rows.append({source_key: " ".join(words), target_key: " ".join(words[:3])})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """{'bart': dir, 't5': dir, 'data': folder with train/validation/test jsonl (article/highlights),
    'plain': folder with source/target columns}"""
    from distill.toy import save_tiny_teacher

    root = tmp_path_factory.mktemp("ws")
    data = root / "data"
    data.mkdir()
    splits = {"train": make_rows(160, 1, "article", "highlights"),
              "validation": make_rows(24, 2, "article", "highlights"),
              "test": make_rows(16, 3, "article", "highlights")}
    for name, rows in splits.items():
        write_jsonl(str(data / f"{name}.jsonl"), rows)
    plain = root / "plain"
    plain.mkdir()
    write_jsonl(str(plain / "train.jsonl"), make_rows(160, 4))
    texts = [r["article"] for r in splits["train"]]
    out = {"data": str(data), "plain": str(plain), "root": str(root)}
    for model_type in ("bart", "t5"):
        out[model_type] = save_tiny_teacher(str(root / f"{model_type}_teacher"), model_type, texts,
                                            vocab_size=160, layers=4, seed=0)
    return out
