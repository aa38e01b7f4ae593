"""The teacher cache on disk (distill/cache_teacher.py builds it): manifest, shards, checksums,
and a training batch's sparse teacher targets read back from it.

    CACHE_DIR/manifest.json
    CACHE_DIR/SPLIT-NNNNN.safetensors      shard NNNNN of a split: rows [NNNNN * shard_size, ...)

A shard's tensors (R rows, T target tokens over them, K = --top-k):
    row_keys  uint8 (R, 16)      row_key(input_ids, labels) of each row: how training finds it
    offsets   int64 (R + 1,)     row r's target tokens are [offsets[r], offsets[r + 1])
    labels    int32 (T,)         the target token ids the teacher was forced with
    ids       int32 (T, K)       token ids: topk, the K most likely; sample, K draws (may repeat)
    logprobs  fp16|bf16 (T, K)   the teacher's log-probabilities of `ids` at T = 1
    tail      float32 (T,)       topk only: log of the teacher's mass off the K ids, from its
                                 full logits (exact, where 1 - sum(p) of rounded values is not)
and in the safetensors metadata: format, split, index, start, end, and sha256 over the tensors'
bytes (in name order), so a damaged shard is found by reading it, before anything trains on it.
Bytes per target token: 6K + 8 (topk) or 6K + 4 (sample), plus 24 per row.

Shards are named by their place in the split, not by the rank that wrote them (every rank writes
its own: a shared folder on several nodes), and written to a temporary name, fsynced and renamed.

manifest.json: {"format", "version", "complete", "identity", "info"}; "identity" is what a
rerun must match to continue the folder and what training checks: teacher_sha256,
tokenizer_sha256 (distill/pseudo_label_files.py's fingerprints), teacher_dtype, source_prefix,
max_source_length, max_target_length, top_k, method, dtype, seed (sample), shard_size, and per
split its rows and rows_sha256 (over the row keys, in order).

Training finds its rows by key, over all splits of the cache: a --max-train-samples subset, another
validation split or a shuffled file all find their targets; a row that is not there is refused.
"""
from __future__ import annotations

import hashlib
import json
import os

from distill import pseudo_label_files as plf
from distill.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "seq2seq-distill teacher cache"
VERSION = 1
METHODS = ("topk", "sample")
DTYPES = ("fp16", "bf16")
SPLITS = ("train", "validation")
MAKE = "python -m distill.cache_teacher"
REPORT_OUTPUTS = "report_outputs.json"  # the teacher's greedy outputs for a training run's report
KEY_BYTES = 16


def row_key(input_ids, labels) -> bytes:
    """16-byte digest of a tokenized row (its input ids and target ids)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(len(input_ids).to_bytes(4, "little"))
    for seq in (input_ids, labels):
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in seq))
    return h.digest()


def keys_fingerprint(keys) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(key)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def _tensors_sha256(tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_shard(folder: str, split: str, index: int, start: int, tensors: dict) -> None:
    from safetensors.torch import save

    meta = {"format": FORMAT, "split": split, "index": str(index), "start": str(start),
            "end": str(start + tensors["row_keys"].shape[0]), "sha256": _tensors_sha256(tensors)}
    plf.write_atomic(os.path.join(folder, shard_name(split, index)), save(tensors, metadata=meta))


def read_shard(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a shard whose checksum holds; a UserError naming it otherwise."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"teacher cache shard {path} is missing; rerun the {MAKE} command that made the "
                        "cache (it makes missing shards again)")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # truncated or not a safetensors file at all
        raise UserError(f"teacher cache shard {path} is damaged ({type(exc).__name__}); rerun the {MAKE} "
                        "command that made the cache (it makes damaged shards again)") from None
    if meta.get("format") != FORMAT or meta.get("sha256") != _tensors_sha256(tensors):
        raise UserError(f"teacher cache shard {path} fails its checksum; rerun the {MAKE} command that made "
                        "the cache (it makes damaged shards again)")
    return tensors, meta


def shard_done(folder: str, split: str, index: int, keys: list[bytes]) -> bool:
    """Whether the shard is whole (checksum) and holds exactly these rows."""
    try:
        tensors, _ = read_shard(os.path.join(folder, shard_name(split, index)))
    except UserError:
        return False
    return [bytes(k) for k in tensors["row_keys"].numpy()] == keys


def report_key(sources: list[str], max_new_tokens: int) -> str:
    """What the report's teacher outputs were made for: the sources, in order, and the length."""
    return f"{plf.sources_fingerprint(sources)}:{max_new_tokens}"


def read_report_outputs(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, REPORT_OUTPUTS), encoding="utf-8") as fh:
            found = json.load(fh)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("outputs"), list) else None


def write_report_outputs(folder: str, content: dict) -> None:
    plf.write_atomic(os.path.join(folder, REPORT_OUTPUTS), json.dumps(content, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- manifest

def read_manifest(folder: str) -> dict | None:
    return plf.read_manifest(folder, CACHE)


def write_manifest(folder: str, manifest: dict) -> None:
    plf.write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def _ours(name: str) -> bool:
    return name in (MANIFEST, REPORT_OUTPUTS) or (name.endswith(".safetensors") and name.split("-")[0] in SPLITS)


CACHE = plf.FolderKind(
    name="teacher cache", manifest=MANIFEST, format=FORMAT, make=MAKE, make_verb="build a cache",
    remake="build the cache again", made="was built", folder_flag="--cache-dir", overwrite_flag="--overwrite-cache",
    train_flag="--teacher-cache", log="cache", ours=_ours)


def pending_shards(out: str, identity: dict, keys: dict[str, list[bytes]], overwrite: bool, log):
    """(shards still to make as (split, index, start, end), the manifest when the run continues
    the folder): plf.folder_state for the cache, a shard done when its checksum holds and it
    has exactly its rows' keys."""
    return plf.folder_state(CACHE, out, identity, {s: len(k) for s, k in keys.items()}, overwrite, log,
                            lambda split, index, start, end: shard_done(out, split, index, keys[split][start:end]))


# ----------------------------------------------------------------------------- training side

def check_for_training(folder, *, source_prefix: str, max_source_length: int, max_target_length: int) -> dict:
    """--teacher-cache DIR: a complete manifest made with this run's input settings (no torch;
    preflight). The teacher, tokenizer and rows are compared once loaded (TeacherCache)."""
    return plf.check_folder_for_training(CACHE, folder, (
        ("--source-prefix", "source_prefix", source_prefix),
        ("--max-source-length", "max_source_length", max_source_length),
        ("--max-target-length", "max_target_length", max_target_length)))


def check_teacher(folder: str, manifest: dict, *, teacher: str, teacher_sha256: str, tokenizer_sha256: str) -> None:
    plf.check_teacher(folder, manifest, teacher=teacher, teacher_sha256=teacher_sha256,
                      tokenizer_sha256=tokenizer_sha256, kind=CACHE)
