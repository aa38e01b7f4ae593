"""Checks of a run's options that need no torch, no DeepSpeed and no process group.

They read only the options, the environment and the filesystem, so every rank reaches the same
verdict in a fraction of a second: train.main runs them before the process group starts and only
rank 0 prints the error (the other ranks exit with the same code, silently). launch.sh runs them
once, in one process, before it starts the ranks:

    WORLD_SIZE=N python -m distill.preflight TRAINING OPTIONS...

exits 0 when the options pass, else prints one `error: ...` line and exits 2. The checks that
need the libraries (a hub teacher, columns, shapes, the device's precisions, whether the
pseudo-labels come from this teacher) run later, in train.prepare, before anything is written.
"""
from __future__ import annotations

import os
import sys

from distill.config import DistillConfig, is_unset
from distill.errors import UserError


def check_output_dir(cfg: DistillConfig) -> None:
    from distill.guard import is_lock_file

    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out!r} is a file; pass a folder path")
    # our own lock file (taken just before this check in a run) does not make the folder "not empty"
    if os.path.isdir(out) and [n for n in os.listdir(out) if not is_lock_file(n)] and not (
            cfg.overwrite_output_dir or cfg.resume or cfg.resume_from):
        raise UserError(f"--output-dir {out!r} is not empty; pass --overwrite-output-dir to replace its "
                        "files, --resume to continue the run in it, or choose another folder")
    if cfg.resume_from and not os.path.isdir(cfg.resume_from):
        raise UserError(f"--resume-from {cfg.resume_from!r} does not exist; pass a checkpoint folder "
                        "(e.g. OUTPUT_DIR/checkpoints/step-000100)")


def check_local_path(path: str) -> None:
    """A --dataset-local-path must exist (what it holds is read and checked by distill.data)."""
    if not os.path.exists(path):
        raise UserError(f"dataset path {path} does not exist; pass --dataset-local-path an existing "
                        "file or folder (json/jsonl/csv/tsv/parquet or a save_to_disk folder)")


def check(cfg: DistillConfig, world_size: int) -> None:
    """Raise UserError for options that cannot work on `world_size` ranks."""
    from distill import distributed, models

    check_output_dir(cfg)
    models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    models.local_folder(cfg.custom_tokenizer_local_path, "tokenizer", "--custom-tokenizer-local-path")
    if not is_unset(cfg.dataset_local_path):
        check_local_path(os.path.expanduser(str(cfg.dataset_local_path)))
    if cfg.target_source != "reference":  # the teacher and tokenizer are compared in train.prepare
        from distill.pseudo_label_files import check_for_training

        check_for_training(os.path.expanduser(str(cfg.pseudo_labels)), source_prefix=cfg.source_prefix,
                           max_source_length=cfg.max_source_length)
    if not is_unset(cfg.teacher_cache):  # the teacher, tokenizer and rows are compared in train.run
        from distill.teacher_cache_files import check_for_training as check_cache

        check_cache(os.path.expanduser(str(cfg.teacher_cache)), source_prefix=cfg.source_prefix,
                    max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length)
    distributed.check_ds_configs(cfg, world_size)
    distributed.resolve_grad_accum(cfg, world_size)


def env_world_size() -> int:
    """The world size the launcher announced (WORLD_SIZE), 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def main(argv=None) -> int:
    from distill.config import parse_args

    try:
        check(parse_args(argv), env_world_size())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def options_stage(parse, check):
    """`check(parse())` as every rank runs it before the process group exists. Returns (parsed,
    None), or (None, exit code) after an option error or --help: both are the same on every rank,
    so rank 0 alone prints them and the other ranks exit quietly with the same code."""
    import contextlib
    import io

    rank0 = os.environ.get("RANK", "0") in ("", "0")
    try:
        with contextlib.redirect_stdout(sys.stdout if rank0 else io.StringIO()):
            parsed = parse()
        check(parsed)
    except UserError as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return None, 2
    except SystemExit as exc:  # --help
        return None, int(exc.code or 0)
    return parsed, None
