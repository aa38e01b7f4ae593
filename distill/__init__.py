"""seq2seq-distill: distill a fine-tuned BART/T5 teacher into a small, fast student."""

__version__ = "0.1.0"

# Public names loaded on first use, so that `import distill` stays light (no torch, no
# transformers): name -> the module that defines it.
_LAZY = {"DistillationSeq2SeqTrainer": "distill.hf_trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
