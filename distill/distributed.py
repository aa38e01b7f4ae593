"""Process-group set-up and DeepSpeed config handling shared by the engines.

Facts this file relies on:
- `deepspeed`, `torchrun` and plain `python` all end up here. The two launchers export RANK,
  LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; plain `python` exports nothing, and
  DeepSpeed would then try MPI discovery, so we fill in a one-process world ourselves.
- On a machine without GPUs DeepSpeed picks its CPU accelerator and the gloo backend, so the
  same ZeRO code paths run (slowly) on CPU ranks; that is how the tests exercise them.
- DeepSpeed JSON may hold "auto" values; they are filled from the CLI the way the transformers
  integration does, so one JSON serves every run.
"""
from __future__ import annotations

import copy
import json
import os
import socket
from typing import Any

from distill.errors import UserError


def free_port() -> int:
    """A TCP port nobody listens on now (a world of one's MASTER_PORT, a launcher's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed. Returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    from distill.logs import library_prints

    # DeepSpeed print()s "... deepspeed_shm_comm_op built successfully" here on every run.
    with library_prints("deepspeed"):
        deepspeed.init_distributed(verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def device_for(local_rank: int):
    import torch
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    get_accelerator().set_device(local_rank)
    return torch.device(name, local_rank)


def load_ds_config(path: str, flag: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist; pass a DeepSpeed JSON such as ds_configs/zero2.json")
    try:
        with open(path, encoding="utf-8") as fh:
            conf = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path!r} is not valid JSON ({str(exc).splitlines()[0]}); "
                        "fix the file or use ds_configs/zero2.json") from None
    if not isinstance(conf, dict):
        raise UserError(f"{flag} {path!r} holds a {type(conf).__name__}; expected a JSON object")
    return conf


def fill_auto(conf: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Replace "auto" leaves by values keyed on their dotted path (e.g. "optimizer.params.lr")."""
    out = copy.deepcopy(conf)

    def walk(node, prefix):
        for key, value in list(node.items()):
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif value == "auto":
                if path not in values:
                    raise UserError(f"DeepSpeed config: no value to fill the 'auto' at {path}; "
                                    "set it in the JSON")
                node[key] = values[path]

    walk(out, "")
    return out


def precision(cfg, on_gpu: bool) -> str:
    """'bf16', 'fp16' or 'fp32'. Nothing asked: bf16 on GPUs that support it, else fp32.

    An asked-for precision the device cannot train in is a UserError here, before any engine
    exists: DeepSpeed would otherwise raise from deep inside `initialize` on every rank (its CPU
    accelerator refuses fp16 on CPUs without fp16 instructions, e.g. AMD EPYC with avx512_bf16).
    """
    if cfg.bf16:
        check_supported("bf16")
        return "bf16"
    if cfg.fp16:
        check_supported("fp16")
        return "fp16"
    if on_gpu:
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16"
    return "fp32"


def precision_supported(prec: str) -> bool:
    """Whether DeepSpeed's accelerator on this machine trains in `prec` ('bf16', 'fp16', 'fp32')."""
    if prec == "fp32":
        return True
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return bool(acc.is_fp16_supported() if prec == "fp16" else acc.is_bf16_supported())


def check_supported(prec: str) -> None:
    if precision_supported(prec):
        return
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    other = "bf16" if prec == "fp16" else "fp16"
    alternatives = (f"pass --{other} instead, or neither for fp32" if precision_supported(other)
                    else "drop the flag to train in fp32")
    raise UserError(f"--{prec}: this device ({device}) cannot train in {prec} (DeepSpeed's "
                    f"accelerator reports no {prec} support); {alternatives}")


def teacher_zero_stage(cfg, world_size: int) -> int:
    """--teacher-zero-stage, else 3 (partitioned) on several ranks and 0 on one."""
    if cfg.teacher_zero_stage is not None:
        return cfg.teacher_zero_stage
    return 3 if world_size > 1 else 0


def _student_json(cfg) -> dict[str, Any]:
    conf = load_ds_config(cfg.deepspeed, "--deepspeed")
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(f"--deepspeed {cfg.deepspeed!r} asks for ZeRO stage {stage} for the student; "
                        "the student engine supports stages 0, 1 and 2 (use ds_configs/zero2.json)")
    return conf


def _teacher_json(cfg) -> dict[str, Any]:
    conf = load_ds_config(cfg.teacher_deepspeed, "--teacher-deepspeed")
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise UserError(f"--teacher-deepspeed {cfg.teacher_deepspeed!r} has ZeRO stage {stage}; the "
                        "partitioned teacher needs stage 3 (or pass --teacher-zero-stage 0)")
    return conf


def check_ds_configs(cfg, world_size: int) -> None:
    """The DeepSpeed JSON files this run will read exist, parse and ask for supported stages."""
    _student_json(cfg)
    if cfg.alpha < 1.0 and teacher_zero_stage(cfg, world_size) == 3:
        _teacher_json(cfg)


def student_ds_config(cfg, *, world_size: int, grad_accum: int, total_steps: int,
                      warmup_steps: int, prec: str) -> dict[str, Any]:
    conf = _student_json(cfg)
    for key in ("bf16", "fp16"):
        enabled = conf.get(key, {}).get("enabled")
        if enabled not in ("auto", None) and bool(enabled) != (prec == key):
            raise UserError(f"--deepspeed {cfg.deepspeed!r} sets {key}.enabled={enabled} but this run "
                            f"is {prec}; set it to \"auto\" or pass the matching --bf16/--fp16")
    values = {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.per_device_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16.enabled": prec == "bf16",
        "fp16.enabled": prec == "fp16",
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "scheduler.params.warmup_max_lr": cfg.learning_rate,
        "scheduler.params.warmup_num_steps": warmup_steps,
        "scheduler.params.total_num_steps": max(total_steps, warmup_steps + 1),
    }
    conf = fill_auto(conf, values)
    # The CLI is the source of truth for batch geometry: a JSON with fixed numbers that disagree
    # would silently change the global batch, so stop instead.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if conf.get(key, values[key]) != values[key]:
            raise UserError(f"--deepspeed sets {key}={conf[key]} but the CLI gives {values[key]}; "
                            "set it to \"auto\" in the JSON")
    conf["train_micro_batch_size_per_gpu"] = values["train_micro_batch_size_per_gpu"]
    conf["gradient_accumulation_steps"] = grad_accum
    conf["train_batch_size"] = values["train_batch_size"]
    return conf


def teacher_ds_config(cfg, *, prec: str) -> dict[str, Any]:
    conf = _teacher_json(cfg)
    conf.pop("optimizer", None)
    conf.pop("scheduler", None)
    return fill_auto(conf, {"train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
                            "bf16.enabled": prec == "bf16", "fp16.enabled": prec == "fp16"})


def resolve_grad_accum(cfg, world_size: int) -> int:
    """Gradient accumulation giving the requested global batch on this world size."""
    if cfg.global_batch_size is None:
        return cfg.gradient_accumulation_steps
    per_step = cfg.per_device_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
                        f"--per-device-batch-size {cfg.per_device_batch_size} x world size {world_size} "
                        f"= {per_step}; pick a multiple of {per_step} or change the batch size")
    return cfg.global_batch_size // per_step


def all_gather_objects(obj, world_size: int) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] without a process group."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any rank (a collective when distributed)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0
