"""What every test that starts the trainer in a subprocess needs: a clean environment and a port.

Imported as `launch_env`: pytest puts tests/ on sys.path when it loads tests/conftest.py, which
it does for every test below tests/ (robustness/ included).
"""
from __future__ import annotations

import os
import socket

from distill.bench_memory import process_tree  # noqa: F401  (the tests' /proc walk)

# A launcher's variables would make a child think it is one rank of a bigger job; DISTILL_FAULT
# would inject a fault the test did not ask for.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "DISTILL_FAULT")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without launcher variables, offline, one thread per process (ranks of a
    multi-process test share the machine's cores), unbuffered output; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def free_port() -> str:
    """A TCP port nobody listens on now (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


