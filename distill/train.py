"""Entry point: argv -> DistillConfig -> teacher, student, data -> DeepSpeed engines -> loop -> export.

Launch it any of these ways (the same code runs in every rank):
    python main.py ...                                     one process
    torchrun --nproc_per_node=N main.py ...                N ranks, torchrun's environment
    deepspeed --num_gpus N distill/train.py --deepspeed ds_configs/zero2.json ...
`main(argv=None) -> int` never lets a UserError become a traceback: it prints one line
`error: ...` and returns 2 (ARCHITECTURE.md, "Rules"). Every check that can fail on user input runs before
anything is written to --output-dir.
"""
from __future__ import annotations

import math
import os
import sys
import time

if __package__ in (None, ""):  # `deepspeed distill/train.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.config import DistillConfig, is_unset, parse_args  # noqa: E402
from distill.errors import UserError  # noqa: E402
from distill.guard import output_dir_lock  # noqa: E402

EXIT_USER_ERROR = 2
LIBRARY_LOG = "library.log"  # what DeepSpeed, torch, transformers and datasets log (distill/logs.py)
TRAIN_LOG = "train.log"  # what the console shows, with times, and the libraries' warnings (distill/run_log.py)
EXIT_INTERRUPTED = 3


class Logger:
    """The `log(line, all_ranks=)` the run's pieces are given: rank 0's lines, or every rank's
    (prefixed `[rank N]`), as records of the run log (distill/run_log.py: console, train.log)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    def __call__(self, message: str, all_ranks: bool = False) -> None:
        import logging

        from distill.run_log import logger

        if self.rank != 0 and not all_ranks:
            return
        prefix = f"[rank {self.rank}] " if all_ranks and self.world_size > 1 else ""
        # The loop's "warning: ..." lines are warnings: --log-level warning keeps them.
        level = logging.WARNING if message.startswith("warning:") else logging.INFO
        logger().log(level, prefix + message)


def prepare(cfg: DistillConfig, log):
    """Everything that reads user input and can fail, before any engine or file exists."""
    from distill import models
    from distill.training_data import training_splits

    source = models.resolve_source(cfg.teacher, cfg.teacher_local_path, "teacher")
    # The teacher's config first: an unreachable hub teacher is then reported as the teacher.
    teacher_config = models.load_teacher_config(source, cfg.model_type, trust_remote_code=cfg.trust_remote_code)
    tokenizer = models.load_tokenizer(source, cfg.custom_tokenizer_local_path,
                                      trust_remote_code=cfg.trust_remote_code)
    student_cfg = models.student_config(teacher_config, num_encoder_layers=cfg.num_encoder_layers,
                                        num_decoder_layers=cfg.num_decoder_layers,
                                        hidden_dim=cfg.hidden_dim, vocab_size=cfg.vocab_size)
    models.check_vocab(tokenizer, teacher_config, student_cfg, cfg.alpha)
    raw, tokenized = training_splits(cfg, source, tokenizer, log)
    return source, tokenizer, teacher_config, raw, tokenized


def _teacher_cache(cfg: DistillConfig, source: str, tokenizer, tokenized, log):
    """--teacher-cache: (the cache, every shard's checksum verified; the teacher's weight files;
    `tokenized` with each row's place in the cache). Refused with one line when the cache was
    built from another teacher, tokenizer or data; preflight checked the lengths and prefix."""
    from distill import pseudo_label_files, teacher_cache_files
    from distill.teacher_cache import TeacherCache

    folder = os.path.expanduser(str(cfg.teacher_cache))
    manifest = teacher_cache_files.check_for_training(folder, source_prefix=cfg.source_prefix,
                                                      max_source_length=cfg.max_source_length,
                                                      max_target_length=cfg.max_target_length)
    fingerprint = pseudo_label_files.teacher_fingerprint(source)
    teacher_cache_files.check_teacher(folder, manifest, teacher=source, teacher_sha256=fingerprint["sha256"],
                                      tokenizer_sha256=pseudo_label_files.tokenizer_fingerprint(tokenizer))
    reverse = cfg.divergence == "reverse_kl" or (cfg.divergence == "jsd" and cfg.jsd_beta == 1.0)
    if reverse and manifest["identity"].get("method") == "sample":
        raise UserError(f"--teacher-cache {folder!r} holds sampled targets, which give no teacher mass off the "
                        "sampled tokens, so the reverse KL is infinite; use --divergence forward_kl or jsd (beta "
                        "below 1), or a topk cache")
    cache = TeacherCache(folder, manifest, log=log)
    return cache, fingerprint["paths"], cache.attach(tokenized)


def loaders(cfg, tokenized, tokenizer, rank, world_size, grad_accum):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from distill.data import Seq2SeqCollator

    collate = Seq2SeqCollator(tokenizer)
    # resume fix: every iter(DataLoader) draws a seed from the generator it is given, by default
    # the global torch RNG that dropout uses. A resumed run makes one extra iter() at its restart
    # point, which would shift the dropout stream; a private generator keeps it identical.
    def private():
        import torch

        return torch.Generator().manual_seed(cfg.seed)

    train = tokenized["train"]
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    train_loader = DataLoader(train, batch_size=cfg.per_device_batch_size, sampler=sampler,
                              collate_fn=collate, drop_last=True, generator=private())
    steps_per_epoch = len(train_loader) // grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"{len(train)} training rows are fewer than one global batch "
                        f"({cfg.per_device_batch_size} x {grad_accum} x {world_size} ranks); use more data "
                        "or a smaller --per-device-batch-size / --global-batch-size")
    val = tokenized["validation"]
    # No shuffle and no drop: every validation row counts once per rank's shard (the sampler pads
    # the last shard by repeating rows, a negligible bias on the logged eval loss).
    eval_sampler = DistributedSampler(val, num_replicas=world_size, rank=rank, shuffle=False)
    eval_loader = DataLoader(val, batch_size=cfg.per_device_batch_size, sampler=eval_sampler, collate_fn=collate,
                             generator=private())
    return train_loader, sampler, eval_loader, steps_per_epoch


def run(cfg: DistillConfig, lib, signals, trackers=None) -> int:
    """The run under train()'s lock; `signals` (signals.Signals, installed) is told each phase;
    `trackers` (tracking.Trackers) are started on rank 0 once the input has passed."""
    import torch

    from distill import checkpoint, models, run_log
    from distill.distributed import init_distributed
    from distill.engine import Distiller
    from distill.export import export_student
    from distill.preflight import check_output_dir

    # Checked again under the lock: the folder may have changed since main's preflight.
    check_output_dir(cfg)
    if os.environ.get("RANK", "0") in ("", "0"):
        from distill.distributed import load_ds_config
        from distill.logs import ops_build_notice

        notice = ops_build_notice(load_ds_config(cfg.deepspeed, "--deepspeed"))
        if notice:
            Logger()(notice)
    signals.enter("starting the process group")
    rank, world_size, local_rank = init_distributed()
    log = Logger(rank, world_size)
    torch.manual_seed(cfg.seed)
    distiller = Distiller(cfg, rank=rank, world_size=world_size, local_rank=local_rank, log=log)
    signals.enter("loading and tokenizing the data", "data")
    source, tokenizer, teacher_config, raw, tokenized = prepare(cfg, log)
    cache, cache_teacher_paths = None, None
    if not is_unset(cfg.teacher_cache):
        cache, cache_teacher_paths, tokenized = _teacher_cache(cfg, source, tokenizer, tokenized, log)
    train_loader, sampler, eval_loader, steps_per_epoch = loaders(
        cfg, tokenized, tokenizer, rank, world_size, distiller.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    if rank == 0 and lib is not None:  # the input is valid: from here on the run writes files
        lib.attach_file(os.path.join(cfg.output_dir, LIBRARY_LOG))
        # train.log: the lines so far, then every line, and the libraries' warnings (forwarded)
        lib.forward = run_log.attach_file(os.path.join(cfg.output_dir, TRAIN_LOG))
    if rank == 0 and trackers is not None:
        trackers.start(cfg)  # after the input checks, as every file the run writes
        distiller.track = trackers.log
    if rank == 0 and cfg.overwrite_output_dir and not (cfg.resume or cfg.resume_from):
        # A fresh run replaces the folder's run: an earlier run's checkpoints would otherwise be
        # taken by a later --resume as this run's.
        old = checkpoint.checkpoints_dir(cfg.output_dir)
        if os.path.isdir(old):
            import shutil

            shutil.rmtree(old)
            log(f"--overwrite-output-dir: removed the earlier run's checkpoints in {old}")

    resume_path = cfg.resume_from or (checkpoint.latest_checkpoint(cfg.output_dir) if cfg.resume else None)
    if cfg.resume and resume_path is None:
        log(f"--resume: no complete checkpoint in {cfg.output_dir}; starting from scratch")

    # The teacher's weights are needed to run it (alpha < 1) or to copy its layers; a labels-only
    # run from random weights uses only its config and tokenizer. With --teacher-cache it is not
    # run: its layers are read from its files tensor by tensor, the model never built.
    signals.enter("loading the teacher and building the student", "teacher")
    teacher, getter = None, None
    if cache is not None:
        if cfg.student_init == "teacher":
            getter = models.file_tensor_getter(cache_teacher_paths, teacher_config)
            if getter is None:
                log("--teacher-cache: the teacher's weights are not all in safetensors files; loading it to copy "
                    "its layers into the student, then freeing it")
                teacher = distiller.load_teacher(source, teacher_config)
    elif cfg.alpha < 1.0 or cfg.student_init == "teacher":
        teacher = distiller.load_teacher(source, teacher_config)
    else:
        log("teacher weights not loaded: labels only (alpha = 1) from a random start")
    torch.manual_seed(cfg.seed)
    if getter is None and teacher is not None:
        getter = models.gathering_tensor_getter(teacher)
    student, info = models.build_student(
        teacher_config, getter,
        num_encoder_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        hidden_dim=cfg.hidden_dim, vocab_size=cfg.vocab_size, init=cfg.student_init, log=log)
    distiller.build_engines(None if cache is not None else teacher, student, steps_per_epoch, total_steps,
                            cache=cache)
    # The engines keep what they run; these names (and the getter's closure over the teacher)
    # would otherwise keep the models alive until the run returns, beside the report's copies.
    del teacher, getter, student

    start_step, state = 0, {}
    if resume_path:
        state = checkpoint.load(distiller.student, resume_path, rank=rank, world_size=world_size,
                                geometry=distiller.geometry())
        start_step = int(state.pop("step"))
        for key in ("epoch", "world_size", "geometry"):
            state.pop(key, None)
        log(f"resumed from {resume_path} at step {start_step}")
        later = checkpoint.stale_checkpoints(cfg.output_dir, start_step + 1)
        if later:
            log(f"checkpoints after it ({', '.join(os.path.basename(p) for p in later)}) belong to the run it "
                "branched from; this run's first save removes them")
    distiller.install_signal_handlers()  # in the loop: a flag, a checkpoint at the next step
    result = distiller.train(train_loader, sampler, eval_loader, start_step=start_step, state=state)
    signals.resume()  # after it: a signal stops the run at once (distill/signals.py)
    if result["interrupted"]:
        log(f"interrupted at step {result['step']}; checkpoint saved. Resume with the same command plus "
            f"--resume (output dir {cfg.output_dir})", all_ranks=False)
        return EXIT_INTERRUPTED
    signals.enter("running the final eval", "eval")
    final_eval = distiller.evaluate(eval_loader)
    hidden = f", hidden {final_eval['eval_hidden']:.4f}" if final_eval.get("eval_hidden") is not None else ""
    log(f"final eval loss {final_eval['eval_loss']:.4f} (ce {final_eval['eval_ce']:.4f}, "
        f"kl {final_eval['eval_kl']:.4f}{hidden})")
    metrics = {
        "steps": result["step"], "samples_seen": result["counters"]["samples"],
        "tokens_seen": result["counters"]["tokens"], "bad_steps": result["counters"]["bad_steps"],
        "batches": result.get("batches"),  # micro-batches per rank by targets: dataset, on_policy, seq_kd
        "train_seconds": result.get("train_seconds"), "train_tokens_per_s": result.get("train_tokens_per_s"),
        "final_eval": final_eval, "history": result["history"], "world_size": world_size,
        "precision": distiller.prec, "optimizer": distiller.optimizer_name,
        "teacher_zero_stage": distiller.teacher_stage, "teacher_memory_rank0": distiller.teacher_memory,
        "student": info,
    }
    if trackers is not None:
        trackers.final(metrics, result["step"])
    runtimes, runtime_error = [], None
    if rank == 0:
        signals.enter("exporting the student", "export")
        export_student(distiller.student.module.model, tokenizer, cfg, info, metrics)
        what = "distilled student" if cfg.alpha < 1.0 else "model trained on labels only (alpha = 1)"
        log(f"{what} written to {cfg.output_dir}")
        if cfg.export_runtime:  # before the report, which gets a row per runtime
            from distill import export_runtime

            signals.enter("exporting the runtimes")
            runtimes, runtime_error = export_runtime.for_training(cfg, raw, log)
    if not cfg.skip_report:
        signals.enter("writing the report", "report")
        report = _report(cfg, source, teacher_config, raw, tokenizer, distiller, log, runtimes)
        if trackers is not None:
            trackers.report(report, result["step"])
    signals.enter("waiting for the other ranks to finish")
    _barrier()
    if runtime_error:  # the student and the report are written; the failed runtime is not
        raise UserError(runtime_error)  # one line on stderr (main) and in train.log (train), exit 2
    return 0


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _report(cfg, teacher_source, teacher_config, raw, tokenizer, distiller, log, runtimes=()) -> None:
    """Teacher vs the exported student (every rank calls it; rank 0 writes). The training engines
    are freed first. A teacher partitioned over the ranks (ZeRO-3) stays partitioned: all ranks
    generate its outputs together and rank 0 evaluates them with the student, so no rank ever
    holds the whole teacher (its speed is then not measured). Otherwise rank 0 loads it whole, as
    `python -m distill.evaluate` does."""
    from distill import pseudo_label
    from distill.evaluate import format_table, run_report

    split = "test" if "test" in raw else "validation"
    rows = raw[split].select(range(min(cfg.report_samples, len(raw[split]))))
    sources = list(rows["source"])
    log(f"report: teacher vs student on {len(rows)} {split} rows")
    teacher = distiller.release_student()  # the running teacher, if it is kept partitioned
    outputs, how = None, None
    if distiller.cache is not None:  # the cache's build kept the teacher's outputs for these rows?
        outputs = distiller.cache.report_outputs(sources, cfg.max_target_length)
        if outputs is not None:
            how = "made by the teacher cache's build (python -m distill.cache_teacher)"
            log(f"report: the teacher's outputs {how}; the teacher is not loaded")
    if outputs is None and distiller.teacher_stage == 3:
        if teacher is None:  # not run during training (alpha = 1): loaded partitioned for the report
            teacher = pseudo_label.load_partitioned_teacher(cfg, teacher_source, teacher_config, distiller.prec,
                                                            distiller.device)
        how = (f"generated by the {distiller.world_size} ranks together with the teacher partitioned "
               "(ZeRO-3)")
        log(f"report: the teacher's outputs {how}; its speed is not measured (no rank holds it whole)")
        outputs = pseudo_label.generate_partitioned(teacher, tokenizer, cfg, sources, rank=distiller.rank,
                                                    world_size=distiller.world_size, device=distiller.device,
                                                    max_new_tokens=cfg.max_target_length)
    del teacher
    distiller.release_teacher()
    if distiller.rank != 0:
        return
    report = run_report(teacher_source, [cfg.output_dir, *runtimes], sources, list(rows["target"]),
                        os.path.join(cfg.output_dir, "report"), source_prefix=cfg.source_prefix,
                        max_source_length=cfg.max_source_length, max_new_tokens=cfg.max_target_length,
                        trust_remote_code=cfg.trust_remote_code, teacher_outputs=outputs,
                        teacher_outputs_from=how, log=log)
    log(format_table(report))
    return report


def train(cfg: DistillConfig) -> int:
    """Run one distillation (or labels-only training) described by `cfg`; the programmatic entry
    point (the demo uses it). Returns 0; after SIGTERM/SIGINT, EXIT_INTERRUPTED where a checkpoint
    is there to resume from, else 143/130 (distill/signals.py); raises UserError."""
    from distill import logs, run_log, tracking
    from distill.signals import Interrupted, Signals

    # Library noise goes to OUTPUT_DIR/library.log (ARCHITECTURE.md, "Logs"); a caller that
    # opened the library log already (the demo) keeps it open after this run.
    opened_here = logs.active() is None
    lib = logs.quiet_libraries()
    console = run_log.start(cfg.log_level)  # our lines; OUTPUT_DIR/train.log once the input has passed
    trackers, ok = tracking.Trackers(), False
    try:
        # guard: one run per --output-dir; refused before this run writes anything
        with output_dir_lock(cfg.output_dir):
            signals, started = Signals().install(), time.time()
            try:
                code = run(cfg, lib, signals, trackers)
                ok = code == 0
                return code
            except Interrupted as exc:
                return _interrupted(cfg, exc, started)
            finally:
                signals.restore()
    except UserError as exc:  # main() prints it; train.log, when there is one by now, keeps a copy
        run_log.logger().error(f"error: {exc}", extra=run_log.FILE_ONLY)
        raise
    finally:
        trackers.close(ok)
        console.close()
        if opened_here:
            lib.close()


def _interrupted(cfg: DistillConfig, exc, started: float) -> int:
    """One line (rank 0) saying what the signal stopped and what is left; the exit code: 3 where
    this run has a checkpoint to resume from (one it saved or resumed from), else 143/130."""
    from distill import checkpoint
    from distill.run_log import logger

    latest = checkpoint.latest_checkpoint(cfg.output_dir)
    if latest and not (cfg.resume or cfg.resume_from) and os.path.getmtime(latest) < started:
        latest = None  # an earlier run's checkpoint, which this fresh run would replace
    if os.environ.get("RANK", "0") in ("", "0"):
        if latest:
            logger().error(f"interrupted by {exc.name} while {exc.phase}; the last checkpoint is {latest}: "
                           f"rerun the same command with --resume to continue")  # stderr and train.log
        else:
            logger().error(f"interrupted by {exc.name} while {exc.phase}; no checkpoint was saved, "
                           f"so a rerun starts again")
    return EXIT_INTERRUPTED if latest else exc.exit_code


def main(argv=None) -> int:
    from distill import preflight

    # Under a launcher every rank runs this: preflight's option stage prints once (rank 0).
    cfg, code = preflight.options_stage(lambda: parse_args(argv),
                                        lambda c: preflight.check(c, preflight.env_world_size()))
    if code is not None:
        return code
    try:
        return train(cfg)
    except UserError as exc:
        # All ranks print it: the failing rank may not be rank 0 (ARCHITECTURE.md, "Rules").
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
