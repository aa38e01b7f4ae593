"""The pseudo-label folder on disk: manifest, shards, fingerprints. No torch, no model.

    OUTPUT_DIR/manifest.json          what made the pseudo-labels, and whether they are complete
    OUTPUT_DIR/SPLIT-NNNNN.jsonl      shard NNNNN of a split: rows [NNNNN * shard_size, ...)

A shard holds one JSON object per line, in row order:
    {"row": 17, "source": "...", "teacher": "...", "target": "..." or null}
`row` is the row's index in its split (after --max-samples), `source` the input text without the
prefix, `teacher` the teacher's decoded output, `target` the dataset's reference (null when the
data has none). Shards are named by their place in the split, not by the rank that made them, so
the folder is the same whatever the world size, and a run on another number of ranks continues it.

Every file is written to a hidden temporary name in the folder, fsynced and renamed, so a shard or
manifest that exists is whole. A shard counts as done when it parses and holds exactly its rows
with the expected sources; anything else is made again.

manifest.json: {"format", "version", "complete", "identity", "info"}. "identity" is what a rerun
must match to continue a folder and what training checks:
  teacher_sha256     sha256 over config.json and the weight files from_pretrained reads
                     (model.safetensors, or the index and its shards, else the .bin), every byte
                     read: exact, at the cost of reading the weights once (sha256 itself runs
                     at about 1 GB/s per core) (teacher_fingerprint)
  tokenizer_sha256   sha256 of the tokenizer's full definition (tokenizer_fingerprint)
  generation         num_beams, max_new_tokens, do_sample (+ temperature, top_p, top_k, seed when
                     sampling), dtype, and the teacher's own generation_config
  source_prefix, max_source_length, shard_size
  splits             per split: rows and sources_sha256 (the input texts, in order)
"info" is for people: paths, columns, world size, batch size, times; it is never compared.

Training (--pseudo-labels DIR) matches its rows to the teacher's outputs by source text
(TeacherOutputs), so --max-train-samples, a split-off validation set or a reordered file all find
their labels; where a source occurs twice, its first output is used.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from distill.config import is_unset
from distill.errors import UserError
from distill.guard import fsync_dir

MANIFEST = "manifest.json"
FORMAT = "seq2seq-distill pseudo-labels"
VERSION = 1
SPLITS = ("train", "validation", "test")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_TMP_PREFIX = ".tmp-"
_READ = 16 * 2**20
MAKE = "python -m distill.pseudo_label"


@dataclass(frozen=True)
class FolderKind:
    """A builder's folder as its checks name it: the pseudo-labels' (here) and the teacher
    cache's (teacher_cache_files.CACHE) share folder_state, read_manifest and the training checks."""
    name: str            # "pseudo-labels": "holds no pseudo-labels", "is not a ... manifest"
    manifest: str
    format: str
    make: str            # the command that makes the folder
    make_verb: str       # "make the teacher's outputs": "...; make the teacher's outputs with CMD"
    remake: str          # "make the pseudo-labels again"
    made: str            # "were made": "--pseudo-labels DIR were made with --source-prefix ..."
    folder_flag: str     # the builder's folder option
    overwrite_flag: str
    train_flag: str      # the training option that reads the folder
    log: str             # the builder's log prefix
    ours: Callable[[str], bool]  # the kind's files in the folder (what the overwrite flag removes)


# ----------------------------------------------------------------------------- fingerprints

def _hash_file(h, path: str) -> None:
    h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ):
            h.update(chunk)


def _weight_names(folder: str, exists) -> list[str]:
    """The weight files from_pretrained reads from `folder`, in its order of preference."""
    for name in WEIGHT_FILES:
        if exists(name):
            if not name.endswith(".index.json"):
                return [name]
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
            return [name, *shards]
    return []


def teacher_fingerprint(source: str) -> dict:
    """{"sha256", "files", "paths"}: config.json and the weight files of the teacher at `source`
    (a folder, or a hub id resolved to its files in the Hugging Face cache, downloaded when
    missing); "paths" are where they are on disk."""
    if os.path.isdir(source):
        folder = source
        files = ["config.json", *_weight_names(folder, lambda n: os.path.isfile(os.path.join(folder, n)))]
        paths = [os.path.join(folder, n) for n in files]
    else:
        files, paths = _hub_files(source)
    h = hashlib.sha256()
    for path in paths:
        _hash_file(h, path)
    return {"sha256": h.hexdigest(), "files": files, "paths": paths}


def _hub_files(repo: str) -> tuple[list[str], list[str]]:
    from huggingface_hub import hf_hub_download

    from distill import hub

    cache_only = hub.offline_mode() or not hub.hub_reachable()

    def fetch(name):
        try:
            return hf_hub_download(repo, name, local_files_only=cache_only)
        except Exception:  # not in the repo, or not cached while offline: the caller decides
            return None

    config = fetch("config.json")
    if config is None:
        raise UserError(f"cannot read teacher {repo!r}'s config.json to fingerprint it (not in the local "
                        "cache, or the Hub cannot be reached); pass the teacher as a folder with "
                        "--teacher-local-path DIR")
    folder = os.path.dirname(config)
    found: dict[str, str | None] = {}

    def exists(name):
        if name not in found:
            found[name] = fetch(name)
        return found[name] is not None

    names = _weight_names(folder, exists)
    paths = [config] + [found[n] if n in found else fetch(n) for n in names]
    if any(p is None for p in paths):
        raise UserError(f"cannot fetch teacher {repo!r}'s weight files to fingerprint them; pass the "
                        "teacher as a folder with --teacher-local-path DIR")
    return ["config.json", *names], paths


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer does: a fast tokenizer's full definition (vocabulary, merges,
    normalizer, pre- and post-processing, added tokens) without its momentary truncation and
    padding settings; a slow one's vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = sorted(map(str, tokenizer.all_special_tokens))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def sources_fingerprint(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- files

def write_atomic(path: str, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` so that the file is either absent/old or whole, never partial."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    with (open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8")) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def remove_temporaries(folder: str) -> None:
    """Temporary files of a run that died mid-write (the caller holds the folder's lock)."""
    for path in glob.glob(os.path.join(glob.escape(folder), _TMP_PREFIX + "*")):
        os.remove(path)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.jsonl"


def plan_shards(rows: dict[str, int], shard_size: int) -> list[tuple[str, int, int, int]]:
    """(split, index, start, end) for every shard, splits in SPLITS order."""
    return [(split, i, start, min(start + shard_size, rows[split]))
            for split in SPLITS if split in rows
            for i, start in enumerate(range(0, rows[split], shard_size))]


def write_shard(folder: str, split: str, index: int, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomic(os.path.join(folder, shard_name(split, index)), text)


def read_shard(path: str) -> list[dict] | None:
    """The rows of a shard, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
    except (OSError, ValueError):
        return None
    return rows if all(isinstance(r, dict) for r in rows) else None


def shard_done(folder: str, split: str, index: int, start: int, sources: list[str]) -> bool:
    """Whether the shard holds exactly rows start.. with these `sources` and a teacher output."""
    rows = read_shard(os.path.join(folder, shard_name(split, index)))
    return rows is not None and len(rows) == len(sources) and all(
        r.get("row") == start + i and r.get("source") == s and isinstance(r.get("teacher"), str)
        for i, (r, s) in enumerate(zip(rows, sources)))


def read_manifest(folder: str, kind=None) -> dict | None:
    """The folder's manifest, None when it has none; a UserError when it cannot be read or is
    not one of `kind` (a FolderKind; default: the pseudo-labels')."""
    kind = kind or PSEUDO_LABELS
    path = os.path.join(folder, kind.manifest)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}); {kind.remake} ({kind.make} ... "
                        f"{kind.folder_flag} {folder} {kind.overwrite_flag})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format or "identity" not in manifest:
        raise UserError(f"{path} is not a {kind.name} manifest; pass a folder written by {kind.make}")
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def first_difference(old, new, path: str = "") -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first difference between two identities."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def _ours(name: str) -> bool:
    return name == MANIFEST or (name.endswith(".jsonl") and name.split("-")[0] in SPLITS)


PSEUDO_LABELS = FolderKind(
    name="pseudo-labels", manifest=MANIFEST, format=FORMAT, make=MAKE, make_verb="make the teacher's outputs",
    remake="make the pseudo-labels again", made="were made", folder_flag="--output-dir",
    overwrite_flag="--overwrite-output-dir", train_flag="--pseudo-labels", log="pseudo-label", ours=_ours)


def pending_shards(out: str, identity: dict, sources: dict[str, list[str]], overwrite: bool,
                   log) -> tuple[list, dict | None]:
    """(the shards still to make, the folder's manifest when the run continues it): folder_state
    for the pseudo-labels, a shard done when it holds exactly its rows' sources."""
    return folder_state(PSEUDO_LABELS, out, identity, {s: len(t) for s, t in sources.items()}, overwrite, log,
                        lambda split, index, start, end: shard_done(out, split, index, start,
                                                                    sources[split][start:end]))


def folder_state(kind, out: str, identity: dict, rows: dict[str, int], overwrite: bool, log,
                 done) -> tuple[list, dict | None]:
    """(the shards still to make as (split, index, start, end), the folder's manifest when the
    run continues it), for a builder's folder of `kind` (a FolderKind).

    A folder made with the same identity is continued (its complete shards kept: `done(split,
    index, start, end)`, even with the overwrite flag); one made otherwise, or holding other
    files, is refused unless `overwrite`, which deletes the kind's old files (manifest and
    shards) first. Rank 0 only, under the folder's lock; raises UserError before anything is
    written."""
    from distill.guard import is_lock_file

    entries = [n for n in os.listdir(out) if not is_lock_file(n)] if os.path.isdir(out) else []
    manifest = None
    if entries:
        try:
            manifest = read_manifest(out, kind)
        except UserError:
            if not overwrite:
                raise
        diff = first_difference(manifest["identity"], identity) if manifest is not None else None
        if not overwrite and manifest is None:
            raise UserError(f"{kind.folder_flag} {out!r} is not empty and holds no {kind.name} ({kind.manifest}); "
                            f"choose an empty or new folder, or pass {kind.overwrite_flag}")
        if not overwrite and diff:
            key, old, new = diff
            raise UserError(f"the {kind.name} in {kind.folder_flag} {out!r} came from other settings ({key}: "
                            f"{describe(old)} there, {describe(new)} now); rerun with the options, teacher and "
                            f"data that made it to continue, pass {kind.overwrite_flag} to replace it, or choose "
                            f"another {kind.folder_flag}")
        if manifest is None or diff:
            for name in filter(kind.ours, entries):
                os.remove(os.path.join(out, name))
            manifest = None
            log(f"{kind.log}: {kind.overwrite_flag}: removed the {kind.name} in {out}")
        remove_temporaries(out)
    plan = plan_shards(rows, identity["shard_size"])
    if manifest is None:
        return plan, None
    todo = [p for p in plan if not done(*p)]
    log(f"{kind.log}: continuing {out}: {len(plan) - len(todo)} of {len(plan)} shards are complete")
    return todo, manifest


# ----------------------------------------------------------------------------- training side

def check_for_training(folder, *, source_prefix: str, max_source_length: int) -> dict:
    """--pseudo-labels DIR: a complete manifest made with this run's input settings (no torch;
    preflight). The teacher and tokenizer are compared later (check_teacher), once loaded."""
    return check_folder_for_training(PSEUDO_LABELS, folder, (("--source-prefix", "source_prefix", source_prefix),
                                                             ("--max-source-length", "max_source_length",
                                                              max_source_length)))


def check_folder_for_training(kind, folder, settings) -> dict:
    """The training flag's folder of `kind`: a complete manifest whose identity has each
    (flag, key, value) of `settings` (this run's input settings). No torch (preflight)."""
    flag = kind.train_flag
    if is_unset(folder) or not os.path.isdir(folder):
        raise UserError(f"{flag} {folder!r} is not a folder; {kind.make_verb} with {kind.make} ... "
                        f"{kind.folder_flag} DIR and pass that DIR")
    manifest = read_manifest(folder, kind)
    if manifest is None:
        raise UserError(f"{flag} {folder!r} has no {kind.manifest}; {kind.make_verb} there with {kind.make} ... "
                        f"{kind.folder_flag} {folder}")
    if manifest.get("complete") is not True:
        raise UserError(f"{flag} {folder!r} is incomplete (its run stopped before the end); rerun "
                        f"the same {kind.make} command to finish it")
    made = manifest["identity"]
    for option, key, value in settings:
        if made.get(key) != value:
            raise UserError(f"{flag} {folder!r} {kind.made} with {option} {describe(made.get(key))}, this run "
                            f"has {describe(value)}; pass {option} {describe(made.get(key))} or {kind.make_verb} "
                            f"with {option} {describe(value)}")
    return manifest


def check_teacher(folder: str, manifest: dict, *, teacher: str, teacher_sha256: str,
                  tokenizer_sha256: str, kind=None) -> None:
    """The folder of `kind` (default: pseudo-labels) was made by this run's teacher (same config
    and weights) and tokenizer."""
    kind = kind or PSEUDO_LABELS
    made, flag = manifest["identity"], kind.train_flag
    if made.get("teacher_sha256") != teacher_sha256:
        by = manifest.get("info", {}).get("teacher", "another teacher")
        raise UserError(f"{flag} {folder!r} {kind.made} by another teacher ({by}, fingerprint "
                        f"{str(made.get('teacher_sha256'))[:12]}) than this run's {teacher} ({teacher_sha256[:12]}); "
                        f"pass the teacher that made it, or {kind.make_verb} with this one ({kind.make} ... "
                        f"{kind.folder_flag} NEW_DIR)")
    if made.get("tokenizer_sha256") != tokenizer_sha256:
        raise UserError(f"{flag} {folder!r} {kind.made} with another tokenizer (fingerprint "
                        f"{str(made.get('tokenizer_sha256'))[:12]}, this run's {tokenizer_sha256[:12]}); use the "
                        "tokenizer it was made with (--custom-tokenizer-local-path), or "
                        f"{kind.make_verb} with this one ({kind.make} ... {kind.folder_flag} NEW_DIR)")


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class TeacherOutputs:
    """source text -> the teacher's output, over every split of a pseudo-label folder. Keys are
    16-byte digests of the source, so a large dataset's inputs are not held twice."""

    def __init__(self, folder: str, manifest: dict):
        self.folder = folder
        self._outputs: dict[bytes, str] = {}
        identity = manifest["identity"]
        for split, info in identity["splits"].items():
            for split_, index, start, end in plan_shards({split: info["rows"]}, identity["shard_size"]):
                self._add(split_, index, start, end)

    def _add(self, split: str, index: int, start: int, end: int) -> None:
        path = os.path.join(self.folder, shard_name(split, index))
        rows = read_shard(path)
        if rows is None or len(rows) != end - start or any(
                not isinstance(r.get("source"), str) or not isinstance(r.get("teacher"), str) for r in rows):
            raise UserError(f"{path} is missing or damaged; rerun the {MAKE} command that made "
                            f"{self.folder} (it makes missing shards again)")
        for r in rows:
            self._outputs.setdefault(_key(r["source"]), r["teacher"])

    def get(self, source: str) -> str | None:
        return self._outputs.get(_key(source))

    def __len__(self) -> int:
        return len(self._outputs)


def iter_rows(folder: str, manifest: dict) -> Iterator[tuple[str, dict]]:
    """(split, row) over the folder's shards, in order (tests, inspection)."""
    identity = manifest["identity"]
    for split, info in identity["splits"].items():
        for split_, index, _, _ in plan_shards({split: info["rows"]}, identity["shard_size"]):
            for row in read_shard(os.path.join(folder, shard_name(split_, index))) or []:
                yield split_, row
