"""Loading the teacher, its config and the tokenizer from a hub id or a folder.

Loading is safe by default: transformers reads `model.safetensors` first and falls back to a
`.bin` only through `torch.load(weights_only=True)`, which refuses to run pickled code; custom
modelling code (a config with `auto_map` and a model type transformers does not know) is refused
unless the user passes --trust-remote-code.

A hub name that cannot be reached fails in seconds instead of after huggingface_hub's minute of
retries: one HEAD request with a short timeout decides whether the Hub is reachable; if it is not
(or HF_HUB_OFFLINE is set) we load with `local_files_only=True`, so a copy in the local cache still
works and anything else is a one-line UserError that says how to pass a local folder.
`load_pretrained` is that loader for any transformers `from_pretrained`; the report
(distill/evaluate.py) loads its models through it too.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Callable

from distill import hub
from distill.config import is_unset
from distill.errors import UserError

# --model-type -> the config.model_type values it accepts. umT5 ("uniform mT5") is accepted as
# mt5: it is mT5's successor with the same config names and multilingual vocabulary, and the
# layer copying (student.py) is name-based, so its per-layer relative attention bias copies too.
MODEL_FAMILIES = {"bart": {"bart"}, "mbart": {"mbart"}, "t5": {"t5"}, "mt5": {"mt5", "umt5"}}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)


def local_folder(local_path, what: str, flag: str) -> str | None:
    """The expanded folder `local_path` (None when unset); a UserError naming `flag` when it is
    not an existing folder."""
    if is_unset(local_path):
        return None
    path = os.path.expanduser(str(local_path))
    if not os.path.isdir(path):
        raise UserError(f"{what} folder {path} given by {flag} does not exist or is "
                        f"not a folder; expected a folder written by save_pretrained")
    return path


def resolve_source(hub_name, local_path, what: str) -> str:
    """The folder or hub name to load `what` ("teacher", ...) from; a local path wins."""
    path = local_folder(local_path, what, f"--{what}-local-path")
    if path is not None:
        return path
    if not is_unset(hub_name):
        return str(hub_name)
    raise UserError(f"no {what} given: pass --{what} HUB_ID or --{what}-local-path DIR")


def load_pretrained(loader: Callable, source: str, what: str, flag: str, **kwargs):
    """`loader(source, **kwargs)` (a transformers `from_pretrained`) with the offline fallback
    and one-line UserErrors that name `what` ("teacher", ...) and the `flag` that gives a folder."""
    local = os.path.isdir(source)
    cache_only = not local and (hub.offline_mode() or not hub.hub_reachable())
    if cache_only:
        kwargs["local_files_only"] = True
    try:
        return loader(source, **kwargs)
    except UserError:
        raise
    except _LOAD_ERRORS as err:
        raise UserError(_explain(err, source, what, flag, local, cache_only)) from err


def _explain(err: Exception, source: str, what: str, flag: str, local: bool, cache_only: bool) -> str:
    text = " ".join(_ANSI.sub("", str(err)).split())
    if "Weights only load failed" in text:
        return (f"the {what} at {source} has a pickled .bin checkpoint holding more than plain "
                f"tensors, and unpickling it could run code from the file, so it was refused; "
                f"convert it to model.safetensors where you trust its origin")
    if "trust_remote_code" in text:
        return (f"the {what} at {source} needs custom code shipped with it (config.json has auto_map "
                f"for a model type transformers does not know); it was not run; pass "
                f"--trust-remote-code only if you trust that code")
    reason = text[:200].rstrip(". ") or type(err).__name__
    if local:
        files = ("tokenizer.json, tokenizer_config.json" if what == "tokenizer"
                 else "config.json, model.safetensors")
        return (f"cannot load the {what} from folder {source}: {reason}; expected a folder written by "
                f"save_pretrained ({files})")
    if cache_only:
        return (f"cannot load the {what} '{source}': the Hugging Face Hub cannot be reached (or "
                f"HF_HUB_OFFLINE is set) and it is not in the local cache; download it where there "
                f"is internet and pass the folder with {flag} DIR")
    return (f"cannot load the {what} '{source}' from the Hugging Face Hub: {reason}; check the name, "
            f"or pass a local folder with {flag} DIR")


def load_tokenizer(teacher_source: str, tokenizer_path: str | None = None, *,
                   trust_remote_code=False):
    """The tokenizer from --custom-tokenizer-local-path when given, else the teacher's."""
    from transformers import AutoTokenizer

    source = local_folder(tokenizer_path, "tokenizer", "--custom-tokenizer-local-path") or teacher_source
    return load_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer",
                           "--custom-tokenizer-local-path", trust_remote_code=bool(trust_remote_code))


def load_teacher_config(source: str, model_type: str, *, trust_remote_code=False):
    """The teacher's config, checked against --model-type."""
    from transformers import AutoConfig

    if model_type not in MODEL_FAMILIES:
        raise UserError(f"--model-type {model_type!r} is not supported; expected one of "
                        f"{', '.join(MODEL_FAMILIES)}")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"teacher folder {source} has no config.json; expected a folder written by "
                        f"save_pretrained (config.json, model.safetensors)")
    config = load_pretrained(AutoConfig.from_pretrained, source, "teacher", "--teacher-local-path",
                             trust_remote_code=bool(trust_remote_code))
    found = getattr(config, "model_type", None)
    if found not in MODEL_FAMILIES[model_type]:
        family = next((f for f, types in MODEL_FAMILIES.items() if found in types), None)
        fix = (f"pass --model-type {family}" if family else
               f"use a teacher of one of the families {', '.join(MODEL_FAMILIES)}")
        raise UserError(f"--model-type {model_type} does not match the teacher at {source}, whose "
                        f"config.json says model_type {found!r}; {fix}")
    return config


def load_teacher(source: str, model_type: str, *, config=None, dtype=None, trust_remote_code=False):
    """The teacher in eval mode (no dropout: its logits are the target) with no gradients.

    `config` is the teacher's config from load_teacher_config when the caller has it already
    (it is then not read again); without it, it is loaded and checked here.
    Safe to call inside distill.zero.zero3_loading: everything goes through from_pretrained,
    which then loads the checkpoint partitioned.
    """
    from transformers import AutoModelForSeq2SeqLM

    if config is None:
        config = load_teacher_config(source, model_type, trust_remote_code=trust_remote_code)
    kwargs = {"config": config, "trust_remote_code": bool(trust_remote_code), "weights_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = load_pretrained(AutoModelForSeq2SeqLM.from_pretrained, source, "teacher",
                            "--teacher-local-path", **kwargs)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
