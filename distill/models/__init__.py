"""Everything the house knows about models: loading, the student, heads and hidden states, and
the teacher's ZeRO-3 partitioned tensors. Callers use these names as `models.<name>`.

    loading.py      resolve_source, local_folder, load_pretrained (the hub/folder loader with
                    one-line errors; the Hub probe is distill/hub.py), load_tokenizer, load_teacher_config,
                    load_teacher, MODEL_FAMILIES
    student.py      student_config, pick_layers, layer_counts, config_summary, build_student,
                    check_vocab (the layer map: which teacher tensor each student tensor copies)
    heads.py        lm_head_of (BART's final_logits_bias), decoder_hidden (T5's output scaling),
                    HiddenStates (the module the DeepSpeed engines run)
    partitioned.py  module_tensor_getter, gathering_tensor_getter, file_tensor_getter, gathered_lm_head,
                    teacher_memory_line (through distill/zero.py)
"""
from __future__ import annotations

import importlib

from distill.models.loading import (MODEL_FAMILIES, load_pretrained, load_teacher, load_teacher_config,
                                    load_tokenizer, local_folder, resolve_source)
from distill.models.student import (HEAD_DIM_MULTIPLE, build_student, check_vocab, config_summary,
                                    layer_counts, pick_layers, student_config)

# heads.py and partitioned.py import torch; they load on first use of one of their names, so
# that the option checks (distill/preflight.py), which use only the loaders, stay torch-free.
_LAZY = {"lm_head_of": "heads", "decoder_hidden": "heads", "HiddenStates": "heads",
         "module_tensor_getter": "partitioned", "gathering_tensor_getter": "partitioned",
         "file_tensor_getter": "partitioned",
         "gathered_lm_head": "partitioned", "teacher_memory_line": "partitioned"}

__all__ = ["HEAD_DIM_MULTIPLE", "MODEL_FAMILIES", "build_student",
           "check_vocab", "config_summary", "layer_counts", "load_pretrained",
           "load_teacher", "load_teacher_config", "load_tokenizer", "local_folder", "pick_layers",
           "resolve_source", "student_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"distill.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
