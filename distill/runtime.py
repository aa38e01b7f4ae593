"""Runtime folders: a student exported for a serving runtime, loaded and run behind one interface.

    STUDENT_DIR/runtime/NAME/        NAME = ct2, ct2-int8, ct2-int8_float16, ct2-float16, onnx, onnx-int8
      runtime.json                   what it is (runtime, quantization, model type), the student it
                                     came from (path, weights fingerprint, parameters), the decoding
                                     rules of the student's generation config, the source prefix and
                                     truncation, the parity check it passed, library versions
      tokenizer files                the student's tokenizer: the folder serves on its own
      ct2:  model.bin, config.json, shared_vocabulary.json     (CTranslate2's converter)
      onnx: encoder.onnx, decoder.onnx                         (torch.onnx; distill/runtime_convert.py)

distill/export_runtime.py writes these folders; distill/evaluate.py runs them as students. Every
runtime decodes the way the PyTorch student's greedy `generate` does, rule for rule (forced
BOS/EOS, minimum length, n-gram blocking, repetition penalty): the parity check compares token
ids, so a rule applied differently would fail it. A generation config that asks for a rule no
runtime here applies (bad words, suppressed tokens, ...) is refused at export.

Two ways in: `load(folder)[0].generate_texts(texts, batch_size, max_new_tokens)` for serving,
and `generate(input_ids=..., attention_mask=..., max_new_tokens=...)`, which takes and returns
what transformers' generate does, so the report's harness (distill/metrics.py) times a runtime
exactly as it times a PyTorch model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from distill.errors import UserError

RUNTIMES = ("ct2", "onnx")
QUANTIZATIONS = ("int8", "int8_float16", "float16")
ONNX_QUANTIZATIONS = ("int8",)  # onnxruntime's dynamic int8 quantization; no float16 graphs are made
MODEL_TYPES = ("bart", "mbart", "t5", "mt5")
MANIFEST = "runtime.json"
RUNTIME_DIR = "runtime"
# import name -> what to install; the same pins as setup.py's extras_require["runtime"]
PACKAGES = {"ct2": {"ctranslate2": "ctranslate2==4.8.5"},
            "onnx": {"onnxruntime": "onnxruntime==1.32.0", "onnx": "onnx==1.23.2"}}  # onnx: the int8 quantizer
# generation-config fields that change greedy outputs and that no runtime here applies
UNSUPPORTED_RULES = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                     "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
                     "exponential_decay_length_penalty", "guidance_scale")


def folder_name(target: str, quantization: str | None) -> str:
    return target if not quantization else f"{target}-{quantization}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def check_packages(target: str) -> None:
    missing = [pin for module, pin in PACKAGES[target].items() if not _installed(module)]
    if missing:
        raise UserError(f"the {target} runtime needs {' and '.join(missing)}, not installed here; "
                        f"pip install {' '.join(missing)} (or pip install -e '.[runtime]')")


def parse_targets(text, quantization, flag="--to", quant_flag="--quantization") -> list[str]:
    """'ct2,onnx' -> ['ct2', 'onnx'], checked with the quantization; each target's packages must
    be installed (checked here, before any training or conversion starts)."""
    if text is None:
        if quantization is not None:
            raise UserError(f"{quant_flag} {quantization} is given without {flag}; pass e.g. {flag} ct2")
        return []
    targets = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    if not targets:
        raise UserError(f"{flag} is empty; pass ct2, onnx or ct2,onnx")
    unknown = [t for t in targets if t not in RUNTIMES]
    if unknown:
        raise UserError(f"{flag}: unknown runtime {unknown[0]!r}; expected ct2, onnx or both (ct2,onnx)")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UserError(f"{quant_flag} {quantization!r} is not one of {', '.join(QUANTIZATIONS)} "
                        f"(leave it out for float32)")
    if "onnx" in targets and quantization is not None and quantization not in ONNX_QUANTIZATIONS:
        raise UserError(f"{quant_flag} {quantization} is not available for onnx (int8 only: no float16 "
                        f"graphs are made); export onnx separately, or use int8")
    for target in targets:
        check_packages(target)
    return targets


def weights_fingerprint(folder: str) -> str:
    """sha256 over the names and bytes of a model folder's top-level weight files."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith((".safetensors", ".bin")) and os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def decoding_rules(generation_config) -> dict:
    """What a runtime must apply to decode like the student's greedy `generate`, from its
    GenerationConfig; UserError for a rule no runtime here applies."""
    g = generation_config
    for name in UNSUPPORTED_RULES:
        value = getattr(g, name, None)
        if value not in (None, 0, 1.0, [], {}):
            raise UserError(f"the student's generation_config.json sets {name}={value!r}, which the "
                            f"runtimes' decoding does not apply; remove it there to export")

    def one(value, name):
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise UserError(f"the student's generation_config.json sets {name}={list(value)}; the "
                                f"runtimes support a single id there")
            value = value[0]
        return None if value is None else int(value)

    eos = g.eos_token_id
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    # transformers counts min_length over the decoder's input, whose first token is the start token
    min_new = max(int(g.min_length or 0) - 1, int(g.min_new_tokens or 0), 0) if eos else 0
    return {"decoder_start_token_id": one(g.decoder_start_token_id, "decoder_start_token_id"),
            "eos_token_ids": eos, "pad_token_id": one(g.pad_token_id, "pad_token_id"),
            "forced_bos_token_id": one(g.forced_bos_token_id, "forced_bos_token_id"),
            "forced_eos_token_id": one(g.forced_eos_token_id, "forced_eos_token_id"),
            "min_new_tokens": min_new, "no_repeat_ngram_size": int(g.no_repeat_ngram_size or 0),
            "repetition_penalty": float(g.repetition_penalty or 1.0)}


def cut_at_eos(ids: list[int], eos_ids) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i + 1]
    return ids


# ---------------------------------------------------------------- folders

def is_runtime_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), MANIFEST))


def read_manifest(path: str, role: str = "student") -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.load(fh)
        runtime = manifest["runtime"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{role} runtime folder {path!r} has an unreadable {MANIFEST} ({type(exc).__name__}); "
                        f"export it again with python -m distill.export_runtime") from None
    if runtime not in RUNTIMES:
        raise UserError(f"{role} runtime folder {path!r} is for runtime {runtime!r}; expected one of "
                        f"{', '.join(RUNTIMES)}")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise UserError(f"{role} runtime folder {path!r} has no tokenizer; export it again with "
                        f"python -m distill.export_runtime")
    return manifest


def check_folder(path: str, role: str = "student") -> None:
    read_manifest(path, role)


def _check_student_unchanged(path: str, manifest: dict) -> None:
    """A runtime folder beside a student that was trained again since is not that student."""
    student = os.path.normpath(os.path.join(path, manifest["student"]["path"]))
    if not os.path.isfile(os.path.join(student, "config.json")):
        return  # the folder was moved on its own (deployed): nothing to compare with
    if weights_fingerprint(student) != manifest["student"]["weights_sha256"]:
        raise UserError(f"runtime folder {path!r} was exported from an earlier version of the student "
                        f"in {student!r} (its weights changed since); export it again: python -m "
                        f"distill.export_runtime {student} --to {manifest['runtime']}")


def load(path: str, role: str = "student", device=None, check_student: bool = True, threads: int | None = None):
    """(RuntimeModel, tokenizer) from a runtime folder; the runtime computes with `threads`
    threads (default: torch's thread count)."""
    import torch
    from transformers import AutoTokenizer

    path = os.path.expanduser(path)
    manifest = read_manifest(path, role)
    check_packages(manifest["runtime"])
    if check_student:
        _check_student_unchanged(path, manifest)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = Ct2Model if manifest["runtime"] == "ct2" else OnnxModel
    return cls(path, manifest, tokenizer, device, threads or torch.get_num_threads()), tokenizer


# ---------------------------------------------------------------- the interface

class RuntimeModel:
    """A runtime folder as a model: `generate` with transformers' arguments and output (decoder
    start token first, padding after EOS). Its weights are not torch tensors, so `parameters()`
    is empty and `sizes()` gives the report's size figures."""
    beam_search = True

    def __init__(self, path, manifest, tokenizer, device, threads):
        self.path, self.manifest, self.tokenizer = path, manifest, tokenizer
        self.rules = manifest["generation"]
        self.device, self.threads = device, max(1, int(threads))

    def generate_ids(self, sources: list[list[int]], max_new_tokens: int, num_beams: int = 1) -> list[list[int]]:
        """Generated ids per source (encoded ids, no padding), cut after the first EOS."""
        raise NotImplementedError

    def generate(self, input_ids=None, attention_mask=None, num_beams=1, do_sample=False,
                 max_new_tokens=128, **_ignored):
        import torch

        assert not do_sample, "runtimes decode deterministically"
        ids = input_ids.cpu()
        mask = attention_mask.cpu().bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        outs = self.generate_ids([row[m].tolist() for row, m in zip(ids, mask)], max_new_tokens, num_beams)
        width = 1 + max((len(o) for o in outs), default=0)
        pad = self.rules["pad_token_id"] if self.rules["pad_token_id"] is not None else 0
        result = torch.full((len(outs), width), pad, dtype=torch.long)
        result[:, 0] = self.rules["decoder_start_token_id"]
        for i, out in enumerate(outs):
            result[i, 1:1 + len(out)] = torch.tensor(out, dtype=torch.long)
        return result

    def generate_texts(self, texts: list[str], batch_size: int = 32, max_new_tokens: int = 128) -> list[str]:
        """Greedy outputs for `texts`, with the student's source prefix and truncation."""
        prefix, limit = self.manifest.get("source_prefix", ""), self.manifest.get("max_source_length", 512)
        outputs = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer([prefix + t for t in texts[start:start + batch_size]], truncation=True,
                                 max_length=limit)["input_ids"]
            outputs += self.tokenizer.batch_decode(self.generate_ids(enc, max_new_tokens),
                                                   skip_special_tokens=True)
        return [text.strip() for text in outputs]

    def parameters(self):
        return iter(())  # the weights live in the runtime, not in torch

    buffers = parameters

    def sizes(self) -> dict:
        files = self.manifest["files"]
        return {"dtype": self.manifest.get("quantization") or "float32",
                "parameters": self.manifest["student"]["parameters"],
                "weights_mb": sum(os.path.getsize(os.path.join(self.path, f)) for f in files) / 2**20}


class Ct2Model(RuntimeModel):
    """CTranslate2's Translator: tokens in, tokens out (the converter's vocabulary is the
    tokenizer's, id for id)."""

    def __init__(self, path, manifest, tokenizer, device, threads):
        import ctranslate2

        super().__init__(path, manifest, tokenizer, device, threads)
        on_cuda = getattr(device, "type", device) == "cuda" and ctranslate2.get_cuda_device_count() > 0
        self.translator = ctranslate2.Translator(path, device="cuda" if on_cuda else "cpu",
                                                 compute_type="default", intra_threads=self.threads)

    def generate_ids(self, sources, max_new_tokens, num_beams=1):
        r = self.rules
        forced_eos = r["forced_eos_token_id"]
        # transformers forces EOS as the last of max_new_tokens: decode one fewer, then add it
        limit = max_new_tokens - 1 if forced_eos is not None else max_new_tokens
        if not sources or limit < 1:
            return [[forced_eos] for _ in sources] if forced_eos is not None else [[] for _ in sources]
        tokens = [self.tokenizer.convert_ids_to_tokens(s) for s in sources]
        prefix = None
        if r["forced_bos_token_id"] is not None:
            prefix = [[self.tokenizer.convert_ids_to_tokens(r["forced_bos_token_id"])]] * len(sources)
        results = self.translator.translate_batch(
            tokens, target_prefix=prefix, beam_size=num_beams, max_decoding_length=limit,
            min_decoding_length=r["min_new_tokens"], no_repeat_ngram_size=r["no_repeat_ngram_size"],
            repetition_penalty=r["repetition_penalty"], end_token=r["eos_token_ids"] or None,
            return_end_token=True, max_input_length=0)  # inputs were truncated by the tokenizer
        outs = []
        for result in results:
            ids = cut_at_eos(self.tokenizer.convert_tokens_to_ids(result.hypotheses[0]), r["eos_token_ids"])
            if forced_eos is not None and not (ids and ids[-1] in r["eos_token_ids"]):
                ids.append(forced_eos)
            outs.append(ids)
        return outs


class OnnxModel(RuntimeModel):
    """encoder.onnx once, then decoder.onnx per step over the whole prefix (no key/value cache:
    distill/runtime_convert.py says why), greedy, with transformers' rules in numpy."""
    beam_search = False

    def __init__(self, path, manifest, tokenizer, device, threads):
        import onnxruntime as ort

        super().__init__(path, manifest, tokenizer, device, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.log_severity_level = 3  # errors only: its warnings are about graph fusions
        self.encoder = ort.InferenceSession(os.path.join(path, "encoder.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(os.path.join(path, "decoder.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def generate_ids(self, sources, max_new_tokens, num_beams=1):
        import numpy as np

        if num_beams != 1:
            raise UserError(f"the onnx runtime decodes greedily only; asked for {num_beams} beams")
        if not sources:
            return []
        r = self.rules
        pad = r["pad_token_id"] if r["pad_token_id"] is not None else 0
        width = max(len(s) for s in sources)
        input_ids = np.full((len(sources), width), pad, dtype=np.int64)
        mask = np.zeros((len(sources), width), dtype=np.int64)
        for i, s in enumerate(sources):
            input_ids[i, :len(s)], mask[i, :len(s)] = s, 1
        hidden = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        seqs = np.full((len(sources), 1), r["decoder_start_token_id"], dtype=np.int64)
        done = np.zeros(len(sources), dtype=bool)
        eos = np.array(r["eos_token_ids"], dtype=np.int64)
        for step in range(max_new_tokens):
            logits = self.decoder.run(None, {"decoder_input_ids": seqs, "encoder_hidden_states": hidden,
                                             "attention_mask": mask})[0]
            apply_rules(logits, seqs, step, max_new_tokens, r)
            nxt = np.where(done, pad, logits.argmax(-1))
            seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
            done |= np.isin(nxt, eos)
            if done.all():
                break
        return [cut_at_eos(row[1:].tolist(), r["eos_token_ids"]) for row in seqs]


def apply_rules(logits, seqs, step: int, max_new_tokens: int, rules: dict) -> None:
    """transformers' greedy logits processors, in place on (B, V) float32 `logits`, for the
    decoder input `seqs` (B, 1 + step), start token first (the processors see it too)."""
    import numpy as np

    penalty = rules["repetition_penalty"]
    if penalty != 1.0:  # RepetitionPenaltyLogitsProcessor
        for row, seq in zip(logits, seqs):
            ids = np.unique(seq)
            row[ids] = np.where(row[ids] < 0, row[ids] * penalty, row[ids] / penalty)
    n = rules["no_repeat_ngram_size"]
    if n and seqs.shape[1] + 1 >= n:  # NoRepeatNGramLogitsProcessor
        for row, seq in zip(logits, seqs.tolist()):
            tail = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == tail}
            row[list(banned)] = -np.inf
    if step < rules["min_new_tokens"] and rules["eos_token_ids"]:  # MinLength / MinNewTokens
        logits[:, rules["eos_token_ids"]] = -np.inf
    for forced, when in ((rules["forced_bos_token_id"], step == 0),
                         (rules["forced_eos_token_id"], step == max_new_tokens - 1)):
        if forced is not None and when:  # ForcedBOS / ForcedEOS
            logits[:] = -np.inf
            logits[:, forced] = 0.0


def measure_speed(models: dict, sources: list[str], *, num_beams: int, **kwargs) -> dict:
    """metrics.measure_speed over PyTorch models and runtimes together. A runtime without beam
    search (onnx) is timed in a second, greedy-only round, so its beam latency is left empty;
    a runtime's peak memory is not counted (its allocations are not torch's)."""
    from distill.metrics import measure_speed as measure

    greedy_only = {n: m for n, m in models.items() if num_beams > 1 and not getattr(m[0], "beam_search", True)}
    rest = {n: m for n, m in models.items() if n not in greedy_only}
    speed = measure(rest, sources, num_beams=num_beams, **kwargs) if rest else {}
    if greedy_only:
        speed.update(measure(greedy_only, sources, num_beams=1, **kwargs))
    for name, (model, _) in models.items():
        if isinstance(model, RuntimeModel):
            speed[name]["peak_memory_mb"] = None
    return speed
