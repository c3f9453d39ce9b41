"""The data a run trains and evaluates on: raw splits → labels → token ids (tokenized once, cached by
``datasets``) → train/validation/test. ``prepare_data`` runs all of it; every notebook calls it and gets
the same splits without tokenizing twice.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from hybridlib.config import Config
from hybridlib.errors import DataError
from hybridlib.hub import hub_reachable
from hybridlib.locations import data_folder, pin_locations
from hybridlib.rawdata import encode_labels, load_raw
from hybridlib.runtime import resolve_device, resolve_precision
from hybridlib.tokens import encode_texts, load_tokenizer, tokenizer_fingerprint


def tokenize(dsd, tok, cfg: Config):
    """Add input_ids and length columns to every split; cached by datasets under a stable fingerprint."""
    fp = tokenizer_fingerprint(tok)

    def fn(batch: dict[str, list]) -> dict[str, list]:
        ids, full = encode_texts(tok, batch["text"], cfg.max_length, cfg.truncation)
        return {"input_ids": ids, "length": [len(x) for x in ids], "full_length": full}

    out = {}
    for split, ds in dsd.items():
        key = f"{ds._fingerprint}-{fp}-{cfg.max_length}-{cfg.truncation}-v2"
        out[split] = ds.map(
            fn,
            batched=True,
            batch_size=1000,
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
            desc=f"Tokenizing {split}",
        )
    return datasets.DatasetDict(out)


TEST_SAMPLE_SEED = 0


def sample(dsd, cfg: Config):
    """A quick run's texts, taken before tokenizing (a quick run tokenizes only what it uses): at most
    max_train_samples training texts (seeded) and max_eval_samples test texts (one sample for every seed)."""
    out = dict(dsd)
    if cfg.max_train_samples and cfg.max_train_samples < len(out["train"]):
        out["train"] = out["train"].shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(out["test"]):  # the same test texts for runs over seeds
        out["test"] = out["test"].shuffle(seed=TEST_SAMPLE_SEED).select(range(cfg.max_eval_samples))
    return datasets.DatasetDict(out)


def split_train_val(dsd, cfg: Config):
    """train/validation (stratified, seeded) from train; test as given; at most max_eval_samples validation texts."""
    train, test = dsd["train"], dsd["test"]
    n_classes = train.features["label"].num_classes
    n_val = round(len(train) * cfg.val_size)
    if n_val < n_classes or len(train) - n_val < n_classes:
        raise DataError(
            f"val_size={cfg.val_size} of {len(train)} training rows leaves too few rows for {n_classes} classes "
            f"in train or validation. Use more training data (max_train_samples) or another val_size."
        )
    try:
        parts = train.train_test_split(test_size=n_val, stratify_by_column="label", seed=cfg.seed)
    except ValueError:  # a class too rare to stratify: fall back to a plain seeded split
        parts = train.train_test_split(test_size=n_val, seed=cfg.seed)
    val = parts["test"]
    counts = np.bincount(parts["train"].with_format("numpy")["label"], minlength=n_classes)
    if not counts.all():
        missing = [name for name, n in zip(train.features["label"].names, counts) if n == 0]
        warnings.warn(f"No training text has the class(es) {missing}: the model cannot learn them, and macro F1 counts "
                      f"them as 0. Add training texts for them, or leave them out of label_names.", stacklevel=2)
    if cfg.max_eval_samples and cfg.max_eval_samples < len(val):
        val = val.select(range(cfg.max_eval_samples))
    return datasets.DatasetDict({"train": parts["train"], "validation": val, "test": test})


def preflight(cfg: Config) -> None:
    """Fail before a run starts if its data or tokenizer cannot be found or loaded (local folders: pinned in ``cfg``)."""
    pin_locations(cfg)
    resolve_precision(cfg.precision, resolve_device(cfg.device))  # a device or precision this machine lacks
    problems = []
    try:
        load_tokenizer(cfg.tokenizer)
    except DataError as e:
        problems.append(str(e))
    if data_folder(cfg) is None and not hub_reachable():
        try:
            load_raw(cfg)  # offline: succeeds only from the local datasets cache
        except DataError as e:
            problems.append(str(e))
    if problems:  # offline, the tokenizer and the dataset may both be missing: both said at once
        raise DataError(" ".join(problems))


@dataclass
class Data:
    """What a run needs from the data side."""

    splits: Any  # datasets.DatasetDict with train/validation/test: text, label, input_ids, length
    label_names: list[str]
    tokenizer: Any
    tokenizer_id: str  # fingerprint of the vocabulary

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def prepare_data(cfg: Config, tokenizer=None) -> Data:
    """Load, check, tokenize (cached) and split the data described by ``cfg``."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    raw, names = encode_labels(load_raw(cfg), cfg)
    splits = split_train_val(tokenize(sample(raw, cfg), tok, cfg), cfg)
    return Data(splits=splits, label_names=names, tokenizer=tok, tokenizer_id=tokenizer_fingerprint(tok))
