"""distill.data: every source shape, split handling, cleaning counts, tokenization, collation."""
import csv
import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from distill import data
from distill.data import Seq2SeqCollator, load_raw_splits, tokenize_splits
from distill.errors import UserError
from distill.toy import train_tokenizer

ROWS = [{"article": f"article number {i} about topic {i % 7}", "summary": f"summary {i}", "id": i}
        for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def load(path, log=None, **kw):
    lines = []
    dd = load_raw_splits(None, str(path), "article", "summary", log=lines.append if log is None else log, **kw)
    return dd, lines


def check_shape(dd, n_rows=len(ROWS)):
    assert set(dd) >= {"train", "validation"}
    for split in dd.values():
        assert split.column_names == ["source", "target"]
        assert all(isinstance(v, str) for v in list(split["source"]) + list(split["target"]))
    assert sum(len(s) for s in dd.values()) == n_rows
    assert set(list(dd["train"]["source"]) + list(dd["validation"]["source"])) <= {r["article"] for r in ROWS}


@pytest.mark.parametrize("fmt", ["jsonl", "json-array", "csv", "tsv", "parquet"])
def test_single_file_formats(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json-array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        path = write_csv(tmp_path / f"d.{fmt}", ROWS, "," if fmt == "csv" else "\t")
    else:
        path = tmp_path / "d.parquet"
        Dataset.from_list(ROWS).to_parquet(str(path))
    dd, _ = load(path)
    check_shape(dd)
    assert len(dd["validation"]) == 2  # 5% of 40


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:30])
    write_csv(tmp_path / "dev.csv", ROWS[30:35])
    Dataset.from_list(ROWS[35:]).to_parquet(str(tmp_path / "test.parquet"))
    (tmp_path / "notes.txt").write_text("ignored: not a data file")
    dd, _ = load(tmp_path)
    check_shape(dd)
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [30, 5, 5]
    assert list(dd["validation"]["source"]) == [r["article"] for r in ROWS[30:35]]


def test_folder_other_names_are_train_and_val_aliases(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "part2.jsonl", ROWS[10:30])
    write_jsonl(tmp_path / "val.jsonl", ROWS[30:])
    dd, _ = load(tmp_path)
    assert (len(dd["train"]), len(dd["validation"])) == (30, 10)
    assert "test" not in dd


def test_save_to_disk_dataset_dict_and_dataset(tmp_path):
    ds = Dataset.from_list(ROWS)
    DatasetDict({"train": ds.select(range(30)), "valid": ds.select(range(30, 40))}).save_to_disk(tmp_path / "dd")
    dd, _ = load(tmp_path / "dd")
    assert (len(dd["train"]), len(dd["validation"])) == (30, 10)
    ds.save_to_disk(tmp_path / "ds")
    dd, _ = load(tmp_path / "ds")
    check_shape(dd)


def test_validation_split_off_is_deterministic_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a, lines = load(path, validation_ratio=0.25, seed=1)
    b, _ = load(path, validation_ratio=0.25, seed=1)
    c, _ = load(path, validation_ratio=0.25, seed=2)
    assert len(a["validation"]) == 10 and len(a["train"]) == 30
    assert list(a["validation"]["source"]) == list(b["validation"]["source"])
    assert list(a["validation"]["source"]) != list(c["validation"]["source"])
    assert not set(list(a["validation"]["source"])) & set(list(a["train"]["source"]))
    assert any("10 of 40 train rows as validation" in line for line in lines)


def test_source_validation_split_is_used_not_split_off(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:20])
    write_jsonl(tmp_path / "validation.jsonl", ROWS[20:23])
    dd, lines = load(tmp_path, validation_ratio=0.5)
    assert (len(dd["train"]), len(dd["validation"])) == (20, 3)
    assert not any("as validation" in line for line in lines)


@pytest.mark.parametrize("flag,kw", [("--dataset-input-column", {"input_column": "text"}),
                                     ("--dataset-target-column", {"target_column": "highlights"})])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_wrong_column_lists_columns_and_flag(tmp_path, flag, kw, fmt):
    path = tmp_path / f"d.{fmt}"
    {"jsonl": lambda: write_jsonl(path, ROWS), "csv": lambda: write_csv(path, ROWS),
     "parquet": lambda: Dataset.from_list(ROWS).to_parquet(str(path))}[fmt]()
    args = {"input_column": "article", "target_column": "summary", **kw}
    with pytest.raises(UserError) as e:
        load_raw_splits(None, str(path), args["input_column"], args["target_column"], log=lambda _: None)
    msg = str(e.value)
    assert flag in msg and "article" in msg and "summary" in msg and "id" in msg and "\n" not in msg


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="does not exist.*--dataset-local-path"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported data file type '.xlsx'"):
        load(tmp_path / "d.xlsx")
    with pytest.raises(UserError, match="holds no jsonl/json/csv/tsv/parquet files"):
        load(tmp_path)


def test_no_dataset_given():
    for unset in (None, "", "None"):
        with pytest.raises(UserError, match="--dataset NAME"):
            load_raw_splits(unset, unset, "a", "b", log=lambda _: None)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "blank.jsonl", [{"article": " ", "summary": "s"}, {"article": "a", "summary": None}])
    with pytest.raises(UserError, match="empty after dropping"):
        load(tmp_path / "blank.jsonl")


def test_empty_rows_dropped_and_counted(tmp_path):
    rows = ROWS[:17] + [{"article": "", "summary": "x"}, {"article": "a", "summary": " \t\n"},
                        {"article": None, "summary": "x"}]
    dd, lines = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "data: dropped 3 of 20 train rows with an empty source or target" in lines
    assert sum(map(len, dd.values())) == 17


def test_numbers_converted_and_missing_columns_dropped(tmp_path):
    rows = ROWS[:10] + [{"article": 12345, "summary": 1.5}, {"article": "only article"}]
    dd, lines = load(write_jsonl(tmp_path / "d.jsonl", rows))
    texts = set(list(dd["train"]["source"]) + list(dd["validation"]["source"]))
    assert "12345" in texts and len(texts) == 11
    assert any("converted 2 numeric values" in line for line in lines)
    assert any("dropped 1 of 12 rows missing column" in line for line in lines)
    Dataset.from_dict({"article": list(range(10)), "summary": ["s"] * 10}).to_parquet(str(tmp_path / "n.parquet"))
    dd, lines = load(tmp_path / "n.parquet")
    assert sorted(list(dd["train"]["source"]) + list(dd["validation"]["source"])) == sorted(map(str, range(10)))
    assert any("converted 10 numeric source values" in line for line in lines)


def test_nested_field_with_dotted_name(tmp_path):
    rows = [{"translation": {"en": f"hello {i}", "de": f"hallo {i}"}} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dd = load_raw_splits(None, str(path), "translation.en", "translation.de", log=lambda _: None)
    assert dd["train"][0]["source"].startswith("hello") and dd["train"][0]["target"].startswith("hallo")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    dd = load_raw_splits(None, str(tmp_path / "dd"), "translation.en", "translation.de", log=lambda _: None)
    assert len(dd["train"]) + len(dd["validation"]) == 10


def test_hub_name_config_parsing(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        return DatasetDict({"train": Dataset.from_list(ROWS[:20]), "test": Dataset.from_list(ROWS[20:])})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr(data.hub, "unreachable_reason", lambda: None)
    dd = load_raw_splits("cnn_dailymail:3.0.0", None, "article", "summary", log=lambda _: None)
    assert calls[-1] == ("cnn_dailymail", "3.0.0", {})
    assert (len(dd["train"]), len(dd["validation"]), len(dd["test"])) == (19, 1, 20)
    load_raw_splits("user/xsum", "None", "article", "summary", trust_remote_code=True, log=lambda _: None)
    assert calls[-1] == ("user/xsum", None, {"trust_remote_code": True})
    with pytest.raises(UserError, match="--dataset-target-column"):
        load_raw_splits("user/xsum", None, "article", "document", log=lambda _: None)


def _set_offline(monkeypatch, offline: bool):
    # huggingface_hub and datasets read HF_HUB_OFFLINE once at import; patch the module values too.
    import datasets
    from huggingface_hub import constants
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_name_is_one_line_user_error(monkeypatch, tmp_path, offline):
    # Passes with or without internet: unreachable -> probe error; reachable -> not found.
    _set_offline(monkeypatch, offline)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_raw_splits("no-such-user-3141/no-such-dataset:cfg", None, "a", "b", log=lambda _: None)
    msg = str(e.value)
    assert "no-such-user-3141/no-such-dataset" in msg and "--dataset-local-path" in msg and "\n" not in msg


def test_unreachable_endpoint_fails_at_the_probe(monkeypatch):
    _set_offline(monkeypatch, False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("load_dataset must not run"))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub at http://127.0.0.1:9"):
        load_raw_splits("cnn_dailymail", None, "article", "highlights", log=lambda _: None)


# ----------------------------------------------------------------------------- tokenize and collate

@pytest.fixture(scope="module", params=["bart", "t5"])
def tokenizer(request):
    texts = [r["article"] + " " + r["summary"] for r in ROWS] * 5
    return train_tokenizer(texts, request.param, vocab_size=200)


def test_tokenize_columns_prefix_and_truncation(tokenizer):
    long_row = {"source": " ".join(["article number"] * 60), "target": " ".join(["summary"] * 40)}
    rows = [{"source": r["article"], "target": r["summary"]} for r in ROWS[:10]]
    dd = DatasetDict({"train": Dataset.from_list(rows + [long_row]), "validation": Dataset.from_list(rows[:3])})
    # Limits that fit every short row exactly, so only the long row is cut.
    max_src = max(len(tokenizer("summarize: " + r["source"])["input_ids"]) for r in rows)
    max_tgt = max(len(tokenizer(text_target=r["target"])["input_ids"]) for r in rows)
    lines = []
    tok = tokenize_splits(dd, tokenizer, max_source_length=max_src, max_target_length=max_tgt,
                          source_prefix="summarize: ", log=lines.append)
    assert set(tok) == {"train", "validation"}
    for split in tok:
        assert tok[split].column_names == ["input_ids", "attention_mask", "labels"]
        for row, raw in zip(tok[split], dd[split]):
            expected = tokenizer("summarize: " + raw["source"], truncation=True, max_length=max_src)["input_ids"]
            assert row["input_ids"] == expected and row["attention_mask"] == [1] * len(expected)
            labels = tokenizer(text_target=raw["target"], truncation=True, max_length=max_tgt)["input_ids"]
            assert row["labels"] == labels
            assert len(row["input_ids"]) <= max_src and len(row["labels"]) <= max_tgt
            assert row["input_ids"][-1] == row["labels"][-1] == tokenizer.eos_token_id  # cut keeps </s>
    assert lines == [f"data: train: truncated 1 of 11 sources to {max_src} tokens and 1 of 11 targets to {max_tgt} tokens",
                     f"data: validation: truncated 0 of 3 sources to {max_src} tokens and 0 of 3 targets to {max_tgt} tokens"]
    assert len(tok["train"][10]["input_ids"]) == max_src
    again = tokenize_splits(dd, tokenizer, max_source_length=max_src, max_target_length=max_tgt,
                            source_prefix="summarize: ", log=lambda _: None)
    assert all(again[s][:] == tok[s][:] for s in tok)


def test_collator_pads_with_pad_id_zero_and_minus_100(tokenizer):
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [8, 9]},
                {"input_ids": [5], "attention_mask": [1], "labels": [8, 9, 10, 11]}]
    batch = Seq2SeqCollator(tokenizer)(features)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, -100, -100], [8, 9, 10, 11]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = Seq2SeqCollator(tokenizer, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    assert batch["labels"][0, 2:].eq(-100).all()


class _NotFast:
    """The toy tokenizer seen as a slow one, to run the two-pass truncation count."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_truncation_count_same_for_slow_tokenizers(tokenizer):
    texts = [r["article"] for r in ROWS[:8]] + [" ".join(["article number"] * 40)] * 3
    dd = DatasetDict({"train": Dataset.from_dict({"source": texts, "target": texts[::-1]})})
    fast_log, slow_log = [], []
    fast = tokenize_splits(dd, tokenizer, max_source_length=12, max_target_length=12, log=fast_log.append)
    slow = tokenize_splits(dd, _NotFast(tokenizer), max_source_length=12, max_target_length=12,
                           log=slow_log.append)
    assert fast["train"][:] == slow["train"][:] and fast_log == slow_log
    assert "truncated 0 of" not in fast_log[0]
