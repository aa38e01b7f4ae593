"""Tiny teachers and tokenizers built offline from configs.

The demo trains its own small teacher on a generated task and the tests build throw-away
teachers; both need a tokenizer trained on the spot (the Hub is not reachable everywhere this
runs) and a seq2seq model of the right family built from a config. Nothing here downloads.
"""
from __future__ import annotations

import os
from typing import Iterable

# Special tokens in the order each family's pretrained tokenizers use, so ids match the configs:
# BART: <s>=0 <pad>=1 </s>=2 <unk>=3, decoder starts with </s>; T5: <pad>=0 </s>=1 <unk>=2,
# decoder starts with <pad>.
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def train_tokenizer(texts: Iterable[str], model_type: str, vocab_size: int = 512):
    """Train a BART-style byte-level BPE or a T5-style unigram tokenizer on `texts`.

    Returns a transformers fast tokenizer with the family's special tokens and post-processing
    (BART wraps inputs in <s> ... </s>; T5 appends </s>).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if model_type in ("bart", "mbart"):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=BART_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            unk_token="<unk>", mask_token="<mask>")
    if model_type in ("t5", "mt5"):
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>", show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    raise ValueError(f"no toy tokenizer for model type {model_type!r}; expected bart or t5")


def tiny_config(model_type: str, vocab_size: int, d_model: int = 32, layers: int = 2,
                heads: int = 2, ffn: int = 64, max_positions: int = 128):
    """A small BART or T5 config whose special-token ids match `train_tokenizer`'s."""
    from transformers import BartConfig, T5Config

    if model_type == "bart":
        return BartConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    if model_type == "t5":
        return T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=ffn,
            num_layers=layers, num_decoder_layers=layers, num_heads=heads,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
            feed_forward_proj="relu")
    raise ValueError(f"no toy config for model type {model_type!r}; expected bart or t5")


def save_tiny_teacher(out_dir: str, model_type: str, texts: Iterable[str], vocab_size: int = 512,
                      seed: int = 0, **config_kwargs) -> str:
    """Train a tokenizer on `texts`, build a randomly initialised tiny teacher, save both."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = train_tokenizer(texts, model_type, vocab_size)
    config = tiny_config(model_type, len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
