"""On-policy distillation (GKD, Agarwal et al. 2024) for encoder-decoders: generated targets.

With probability --on-policy-ratio a training micro-batch's targets are sampled from the current
student, with probability --seq-kd-ratio from the teacher (online sequence-level KD); otherwise
they are the dataset's. On generated targets the loss is the divergence to the teacher alone (no
CE: a sampled sequence is no reference), the same mixture TRL's GKDTrainer trains on.

Facts:
- The choice is a pure function of (--seed, the micro-batch's index in the run), so every rank
  takes the same branch for the same micro-batch (a ZeRO-3 teacher's forward and generate are
  collective: all ranks must run them together) and a resumed run makes the same choices again,
  with no RNG state to checkpoint.
- Generation runs in eval mode (no dropout) under no_grad, then the model's mode is restored.
  Its random numbers come from (--seed, rank, index) in a forked RNG: each rank draws its own
  samples, a resumed run draws the same ones, and the global RNG (dropout's) is left as it was.
  It samples from the model's own distribution: temperature, no top-k/top-p, no beam search, no
  length or repetition tricks; only the output format the model's generation config forces
  (forced BOS/EOS, suppressed tokens) is kept.
- A ZeRO-3 teacher generates with synced_gpus: every rank steps the decoder until all ranks are
  done (a finished rank keeps running dummy steps), because each step gathers partitioned
  parameters collectively. The student (ZeRO 0-2, full parameters on every rank) generates on
  its own; sequences of different lengths on different ranks are fine for the forwards that
  follow, which gather parameters per module, whatever the activations' shapes.
- Labels: the decoder start token is stripped; a sequence ends at its first EOS (kept: the
  student learns to stop) or its first pad (not kept: data never has pad as a target, and
  generate pads finished rows with it); everything after is -100, as the collator pads labels.
"""
from __future__ import annotations

import contextlib
import random

import torch

IGNORE_INDEX = -100
BRANCHES = ("dataset", "on_policy", "seq_kd")


def choose_targets(seed: int, index: int, on_policy_ratio: float, seq_kd_ratio: float) -> str:
    """Where micro-batch `index` (counted over the run, the same on every rank) takes its targets
    from: "on_policy" with probability on_policy_ratio, "seq_kd" with seq_kd_ratio, else "dataset".

    A string seed makes random.Random hash it with SHA-512: the same draw in every process,
    whatever PYTHONHASHSEED is."""
    if on_policy_ratio <= 0.0 and seq_kd_ratio <= 0.0:
        return "dataset"
    u = random.Random(f"distill-targets:{seed}:{index}").random()  # uniform in [0, 1)
    if u < on_policy_ratio:
        return "on_policy"
    if u < on_policy_ratio + seq_kd_ratio:
        return "seq_kd"
    return "dataset"


def _seed(*parts) -> int:
    return random.Random(":".join(map(str, ("distill-sample",) + parts))).getrandbits(63)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Random numbers from `seed` inside the block; the global RNG state is restored after it."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else None):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def labels_from_sequences(sequences: torch.Tensor, *, decoder_start_token_id: int, eos_token_id,
                          pad_token_id: int | None, max_new_tokens: int | None = None) -> torch.Tensor:
    """Decoder sequences from `generate` (B, 1 + L), starting with the decoder start token, ->
    labels (B, <= max_new_tokens): the start token stripped, each row ending at its first EOS
    (kept) or first pad (dropped), -100 after that. `eos_token_id` may be an int or a list."""
    if sequences.dim() != 2 or sequences.size(1) < 1:
        raise ValueError(f"sequences must be (batch, length >= 1), got shape {tuple(sequences.shape)}")
    # Internal invariant: an encoder-decoder's generate output starts with the decoder start token.
    assert bool((sequences[:, 0] == decoder_start_token_id).all()), (
        f"generated sequences do not start with decoder_start_token_id {decoder_start_token_id}")
    labels = sequences[:, 1:]
    if max_new_tokens is not None:
        labels = labels[:, :max_new_tokens]
    labels = labels.clone()
    eos = torch.zeros_like(labels, dtype=torch.bool)
    for token in _ids(eos_token_id):
        eos |= labels == token
    pad = labels == pad_token_id if pad_token_id is not None else torch.zeros_like(eos)
    # A position is past the end when an EOS came strictly before it, or a pad at or before it.
    ended = ((eos.long().cumsum(1) - eos.long()) > 0) | (pad.long().cumsum(1) > 0)
    labels[ended] = IGNORE_INDEX
    # Columns past every row's end go (at least one column stays, for a (B, 1) shape).
    used = (labels != IGNORE_INDEX).any(0).nonzero()
    return labels[:, :int(used.max()) + 1 if used.numel() else 1]


def sampling_config(*, temperature: float, max_new_tokens: int):
    """A GenerationConfig that samples from the model's distribution at `temperature`. Every
    value is explicit: generate() fills a passed config's unset (None) values from the model's own
    generation config, which for a summariser may hold beams, min_length and no-repeat n-grams.
    Lengths are max_length/min_length (an encoder-decoder's decoder starts at length 1, its start
    token), not max_new_tokens: a model whose config sets max_length would then warn every call."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, num_beams=1, num_beam_groups=1, num_return_sequences=1,
        max_length=max_new_tokens + 1, min_length=0, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, early_stopping=False, use_cache=True,
        return_dict_in_generate=False, output_scores=False, output_logits=False)


def generate_labels(model, input_ids, attention_mask, *, temperature: float, max_new_tokens: int,
                    synced_gpus: bool = False) -> torch.Tensor:
    """Sample one target per row from the seq2seq LM `model` (a transformers model, eval mode,
    no_grad) and return it as labels (B, <= max_new_tokens), -100 past each row's end.
    `synced_gpus` must be True for a ZeRO-3 partitioned model on more than one rank."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else model.config.decoder_start_token_id
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, synced_gpus=synced_gpus,
                generation_config=sampling_config(temperature=temperature, max_new_tokens=max_new_tokens))
    finally:
        model.train(was_training)
    return labels_from_sequences(sequences, decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad,
                                 max_new_tokens=max_new_tokens).to(input_ids.device)


class GeneratedTargets:
    """Per micro-batch: which targets (choose), and the generated labels (labels)."""

    def __init__(self, cfg, *, rank: int, world_size: int, teacher_stage: int):
        self.seed, self.rank = cfg.seed, rank
        self.on_policy_ratio = float(cfg.on_policy_ratio)
        self.seq_kd_ratio = float(cfg.seq_kd_ratio)
        self.temperature = float(cfg.on_policy_temperature)
        self.max_new_tokens = int(cfg.on_policy_max_new_tokens or cfg.max_target_length)
        # ZeRO-3 gathers the teacher's parameters collectively at every decoder step.
        self.teacher_synced = teacher_stage == 3 and world_size > 1

    @property
    def active(self) -> bool:
        return self.on_policy_ratio > 0.0 or self.seq_kd_ratio > 0.0

    def choose(self, index: int) -> str:
        return choose_targets(self.seed, index, self.on_policy_ratio, self.seq_kd_ratio)

    def labels(self, branch: str, batch, index: int, *, student, teacher) -> torch.Tensor:
        """Labels for micro-batch `index` (`batch` on the device) sampled from `student`
        ("on_policy") or `teacher` ("seq_kd"); both are transformers models."""
        model, synced = (student, False) if branch == "on_policy" else (teacher, self.teacher_synced)
        assert branch in ("on_policy", "seq_kd") and model is not None, branch
        with seeded(_seed(self.seed, self.rank, index), batch["input_ids"].device):
            return generate_labels(model, batch["input_ids"], batch["attention_mask"], temperature=self.temperature,
                                   max_new_tokens=self.max_new_tokens, synced_gpus=synced)

    def describe(self) -> str:
        """One phrase for the run's set-up line."""
        dataset = 1.0 - self.on_policy_ratio - self.seq_kd_ratio
        return (f"targets: dataset {max(dataset, 0.0):g}, student samples {self.on_policy_ratio:g}, "
                f"teacher samples {self.seq_kd_ratio:g} (T = {self.temperature:g}, at most "
                f"{self.max_new_tokens} new tokens; divergence only on generated targets)")


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(b, 0)} {name}" for b, name in
                     zip(BRANCHES, ("dataset", "on-policy", "seq-KD")))
