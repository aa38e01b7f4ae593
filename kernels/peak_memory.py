"""PeakMemory: the most memory a piece of work adds above what was held before it.

Both benchmarks use it (python -m kernels.bench per loss, python -m distill.bench_step per
training-step mode):

    mem = PeakMemory(device)
    mem.reset()          # baseline: what is held now
    ...                  # the work
    mem.added_mb()       # its peak above the baseline, in MiB
"""
from __future__ import annotations

import re

import torch


def _status_mb(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) / 1024


class PeakMemory:
    """Peak memory above a baseline: CUDA max_memory_allocated, else the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs so the baseline excludes input creation)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_mb("VmRSS")

    def added_mb(self):
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        # The kernel's RSS counters are per thread and synced lazily (up to 64 pages each), so
        # a loss that adds nothing can read a fraction of a MB below its baseline.
        return max(0.0, _status_mb("VmHWM") - self.base)
