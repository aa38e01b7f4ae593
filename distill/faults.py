"""Fault injection for the robustness tests: the one seam production code calls.

    value = faults.at(POINT, value, step=N, rank=R, path=P)

returns `value` unchanged (one dict check) unless DISTILL_FAULT arms a fault for that point.
DISTILL_FAULT holds comma-separated KIND@STEP items, read once at import:
    nan@N              point "train_loss": the loss of the first micro-batch of step N is NaN
    nan_second@N       point "train_loss": the loss of the second micro-batch of step N's
                       accumulation window is NaN (a step of several micro-batches)
    nan_from@N         point "train_loss": every loss from step N on is NaN
    raise_on_rankR@N   point "train_loss": rank R raises InjectedFault at step N (a crashing rank)
    kill_in_save@N     point "checkpoint_written": rank 0 SIGKILLs itself while saving step N,
                       after DeepSpeed wrote its shards, before the checkpoint is renamed
    enospc_in_save@N   point "checkpoint_written": the save of step N fails with ENOSPC
    sigterm_in_PHASE@R point "phase": rank R sends itself SIGTERM as the run enters PHASE (data,
                       teacher, eval, export, report; signals.Signals.enter), or as the export
                       has staged its files (PHASE export_staged, point "export_staged")
    sigint_in_PHASE@R  the same with SIGINT (Ctrl-C)
Every kind but nan_from fires once per process. `step` is 1-based; for the phase kinds the
number is the rank.
"""
from __future__ import annotations

import errno
import os
import re
import signal

FAULT_ENV = "DISTILL_FAULT"
POINTS = ("train_loss", "checkpoint_written", "phase", "export_staged")
PHASES = ("data", "teacher", "eval", "export", "export_staged", "report")
_KINDS = re.compile(r"^(kill_in_save|enospc_in_save|nan|nan_second|nan_from|raise_on_rank(\d+)"
                    r"|sig(term|int)_in_(" + "|".join(PHASES) + r"))@(\d+)$")


class InjectedFault(RuntimeError):
    """The exception raise_on_rankR@N throws: stands for any crash on one rank."""


def parse_faults(text: str) -> dict[str, int]:
    faults = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not _KINDS.match(item):
            raise ValueError(f"{FAULT_ENV}: cannot parse {item!r}; expected KIND@STEP with KIND one of "
                             "kill_in_save, enospc_in_save, nan, nan_second, nan_from, raise_on_rankR, "
                             f"sigterm_in_PHASE, sigint_in_PHASE (PHASE: {', '.join(PHASES)})")
        kind, step = item.rsplit("@", 1)
        faults[kind] = int(step)
    return faults


_FAULTS = parse_faults(os.environ.get(FAULT_ENV, ""))


def _fire(kind: str, step: int) -> bool:
    """True once (or every time for nan_from) when fault `kind` is armed for `step`."""
    at_step = _FAULTS.get(kind)
    if at_step is None:
        return False
    if kind == "nan_from":
        return step >= at_step
    if step != at_step:
        return False
    del _FAULTS[kind]
    return True


def at(point: str, value=None, *, step: int, rank: int, path: str | None = None, micro: int = 0):
    """`value`, or what the armed fault makes of it at `point` (see the module docstring);
    `micro`: the micro-batch's place in its step's accumulation window (point "train_loss")."""
    if not _FAULTS:
        return value
    assert point in POINTS, point
    if point == "train_loss":
        if _fire(f"raise_on_rank{rank}", step):
            raise InjectedFault(f"injected fault ({FAULT_ENV}): rank {rank} crashed at step {step}")
        if _fire("nan_from", step) or _fire("nan", step) or (micro == 1 and _fire("nan_second", step)):
            return value * float("nan")
    elif point == "checkpoint_written":
        if _fire("enospc_in_save", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)", path)
        if rank == 0 and _fire("kill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
    else:  # "phase" / "export_staged": `path` names the phase, `rank` selects the process
        for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
            if _fire(f"{name}_in_{path}", rank):
                os.kill(os.getpid(), sig)  # the handler runs before the next bytecode
    return value
