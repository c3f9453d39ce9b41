"""Tiny synthetic data, tokenizer and params for fast tests (and for running the notebooks in tests).

Plain functions, no pytest dependency: ``tests/conftest.py`` wraps them in fixtures, and a
notebook-running hook can call them directly to build a tiny data folder, tokenizer and params file.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

LABEL_NAMES = ["sports", "business", "science"]

# fmt: off
KEYWORDS = {
    "sports": [
        "football", "soccer", "goal", "match", "team", "coach", "player", "league", "tennis", "score",
        "stadium", "championship", "season", "referee", "striker", "tournament", "olympic", "basketball",
    ],
    "business": [
        "market", "stock", "shares", "profit", "company", "investor", "bank", "revenue", "economy", "price",
        "merger", "earnings", "trade", "dollar", "quarter", "inflation", "budget", "sales",
    ],
    "science": [
        "research", "scientists", "study", "experiment", "laboratory", "space", "planet", "cells", "physics",
        "species", "telescope", "climate", "genome", "energy", "theory", "molecule", "biology", "galaxy",
    ],
}

FILLER = [
    "the", "a", "of", "and", "in", "on", "for", "with", "new", "after", "report", "said", "year", "today",
    "people", "week", "first", "last", "news", "about", "over", "more", "this", "that", "from", "their",
    "big", "latest", "during", "city", "world", "officials", "group", "some", "many", "time",
]
# fmt: on

_EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> tuple[list[str], list[int]]:
    """``n`` synthetic sentences and their class ids (0..2, balanced, shuffled); deterministic given ``seed``.

    Each text mixes words of its class's keyword list (about 40%, at least one) with shared filler words,
    so a tiny model can learn the task in an epoch or two.
    """
    rng = random.Random(seed)
    labels = [i % len(LABEL_NAMES) for i in range(n)]
    rng.shuffle(labels)
    texts = []
    for y in labels:
        kw = KEYWORDS[LABEL_NAMES[y]]
        length = rng.randint(min_words, max_words)
        words = [rng.choice(kw) if rng.random() < 0.4 else rng.choice(FILLER) for _ in range(length)]
        words[rng.randrange(length)] = rng.choice(kw)  # at least one keyword
        text = " ".join(words)
        texts.append(text[0].upper() + text[1:] + ".")
    return texts, labels


def write_rows(rows: dict[str, list], path: Path, fmt: str) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for rec in df.to_dict(orient="records"):
                f.write(json.dumps(rec) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; use parquet, csv or jsonl")


def make_tiny_dataset(
    folder: str | Path,
    n_train: int = 240,
    n_test: int = 80,
    fmt: str = "parquet",
    string_labels: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``train.<ext>`` and ``test.<ext>`` (columns text, label) into ``folder``; return the folder."""
    if fmt not in _EXT:
        raise ValueError(f"unknown format {fmt!r}; use parquet, csv or jsonl")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        texts, labels = make_texts(n, seed=s)
        lab: list[Any] = [LABEL_NAMES[y] for y in labels] if string_labels else labels
        write_rows({"text": texts, "label": lab}, folder / f"{split}.{_EXT[fmt]}", fmt)
    return folder


def make_tiny_tokenizer(folder: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 400) -> Path:
    """Build a small lowercase WordPiece vocabulary from ``texts``; write vocab.txt + tokenizer_config.json.

    Deterministic (the same texts always give the same ids): the specials ([PAD]=0, [UNK], [CLS],
    [SEP], [MASK]), every character alone and as a ``##`` continuation, the words by frequency, then
    the most frequent word endings as ``##`` pieces, up to ``vocab_size``. (``tokenizers``' WordPiece
    trainer breaks frequency ties differently on every call, so tiny models trained on its ids vary.)
    ``transformers.AutoTokenizer.from_pretrained(folder)`` then loads a fast BERT tokenizer. Returns the folder.
    """
    from collections import Counter

    from tokenizers.pre_tokenizers import BertPreTokenizer

    if texts is None:
        texts = make_texts(600, seed=12345)[0]
    pre = BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t.lower()))
    chars = sorted({c for w in words for c in w})
    endings = Counter()
    for w, n in words.items():
        for i in range(1, len(w) - 1):
            endings["##" + w[i:]] += n

    def ranked(counts: Counter) -> list[str]:  # most frequent first, ties alphabetical
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    for tok in ranked(words) + ranked(endings):
        if len(vocab) >= vocab_size:
            break
        if tok not in vocab:
            vocab.append(tok)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}, indent=2),
        encoding="utf-8",
    )
    return folder


def tiny_params(data_dir: str | Path, tokenizer_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The params of a tiny, fast run on the tiny data (as a dict; keys checked against Config)."""
    from hybridlib.config import FIELDS

    params: dict[str, Any] = {
        "dataset": "tiny",
        "data_dir": str(data_dir),
        "tokenizer": str(tokenizer_dir),
        "label_names": list(LABEL_NAMES),
        "val_size": 0.2,
        "max_length": 64,
        "embed_dim": 16,
        "embed_dropout": 0.0,
        "lstm_hidden": 16,
        "cnn_kernel_sizes": [3, 4, 5],
        "cnn_filters": 8,
        "mlp_hidden": 16,
        "dropout": 0.1,
        "epochs": 2,
        "batch_size": 16,
        "eval_batch_size": 64,
        "lr": 0.01,
        "patience": 0,
        "device": "cpu",
        "precision": "fp32",
        "num_threads": 1,
        "seed": 0,
    }
    if "baseline" in FIELDS:
        params["baseline"] = False
    params.update(overrides)
    unknown = [k for k in params if k not in FIELDS]
    if unknown:
        raise KeyError(f"tiny_params: {unknown} are not fields of hybridlib.config.Config")
    return params


def write_tiny_params(path: str | Path, data_dir: str | Path, tokenizer_dir: str | Path, **overrides: Any) -> Path:
    """Write the tiny params (see :func:`tiny_params`) as YAML to ``path``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(tiny_params(data_dir, tokenizer_dir, **overrides), sort_keys=False), encoding="utf-8"
    )
    return path


def load_benchmark(name: str) -> Any:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- runs made before NB-LR

# what TfidfVectorizer.transform needs besides the vocabulary and idf, as hybridlib saved it before NB-LR
_VECTORIZER_KEYS = ("lowercase", "strip_accents", "token_pattern", "ngram_range", "analyzer", "norm", "use_idf",
                    "smooth_idf", "sublinear_tf", "dtype")


def fit_tfidf_logreg(texts: list[str], labels: list[int]) -> Any:
    """A TF-IDF 1-2-gram + LR pipeline, the baseline of runs made before NB-LR."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode")
    return Pipeline([("tfidf", vec), ("logreg", LogisticRegression(C=4.0, max_iter=2000))]).fit(texts, labels)


def save_tfidf_logreg(pipe: Any, path: str | Path) -> None:
    """Write ``pipe`` as hybridlib wrote tfidf_logreg.npz before NB-LR (vocabulary, idf, coefficients; no pickle)."""
    import numpy as np

    vec, clf = pipe.named_steps["tfidf"], pipe.named_steps["logreg"]
    params = {k: v for k, v in vec.get_params().items() if k in _VECTORIZER_KEYS}
    params["dtype"] = np.dtype(params["dtype"]).name
    np.savez_compressed(
        path, terms=np.frombuffer("\n".join(vec.get_feature_names_out()).encode("utf-8"), dtype=np.uint8),
        idf=vec.idf_, coef=clf.coef_, intercept=clf.intercept_, classes=clf.classes_,
        params=np.frombuffer(json.dumps(params).encode("utf-8"), dtype=np.uint8))
