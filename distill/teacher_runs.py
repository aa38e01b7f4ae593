"""What the two teacher builders share: distill/pseudo_label.py (the teacher's outputs) and
distill/cache_teacher.py (the teacher cache). Both load the teacher for inference (ZeRO-3
partitioned on several ranks), let rank 0 decide which shards are pending and hand that to
every rank, make the shards in rounds (one per rank per round, the ranks kept in step by dummy
calls under ZeRO-3, the results gathered after each round), and run as a command that takes its
folder's lock and turns a UserError into one line and exit code 2.
"""
from __future__ import annotations

import math
import os
import sys
import time

from distill.errors import UserError

EXIT_USER_ERROR = 2


def now() -> str:
    """A manifest's timestamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def load_inference_teacher(cfg, source, teacher_config, prec, device, stage, *, wrap=None):
    """(teacher, runner): the teacher in eval mode at the run's precision and what to call.
    stage 3: each rank keeps only its partition (zero.zero3_loading) and the runner is
    the DeepSpeed inference engine around `wrap(teacher)` (the teacher itself when wrap is None),
    whose hooks gather each layer as it runs; else the whole teacher on `device` and the runner
    is `wrap(teacher)` (or the teacher)."""
    from distill import distributed, models, zero
    from distill.engine import DTYPES

    dtype = DTYPES[prec]
    ds_conf = distributed.teacher_ds_config(cfg, prec=prec) if stage == 3 else None
    with zero.zero3_loading(ds_conf):
        teacher = models.load_teacher(source, cfg.model_type, config=teacher_config, dtype=dtype,
                                      trust_remote_code=cfg.trust_remote_code)
    if ds_conf is None:
        teacher = teacher.to(device)
        return teacher, (teacher if wrap is None else wrap(teacher))
    import deepspeed

    engine, *_ = deepspeed.initialize(model=teacher if wrap is None else wrap(teacher), config=ds_conf)
    engine.eval()
    return teacher, engine


def agreed(decide, rank: int, world_size: int) -> dict | None:
    """Rank 0's verdict (`decide()`, run there only) on every rank. A verdict {"error": message}
    raises UserError on rank 0 and gives None elsewhere (the other ranks exit with the code
    without printing: rank 0 says it once). No rank waits in a collective for one that stopped."""
    verdict = [decide() if rank == 0 else None]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(verdict, src=0)
    verdict = verdict[0]
    if "error" in verdict:
        if rank == 0:
            raise UserError(verdict["error"])
        return None
    return verdict


def rounds(pending: list, rank: int, world_size: int, batch_size: int, work, idle):
    """Deal the pending shards (split, index, start, end) round-robin, one per rank per round.
    In each round the rank with a shard calls work(shard, calls), one without calls idle(first
    shard of the round, calls); `calls` is the most batches of `batch_size` rows any shard of the
    round needs (under ZeRO-3 every rank makes that many collective calls). Yields, per round,
    every rank's return value (all_gather_objects, rank order)."""
    from distill import distributed

    for k in range(0, len(pending), world_size):
        group = pending[k:k + world_size]
        calls = max(math.ceil((end - start) / batch_size) for _, _, start, end in group)
        result = work(group[rank], calls) if rank < len(group) else idle(group[0], calls)
        yield distributed.all_gather_objects(result, world_size)


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def builder_main(argv, parse_args, preflight, run, folder) -> int:
    """A builder's command: options (printed once under a launcher: preflight.options_stage),
    library logs quieted, one run per folder (`folder(opts)`, its lock taken before anything is
    written), a UserError as one line (with the rank under a launcher) and exit code 2."""
    from distill import logs
    from distill.guard import output_dir_lock
    from distill.preflight import env_world_size, options_stage

    parsed, code = options_stage(lambda: parse_args(argv), lambda p: preflight(p[0], p[1], env_world_size()))
    if code is not None:
        return code
    cfg, opts = parsed
    lib = logs.quiet_libraries()
    try:
        with output_dir_lock(folder(opts)):
            return run(cfg, opts, lib)
    except UserError as exc:
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if env_world_size() > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        lib.close()
