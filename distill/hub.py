"""The Hugging Face Hub probe: one question, asked once per process, before any hub download.

huggingface_hub and datasets retry an unreachable Hub for 20-50 s before they fail. One HEAD
request to the Hub endpoint, through huggingface_hub's own session (its proxies, mirror endpoint,
certificates, token) in a daemon thread, decides it within PROBE_TIMEOUT_S even when a DNS lookup
hangs. Loaders then fail fast with a one-line message, or read only the local cache.
"""
from __future__ import annotations

import functools
import os
import threading

# Long enough for a slow link to answer, short enough that an offline run fails at once.
PROBE_TIMEOUT_S = 5.0


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for the local cache only."""
    from huggingface_hub import constants

    # The env is read here as well because huggingface_hub reads it once, at import.
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=None)
def unreachable_reason() -> str | None:
    """Why the Hub cannot be reached, or None when it answers; cached for the process
    (`unreachable_reason.cache_clear()` asks again)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    result: list = []

    def probe():
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
            result.append(None)
        except Exception as e:  # any transport failure (DNS, refused, timeout) means unreachable
            text = str(e).strip().splitlines()
            result.append(f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": "))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 2)
    return result[0] if result else f"no answer within {PROBE_TIMEOUT_S:.0f} s"


def hub_reachable() -> bool:
    return unreachable_reason() is None
