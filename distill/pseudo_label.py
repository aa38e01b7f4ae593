"""python -m distill.pseudo_label: the teacher's outputs for a dataset's inputs (sequence-level KD).

    python -m distill.pseudo_label --model-type bart --teacher-local-path TEACHER \\
        --dataset-local-path data/ --dataset-input-column document --dataset-target-column summary \\
        --output-dir pseudo/ [--num-beams 4] [--max-new-tokens N] [--max-samples N]
    deepspeed --num_gpus N --module distill.pseudo_label ...      (or deepspeed ... distill/pseudo_label.py)
    python -m distill.train ... --pseudo-labels pseudo/ --target-source teacher|mixed

As DistilBART's make_pseudolabels/run_eval: the teacher decodes every training input with beam
search, the outputs are written next to the source text, and the student is then trained on them
(Kim & Rush 2016, sequence-level KD). The options the training CLI has mean the same here (teacher,
tokenizer, dataset, columns, --source-prefix, --max-source-length, --seed); the folder's layout,
manifest and fingerprints are described in distill/pseudo_label_files.py.

- Splits: --splits (default: train, and validation when the data has one). No validation set is cut
  out of train: all of it is labelled, and training finds each row's output by its source text.
- Data without references (a file with only the input column) works: the rows' target is null.
- Decoding: beam search, --num-beams (4) and --max-new-tokens (default --max-target-length); with
  --do-sample, sampling (--temperature, --top-p, --top-k), seeded per shard from --seed. The
  teacher's own generation_config (length penalty, no-repeat n-grams, minimum length) still
  applies and is recorded. Outputs are decoded without special tokens and stripped.
- Shards: --shard-size rows each. A shard's rows are batched by length (--per-device-batch-size
  inputs per generate call) and written in row order; the batches do not depend on the world
  size, so neither do the outputs (greedy and beam search are deterministic).
- Resume: a rerun with the same options into the same folder keeps every complete shard and makes
  the others; a kill mid-write leaves only a temporary file, removed by the next run. A folder
  made with other options, teacher or data is refused unless --overwrite-output-dir, which then
  deletes its pseudo-labels first.
- Ranks: rank 0 decides which shards are pending and tells the others; the pending shards are
  dealt round-robin, one per rank per round. With world size > 1 the teacher is partitioned by
  default (ZeRO-3, as in training: zero.zero3_loading + deepspeed.initialize with
  --teacher-deepspeed), so every generate runs with synced_gpus=True and ranks must call it
  equally often: a rank with fewer batches in a round (the last shard of a split is short, or it
  has no shard) makes extra calls on a dummy batch, whose output is dropped. After each round
  the outputs are gathered to rank 0, which alone writes files. --teacher-zero-stage 0 keeps a
  whole teacher per rank and generates without the lockstep.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

if __package__ in (None, ""):  # `deepspeed distill/pseudo_label.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill import config, pseudo_label_files as files  # noqa: E402
from distill import teacher_runs  # noqa: E402
from distill.errors import UserError  # noqa: E402

EXIT_USER_ERROR = teacher_runs.EXIT_USER_ERROR
LIBRARY_LOG = "library.log"
# DistillConfig fields this CLI shares with training (same flag, meaning and check).
SHARED = ("model_type", "teacher", "teacher_local_path", "custom_tokenizer_local_path", "trust_remote_code",
          "dataset", "dataset_local_path", "input_column", "target_column", "max_source_length",
          "max_target_length", "source_prefix", "per_device_batch_size", "seed", "bf16", "fp16",
          "teacher_deepspeed", "teacher_zero_stage", "local_rank")
HELPS = {"per_device_batch_size": "Inputs per generate call on each rank.",
         "max_target_length": "Used as --max-new-tokens when that is not given (default: 128).",
         "seed": "Seed of --do-sample (each shard is seeded from it and its place).",
         "bf16": "Run the teacher in bfloat16.", "fp16": "Run the teacher in float16.",
         "target_column": "Column holding the reference, written next to the teacher's output "
                          "(null where the data has none)."}


def build_parser() -> argparse.ArgumentParser:
    parser = config.make_parser("python -m distill.pseudo_label", __doc__.splitlines()[0])
    config.add_options(parser, SHARED, HELPS)
    add = parser.add_argument
    add("--output-dir", required=True, help="Folder for manifest.json and the shards.")
    add("--overwrite-output-dir", action="store_true", help="Replace pseudo-labels made with other "
        "options or another teacher (a folder made with the same ones is always continued).")
    add("--splits", default=None, help="Comma-separated splits to label. Default: train, and "
        "validation when the data has one.")
    add("--max-samples", type=int, default=None, help="Label at most this many rows of each split.")
    add("--num-beams", type=int, default=4, help="Beam width.")
    add("--max-new-tokens", type=int, default=None, help="Longest output in tokens. Default: "
        "--max-target-length.")
    add("--do-sample", action="store_true", help="Sample instead of beam search.")
    add("--temperature", type=float, default=None, help="Sampling temperature (with --do-sample).")
    add("--top-p", type=float, default=None, help="Nucleus sampling mass (with --do-sample).")
    add("--top-k", type=int, default=None, help="Top-k sampling (with --do-sample).")
    add("--shard-size", type=int, default=512, help="Rows per shard, the unit of resuming.")
    return parser


def parse_args(argv=None) -> tuple[config.DistillConfig, argparse.Namespace]:
    values = vars(build_parser().parse_args(argv))
    cfg = config.DistillConfig(**{name: values.pop(name) for name in SHARED})  # the shared checks
    opts = argparse.Namespace(**values)
    for flag, value, low in (("--num-beams", opts.num_beams, 1), ("--max-new-tokens", opts.max_new_tokens, 1),
                             ("--max-samples", opts.max_samples, 1), ("--shard-size", opts.shard_size, 1),
                             ("--top-k", opts.top_k, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} must be >= {low}")
    if opts.temperature is not None and not opts.temperature > 0:
        raise UserError(f"--temperature {opts.temperature} must be > 0, e.g. 0.7")
    if opts.top_p is not None and not 0 < opts.top_p <= 1:
        raise UserError(f"--top-p {opts.top_p} must be in (0, 1], e.g. 0.9")
    given = [f for f, v in (("--temperature", opts.temperature), ("--top-p", opts.top_p),
                            ("--top-k", opts.top_k)) if v is not None]
    if given and not opts.do_sample:
        raise UserError(f"{given[0]} only applies to sampling; add --do-sample, or drop {given[0]} for beam search")
    opts.max_new_tokens = opts.max_new_tokens or cfg.max_target_length
    if opts.splits is not None:
        opts.splits = [s.strip() for s in opts.splits.split(",") if s.strip()]
        bad = [s for s in opts.splits if s not in files.SPLITS]
        if bad or not opts.splits or len(set(opts.splits)) < len(opts.splits):
            raise UserError(f"--splits {','.join(opts.splits)!r}: expected distinct names among "
                            f"{', '.join(files.SPLITS)}, e.g. --splits train,validation")
    return cfg, opts


def preflight(cfg, opts, world_size: int) -> None:
    """The checks that need no torch: paths, and the teacher's DeepSpeed JSON when it is used."""
    from distill import distributed, models
    from distill.preflight import check_local_path

    if os.path.exists(opts.output_dir) and not os.path.isdir(opts.output_dir):
        raise UserError(f"--output-dir {opts.output_dir!r} is a file; pass a folder path")
    models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    models.local_folder(cfg.custom_tokenizer_local_path, "tokenizer", "--custom-tokenizer-local-path")
    if not config.is_unset(cfg.dataset_local_path):
        check_local_path(os.path.expanduser(str(cfg.dataset_local_path)))
    if distributed.teacher_zero_stage(cfg, world_size) == 3:
        distributed.teacher_ds_config(cfg, prec="fp32")


# ----------------------------------------------------------------------------- the folder

def _generation_config(source: str, teacher_config) -> dict:
    """The teacher's own generation settings, as from_pretrained will set them: its
    generation_config.json, else those derived from its config."""
    from transformers import GenerationConfig

    from distill import models

    try:
        gen = models.load_pretrained(GenerationConfig.from_pretrained, source, "teacher", "--teacher-local-path")
    except UserError:  # no generation_config.json
        gen = GenerationConfig.from_model_config(teacher_config)
    return {k: v for k, v in gen.to_diff_dict().items() if k != "transformers_version"}


def _identity(cfg, opts, teacher_sha256, tokenizer_sha256, generation_config, prec, sources) -> dict:
    gen = {"num_beams": opts.num_beams, "max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample,
           "dtype": prec}
    if opts.do_sample:
        gen.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=cfg.seed)
    gen["teacher_generation_config"] = generation_config
    return {"teacher_sha256": teacher_sha256, "tokenizer_sha256": tokenizer_sha256, "generation": gen,
            "source_prefix": cfg.source_prefix, "max_source_length": cfg.max_source_length,
            "shard_size": opts.shard_size,
            "splits": {s: {"rows": len(texts), "sources_sha256": files.sources_fingerprint(texts)}
                       for s, texts in sources.items()}}


# ----------------------------------------------------------------------------- generation

def _shard_seed(seed: int, split: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()[:8], "little")


class _Generator:
    def __init__(self, model, tokenizer, cfg, opts, device, synced: bool):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.kwargs = {"num_beams": opts.num_beams, "max_new_tokens": opts.max_new_tokens,
                       "do_sample": opts.do_sample, "synced_gpus": synced}
        if opts.do_sample:
            self.kwargs.update({k: v for k, v in (("temperature", opts.temperature), ("top_p", opts.top_p),
                                                  ("top_k", opts.top_k)) if v is not None})

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        from distill.metrics import encode

        enc = encode(self.tokenizer, texts, self.cfg.source_prefix, self.cfg.max_source_length, self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, **self.kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def batches(self, sources: list[str]) -> list[list[int]]:
        """Row positions per generate call: longest first, so a batch wastes little on padding."""
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
        size = self.cfg.per_device_batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def shard(self, split: str, index: int, sources: list[str], calls: int) -> list[str]:
        """The outputs of one shard, then dummy calls up to `calls` generate calls in all."""
        import torch

        torch.manual_seed(_shard_seed(self.cfg.seed, split, index))
        outputs: list[str] = [""] * len(sources)
        batches = self.batches(sources)
        for idx in batches:
            for i, text in zip(idx, self([sources[i] for i in idx])):
                outputs[i] = text
        self.idle(calls - len(batches), sources[0])
        return outputs

    def idle(self, calls: int, text: str) -> None:
        """Generate calls whose output is dropped: under synced_gpus a rank that has run out of
        batches still steps with the others (each call is collective); otherwise nothing."""
        for _ in range(calls if self.kwargs["synced_gpus"] else 0):
            self([text])


def generate_partitioned(model, tokenizer, cfg, sources: list[str], *, rank: int, world_size: int, device,
                         max_new_tokens: int) -> list[str] | None:
    """Greedy outputs for `sources` from a teacher partitioned over the ranks (ZeRO-3): every rank
    calls this, generates its share (rows rank, rank + world_size, ...) with the others in
    lockstep (synced_gpus; a rank that runs out of batches makes dummy calls), and rank 0 gets all
    outputs in input order (None elsewhere). Used by the trainer's report, so that no rank ever
    holds the whole teacher."""
    import types

    from distill import distributed

    if not sources:  # alike on every rank: nothing to generate, no collective to make
        return [] if rank == 0 else None
    opts = types.SimpleNamespace(num_beams=1, max_new_tokens=max_new_tokens, do_sample=False)
    gen = _Generator(model, tokenizer, cfg, opts, device, synced=world_size > 1)
    mine = list(range(rank, len(sources), world_size))
    batches = gen.batches([sources[i] for i in mine])
    calls = max(distributed.all_gather_objects(len(batches), world_size))
    outputs = {}
    for idx in batches:
        for i, text in zip(idx, gen([sources[mine[j]] for j in idx])):
            outputs[mine[i]] = text
    gen.idle(calls - len(batches), sources[0])
    shares = distributed.all_gather_objects(outputs, world_size)
    if rank != 0:
        return None
    merged = {i: text for share in shares for i, text in share.items()}
    return [merged[i] for i in range(len(sources))]


def load_partitioned_teacher(cfg, source, teacher_config, prec, device):
    """The teacher under ZeRO-3 inference (each rank keeps only its partition), ready
    for generate_partitioned."""
    return teacher_runs.load_inference_teacher(cfg, source, teacher_config, prec, device, 3)[0]


def _load_rows(cfg, opts, log) -> dict[str, tuple[list[str], list]]:
    """split -> (sources, references or None) for the splits to label, --max-samples applied."""
    from distill import data

    raw = data.load_raw_splits(cfg.dataset, cfg.dataset_local_path, cfg.input_column, cfg.target_column,
                               trust_remote_code=cfg.trust_remote_code, require_target=False,
                               split_off_validation=False, log=log)
    names = opts.splits or ["train"] + (["validation"] if "validation" in raw else [])
    absent = [s for s in names if s not in raw]
    if absent:
        raise UserError(f"--splits asks for {absent[0]!r}, which the data does not have (found: "
                        f"{', '.join(raw)}); pass --splits with some of those")
    out = {}
    for split in names:
        ds = raw[split].select(range(min(opts.max_samples or len(raw[split]), len(raw[split]))))
        out[split] = (list(ds["source"]), [t if t and t.strip() else None for t in ds["target"]])
    return out


def _decide(cfg, opts, source, teacher_config, tokenizer, prec, rows, log) -> dict:
    """Rank 0: fingerprints, the folder's state -> {"pending", "manifest"} or {"error"}."""
    try:
        fingerprint = files.teacher_fingerprint(source)
        sources = {s: texts for s, (texts, _) in rows.items()}
        identity = _identity(cfg, opts, fingerprint["sha256"], files.tokenizer_fingerprint(tokenizer),
                             _generation_config(source, teacher_config), prec, sources)
        pending, manifest = files.pending_shards(opts.output_dir, identity, sources, opts.overwrite_output_dir, log)
    except UserError as exc:
        return {"error": str(exc)}
    manifest = {"format": files.FORMAT, "version": files.VERSION, "complete": False, "identity": identity,
                "info": {"teacher": source, "teacher_files": fingerprint["files"],
                         "tokenizer": cfg.custom_tokenizer_local_path or source,
                         "dataset": cfg.dataset_local_path or cfg.dataset, "input_column": cfg.input_column,
                         "target_column": cfg.target_column, "max_samples": opts.max_samples,
                         "with_reference": {s: sum(t is not None for t in refs) for s, (_, refs) in rows.items()},
                         "per_device_batch_size": cfg.per_device_batch_size,
                         "created": (manifest or {}).get("info", {}).get("created", teacher_runs.now())}}
    return {"pending": pending, "manifest": manifest}


def run(cfg, opts, lib=None) -> int:
    from tqdm.auto import tqdm

    from distill import distributed, models

    rank, world_size, local_rank = distributed.init_distributed()
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    device = distributed.device_for(local_rank)
    prec = distributed.precision(cfg, on_gpu=device.type != "cpu")
    stage = distributed.teacher_zero_stage(cfg, world_size)
    source = models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    teacher_config = models.load_teacher_config(source, cfg.model_type, trust_remote_code=cfg.trust_remote_code)
    tokenizer = models.load_tokenizer(source, cfg.custom_tokenizer_local_path, trust_remote_code=cfg.trust_remote_code)
    rows = _load_rows(cfg, opts, log)

    # Rank 0 decides and tells the others, so no rank waits in a collective for one that stopped.
    verdict = teacher_runs.agreed(lambda: _decide(cfg, opts, source, teacher_config, tokenizer, prec, rows, log),
                                  rank, world_size)
    if verdict is None:
        return EXIT_USER_ERROR  # rank 0 prints it
    pending, manifest, out = verdict["pending"], verdict["manifest"], opts.output_dir
    if rank == 0:
        if lib is not None:  # the input is valid: from here on the run writes files
            lib.attach_file(os.path.join(out, LIBRARY_LOG))
        manifest["info"].update(world_size=world_size, teacher_zero_stage=stage)
        files.write_manifest(out, manifest)
    total = sum(end - start for _, _, start, end in pending)
    log(f"pseudo-label: {', '.join(f'{s} {len(r[0])} rows' for s, r in rows.items())}; {len(pending)} shards "
        f"({total} rows) to generate on {world_size} rank(s), teacher ZeRO stage {stage}, num_beams "
        f"{opts.num_beams}, max_new_tokens {opts.max_new_tokens}" + (", sampling" if opts.do_sample else ""))
    if pending:
        model, _ = teacher_runs.load_inference_teacher(cfg, source, teacher_config, prec, device, stage)
        line, _ = models.teacher_memory_line(model)
        print((f"[rank {rank}] " if world_size > 1 else "") + line, flush=True)
        generate = _Generator(model, tokenizer, cfg, opts, device, synced=stage == 3 and world_size > 1)

        def work(shard, calls):
            split, index, start, end = shard
            return split, index, start, generate.shard(split, index, rows[split][0][start:end], calls)

        def idle(shard, calls):
            generate.idle(calls, rows[shard[0]][0][0])

        # the outputs go to rank 0, which alone writes the shards
        with tqdm(total=total, disable=rank != 0, desc="pseudo-label", dynamic_ncols=True) as bar:
            for gathered in teacher_runs.rounds(pending, rank, world_size, cfg.per_device_batch_size, work, idle):
                for item in gathered:
                    if rank == 0 and item is not None:
                        split, index, start, outputs = item
                        sources, references = rows[split]
                        files.write_shard(out, split, index, [
                            {"row": start + i, "source": sources[start + i], "teacher": t,
                             "target": references[start + i]} for i, t in enumerate(outputs)])
                        bar.update(len(outputs))
    if rank == 0:
        manifest.update(complete=True)
        manifest["info"]["finished"] = teacher_runs.now()
        files.write_manifest(out, manifest)
        log(f"pseudo-labels written to {out} (train with --pseudo-labels {out} --target-source teacher|mixed)")
    teacher_runs.barrier(world_size)
    return 0


def main(argv=None) -> int:
    return teacher_runs.builder_main(argv, parse_args, preflight, run, lambda opts: opts.output_dir)


if __name__ == "__main__":
    sys.exit(main())
