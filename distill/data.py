"""Dataset loading, cleaning, tokenization and batching for seq2seq distillation.

Every source (a Hub name, a `save_to_disk` folder, one json/jsonl/csv/tsv/parquet file or a
folder of them) ends as the same DatasetDict: "train", "validation" (the source's own, else split
off train) and "test" when the source has one, each with exactly two string columns "source" and
"target". With `require_target=False` (training on the teacher's outputs, pseudo-labelling) a
source without the target column loads too, its "target" all null, and rows with a blank target
stay (null target). Bad data either gets cleaned with a logged count or stops the run with a
one-line UserError naming the file and line, because a traceback from deep inside a data library
names neither and a silently shrunk dataset hides a broken export.

`apply_pseudo_labels` turns the teacher's outputs (distill/pseudo_label.py) into the targets that
--target-source asks for. This module decides which files make which split; reading one file
(strict UTF-8, line-numbered errors) lives in distill.data_files. `save_to_disk` and the Hub go through datasets/pyarrow.
"""
from __future__ import annotations

import os

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from distill import hub
from distill.data_files import FILE_TYPES, as_text, first_line, read_file, select_columns
from distill.config import is_unset
from distill.errors import UserError
from distill.preflight import check_local_path

# Names a split goes by in the wild, mapped to the three this toolkit uses.
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                 "valid": "validation", "val": "validation", "dev": "validation",
                 "test": "test", "testing": "test"}
_CHUNK_ROWS = 10_000


def load_raw_splits(dataset: str | None, dataset_local_path: str | None, input_column: str,
                    target_column: str, *, validation_ratio: float = 0.05, seed: int = 42,
                    trust_remote_code: bool = False, require_target: bool = True,
                    split_off_validation: bool = True, log=print) -> DatasetDict:
    """Load a dataset as DatasetDict(train, validation[, test]) with string columns source/target.

    `dataset_local_path` wins over `dataset` (a Hub name, "NAME:CONFIG" picks a config). Rows with
    an empty or missing source/target are dropped and counted in the log; numbers become text.
    `require_target=False`: a file or split without the target column gives null targets, and
    only rows with an empty source are dropped. `split_off_validation=False`: no validation split
    is made when the source has none (pseudo-labelling labels all of train).
    """
    if not 0.0 < validation_ratio < 1.0:
        raise UserError(f"validation ratio {validation_ratio} is outside (0, 1); pass e.g. 0.05")
    columns = {"source": input_column, "target": target_column}
    if not require_target:
        columns["optional"] = True  # read by _read/_select only; the readers see source/target
    if not is_unset(dataset_local_path):
        if not is_unset(dataset):
            log(f"data: --dataset-local-path {dataset_local_path} is used; --dataset {dataset} is ignored")
        raw = _load_local(os.path.expanduser(str(dataset_local_path)), columns, log)
    elif not is_unset(dataset):
        raw = _load_hub(str(dataset).strip(), columns, trust_remote_code, log)
    else:
        raise UserError("no dataset given; pass --dataset NAME[:CONFIG] (a Hugging Face Hub dataset) "
                        "or --dataset-local-path PATH (a file, a folder of files or a save_to_disk folder)")
    splits = {}
    for split, (ds, where) in raw.items():
        splits[split] = _drop_empty(ds, split, where, log, require_target)
    if "validation" not in splits and split_off_validation:
        splits.update(_split_off_validation(splits["train"], raw["train"][1], validation_ratio, seed, log))
    return DatasetDict({name: splits[name] for name in ("train", "validation", "test") if name in splits})


# ----------------------------------------------------------------------------- local sources

def _load_local(path: str, columns: dict, log) -> dict:
    """-> {split: (Dataset with source/target, description for messages)}."""
    check_local_path(path)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            return _load_saved(path, columns, log)
        files = _data_files(path)
        if not files:
            raise UserError(f"folder {path} holds no {'/'.join(t[1:] for t in FILE_TYPES)} files and is "
                            "not a save_to_disk folder; point --dataset-local-path at your data")
    else:
        files = [path]
    by_split: dict[str, list] = {}
    for file in files:  # a single file is the train data whatever its name
        by_split.setdefault(_split_of(file, path) if len(files) > 1 else "train", []).append(file)
    if "train" not in by_split:
        raise UserError(f"{path} has no train data (found splits: {', '.join(sorted(by_split))}); name a "
                        "file train.<ext>, or any name other than validation/val/valid/dev/test")
    log(f"data: {path}: " + ", ".join(f"{s} <- {', '.join(os.path.basename(f) for f in fs)}"
                                      for s, fs in sorted(by_split.items())))
    return {split: (concatenate_datasets([_read(f, columns, log) for f in fs]),
                    fs[0] if len(fs) == 1 else path)
            for split, fs in by_split.items()}


def _data_files(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .cache, .git and the like
        found += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(FILE_TYPES)]
    return found


def _split_of(file: str, root: str) -> str:
    """Split from the file name (train.jsonl, dev.csv, test-00000-of-00001.parquet), else its folder."""
    parts = os.path.relpath(file, root).replace("\\", "/").split("/")
    parts[-1] = parts[-1].split(".")[0]
    for part in reversed(parts):
        token = part.lower().replace("-", "_").split("_")[0]
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return "train"


def _load_saved(path: str, columns: dict, log) -> dict:
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(path)
    except Exception as e:  # any corruption in a saved folder is the user's data, not our bug
        raise UserError(f"{path} looks like a save_to_disk folder but cannot be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-save it") from None
    if isinstance(loaded, Dataset):
        log(f"data: {path}: a single saved Dataset, used as train")
        return {"train": (as_text(_select(loaded, columns, path, log), path, log), path)}
    return _pick_splits(loaded, columns, path, log)


def _pick_splits(dd, columns: dict, name: str, log) -> dict:
    picked = {}
    for split, ds in dd.items():
        role = SPLIT_ALIASES.get(split.lower())
        if role is None or role in picked:
            log(f"data: {name}: ignoring split {split!r}")
            continue
        where = f"{name} ({split} split)"
        picked[role] = (as_text(_select(ds, columns, where, log), where, log), where)
    if "train" not in picked:
        raise UserError(f"{name} has no train split (found: {', '.join(dd) or 'none'}); "
                        "provide one named train")
    return picked


def _read(file: str, columns: dict, log) -> Dataset:
    """read_file, or with an optional target (columns["optional"]) and a file without that
    column: its sources with null targets."""
    roles = {"source": columns["source"], "target": columns["target"]}
    if not columns.get("optional"):
        return read_file(file, roles, log)
    try:
        return read_file(file, roles, log)
    except UserError as exc:  # data_files names a missing column this way (its one column error)
        if not str(exc).startswith(f"column {roles['target']!r} not found"):
            raise
    ds = read_file(file, {"source": roles["source"], "target": roles["source"]}, log)
    log(f"data: {file}: no {roles['target']!r} column; inputs only")
    return _null_targets(ds)


def _select(ds: Dataset, columns: dict, where: str, log) -> Dataset:
    """select_columns, or sources with null targets when the target is optional and absent."""
    roles = {"source": columns["source"], "target": columns["target"]}
    target = roles["target"]
    if not columns.get("optional") or target in ds.column_names or target in ds.flatten().column_names:
        return select_columns(ds, roles, where)
    log(f"data: {where}: no {target!r} column; inputs only")
    return _null_targets(select_columns(ds, {"source": roles["source"], "target": roles["source"]}, where))


def _null_targets(ds: Dataset) -> Dataset:
    import pyarrow as pa

    return Dataset(pa.table({"source": ds.data.column("source"),
                             "target": pa.nulls(len(ds), type=pa.string())}))


# ----------------------------------------------------------------------------- the Hub

def _load_hub(dataset: str, columns: dict, trust_remote_code: bool, log) -> dict:
    name, _, config = (part.strip() for part in dataset.partition(":"))
    if os.path.exists(os.path.expanduser(dataset)):
        log(f"data: {dataset} is a local path; reading it as --dataset-local-path")
        return _load_local(os.path.expanduser(dataset), columns, log)
    import datasets
    from huggingface_hub import constants

    offline = hub.offline_mode() or datasets.config.HF_HUB_OFFLINE  # datasets reads it at import
    if not offline:
        reason = hub.unreachable_reason()
        if reason:
            raise UserError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) to load "
                            f"dataset {name!r}; pass --dataset-local-path with a local copy instead "
                            "(or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache)")
    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    log(f"data: loading {name!r}" + (f" config {config!r}" if config else "") + " from the Hugging Face Hub")
    try:
        dd = datasets.load_dataset(name, config or None, **kwargs)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as e:
        where = "in the offline Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
        raise UserError(f"dataset {name!r} could not be loaded {where} ({first_line(e)}); check the name, "
                        "or pass --dataset-local-path with a local copy instead") from None
    except (ValueError, OSError) as e:  # e.g. a missing or unknown config name
        raise UserError(f"dataset {name!r} could not be loaded ({first_line(e)}); "
                        "pick a config with --dataset NAME:CONFIG or pass --dataset-local-path") from None
    return _pick_splits(dd, columns, name, log)


# ----------------------------------------------------------------------------- cleaning

def _drop_empty(ds: Dataset, split: str, where: str, log, require_target: bool = True) -> Dataset:
    """Drop rows where source or (when required) target is null or blank, log the count; refuse
    an empty result."""
    keep = []
    what = "source or target" if require_target else "source"
    for batch in ds.with_format("arrow").iter(batch_size=_CHUNK_ROWS):
        # str.strip, not an arrow kernel: "blank" should mean what str.isspace means to the user.
        ok = [bool(s and s.strip() and (not require_target or (t and t.strip())))
              for s, t in zip(batch.column("source").to_pylist(), batch.column("target").to_pylist())]
        keep.append(np.asarray(ok, dtype=bool))
    mask = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    dropped = int(len(mask) - mask.sum())
    if dropped:
        log(f"data: dropped {dropped} of {len(mask)} {split} rows with an empty {what}")
        ds = ds.select(np.flatnonzero(mask))
    if len(ds) == 0:
        raise UserError(f"the {split} data from {where} is empty" + (f" after dropping rows with an empty "
                        f"{what}" if dropped else "") + "; check the file and the column flags "
                        "--dataset-input-column/--dataset-target-column")
    return ds


def _split_off_validation(train: Dataset, where: str, ratio: float, seed: int, log) -> dict:
    n_val = max(1, round(len(train) * ratio))
    if len(train) < 2:
        raise UserError(f"only {len(train)} usable train row in {where}, too few to split off a validation set; "
                        "add rows or provide a validation split (e.g. a validation.jsonl file)")
    parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    log(f"data: no validation split; took {n_val} of {len(train)} train rows as validation (seed {seed})")
    return {"train": parts["train"], "validation": parts["test"]}


# ----------------------------------------------------------------------------- pseudo-labels

def apply_pseudo_labels(splits: DatasetDict, teacher_output, target_source: str, where: str,
                        log=print) -> DatasetDict:
    """The training targets --target-source asks for, from `teacher_output(source) -> str | None`
    (the teacher's output for an input text, distill.pseudo_label_files.TeacherOutputs.get).

    train, teacher: every row's target is the teacher's output.
    train, mixed: every row twice, with its reference and with the teacher's output; once where
        the two are equal, so agreement is not counted double.
    validation: the reference where there is one, else the teacher's output.
    test (the report's references): the reference; rows without one are dropped, and a test
        split without any is left out (the report then uses validation).
    A train or validation row whose input the pseudo-labels lack is an error (they were made for
    other data); an empty teacher output is dropped and counted.
    """
    out = {}
    for split, ds in splits.items():
        sources, references = ds["source"], ds["target"]
        has_ref = [bool(t and t.strip()) for t in references]
        if split == "test":
            keep = [i for i, ok in enumerate(has_ref) if ok]
            if len(keep) < len(ds):
                log(f"data: test: {len(ds) - len(keep)} of {len(ds)} rows have no reference and are left out")
            if keep:
                out[split] = ds.select(keep) if len(keep) < len(ds) else ds
            continue
        need = [i for i in range(len(ds)) if split == "train" or not has_ref[i]]
        outputs = {i: teacher_output(sources[i]) for i in need}
        missing = [i for i in need if outputs[i] is None]
        if missing:
            raise UserError(f"{len(missing)} of {len(ds)} {split} rows have no teacher output in {where} "
                            f"(first: {sources[missing[0]][:60]!r}); make the pseudo-labels from this data "
                            "(same dataset and --dataset-input-column, all the rows this run uses)")
        empty = sum(1 for i in need if not outputs[i].strip())
        if split == "train" and target_source == "teacher":
            pairs = [(sources[i], outputs[i]) for i in need]
        elif split == "train":  # mixed
            pairs = [(s, t) for s, t in zip(sources, references)]
            pairs += [(sources[i], outputs[i]) for i in need if outputs[i] != references[i]]
            log(f"data: train: {len(ds)} rows with their reference + {len(pairs) - len(ds)} with the "
                f"teacher's output ({len(ds) - (len(pairs) - len(ds))} equal to the reference, kept once)")
        else:
            pairs = [(s, t if ok else outputs[i]) for i, (s, t, ok) in enumerate(zip(sources, references, has_ref))]
            if need:
                log(f"data: {split}: {len(need)} of {len(ds)} rows have no reference; the teacher's output is used")
        kept = [(s, t) for s, t in pairs if t.strip()]
        if empty:
            log(f"data: {split}: dropped {len(pairs) - len(kept)} rows whose teacher output is empty")
        if not kept:
            raise UserError(f"every teacher output for the {split} rows in {where} is empty; make the "
                            "pseudo-labels again with a larger --max-new-tokens or another teacher")
        out[split] = Dataset.from_dict({"source": [s for s, _ in kept], "target": [t for _, t in kept]},
                                       features=ds.features)
    if target_source == "teacher":
        log(f"data: train: {len(out['train'])} rows with the teacher's outputs as targets (from {where})")
    return DatasetDict(out)


# ----------------------------------------------------------------------------- tokenize, collate

def tokenize_splits(splits: DatasetDict, tokenizer, *, max_source_length: int, max_target_length: int,
                    source_prefix: str = "", log=print) -> DatasetDict:
    """Tokenize source (with `source_prefix`) and target; columns input_ids, attention_mask, labels."""
    counts: dict[str, list[int]] = {}

    def encode(batch, split):
        sources = [source_prefix + s for s in batch["source"]]
        model_inputs, cut_src = _encode(tokenizer, sources, max_source_length, {})
        labels, cut_tgt = _encode(tokenizer, batch["target"], max_target_length, {"is_target": True})
        model_inputs["labels"] = labels["input_ids"]
        counts[split][0] += cut_src
        counts[split][1] += cut_tgt
        return model_inputs

    out = {}
    for split, ds in splits.items():
        counts[split] = [0, 0]
        # load_from_cache_file=False: the counts below come from running encode, not from a cache.
        out[split] = ds.map(encode, batched=True, fn_kwargs={"split": split}, remove_columns=ds.column_names,
                            load_from_cache_file=False, desc=f"tokenizing {split}")
        cut_src, cut_tgt = counts[split]
        log(f"data: {split}: truncated {cut_src} of {len(ds)} sources to {max_source_length} tokens "
            f"and {cut_tgt} of {len(ds)} targets to {max_target_length} tokens")
    return DatasetDict(out)


def _encode(tokenizer, texts: list[str], max_length: int, how: dict):
    """Encode with truncation and count the texts that were cut.

    A result of exactly max_length tokens may or may not have been cut, so the count needs more
    than the truncated encoding. Fast tokenizers say it in the same pass (overflowing pieces, of
    which the first is exactly the truncated encoding, special tokens included); others encode
    without truncation first and encode the long texts again, truncated.
    """
    key = "text_target" if how.get("is_target") else "text"
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(**{key: texts}, truncation=True, max_length=max_length, stride=0,
                        return_overflowing_tokens=True)
        sample = enc["overflow_to_sample_mapping"]  # piece -> text, pieces of a text adjacent
        first = [i for i in range(len(sample)) if i == 0 or sample[i] != sample[i - 1]]
        cut = sum(1 for j, i in enumerate(first) if (first[j + 1] if j + 1 < len(first) else len(sample)) > i + 1)
        return {k: [enc[k][i] for i in first] for k in ("input_ids", "attention_mask")}, cut
    full = tokenizer(**{key: texts}, truncation=False, verbose=False)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    out = {k: list(full[k]) for k in ("input_ids", "attention_mask")}
    if long:
        short = tokenizer(**{key: [texts[i] for i in long]}, truncation=True, max_length=max_length)
        for k in out:
            for j, i in enumerate(long):
                out[k][i] = short[k][j]
    return out, len(long)


class Seq2SeqCollator:
    """Pad a list of tokenized rows into tensors: input_ids with the tokenizer's pad id,
    attention_mask with 0 and labels with -100 (the index cross-entropy and the KL term ignore)."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForSeq2Seq

        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                            "tokenizer.eos_token) before training")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        # model=None: decoder_input_ids are built by the models from labels, not here.
        self._collate = DataCollatorForSeq2Seq(tokenizer, model=None, padding=True, label_pad_token_id=-100,
                                               pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def __call__(self, features: list[dict]):
        keep = ("input_ids", "attention_mask", "labels")
        batch = dict(self._collate([{k: f[k] for k in keep if k in f} for f in features]))
        if features and "cache_row" in features[0]:  # where a --teacher-cache holds the row's targets
            import torch

            batch["cache_row"] = torch.tensor([f["cache_row"] for f in features], dtype=torch.long)
        return batch
