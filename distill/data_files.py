"""Strict, line-numbered reading of the user's own data files (jsonl/json/csv/tsv/parquet).

Split out of distill/data.py, which decides which files make which split; this module turns one file
into a Dataset with exactly the string columns "source" and "target". jsonl/json/csv/tsv are read
with the json/csv modules and strict UTF-8 instead of the `datasets` json/csv builders: those builders
report malformed lines without a line number and can guess column types from the first rows, and a
traceback from deep inside a data library names neither the file nor the line. Parquet goes through
pyarrow. Every bad row either is dropped with a logged count or stops the run with a one-line
UserError naming the file and the line (or row).

Public: FILE_TYPES, read_file, select_columns, as_text, first_line (the last three are shared with
the save_to_disk and Hub loaders in distill.data).
"""
from __future__ import annotations

import csv
import json
import math
import os

import pyarrow as pa
from datasets import Dataset, Value

from distill.errors import UserError

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_FLAGS = {"source": "--dataset-input-column", "target": "--dataset-target-column"}


def read_file(path: str, columns: dict, log) -> Dataset:
    """One data file -> Dataset with string columns source/target (`columns` maps those roles to the
    file's column names); rows lacking either are dropped and counted, numbers become text."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_TYPES:
        raise UserError(f"unsupported data file type '{ext or os.path.basename(path)}' ({path}); "
                        f"convert it to one of {', '.join(FILE_TYPES)}")
    if ext == ".parquet":
        return _read_parquet(path, columns, log)
    rows = _json_rows(path) if ext in (".json", ".jsonl") else _csv_rows(path, "\t" if ext == ".tsv" else ",")
    return _rows_to_dataset(rows, path, columns, log)


def _decoded_lines(path: str):
    """Yield (line number, text) with strict UTF-8, naming the line of any undecodable byte."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); re-save the file as UTF-8 or remove the line") from None
            yield number, text.lstrip("\ufeff") if number == 1 else text


def _json_rows(path: str):
    """Yield (line, object) from JSON lines, or from one JSON array/object spanning the file."""
    lines = _decoded_lines(path)
    first = next(((n, t) for n, t in lines if t.strip()), None)
    if first is None:
        return
    number, text = first
    if text.lstrip().startswith("[") or (path.lower().endswith(".json") and not _is_complete_json(text)):
        yield from _json_document(path, text + "".join(t for _, t in lines))
        return
    yield number, _parse_json_line(path, number, text)
    for number, text in lines:
        if text.strip():
            yield number, _parse_json_line(path, number, text)


def _is_complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    except (ValueError, RecursionError):
        pass  # complete but unreadable: parsing it as a line reports it with its line number
    return True


def _parse_json_line(path: str, number: int, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: invalid JSON ({e.msg} at column {e.colno}); "
                        "fix or remove the line") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits, nesting too deep
        raise UserError(f"{path} line {number}: unreadable JSON ({first_line(e)}); fix or remove the line") from None


def _json_document(path: str, text: str):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        "fix the file or write it as JSON lines (one object per line)") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: unreadable JSON ({first_line(e)}); fix the file") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]  # the {"data": [...]} layout some exporters write
    if not isinstance(doc, list):
        doc = [doc]
    # A single document has no per-row line numbers; name the row instead.
    yield from ((f"row {i}", row) for i, row in enumerate(doc, start=1))


def _csv_rows(path: str, delimiter: str):
    # 1 MB fields must load; the csv module's default limit is 128 KiB.
    csv.field_size_limit(2**31 - 1)
    lines = (text for _, text in _decoded_lines(path))
    # strict: a stray opening quote stops the load instead of silently swallowing the lines after it.
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next(reader, None)
        while header is not None:
            start = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                return
            if fields:  # skip empty lines; a line of spaces is a row and gets counted
                # A short row lacks its trailing columns: they are missing (counted), not "".
                yield start, {**dict.fromkeys(header, _MISSING), **dict(zip(header, fields))}
    except csv.Error as e:
        lines_at = f"line {start}" if reader.line_num <= start else f"lines {start}-{reader.line_num}"
        raise UserError(f"{path} {lines_at}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e}); "
                        'a field that starts with a double quote must end with one ("" inside); '
                        "fix or remove the line") from None


def _rows_to_dataset(rows, path: str, columns: dict, log) -> Dataset:
    """Keep the two wanted fields of each row as text; count rows lacking one and numbers converted."""
    out = {"source": [], "target": []}
    seen: dict[str, None] = {}
    total = missing = converted = 0
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path} {_at(where)}: expected an object with fields {columns['source']!r} and "
                            f"{columns['target']!r}, found {type(row).__name__}; fix or remove it")
        total += 1
        seen.update(dict.fromkeys(map(str, row)))
        values = {role: _text_value(_lookup(row, name), path, where, role, name) for role, name in columns.items()}
        if _MISSING in values.values():
            missing += 1
            continue
        converted += sum(isinstance(v, _Converted) for v in values.values())
        out["source"].append(values["source"])
        out["target"].append(values["target"])
    if total and missing == total:
        for role, name in columns.items():
            if _lookup(dict.fromkeys(seen), name) is _MISSING:
                raise _column_error(name, role, list(seen), path)
    if missing:
        log(f"data: {path}: dropped {missing} of {total} rows missing column "
            f"{columns['source']!r} or {columns['target']!r}")
    if converted:
        log(f"data: {path}: converted {converted} numeric values to text")
    return Dataset(pa.table({k: pa.array(v, type=pa.string()) for k, v in out.items()}))


class _Converted(str):
    """A number turned into text, marked so it can be counted."""


def _text_value(value, path: str, where, role: str, name: str):
    if value is _MISSING or value is None:
        return value
    if isinstance(value, (bool, int, float)):
        return None if isinstance(value, float) and math.isnan(value) else _Converted(value)
    if not isinstance(value, str):
        raise UserError(f"{path} {_at(where)}: column {name!r} holds a {type(value).__name__}, expected "
                        f"text; pick a text column with {_FLAGS[role]} (nested fields as a.b)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates, which are not text
        raise UserError(f"{path} {_at(where)}: column {name!r} holds an unpaired surrogate escape "
                        "(\\ud800-\\udfff), which is not valid Unicode; fix or remove the line") from None
    return value


_MISSING = object()


def _lookup(row: dict, name: str):
    """row[name], or a nested field for dotted names ("translation.en"); _MISSING when absent."""
    if name in row:
        return row[name]
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _at(where) -> str:
    return f"line {where}" if isinstance(where, int) else str(where)


def _read_parquet(path: str, columns: dict, log) -> Dataset:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        wanted = list(dict.fromkeys(columns.values()))
        table = pq.read_table(path, columns=wanted if set(wanted) <= set(names) else None)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({first_line(e)}); "
                        "re-export it or convert it to jsonl") from None
    return as_text(select_columns(Dataset(table), columns, path), path, log)


def select_columns(ds: Dataset, columns: dict, where: str) -> Dataset:
    """Keep the two wanted columns (dotted names reach nested fields), renamed source/target."""
    names = list(ds.column_names)
    if any(c not in names and "." in c for c in columns.values()):
        ds = ds.flatten()  # nested fields ("translation.en") become top-level columns
    for role, name in columns.items():
        if name not in ds.column_names:
            raise _column_error(name, role, names, where)
    if columns["source"] == columns["target"]:
        ds = ds.add_column("__target__", ds[columns["target"]])
        columns = {"source": columns["source"], "target": "__target__"}
    ds = ds.select_columns([columns["source"], columns["target"]])
    return ds.rename_columns({columns["source"]: "source", columns["target"]: "target"})


def _column_error(name: str, role: str, existing: list, where: str) -> UserError:
    return UserError(f"column {name!r} not found in {where}; columns found: "
                     f"{', '.join(map(str, existing)) or 'none'}; pass one of them with {_FLAGS[role]}")


def as_text(ds: Dataset, where: str, log) -> Dataset:
    """Cast source/target to plain strings (numbers become text, counted) so splits concatenate."""
    for col in ("source", "target"):
        feature = ds.features[col]
        dtype = getattr(feature, "dtype", "")
        if not isinstance(feature, Value) or not (dtype in ("string", "large_string", "null", "bool")
                                                  or dtype.startswith(("int", "uint", "float", "decimal"))):
            raise UserError(f"column {col!r} of {where} holds {feature}, expected text; pick a text column "
                            f"with {_FLAGS[col]} (nested fields as a.b)")
        if dtype not in ("string", "large_string", "null"):
            log(f"data: {where}: converted {len(ds) - ds.data.column(col).null_count} numeric {col} values to text")
        if dtype != "string":
            ds = ds.cast_column(col, Value("string"))
    return ds


def first_line(e: BaseException) -> str:
    """An exception's first line, capped, for one-line error messages."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
