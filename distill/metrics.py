"""How each figure of the teacher-vs-student report is measured.

Quality: scores from well-kept libraries (rouge-score, sacrebleu), so numbers match what papers
and the HF examples report, all on a 0-100 scale so a table can put them side by side; and the
rule that picks the headline metric. Speed and memory: a harness that times every model the
same way (see measure_speed). distill/evaluate.py loads the models and writes the report.

Beam latency is measured only when num_beams > 1; with 1 its keys are None (greedy is already
timed). Peak memory is the weights plus the peak tensor memory of one untimed greedy batch
generation, counted at torch's allocator: CUDA's max_memory_allocated, and on the CPU the
allocation/free events of torch.profiler(profile_memory=True). The resident set size is not
used: it stays flat during a generation (freed pages are reused at once), so it would show the
weights alone. The profiled generation is one more per model, outside the timed rounds.
"""
from __future__ import annotations

import gc
import os
import re
import statistics
import time

from distill.errors import UserError

METRICS = ("rouge1", "rouge2", "rougeLsum", "bleu", "chrf", "exact_match")

# Thresholds of the "auto" rule (see pick_main_metric). Medians, so a few odd rows do not decide.
SHORT_TARGET_WORDS = 4      # targets this short are labels/normalised forms: right or wrong
TRANSLATION_RATIO = 0.6     # target about as long as the source: a rewrite, not a summary

_REGEX_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_nltk_split = None  # resolved on first use: nltk's punkt if its data is installed, else False


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: nltk's punkt when its data is installed, else split after .!? + space.

    rougeLsum scores summary-level LCS over sentences that rouge-score expects one per line; the
    HF summarization examples use nltk for this, and the regex is the offline stand-in.
    """
    global _nltk_split
    if _nltk_split is None:
        _nltk_split = False
        try:
            import nltk

            nltk.sent_tokenize("Probe. Probe.")  # raises LookupError when punkt data is missing
            _nltk_split = nltk.sent_tokenize
        except Exception:  # ImportError, LookupError: the regex is a fine stand-in
            pass
    text = text.strip()
    if not text:
        return []
    if _nltk_split:
        return [s for s in _nltk_split(text) if s.strip()]
    return [s for s in _REGEX_SENTENCE_END.split(text) if s.strip()]


def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """rouge1/rouge2/rougeLsum (F1, stemmed), corpus BLEU and chrF, exact match; all 0-100.

    ROUGE is the mean per-pair F-measure from rouge-score with use_stemmer=True; for rougeLsum
    each text is first put one sentence per line. BLEU and chrF are sacrebleu's corpus scores
    with its default (13a) tokenisation. exact_match compares the strings after stripping
    surrounding whitespace. Note rouge-score's tokenizer keeps only [a-z0-9] (lowercased), so
    ROUGE is 0 for non-Latin scripts: use chrf or bleu there.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for pred, ref in zip(predictions, references):
        # rouge1/2 ignore line breaks, so one call on the sentence-per-line texts serves all three.
        scores = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for key in sums:
            sums[key] += scores[key].fmeasure
    n = len(predictions)
    result = {key: 100.0 * total / n for key, total in sums.items()}
    result["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    result["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    result["exact_match"] = 100.0 * sum(p == r for p, r in zip(predictions, references)) / n
    return result


def pick_main_metric(name: str, references: list[str], sources: list[str] | None = None) -> str:
    """The metric a report leads with: `name` itself if it is one of METRICS, or, for "auto":

    1. chrf when rouge-score's tokenizer keeps no word of most references (non-Latin scripts:
       ROUGE is always 0 there, and spaces do not mark words, so rule 2 cannot count them);
    2. exact_match when the median reference has <= 4 words (labels, normalised forms, short
       answers: partial overlap means little there);
    3. bleu when `sources` are given and the median target/source word ratio is >= 0.6
       (translation, paraphrase, rewriting: the output is about as long as the input);
    4. rougeLsum otherwise (summaries, one or many sentences).
    Pass the name explicitly when the task is known (e.g. bleu for translation).
    """
    if name != "auto":
        if name not in METRICS:
            raise UserError(f"unknown metric {name!r}; expected auto or one of {', '.join(METRICS)}")
        return name
    if not references:
        raise UserError("no references to choose a metric from; the evaluation split is empty")
    from rouge_score import tokenize

    if sum(not tokenize.tokenize(r, None) for r in references) > len(references) / 2:
        return "chrf"
    if statistics.median(len(r.split()) for r in references) <= SHORT_TARGET_WORDS:
        return "exact_match"
    if sources:
        ratios = [len(r.split()) / max(1, len(s.split())) for s, r in zip(sources, references)]
        if statistics.median(ratios) >= TRANSLATION_RATIO:
            return "bleu"
    return "rougeLsum"


# ---------------------------------------------------------------- generation, speed and memory

def encode(tokenizer, texts, prefix, max_source_length, device):
    """Padded tensors for `texts` (with `prefix`) on `device`; no token_type_ids (BART/T5
    forward does not take them)."""
    enc = tokenizer([prefix + t for t in texts], truncation=True, max_length=max_source_length,
                    padding=True, return_tensors="pt", return_token_type_ids=False)
    return {k: v.to(device) for k, v in enc.items()}


def generate(model, enc, num_beams, max_new_tokens):
    """Deterministic generation: greedy (num_beams=1) or beam search, never sampling."""
    return model.generate(**enc, num_beams=num_beams, do_sample=False,
                          max_new_tokens=max_new_tokens)


def _new_tokens(tokenizer, out) -> int:
    """Generated tokens, not counting the decoder start token or padding after EOS."""
    body = out[:, 1:]
    pad = tokenizer.pad_token_id
    return int((body != pad).sum()) if pad is not None else int(body.numel())


def _timed(model, tokenizer, enc, num_beams, max_new_tokens, device):
    import torch

    if device.type == "cuda":  # CUDA runs asynchronously: time finished work only
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = generate(model, enc, num_beams, max_new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, _new_tokens(tokenizer, out)


def _cpu_tensor_peak_bytes(run) -> int | None:
    """Peak of torch's CPU tensor memory while `run()` runs, above the level at its start.

    torch.profiler with profile_memory=True records every allocation and free of the CPU
    allocator; their running sum in time order peaks where the generation held the most tensor
    memory (activations, KV cache, logits, beam state). Sampling the resident set size instead
    stays flat: glibc hands freed pages straight back to the next allocation. The profiler
    reports no free of a block allocated before it started, so only memory taken during the
    run counts. Python objects and the allocator's own caching are not counted. None when this
    torch's profiler does not expose its events.
    """
    from torch.profiler import ProfilerActivity, profile

    # kineto otherwise writes two "USDT ... profiler_start/stop" lines to stderr per profile;
    # it reads this when it starts, at the first profile in the process
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type().name == "CPU"]
    except AttributeError:  # a private attribute of the profiler: gone in some later torch
        return None
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep their order
        level += event.nbytes()  # negative for a free
        peak = max(peak, level)
    return peak


def _peak_extra_bytes(model, enc, max_new_tokens, device) -> int | None:
    """Peak tensor memory above the level before one untimed greedy batch generation.

    CUDA: max_memory_allocated after a reset. CPU: torch.profiler's allocator events (see
    _cpu_tensor_peak_bytes). Both count tensors at the allocator, not pages of the process.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        generate(model, enc, 1, max_new_tokens)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_tensor_peak_bytes(lambda: generate(model, enc, 1, max_new_tokens))
    return None  # other devices: no allocator statistics read here


def memory_method(device) -> str:
    if device.type == "cuda":
        return ("weights + peak growth of CUDA max_memory_allocated during one greedy batch "
                "generation")
    return ("weights + peak tensor memory of one greedy batch generation, from torch.profiler's "
            "CPU allocator events (tensors only: Python objects and allocator caching not "
            "counted)")


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(model.parameters()) + list(model.buffers()))


SPEED_KEYS = ("latency_greedy_b1_p50_ms", "latency_greedy_b1_p90_ms", "latency_beam_b1_p50_ms",
              "latency_beam_b1_p90_ms", "mean_new_tokens_b1", "throughput_samples_per_s",
              "throughput_tokens_per_s", "peak_memory_mb")


def measure_speed(models: dict, sources: list[str], *, source_prefix="", max_source_length=512,
                  max_new_tokens=128, batch_size=32, num_beams=4, repeats=5, device=None,
                  log=print) -> dict[str, dict]:
    """Time every model the same way; `models` maps name -> (model, tokenizer). Returns
    name -> {SPEED_KEYS}, times in ms, memory in MiB.

    Each model is warmed up (one call per measured shape: allocator growth, kernel choice and
    lazy init land there), then `repeats` rounds run every model in turn, the order rotated
    each round so drift hits all alike; each turn starts with one untimed batch-1 call.
    Batch-1 latency uses a different input each round (greedy, and beam `num_beams` when > 1;
    the beam keys are None otherwise): p50/p90.
    Throughput: `batch_size` inputs (cycled when fewer) per call, samples/s from the median
    time. Generation stops at EOS, so a model that writes more pays for it; mean_new_tokens_b1
    shows how much each wrote. peak_memory_mb: weights + the peak tensor memory of one more,
    untimed batch generation (see _peak_extra_bytes).
    """
    import numpy as np
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = list(models)
    beam = num_beams > 1
    batch_texts = [sources[i % len(sources)] for i in range(batch_size)]
    enc_b1, enc_batch = {}, {}
    for name, (model, tok) in models.items():
        enc_b1[name] = [encode(tok, [sources[r % len(sources)]], source_prefix,
                               max_source_length, device) for r in range(repeats)]
        enc_batch[name] = encode(tok, batch_texts, source_prefix, max_source_length, device)
        _timed(model, tok, enc_b1[name][0], 1, max_new_tokens, device)
        if beam:
            _timed(model, tok, enc_b1[name][0], num_beams, max_new_tokens, device)
        _timed(model, tok, enc_batch[name], 1, max_new_tokens, device)
    t = {n: {"greedy": [], "beam": [], "batch": [], "tokens": [], "batch_tokens": []}
         for n in names}
    for r in range(repeats):
        log(f"evaluate: speed round {r + 1}/{repeats}")
        for name in names[r % len(names):] + names[:r % len(names)]:
            model, tok = models[name]
            # One untimed call first: the switch from another model (its data out of the caches,
            # another library's threads winding down) is the harness's cost, not this model's; a
            # deployed model serves its requests back to back.
            _timed(model, tok, enc_b1[name][0], 1, max_new_tokens, device)
            seconds, tokens = _timed(model, tok, enc_b1[name][r], 1, max_new_tokens, device)
            t[name]["greedy"].append(seconds)
            t[name]["tokens"].append(tokens)
            if beam:
                t[name]["beam"].append(
                    _timed(model, tok, enc_b1[name][r], num_beams, max_new_tokens, device)[0])
            seconds, tokens = _timed(model, tok, enc_batch[name], 1, max_new_tokens, device)
            t[name]["batch"].append(seconds)
            t[name]["batch_tokens"].append(tokens)
    results = {}
    gc.collect()  # once, so garbage from the timed rounds is gone before memory is measured
    for name, (model, _) in models.items():
        times = t[name]
        batch_s = statistics.median(times["batch"])
        extra = _peak_extra_bytes(model, enc_batch[name], max_new_tokens, device)
        ms = lambda key, q: float(1000 * np.percentile(times[key], q)) if times[key] else None
        results[name] = {
            "latency_greedy_b1_p50_ms": ms("greedy", 50),
            "latency_greedy_b1_p90_ms": ms("greedy", 90),
            "latency_beam_b1_p50_ms": ms("beam", 50),
            "latency_beam_b1_p90_ms": ms("beam", 90),
            "mean_new_tokens_b1": statistics.mean(times["tokens"]),
            "throughput_samples_per_s": batch_size / batch_s,
            "throughput_tokens_per_s": statistics.median(times["batch_tokens"]) / batch_s,
            "peak_memory_mb": (weights_bytes(model) + extra) / 2**20 if extra is not None else None,
        }
    return results
