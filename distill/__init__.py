"""seq2seq-distill: distill a fine-tuned BART/T5 teacher into a small, fast student."""

__version__ = "0.1.0"
