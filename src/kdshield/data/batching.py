"""Tokenised examples, length-bucketed seeded batch order, and the collator.

Batches are built from the indices of a tokenised dataset: the epoch's permutation comes from
``seed + epoch`` alone, so a resumed run rebuilds exactly the batches it had not seen yet. Within
chunks of ``bucket_batches`` batches, examples are sorted by length, which cuts padding work on CPU
without changing which examples share an epoch.

Generative (SFT) data carries per-token labels (``Encoded.token_labels``, -100 on the prompt):
its batches' ``labels`` are then those, padded with -100, and ``position_ids`` count real tokens
only, so left and right padding give the same per-row loss (``kdshield.training.sft``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset


@dataclass
class Encoded:
    """Token ids per example plus labels and any per-example numeric extras (e.g. teacher outputs).

    ``token_labels`` (generative data): one label per token, -100 where no loss is taken; batches
    then carry these as ``labels`` (``labels`` here stays the per-example class, 0 if none).
    """

    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int
    padding_side: str = "right"
    extras: dict[str, torch.Tensor] | None = None
    token_labels: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def encode_dataset(tokenizer, data: Dataset, max_length: int, extra_columns: Sequence[str] = ()) -> Encoded:
    """Tokenise ``data['text']`` once (no padding); carry ``label`` and ``extra_columns``."""
    texts = list(data["text"])
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    for i, row in enumerate(ids):
        if not row:  # an empty string: keep one pad token so pooling has a position
            ids[i] = [tokenizer.pad_token_id]
    labels = [int(x) for x in data["label"]] if "label" in data.column_names else [0] * len(ids)
    extras = {}
    for col in extra_columns:
        extras[col] = torch.as_tensor(np.asarray(data.with_format("numpy")[col][:])).float()
    return Encoded(ids, labels, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right") or "right",
                   extras or None)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
                  bucket_batches: int = 32) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; deterministic in (seed, epoch)."""
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=gen).tolist()
    chunk = batch_size * max(1, bucket_batches)
    batches: list[list[int]] = []
    for start in range(0, n, chunk):
        part = sorted(perm[start:start + chunk], key=lambda i: lengths[i])
        chunk_batches = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        order = torch.randperm(len(chunk_batches), generator=gen).tolist()
        batches.extend(chunk_batches[j] for j in order)
    return batches


IGNORE_INDEX = -100


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for j, r in enumerate(rows):
        if side == "left":
            out[j, width - len(r):] = torch.tensor(r)
        else:
            out[j, :len(r)] = torch.tensor(r)
    return out


def collate(encoded: Encoded, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    rows = [encoded.input_ids[i] for i in indices]
    side = "left" if encoded.padding_side == "left" else "right"
    ids = _pad(rows, encoded.pad_id, side)
    mask = _pad([[1] * len(r) for r in rows], 0, side)
    batch = {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(list(indices), dtype=torch.long)}
    if encoded.token_labels is None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    else:
        batch["labels"] = _pad([encoded.token_labels[i] for i in indices], IGNORE_INDEX, side)
        batch["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask  # real tokens only
    for name, values in (encoded.extras or {}).items():
        batch[name] = values[list(indices)]
    return batch


class BatchDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole collated batches (so accelerate can shard them)."""

    def __init__(self, encoded: Encoded, batches: list[list[int]]):
        self.encoded, self.batches = encoded, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate(self.encoded, self.batches[i])
