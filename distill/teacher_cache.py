"""The teacher cache's content as tensors: the sparse targets a build stores per target token, and
`TeacherCache`, which gives a training batch its targets back in the sparse loss's form.

Methods (--cache-method), per target token, from the teacher's full logits at T = 1:
- topk: the K most likely token ids, their log-probabilities, and the log of the mass on all
  other tokens (from the full logits, exact). The loss is KL over the K ids plus one bucket for
  the rest (kernels/sparse.py): biased towards the head, but with the tail's mass kept.
- sample: K draws with replacement from the teacher's distribution and their log-probabilities
  ("Sparse Logit Sampling", Anshumann et al., ACL 2025). At T = 1 the target is the draws'
  empirical distribution (count_i / K), an unbiased estimate of the teacher, so the student's
  expected gradient is the one of the full forward KL. At another temperature T the target is
  self-normalised importance weighting of the same draws towards p^(1/T):
      w_i  proportional to  count_i * p_i^(1/T - 1)
  (unbiased as K grows; at T = 1 exactly count_i / K). There is no tail: the weights are the
  whole target.
"""
from __future__ import annotations

import collections
import os

import torch

from distill import pseudo_label_files, teacher_cache_files as files
from distill.errors import UserError

_OPEN_SHARDS = 64  # safetensors handles kept open (each an mmap of one shard)


def sparse_targets(logits, method: str, k: int, generator=None) -> dict:
    """{"ids" int32 (r, K), "logprobs" float32 (r, K), "tail" float32 (r,) for topk} from the
    teacher's logits (r, V) at T = 1."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if method == "topk":
        lp, idx = logp.topk(k, dim=-1)
        tail = logp.scatter(1, idx, float("-inf")).logsumexp(1)  # -inf when K is the whole vocabulary
        return {"ids": idx.to(torch.int32), "logprobs": lp, "tail": tail}
    idx = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)
    return {"ids": idx.to(torch.int32), "logprobs": logp.gather(1, idx)}


def sample_weights(ids, logprobs, temperature: float):
    """(ids, log-weights) for the sparse loss from K draws per row (module docstring): each
    distinct id once with log(count * p^(1/T - 1)) scaled so that the loss's softmax(x / T)
    gives w_i; repeats get -inf (zero mass, allowed by the loss). Shapes (N, K)."""
    ids, order = ids.long().sort(dim=1)
    lp = logprobs.float().gather(1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = first.long().cumsum(1) - 1
    counts = torch.zeros_like(lp).scatter_add_(1, group, torch.ones_like(lp)).gather(1, group)
    # The loss takes softmax(x / T) over the row: x = T log count + (1 - T) log p gives
    # exp(x / T) = count * p^(1/T - 1).
    x = temperature * counts.log() + (1.0 - temperature) * lp
    return ids, x.masked_fill(~first, float("-inf"))


class TeacherCache:
    """A complete cache, every shard's checksum verified, its rows indexed by key.

    Every rank verifies every shard (the same outcome everywhere; on one node the second rank
    reads from the page cache); the big tensors are then read back per batch through mmap."""

    def __init__(self, folder: str, manifest: dict, log=print):
        self.folder, self.manifest = folder, manifest
        identity = manifest["identity"]
        self.method, self.k = identity["method"], int(identity["top_k"])
        self._paths, self._offsets, self._where = [], [], {}
        for split, info in identity["splits"].items():
            for split_, index, start, end in pseudo_label_files.plan_shards({split: info["rows"]}, identity["shard_size"]):
                path = os.path.join(folder, files.shard_name(split_, index))
                tensors, _ = files.read_shard(path)
                keys = tensors["row_keys"].numpy()
                if len(keys) != end - start:
                    raise UserError(f"teacher cache shard {path} holds {len(keys)} rows, its manifest says "
                                    f"{end - start}; rerun the {files.MAKE} command that made the cache")
                shard = len(self._paths)
                self._paths.append(path)
                self._offsets.append(tensors["offsets"])
                for r, key in enumerate(keys):
                    self._where.setdefault(bytes(key), (shard, r))
        self._handles: collections.OrderedDict = collections.OrderedDict()
        self._rows: list[tuple[int, int]] = []
        log(f"teacher cache {folder}: {self.method}, K={self.k}, {len(self._where)} rows in "
            f"{len(self._paths)} shards, checksums verified; the teacher is not loaded for training")

    def attach(self, tokenized, splits=("train", "validation")):
        """`tokenized` with a "cache_row" column on `splits`: where each row's targets are. A row
        the cache does not hold (other data, lengths or target source) is refused."""
        out = dict(tokenized)
        for split in splits:
            ds = tokenized[split]
            rows = [self.locate(input_ids, labels) for input_ids, labels in zip(ds["input_ids"], ds["labels"])]
            missing = sum(r is None for r in rows)
            if missing:
                raise UserError(f"--teacher-cache {self.folder!r} does not hold {missing} of {len(ds)} {split} rows "
                                "of this run (built from other data, --target-source or --max-*-samples?); "
                                f"build a cache from this run's data ({files.MAKE} with the same data options)")
            out[split] = ds.add_column("cache_row", rows)
        from datasets import DatasetDict

        return DatasetDict(out)

    def report_outputs(self, sources: list[str], max_new_tokens: int) -> list[str] | None:
        """The teacher's greedy outputs for a report on `sources`, when the build made them for
        exactly these rows and length (cache_teacher's --report-samples), else None."""
        found = files.read_report_outputs(self.folder)
        if found is None or found.get("key") != files.report_key(sources, max_new_tokens):
            return None
        return list(found["outputs"])

    def locate(self, input_ids, labels) -> int | None:
        """The `cache_row` of a tokenized row (what targets() takes), None when the cache lacks it."""
        where = self._where.get(files.row_key(input_ids, labels))
        if where is None:
            return None
        self._rows.append(where)
        return len(self._rows) - 1

    def _handle(self, shard: int):
        from safetensors import safe_open

        fh = self._handles.pop(shard, None) or safe_open(self._paths[shard], framework="pt")
        self._handles[shard] = fh
        while len(self._handles) > _OPEN_SHARDS:
            self._handles.popitem(last=False)
        return fh

    def targets(self, cache_rows, labels, temperature: float):
        """(teacher_ids (B, L, K) int64, teacher_logprobs (B, L, K) float32, tail (B, L) float32)
        for a batch's rows (`cache_row`) at its label positions; padding positions get a harmless
        uniform row (they are masked in the loss)."""
        mask = labels != -100
        ids_l, lp_l, tail_l = [], [], []
        for i, (row, n) in enumerate(zip(cache_rows.tolist(), mask.sum(1).tolist())):
            shard, r = self._rows[row]
            a, b = int(self._offsets[shard][r]), int(self._offsets[shard][r + 1])
            fh = self._handle(shard)
            if b - a != n:
                raise RuntimeError(f"teacher cache row {r} of {self._paths[shard]} has {b - a} targets, the batch {n}")
            ids_l.append(fh.get_slice("ids")[a:b])
            lp_l.append(fh.get_slice("logprobs")[a:b])
            tail_l.append(fh.get_slice("tail")[a:b] if self.method == "topk" else None)
            cached = fh.get_slice("labels")[a:b]
            if not torch.equal(cached.long(), labels[i][mask[i]].long().cpu()):
                raise RuntimeError(f"teacher cache row {r} of {self._paths[shard]} has other labels than the batch")
        shape = (*labels.shape, self.k)
        ids = torch.arange(self.k).expand(shape).clone()
        lp = torch.full(shape, -float(torch.log(torch.tensor(float(self.k)))))
        tail = torch.full(labels.shape, float("-inf"))
        cpu_mask = mask.cpu()
        if ids_l:
            got_ids, got_lp = torch.cat(ids_l).long(), torch.cat(lp_l).float()
            if self.method == "sample":
                got_ids, got_lp = sample_weights(got_ids, got_lp, temperature)
            else:
                tail[cpu_mask] = torch.cat(tail_l).float()
            ids[cpu_mask], lp[cpu_mask] = got_ids, got_lp
        dev = labels.device
        return ids.to(dev), lp.to(dev), tail.to(dev)
