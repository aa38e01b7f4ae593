"""Untrusted data files: every row is used, or dropped and counted in the log, or the load stops
with a one-line UserError naming the file (and the line, for a bad line). Never another exception."""
import csv
import json
import re

import pytest
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distill.data import load_raw_splits
from distill.errors import UserError

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

any_text = st.text(max_size=20)  # any code point, lone surrogates included
clean_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
ok_value = st.one_of(
    any_text, st.just(""), st.sampled_from([" ", "\t\n", "\u3000"]), st.none(), st.booleans(),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True))
bad_value = st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                      st.lists(st.integers(), max_size=2))


@st.composite
def json_rows(draw):
    # Half the files hold no bad value at all and most fields are present text, so loading and
    # counting get exercised as much as stopping.
    value = draw(st.sampled_from([ok_value, st.one_of(*[ok_value] * 3, bad_value)]))
    plain = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
    text_or_value = st.one_of(plain, plain, value)
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        present = [key for key, odds in (("src", 6), ("tgt", 6), ("other", 1)) if draw(st.integers(0, odds))]
        rows.append({key: draw(text_or_value) for key in present})
    return rows


def load(path):
    lines = []
    try:
        dd = load_raw_splits(None, str(path), "src", "tgt", log=lines.append)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None, msg, lines
    return dd, None, lines


def n_rows(dd):
    return sum(len(split) for split in dd.values())


def logged_count(lines, pattern):
    found = [int(m.group(1)) for line in lines for m in [re.search(pattern, line)] if m]
    return sum(found)


def as_text(value):
    """What the loader makes of a JSON value: text, None (empty), or 'bad' (stops the load)."""
    if isinstance(value, (dict, list)):
        return "bad"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "bad"
        return value
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


@SETTINGS
@given(rows=json_rows(), ensure_ascii=st.booleans())
def test_jsonl_rows_used_dropped_or_user_error(tmp_path, rows, ensure_ascii):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")
    dd, error, lines = load(path)
    bad = [i for i, r in enumerate(rows, 1) if any(as_text(r[k]) == "bad" for k in ("src", "tgt") if k in r)]
    complete = [r for r in rows if "src" in r and "tgt" in r]
    kept = [r for r in complete if all(as_text(r[k]) and as_text(r[k]).strip() for k in ("src", "tgt"))]
    event("stops at a bad value" if bad else "too few rows" if len(kept) < 2 else "loads")
    if bad:
        assert error and f"data.jsonl line {bad[0]}:" in error
    elif len(kept) < 2:
        assert error and re.search(r"empty|not found|too few", error), error
    else:
        assert error is None and n_rows(dd) == len(kept)
        assert logged_count(lines, r"dropped (\d+) of \d+ rows missing") == len(rows) - len(complete)
        assert logged_count(lines, r"dropped (\d+) of \d+ train rows with an empty") == len(complete) - len(kept)
        texts = set(dd["train"]["source"]) | set(dd["validation"]["source"])
        assert texts <= {as_text(r["src"]) for r in kept}


@SETTINGS
@given(cells=st.lists(st.tuples(clean_text, clean_text), max_size=12),
       delimiter=st.sampled_from([",", "\t"]))
def test_csv_tsv_any_unicode_round_trips(tmp_path, cells, delimiter):
    path = tmp_path / ("data.csv" if delimiter == "," else "data.tsv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["src", "tgt"])
        writer.writerows(cells)
    dd, error, lines = load(path)
    kept = [(s, t) for s, t in cells if s.strip() and t.strip()]
    if len(kept) < 2:
        assert error and re.search(r"empty|too few", error), error
        return
    assert error is None, error
    got = sorted(zip(list(dd["train"]["source"]) + list(dd["validation"]["source"]),
                     list(dd["train"]["target"]) + list(dd["validation"]["target"])))
    assert got == sorted(kept)
    # A row may be counted as short (a line of one blank cell) or as empty: either way, counted.
    assert logged_count(lines, r"dropped (\d+) of") == len(cells) - len(kept)


@SETTINGS
@given(lines=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=15), max_size=10),
       fmt=st.sampled_from(["csv", "tsv", "jsonl", "json"]))
def test_raw_junk_lines_never_crash(tmp_path, lines, fmt):
    # Hand-written files: stray quotes, ragged rows, junk. Loaded rows are clean text; errors are one line.
    path = tmp_path / f"data.{fmt}"
    header = {"csv": "src,tgt", "tsv": "src\ttgt"}.get(fmt)
    path.write_text("\n".join(([header] if header else []) + lines) + "\n", encoding="utf-8")
    dd, error, _ = load(path)
    if error is None:
        assert all(s.strip() for split in dd.values() for col in ("source", "target") for s in split[col])


@SETTINGS
@given(n_lines=st.integers(2, 8), bad_line=st.data(),
       garbage=st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80abc"]),
       fmt=st.sampled_from(["jsonl", "csv", "tsv"]))
def test_invalid_utf8_names_file_and_line(tmp_path, n_lines, bad_line, garbage, fmt):
    target = bad_line.draw(st.integers(2, n_lines + 1))  # line 1 is the csv header / first row
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps({"src": f"s{i}", "tgt": f"t{i}"}).encode() for i in range(n_lines + 1)]
        lines[target - 1] = lines[target - 1].replace(b'"s', b'"' + garbage + b"s", 1)
    else:
        sep = b"," if fmt == "csv" else b"\t"
        lines = [b"src" + sep + b"tgt"] + [b"s%d" % i + sep + b"t%d" % i for i in range(n_lines)]
        lines[target - 1] = garbage + lines[target - 1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=rf"data\.{fmt} line {target}: invalid UTF-8") as e:
        load_raw_splits(None, str(path), "src", "tgt", log=lambda _: None)
    assert "\n" not in str(e.value)


@SETTINGS
@given(rows=st.lists(st.tuples(clean_text, clean_text), min_size=3, max_size=8), data=st.data(),
       how=st.sampled_from(["cut", "trailing comma", "garbage", "single quotes"]))
def test_malformed_json_line_names_file_and_line(tmp_path, rows, data, how):
    lines = [json.dumps({"src": s, "tgt": t}) for s, t in rows]
    target = data.draw(st.integers(1, len(lines)))
    broken = {"cut": lines[target - 1][:-1], "trailing comma": lines[target - 1][:-1] + ",}",
              "garbage": lines[target - 1] + " xyz", "single quotes": "{'src': 'a', 'tgt': 'b'}"}[how]
    lines[target - 1] = broken
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"data\.jsonl line {target}: invalid JSON .*fix or remove the line"):
        load_raw_splits(None, str(path), "src", "tgt", log=lambda _: None)


# ----------------------------------------------------------------------------- fixed cases

ONE_MB = "word " * 200_000 + "end"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_one_megabyte_rows_load_whole(tmp_path, fmt):
    rows = [{"src": ONE_MB + str(i), "tgt": f"short {i}"} for i in range(3)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["src", "tgt"], delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    dd, error, _ = load(path)
    assert error is None
    assert sorted(len(s) for split in dd.values() for s in split["source"]) == [len(ONE_MB) + 1] * 3


def test_parquet_nulls_and_numbers(tmp_path):
    path = tmp_path / "data.parquet"
    Dataset.from_dict({"src": [1, 2, None, 4, 5], "tgt": ["a", None, "c", " ", "e"]}).to_parquet(str(path))
    dd, error, lines = load(path)
    assert error is None and n_rows(dd) == 2
    assert "data: dropped 3 of 5 train rows with an empty source or target" in lines
    assert any("converted 4 numeric source values to text" in line for line in lines)


def test_rows_missing_a_column_in_jsonl_are_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"src": "a", "tgt": "b"}, {"src": "c"}, {"tgt": "d"}, {"src": "e", "tgt": "f"}, {"src": "g", "tgt": "h"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    dd, error, lines = load(path)
    assert error is None and n_rows(dd) == 3
    assert any(line.endswith("dropped 2 of 5 rows missing column 'src' or 'tgt'") for line in lines)


def test_short_csv_rows_are_counted_and_bom_is_ignored(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffsrc,tgt\na,b\nc\nd,e\nf,g\n".encode("utf-8"))
    dd, error, lines = load(path)
    assert error is None and n_rows(dd) == 3
    assert any("dropped 1 of 4 rows missing" in line for line in lines)


@pytest.mark.parametrize("text,expected", [
    ("[1, 2]\n", "row 1: expected an object"),
    ('{"src": "a", "tgt": "b"}\n"just a string"\n', "line 2: expected an object"),
    ('{"src": {"nested": 1}, "tgt": "b"}\n', "line 1: column 'src' holds a dict"),
    ('{"src": "\\ud800", "tgt": "b"}\n', "line 1: column 'src' holds an unpaired surrogate"),
    ('{"src": ' + "9" * 5000 + ', "tgt": "b"}\n', "line 1: unreadable JSON"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "unreadable JSON"),
])
def test_odd_json_is_a_user_error(tmp_path, text, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(expected)):
        load_raw_splits(None, str(path), "src", "tgt", log=lambda _: None)


@pytest.mark.parametrize("text,expected", [
    ('src\ttgt\n"quoted start\tx\nplain\ty\nz\tw\n', "data.tsv lines 2-4: malformed TSV"),
    ('src\ttgt\na\tb\n"Hello" she said\tx\n', "data.tsv line 3: malformed TSV"),
])
def test_stray_quote_in_tsv_stops_with_lines(tmp_path, text, expected):
    path = tmp_path / "data.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(expected)):
        load_raw_splits(None, str(path), "src", "tgt", log=lambda _: None)


def test_truncated_or_garbage_parquet_is_a_user_error(tmp_path):
    path = tmp_path / "data.parquet"
    Dataset.from_dict({"src": ["a"] * 10, "tgt": ["b"] * 10}).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="data.parquet is not a readable parquet file"):
        load_raw_splits(None, str(path), "src", "tgt", log=lambda _: None)
