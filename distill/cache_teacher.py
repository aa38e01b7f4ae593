"""python -m distill.cache_teacher: run the teacher once, keep a sparse copy of its predictions.

    python -m distill.cache_teacher --model-type bart --teacher-local-path TEACHER \\
        --dataset-local-path data/ --dataset-input-column document --dataset-target-column summary \\
        --cache-dir cache/ [--top-k 32] [--cache-method topk|sample] [--cache-dtype fp16|bf16]
    deepspeed --num_gpus N --module distill.cache_teacher ...      (or torchrun ... -m distill.cache_teacher)
    python -m distill.train ... --teacher-cache cache/              (the teacher is then never loaded)

One teacher-forced pass over the training and validation rows, made exactly as training makes
them (distill/training_data.py: the same data, column, split, sample-count, prefix, length and
--pseudo-labels/--target-source options, which mean the same here). Per target token it keeps K
token ids and their log-probabilities (and for topk the log of the mass on every other token):
what is kept, the file layout and the checksums are in distill/teacher_cache_files.py, the
methods in distill/teacher_cache.py. Any number of students (shapes, seeds, epochs) then train
from the folder without the teacher.

- Shards: --shard-size rows each, batched --per-device-batch-size rows per forward in row order
  (the batches, so the cache, do not depend on the world size; sample draws are seeded per shard
  from --seed).
- Resume: a rerun with the same options into the same folder keeps every shard whose checksum
  holds and makes the others; a folder made otherwise is refused unless --overwrite-cache.
- Ranks: rank 0 decides which shards are pending and tells the others; they are dealt round-robin,
  one per rank per round, and each rank writes its own shards (on several nodes --cache-dir must
  be a shared folder). With world size > 1 the teacher is partitioned (ZeRO-3, as in training):
  every forward is collective, so a rank with fewer batches in a round runs dummy ones.
- Memory: the teacher's logits exist for --logits-chunk target tokens at a time.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

if __package__ in (None, ""):  # `deepspeed distill/cache_teacher.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill import config, teacher_cache_files as files  # noqa: E402
from distill import teacher_runs  # noqa: E402
from distill.errors import UserError  # noqa: E402

EXIT_USER_ERROR = teacher_runs.EXIT_USER_ERROR
LIBRARY_LOG = "library.log"
SHARED = ("model_type", "teacher", "teacher_local_path", "custom_tokenizer_local_path", "trust_remote_code",
          "dataset", "dataset_local_path", "input_column", "target_column", "validation_ratio",
          "max_train_samples", "max_eval_samples", "max_source_length", "max_target_length", "source_prefix",
          "pseudo_labels", "target_source", "per_device_batch_size", "seed", "bf16", "fp16",
          "teacher_deepspeed", "teacher_zero_stage", "local_rank", "report_samples")
HELPS = {"per_device_batch_size": "Rows per teacher forward on each rank.",
         "seed": "Seed of the validation split (as in training) and of --cache-method sample's draws.",
         "bf16": "Run the teacher in bfloat16.", "fp16": "Run the teacher in float16.",
         "report_samples": "Test (else validation) rows whose greedy teacher outputs the cache keeps for "
                           "the final report of a run that trains from it (as training's option; 0: none)."}


def build_parser() -> argparse.ArgumentParser:
    parser = config.make_parser("python -m distill.cache_teacher", __doc__.splitlines()[0])
    config.add_options(parser, SHARED, HELPS)
    add = parser.add_argument
    add("--cache-dir", required=True, help="Folder for manifest.json and the shards.")
    add("--overwrite-cache", action="store_true", help="Replace a cache made with other options, "
        "teacher or data (one made with the same ones is always continued).")
    add("--top-k", type=int, default=32, help="K: token ids kept per target token.")
    add("--cache-method", choices=files.METHODS, default="topk", help="topk: the K most likely tokens "
        "and the tail's mass; sample: K draws from the teacher (unbiased targets).")
    add("--cache-dtype", choices=files.DTYPES, default="fp16", help="Storage type of the log-probabilities.")
    add("--shard-size", type=int, default=1024, help="Rows per shard, the unit of resuming.")
    add("--logits-chunk", type=int, default=1024, help="Target tokens whose full-vocabulary logits "
        "exist at once.")
    return parser


def parse_args(argv=None):
    values = vars(build_parser().parse_args(argv))
    cfg = config.DistillConfig(**{name: values.pop(name) for name in SHARED})  # the shared checks
    opts = argparse.Namespace(**values)
    for flag, value in (("--top-k", opts.top_k), ("--shard-size", opts.shard_size),
                        ("--logits-chunk", opts.logits_chunk)):
        if value < 1:
            raise UserError(f"{flag} {value} must be >= 1")
    return cfg, opts


def preflight(cfg, opts, world_size: int) -> None:
    from distill import distributed, models
    from distill.preflight import check_local_path

    if os.path.exists(opts.cache_dir) and not os.path.isdir(opts.cache_dir):
        raise UserError(f"--cache-dir {opts.cache_dir!r} is a file; pass a folder path")
    models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    models.local_folder(cfg.custom_tokenizer_local_path, "tokenizer", "--custom-tokenizer-local-path")
    if not config.is_unset(cfg.dataset_local_path):
        check_local_path(os.path.expanduser(str(cfg.dataset_local_path)))
    if distributed.teacher_zero_stage(cfg, world_size) == 3:
        distributed.teacher_ds_config(cfg, prec="fp32")


def _shard_seed(seed: int, split: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"cache:{seed}:{split}:{index}".encode()).digest()[:8], "little")


class _Builder:
    """Teacher forwards and sparse targets for the rows of one shard at a time."""

    def __init__(self, teacher, engine, collate, cfg, opts, device):
        self.teacher, self.engine, self.collate = teacher, engine, collate
        self.cfg, self.opts, self.device = cfg, opts, device

    def _forward(self, rows: list[dict], generator):
        """The rows' sparse targets, concatenated over their target tokens in row order."""
        import torch

        from distill import models
        from distill.teacher_cache import sparse_targets

        batch = self.collate(rows)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            hidden = self.engine(batch["input_ids"], batch["attention_mask"], batch["labels"])
            mask = batch["labels"] != -100
            h = hidden[mask]
            out = []
            # ZeRO-3 gathers the head for this block (collective: every rank, every batch).
            with models.gathered_lm_head(self.teacher) as (weight, bias):
                for i in range(0, h.shape[0], self.opts.logits_chunk):
                    logits = h[i:i + self.opts.logits_chunk].float() @ weight.float().t()
                    if bias is not None:
                        logits += bias.float()
                    out.append({k: v.cpu() for k, v in sparse_targets(logits, self.opts.cache_method, self.opts.top_k,
                                                                      generator).items()})
        return {k: torch.cat([o[k] for o in out]) for k in (out[0] if out else {})}, mask.sum(1).cpu()

    def shard(self, rows: list[dict], split: str, index: int, calls: int) -> dict:
        import torch

        generator = torch.Generator(device=self.device).manual_seed(_shard_seed(self.cfg.seed, split, index))
        size = self.cfg.per_device_batch_size
        parts, counts = [], []
        for i in range(0, len(rows), size):
            got, n = self._forward(rows[i:i + size], generator)
            parts.append(got)
            counts.append(n)
        self.idle(calls - len(parts), rows[:1])
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.opts.cache_dtype]
        counts = torch.cat(counts)
        tensors = {
            "row_keys": torch.tensor([list(files.row_key(r["input_ids"], r["labels"])) for r in rows], dtype=torch.uint8),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            "labels": torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.int32),
            "ids": torch.cat([p["ids"] for p in parts]),
            "logprobs": torch.cat([p["logprobs"] for p in parts]).to(dtype),
        }
        if self.opts.cache_method == "topk":
            tensors["tail"] = torch.cat([p["tail"] for p in parts]).float()
        return tensors

    def idle(self, calls: int, rows: list[dict]) -> None:
        """Forwards whose output is dropped: under ZeRO-3 every rank makes the same number."""
        for _ in range(calls if self.engine_synced else 0):
            self._forward(rows, None)

    engine_synced = False


def _decide(cfg, opts, source, tokenizer, teacher_config, prec, keys, log) -> dict:
    """Rank 0: fingerprints and the folder's state -> {"pending", "manifest"} or {"error"}."""
    from distill import pseudo_label_files as plf

    try:
        fingerprint = plf.teacher_fingerprint(source)
        identity = {"teacher_sha256": fingerprint["sha256"], "tokenizer_sha256": plf.tokenizer_fingerprint(tokenizer),
                    "teacher_dtype": prec, "source_prefix": cfg.source_prefix,
                    "max_source_length": cfg.max_source_length, "max_target_length": cfg.max_target_length,
                    "top_k": opts.top_k, "method": opts.cache_method, "dtype": opts.cache_dtype,
                    "seed": cfg.seed if opts.cache_method == "sample" else None, "shard_size": opts.shard_size,
                    "splits": {s: {"rows": len(k), "rows_sha256": files.keys_fingerprint(k)} for s, k in keys.items()}}
        pending, manifest = files.pending_shards(opts.cache_dir, identity, keys, opts.overwrite_cache, log)
    except UserError as exc:
        return {"error": str(exc)}
    manifest = {"format": files.FORMAT, "version": files.VERSION, "complete": False, "identity": identity,
                "info": {"teacher": source, "teacher_files": fingerprint["files"],
                         "tokenizer": cfg.custom_tokenizer_local_path or source,
                         "dataset": cfg.dataset_local_path or cfg.dataset, "input_column": cfg.input_column,
                         "target_column": cfg.target_column, "target_source": cfg.target_source,
                         "vocab_size": teacher_config.vocab_size,
                         "created": (manifest or {}).get("info", {}).get("created", teacher_runs.now())}}
    return {"pending": pending, "manifest": manifest}


def _report_outputs(cfg, raw, out, source, teacher_config, tokenizer, prec, device, stage, rank, world_size,
                    teacher, log):
    """The teacher's greedy outputs for the rows the final report of a run from this cache
    evaluates (training's rule: the first --report-samples test rows, else validation; up to
    --max-target-length new tokens), in files.REPORT_OUTPUTS, so that run never loads the
    teacher. Kept when a rerun asks for the same; all ranks generate (ZeRO-3: synced)."""
    from distill import models, pseudo_label

    split = "test" if "test" in raw else "validation"
    sources = list(raw[split].select(range(min(cfg.report_samples, len(raw[split]))))["source"])
    wanted = files.report_key(sources, cfg.max_target_length)
    have = files.read_report_outputs(out)
    if not sources or (have is not None and have.get("key") == wanted):
        return {"split": split, "rows": len(sources)} if sources else None
    if teacher is None:
        teacher, _ = teacher_runs.load_inference_teacher(cfg, source, teacher_config, prec, device, stage,
                                                         wrap=models.HiddenStates)
    log(f"cache: the teacher's greedy outputs for the report's {len(sources)} {split} rows")
    outputs = pseudo_label.generate_partitioned(teacher, tokenizer, cfg, sources, rank=rank, world_size=world_size,
                                                device=device, max_new_tokens=cfg.max_target_length)
    if rank == 0:
        files.write_report_outputs(out, {"key": wanted, "split": split, "outputs": outputs})
    return {"split": split, "rows": len(sources)}


def run(cfg, opts, lib=None) -> int:
    from tqdm.auto import tqdm

    from distill import distributed, models
    from distill.data import Seq2SeqCollator
    from distill.training_data import training_splits

    rank, world_size, local_rank = distributed.init_distributed()
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    device = distributed.device_for(local_rank)
    prec = distributed.precision(cfg, on_gpu=device.type != "cpu")
    stage = distributed.teacher_zero_stage(cfg, world_size)
    source = models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    teacher_config = models.load_teacher_config(source, cfg.model_type, trust_remote_code=cfg.trust_remote_code)
    if opts.top_k > teacher_config.vocab_size:  # alike on every rank: each prints nothing but rank 0
        raise UserError(f"--top-k {opts.top_k} is larger than the teacher's vocabulary ({teacher_config.vocab_size} "
                        f"tokens); pass --top-k {min(64, teacher_config.vocab_size)} or less")
    tokenizer = models.load_tokenizer(source, cfg.custom_tokenizer_local_path, trust_remote_code=cfg.trust_remote_code)
    raw, tokenized = training_splits(cfg, source, tokenizer, log)
    rows = {s: tokenized[s] for s in files.SPLITS}
    keys = {s: [files.row_key(i, t) for i, t in zip(ds["input_ids"], ds["labels"])] for s, ds in rows.items()}

    # Rank 0 decides and tells the others, so no rank waits in a collective for one that stopped.
    verdict = teacher_runs.agreed(lambda: _decide(cfg, opts, source, tokenizer, teacher_config, prec, keys, log),
                                  rank, world_size)
    if verdict is None:
        return EXIT_USER_ERROR  # rank 0 prints it
    pending, manifest, out = verdict["pending"], verdict["manifest"], opts.cache_dir
    if rank == 0:
        if lib is not None:  # the input is valid: from here on the run writes files
            lib.attach_file(os.path.join(out, LIBRARY_LOG))
        manifest["info"].update(world_size=world_size, teacher_zero_stage=stage)
        files.write_manifest(out, manifest)
    total = sum(end - start for _, _, start, end in pending)
    log(f"cache: {', '.join(f'{s} {len(k)} rows' for s, k in keys.items())}; {len(pending)} shards ({total} rows) "
        f"to make on {world_size} rank(s), teacher ZeRO stage {stage}, {opts.cache_method} K={opts.top_k}, "
        f"{opts.cache_dtype}")
    started, tokens, nbytes, teacher = time.time(), 0, 0, None
    if pending:
        teacher, engine = teacher_runs.load_inference_teacher(cfg, source, teacher_config, prec, device, stage,
                                                              wrap=models.HiddenStates)
        line, _ = models.teacher_memory_line(teacher)
        print((f"[rank {rank}] " if world_size > 1 else "") + line, flush=True)
        builder = _Builder(teacher, engine, Seq2SeqCollator(tokenizer), cfg, opts, device)
        builder.engine_synced = stage == 3 and world_size > 1

        def work(shard, calls):  # each rank writes its own shards
            split, index, start, end = shard
            tensors = builder.shard([rows[split][i] for i in range(start, end)], split, index, calls)
            files.write_shard(out, split, index, start, tensors)
            return (end - start, int(tensors["labels"].numel()),
                    os.path.getsize(os.path.join(out, files.shard_name(split, index))))

        def idle(shard, calls):
            builder.idle(calls, [rows[shard[0]][shard[2]]])

        with tqdm(total=total, disable=rank != 0, desc="cache", dynamic_ncols=True) as bar:
            for gathered in teacher_runs.rounds(pending, rank, world_size, cfg.per_device_batch_size, work, idle):
                for item in gathered:
                    if item:
                        bar.update(item[0])
                        tokens, nbytes = tokens + item[1], nbytes + item[2]
    teacher_runs.barrier(world_size)  # every rank's shards are written
    report = _report_outputs(cfg, raw, out, source, teacher_config, tokenizer, prec, device, stage,
                             rank, world_size, teacher, log)
    if rank == 0:
        manifest["info"]["report_outputs"] = report
        seconds = time.time() - started
        manifest.update(complete=True)
        stats = {"tokens": tokens, "bytes": nbytes, "seconds": round(seconds, 2)}
        manifest["info"].update(finished=teacher_runs.now(), this_run=stats)
        files.write_manifest(out, manifest)
        if tokens:
            log(f"cache: {tokens} target tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s), "
                f"{nbytes / tokens:.1f} bytes per target token (K={opts.top_k}: 6K+16 = {6 * opts.top_k + 16})")
        log(f"teacher cache written to {out} (train with --teacher-cache {out})")
    teacher_runs.barrier(world_size)
    return 0


def main(argv=None) -> int:
    return teacher_runs.builder_main(argv, parse_args, preflight, run, lambda opts: opts.cache_dir)


if __name__ == "__main__":
    sys.exit(main())
