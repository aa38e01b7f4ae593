"""Memory-lean, exact distillation losses (no (tokens x vocab) tensor lives past one chunk).

    chunked_kl_div(student_logits, teacher_logits, labels=None, *, temperature, ...)
    fused_linear_distill_loss(student_hidden, student_weight, labels, *, teacher_..., ...)
        both with divergence="forward_kl" | "reverse_kl" | "jsd" and beta (jsd's weight), as
        TRL's GKDTrainer.generalized_jsd_loss defines them (times T^2).
    naive_kl_div / naive_distill_loss: the plain-torch references with the same signatures.
    naive_logits_loss(student_logits, teacher_logits, labels, *, alpha, temperature, ...): the
        reference loss on full logits, the one the others are tested against;
        masked_cross_entropy: its CE term alone.
    fused_linear_sparse_distill_loss(student_hidden, student_weight, labels, *, teacher_ids,
        teacher_logprobs, ...): the same from a sparse teacher (K ids and log-probabilities per
        token, as a teacher cache keeps them): top-k KL with a tail bucket (kernels/sparse.py);
        naive_sparse_distill_loss: its reference on full logits.
    env_flag(name, default): the one reader of the SEQ2SEQ_DISTILL_* on/off variables.
    PeakMemory(device): peak memory above a baseline, for the benchmarks.
    Submodules: native (the C row step), rowsteps (which row step runs), bench.
Benchmark: python -m kernels.bench [--quick | --full | --json].

Two names, one folder. From a checkout this folder is the package `kernels` (`from kernels import
...` at the repository root). `pip install .` (or -e .) installs it as `seq2seq_distill_kernels`
and leaves the top-level name `kernels` to Hugging Face's package of that name, which
transformers imports for its hub kernels; distill/ always uses `seq2seq_distill_kernels`
(distill/kernel_ops.py).

The losses import torch, so they are imported on first use (a module __getattr__): reading a
switch with env_flag imports no torch.

When this folder hides Hugging Face's `kernels`: run from the repository root (python main.py,
python -m pytest, or launch.sh, which puts the root on PYTHONPATH) this folder is the `kernels`
that every import finds first, also transformers'. With Hugging Face's `kernels` installed,
transformers sees its version in the metadata and imports get_kernel, kernelize, ... from
`kernels` when its modeling code loads; from this folder alone that import fails and no model
loads. So this package then serves that package too: its folder goes after this one on
__path__ (kernels.layer, kernels.load, ... import from there) and a name not defined here comes
from its __init__, run once, on first use. If both folders hold a module of the same name, one
would hide the other: then nothing is merged and a warning says so.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .switches import env_flag

__all__ = ["PeakMemory", "chunked_kl_div", "env_flag", "fused_linear_distill_loss",
           "fused_linear_sparse_distill_loss", "masked_cross_entropy", "naive_distill_loss", "naive_kl_div",
           "naive_logits_loss", "naive_sparse_distill_loss"]
# public name -> the submodule that defines it, imported when the name is first used
_LAZY = {"chunked_kl_div": "kl", "fused_linear_distill_loss": "fused", "masked_cross_entropy": "naive",
         "fused_linear_sparse_distill_loss": "sparse", "naive_sparse_distill_loss": "naive",
         "naive_distill_loss": "naive", "naive_kl_div": "naive", "naive_logits_loss": "naive",
         "PeakMemory": "peak_memory"}
_SUBMODULES = ("bench", "native", "rowsteps")


def _hidden_package() -> Path | None:
    """The folder of an installed `kernels` distribution that this folder hides, else None."""
    if __name__ != "kernels":  # installed as seq2seq_distill_kernels: nothing is hidden
        return None
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = Path(dist.locate_file("kernels/__init__.py"))
    here = Path(__file__).resolve().parent
    if not init.is_file() or init.resolve().parent == here:
        return None  # e.g. an editable install of that package: left hidden
    theirs = init.resolve().parent
    clash = sorted(_module_names(here) & _module_names(theirs))
    if clash:
        import warnings

        warnings.warn(f"this repository's kernels/ folder hides the installed kernels package ({theirs}) and "
                      f"both have the modules {clash}, so transformers' hub kernels cannot load from here; "
                      "run from another folder, with this project installed (pip install .)", stacklevel=2)
        return None
    return theirs


def _module_names(folder: Path) -> set[str]:
    return {p.name.split(".")[0] for p in folder.iterdir()
            if p.suffix in (".py", ".so", ".pyd") or (p / "__init__.py").is_file()} - {"__init__"}


_hidden = _hidden_package()
if _hidden is not None:
    __path__.append(str(_hidden))
_hidden_names: dict | None = None


def _from_hidden(name: str):
    """`name` from the hidden package's __init__, run once in a namespace of its own (as `kernels`,
    so its absolute and relative imports resolve through this package's __path__)."""
    global _hidden_names
    if _hidden_names is None:
        _hidden_names = {}  # while its __init__ runs, its own lookups here find nothing
        init = _hidden / "__init__.py"
        ns = {"__name__": __name__, "__package__": __name__, "__file__": str(init), "__path__": __path__}
        try:
            exec(compile(init.read_bytes(), str(init), "exec"), ns)
        except BaseException:
            _hidden_names = None
            raise
        _hidden_names = ns
    if name not in _hidden_names:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _hidden_names[name]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module("." + name, __name__)
    elif _hidden is not None and (not name.startswith("__") or name == "__version__"):
        value = _from_hidden(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
