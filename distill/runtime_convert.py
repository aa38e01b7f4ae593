"""The two converters: a student folder -> CTranslate2 files, a loaded student -> ONNX files.

CTranslate2: its own TransformersConverter, with one fix. ctranslate2 4.8.5's BartLoader (and
MBartLoader, which inherits it) reads `config.normalize_before`, a pre-4.0 BartConfig field that
transformers 5 no longer has ("'BartConfig' object has no attribute 'normalize_before'"). BART
is post-norm and mBART pre-norm (their transformers code has no other switch), so the loaded
config gets the value its family means, the way ctranslate2's own Marian/M2M100 loaders set it.
The converted config's decoder start token is then set to the student's, so that generation
starts where transformers' does (the converter leaves it unset for mBART).

ONNX: torch.onnx's TorchScript exporter (dynamo=False), an encoder graph and a decoder graph
that takes the whole decoder prefix (no key/value cache). Why this path:
- optimum-onnx, the usual route, requires transformers < 4.58 (not 5);
- the torch.export-based exporter (torch.onnx's default) needs the onnxscript package and took
  about 10 s per graph for a 2-layer test model here, against well under 1 s traced;
- transformers 5 passes the decoder's cache as Cache objects, not tensors, so a with-past
  decoder needs a wrapper over its internals; without the cache each step recomputes the prefix,
  which costs little for short outputs (the decoder is the small half of a distilled student)
  and the traced graphs stay model-agnostic: the model's own forward, unchanged.
Tracing records one branch of every shape test, so the example inputs take the general ones:
batch 2 with a padded row (the attention mask is applied) and a 3-token decoder prefix. The
parity check (distill/export_runtime.py) runs the graphs on real inputs before they are kept.
"""
from __future__ import annotations

import json
import os
import warnings

from distill.errors import UserError


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def convert_ct2(student_dir: str, out_dir: str, quantization: str | None, decoder_start_token: str,
                trust_remote_code: bool = False) -> list[str]:
    """Write CTranslate2's files into `out_dir` (which must not exist); returns their names."""
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if not hasattr(model.config, "normalize_before"):  # see the module docstring
                model.config.normalize_before = model.config.model_type == "mbart"
            return model

    try:
        Converter(student_dir, trust_remote_code=trust_remote_code).convert(out_dir, quantization=quantization)
    except Exception as exc:  # the converter's reasons are ValueError/NotImplementedError/...
        raise UserError(f"ctranslate2 could not convert the student in {student_dir!r}: {_reason(exc)}") from None
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["decoder_start_token"] = decoder_start_token
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return sorted(os.listdir(out_dir))


def export_onnx(model, out_dir: str, quantization: str | None) -> list[str]:
    """Write encoder.onnx and decoder.onnx (int8 weights with quantization="int8") for a float32
    model in eval mode on the CPU; the model is left as it was. Returns the file names."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.encoder = model.get_encoder()

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class LastPosition(torch.nn.Module):
        """The lm_head on the last decoder position only: greedy needs no other logits."""

        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, hidden):
            return self.head(hidden[:, -1:])

    class Decoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask):
            out = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=attention_mask,
                             decoder_input_ids=decoder_input_ids, use_cache=False)
            return out.logits[:, -1]

    os.makedirs(out_dir)
    pad = model.config.pad_token_id or 0
    input_ids = torch.full((2, 8), 5, dtype=torch.long)
    input_ids[1, 5:] = pad
    mask = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    prefix = torch.full((2, 3), 5, dtype=torch.long)
    head = model.get_output_embeddings()
    batch, src, tgt = {0: "batch"}, {0: "batch", 1: "source"}, {0: "batch", 1: "target"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notices: library noise
            model.set_output_embeddings(LastPosition(head))
            hidden = Encoder(model)(input_ids, mask)
            torch.onnx.export(Encoder(model), (input_ids, mask), os.path.join(out_dir, "encoder.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              dynamic_axes={"input_ids": src, "attention_mask": src, "last_hidden_state": src},
                              opset_version=17, dynamo=False)
            torch.onnx.export(Decoder(model), (prefix, hidden, mask), os.path.join(out_dir, "decoder.onnx"),
                              input_names=["decoder_input_ids", "encoder_hidden_states", "attention_mask"],
                              output_names=["logits"],
                              dynamic_axes={"decoder_input_ids": tgt, "encoder_hidden_states": src,
                                            "attention_mask": src, "logits": batch},
                              opset_version=17, dynamo=False)
    except Exception as exc:
        raise UserError(f"torch.onnx could not export the student: {_reason(exc)}") from None
    finally:
        model.set_output_embeddings(head)
    if quantization == "int8":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.disable(logging.WARNING)  # its advice to pre-process, logged on the root logger
        try:
            for name in ("encoder.onnx", "decoder.onnx"):
                path = os.path.join(out_dir, name)
                # weights to int8, activations quantized per call: the CPU-friendly scheme
                quantize_dynamic(path, path + ".int8", weight_type=QuantType.QInt8)
                os.replace(path + ".int8", path)
        finally:
            logging.disable(logging.NOTSET)
    return sorted(os.listdir(out_dir))
