"""Tables and figures for 01_data_exploration: class balance, examples, token lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hybridlib.data import Data
from hybridlib.files import LENGTHS_FILE
from hybridlib.plots import plot_length_distribution


def class_balance(data: Data) -> pd.DataFrame:
    """Texts per class and split, with each class's share of its split."""
    cols = {}
    for split, ds in data.splits.items():
        counts = np.bincount(np.asarray(ds["label"]), minlength=len(data.label_names))
        cols[(split, "texts")] = counts
        cols[(split, "share")] = (counts / max(counts.sum(), 1)).round(3)
    return pd.DataFrame(cols, index=pd.Index(data.label_names, name="class"))


def examples(data: Data, per_class: int = 2, width: int = 300) -> pd.DataFrame:
    """The first ``per_class`` training texts of each class (cut to ``width`` characters)."""
    train = data.splits["train"]
    labels = np.asarray(train["label"])
    rows = []
    for k, name in enumerate(data.label_names):
        for i in np.flatnonzero(labels == k)[:per_class]:
            text = train[int(i)]["text"]
            rows.append({"class": name, "text": text[:width] + ("..." if len(text) > width else "")})
    return pd.DataFrame(rows)


def length_summary(data: Data, max_length: int) -> pd.DataFrame:
    """Token counts per split before truncation, and the share of texts cut at ``max_length``."""
    rows = {}
    for split, ds in data.splits.items():
        full = np.asarray(ds["full_length"])
        rows[split] = {
            "mean": full.mean(), "median": np.median(full), "p90": np.percentile(full, 90),
            "p99": np.percentile(full, 99), "max": full.max(),
            "truncated_share": (full > max_length).mean(),
            "tokens_kept_share": np.minimum(full, max_length).sum() / max(full.sum(), 1),
        }
    return pd.DataFrame(rows).T.round(3)


def plot_lengths(data: Data, cfg, run_dir: str | Path | None = None):
    """Histogram of training-text lengths against max_length; saved as token_lengths.png in the run."""
    path = Path(run_dir) / LENGTHS_FILE if run_dir and Path(run_dir).is_dir() else None
    return plot_length_distribution(data.splits["train"]["full_length"], cfg.max_length, path)
