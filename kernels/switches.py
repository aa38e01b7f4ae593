"""env_flag(name, default): the one reader of this project's on/off environment variables.

    SEQ2SEQ_DISTILL_NATIVE   native CPU row step (kernels/native.py), default on
    SEQ2SEQ_DISTILL_TRITON   Triton row step on CUDA (kernels/rowsteps.py), default off
    SEQ2SEQ_DISTILL_VERBOSE  library output on the console (distill/logs.py), default off

Imports nothing but the standard library, so reading a switch never imports torch.
"""
from __future__ import annotations

import os
import warnings

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """True or False from the environment variable `name` (case and surrounding blanks ignored).

    Unset or blank gives `default`; 1/true/yes/on gives True; 0/false/no/off gives False. Any other
    value also gives `default`, with a warning naming the variable: a typo such as
    SEQ2SEQ_DISTILL_TRITON=ture changes nothing, and says so, rather than stopping a run midway."""
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    if value:
        warnings.warn(f"{name}={raw!r} is not one of {'/'.join(TRUE)} or {'/'.join(FALSE)}; "
                      f"using the default ({'on' if default else 'off'})", stacklevel=2)
    return default
