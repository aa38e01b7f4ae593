"""What every test that starts the trainer in a subprocess needs: a clean environment and a port.

Imported as `launch_env`: pytest puts tests/ on sys.path when it loads tests/conftest.py, which
it does for every test below tests/ (robustness/ included).
"""
from __future__ import annotations

from distill import distributed
from distill.bench_memory import LAUNCHER_VARS, clean_env, process_tree  # noqa: F401  (shared with the benchmark)


def free_port() -> str:
    """A TCP port nobody listens on now (for a launcher's --master_port)."""
    return str(distributed.free_port())
