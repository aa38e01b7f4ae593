"""The loss kernels (the repository's kernels/ folder) as distill uses them: one name, one copy.

    from distill.kernel_ops import kernels      # kernels.fused_linear_distill_loss(...), kernels.rowsteps
    from distill.kernel_ops import env_flag     # the SEQ2SEQ_DISTILL_* switches; imports no torch

`kernels` here is always the package `seq2seq_distill_kernels`:
- installed (pip install . or pip install -e .): imported by that name, from any folder, next to
  Hugging Face's `kernels` package if that is installed too (setup.py);
- a checkout that is not installed: the folder kernels/ beside distill/ is loaded under that
  name (importlib's recipe for importing a source file; its imports are relative).
Never as the top-level `kernels`: that name may be Hugging Face's package.

Run from the repository root, a process can hold two copies of the folder's code: `kernels` (what
`from kernels import ...` there finds, e.g. in tests/kernels) and this one. They share no state
that matters: the row-step switches are environment variables read at each call, and the
native library is one file on disk. A test that intercepts distill's calls patches this module's
`kernels`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

NAME = "seq2seq_distill_kernels"
FOLDER = Path(__file__).resolve().parent.parent / "kernels"


def _load():
    try:
        return importlib.import_module(NAME)
    except ModuleNotFoundError as e:
        if e.name != NAME:  # installed, but something it imports is missing: not ours to hide
            raise
    if not (FOLDER / "__init__.py").is_file():
        raise ModuleNotFoundError(f"{NAME} is not installed and there is no kernels/ folder at {FOLDER}; "
                                  "install this project (pip install .)", name=NAME)
    spec = importlib.util.spec_from_file_location(NAME, FOLDER / "__init__.py",
                                                  submodule_search_locations=[str(FOLDER)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return module


kernels = _load()
env_flag = kernels.env_flag

__all__ = ["NAME", "env_flag", "kernels"]
