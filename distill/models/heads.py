"""What the loss needs from a seq2seq LM: its output projection and its decoder hidden states.

The objective never sees a model: it gets decoder hidden states (B, T, H) and the lm_head as
(weight (V, H), bias (V,) or None), and applies the head chunk-wise. What differs between the
families lives here: BART/mBART add a `final_logits_bias` buffer to the logits; T5 with tied
embeddings scales the decoder output by d_model**-0.5 before its lm_head.
"""
from __future__ import annotations

from torch import nn


def lm_head_of(model: nn.Module):
    """(weight (V, H), bias (V,) or None) of a BART/mBART/T5 model's output projection."""
    weight = model.get_output_embeddings().weight
    bias = getattr(model, "final_logits_bias", None)  # BART/mBART add a (1, V) buffer
    return weight, (bias.view(-1) if bias is not None else None)


def decoder_hidden(model: nn.Module, input_ids, attention_mask, labels, *, all_layers: bool = False):
    """Decoder output exactly as the model's lm_head sees it, without computing logits.

    T5 with tied embeddings rescales the decoder output by d_model**-0.5 before the lm_head
    (`config.scale_decoder_outputs` in transformers 5); BART does not.
    all_layers=True returns (that output, encoder hidden states, decoder hidden states): each
    stack's `hidden_states` tuple, [0] the embeddings and [i + 1] layer i's output (unscaled).
    """
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    encoder_out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                      output_hidden_states=all_layers, return_dict=True)
    decoder_out = model.get_decoder()(
        input_ids=decoder_input_ids, encoder_hidden_states=encoder_out[0],
        encoder_attention_mask=attention_mask, use_cache=False, output_hidden_states=all_layers,
        return_dict=True)
    hidden = decoder_out[0]
    if getattr(model.config, "scale_decoder_outputs", False):
        hidden = hidden * (model.config.d_model ** -0.5)
    if all_layers:
        return hidden, tuple(encoder_out.hidden_states), tuple(decoder_out.hidden_states)
    return hidden


class HiddenStates(nn.Module):
    """Wraps a seq2seq LM so that the DeepSpeed engine's forward returns decoder hidden states.

    Going through the engine keeps ZeRO's hooks (ZeRO-3 parameter gathering, ZeRO-2 gradient
    bucketing) in charge; the lm_head is applied later, chunk-wise, by the loss kernel.
    `extra`: a module trained with the model but not part of it (the layer-matching projections,
    distill/layer_match.py), held as the submodule `extra` so that the engine's optimizer steps it
    and its checkpoints hold it; export saves `.model` alone. forward never calls it.
    """

    def __init__(self, model: nn.Module, extra: nn.Module | None = None):
        super().__init__()
        self.model = model
        if extra is not None:
            self.extra = extra

    def forward(self, input_ids, attention_mask, labels, all_layers: bool = False):
        return decoder_hidden(self.model, input_ids, attention_mask, labels, all_layers=all_layers)
