"""Batches: a length-bucketing batch sampler (sharded across processes), a padding collator, the DataLoader,
and the one inference loop over batches (validation, evaluation and prediction)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from hybridlib.config import Config
from hybridlib.runtime import CUDA_PAD_MULTIPLE, Dist, autocast, resolve_device
from hybridlib.threads import CPUThreads

POOL_BATCHES = 50  # length buckets sort within pools of this many batches


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of indices. With ``bucket``, texts of similar length share a batch.

    Shuffles by (seed, epoch), so a resumed run sees the same batches. With several processes,
    each rank takes every ``world_size``-th batch of the same global order (disjoint shards); the
    training batch list is padded by repetition so all ranks take the same number of steps.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, bucket: bool, seed: int = 0,
                 dist: Dist = Dist()):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.bucket = batch_size, shuffle, bucket
        self.seed, self.rank, self.world_size = seed, dist.rank, dist.world_size
        self.pool = batch_size * POOL_BATCHES
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket:
            # sort within pools of batches: little padding, still random across pools
            chunks = [order[i : i + self.pool] for i in range(0, n, self.pool)]
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.shuffle and self.world_size > 1 and len(batches) % self.world_size:
            batches += batches[: self.world_size - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches()[self.rank :: self.world_size]:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.global_batches()[self.rank :: self.world_size])


def padded_length(longest: int, multiple: int, max_length: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, but not past ``max_length`` (nor below ``longest``)."""
    if multiple <= 1:
        return longest
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, max_length or rounded))


class Collator:
    """Pads a list of examples to the longest in the batch (never to a global maximum).

    ``pad_multiple`` > 1 rounds that length up to a multiple of it, but not past ``max_length`` (CUDA: each new
    (batch, length) shape costs cuDNN a set-up, so lengths come in multiples of 64, at most 8 at 512 tokens).
    ``pad_to`` pads every batch to exactly that length instead. An empty sequence (a tokenizer without special tokens,
    an empty text) reads one pad token (zero embedding), so it still has a length.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, pad_multiple: int = 1, max_length: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to
        self.pad_multiple, self.max_length = pad_multiple, max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = self.pad_to or padded_length(max(1, *(len(r["input_ids"]) for r in rows)), self.pad_multiple,
                                               self.max_length)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            x = r["input_ids"][:longest]
            ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask = ids.ne(self.pad_id)
        mask[[i for i, r in enumerate(rows) if len(r["input_ids"]) == 0], 0] = True  # see the class docstring
        out = {"input_ids": ids, "attention_mask": mask}
        if "label" in rows[0]:
            out["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return out


def make_loader(ds, cfg: Config, pad_id: int, device: torch.device | None = None, epoch: int | None = None,
                dist: Dist = Dist()) -> torch.utils.data.DataLoader:
    """A DataLoader over a tokenized split. Rows are read from Arrow per batch (no full copy).

    ``epoch``: a training loader for that epoch (shuffled by (seed, epoch), batches of ``cfg.batch_size`` split over
    ``dist``'s ranks); None: an evaluation loader (in order, ``cfg.eval_batch_size``). ``device`` (default:
    ``cfg.device`` resolved) is where the batches go: on CUDA, batch lengths are rounded up to multiples of
    ``CUDA_PAD_MULTIPLE`` and batches come in pinned memory (for ``non_blocking`` copies); on CPU neither. Each loader
    has its own seeded generator, so making or iterating a loader never draws from torch's global RNG (which dropout
    uses): training's randomness does not depend on how many loaders a run makes."""
    cuda = (device if device is not None else resolve_device(cfg.device)).type == "cuda"
    train = epoch is not None
    lengths = np.asarray(ds["length"], dtype=np.int64)
    ds = ds.select_columns(["input_ids", "label"]).with_format("numpy")
    sampler = LengthBucketSampler(lengths, cfg.batch_size // dist.world_size if train else cfg.eval_batch_size,
                                  shuffle=train, bucket=cfg.bucket_by_length, seed=cfg.seed, dist=dist)
    sampler.set_epoch(epoch or 0)
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=Collator(pad_id, None, CUDA_PAD_MULTIPLE if cuda else 1, cfg.max_length),
        num_workers=cfg.num_workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(cfg.seed + (epoch or 0)),
    )


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
                   amp_dtype: torch.dtype | None = None, threads: CPUThreads | None = None):
    """Run ``model`` (in eval mode) over ``batches`` (a loader's, or Collator outputs): per batch, yields
    (its fp32 logits on ``device``, the batch). ``threads.update()`` runs before each batch."""
    model.eval()
    for batch in batches:
        if threads is not None:
            threads.update()
        # CUDA: the packed LSTM needs the lengths on the host; from the batch they cost no wait for the GPU
        extra = {"host_lengths": batch["attention_mask"].sum(dim=1)} if device.type == "cuda" else {}
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(ids, mask, **extra).float()
        yield logits, batch
