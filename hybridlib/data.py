"""Datasets and tokenizer: load (hub or local files), check, encode labels, tokenize once, split, batch.

The pipeline is ``load_raw`` → ``encode_labels`` → ``tokenize`` (cached by datasets, keyed by the
data, tokenizer and truncation settings) → ``split``. ``prepare_data`` runs all of it; every
notebook calls it and gets the same splits without tokenizing twice.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.config import Config
from hybridlib.errors import DataError

DATA_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
HUB_TIMEOUT_S = 3.0


# ----------------------------------------------------------------------------- hub access


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True if the Hugging Face hub answers an HTTP HEAD request within ``timeout`` (and offline mode is off).

    HTTP rather than a bare TCP connect: it goes through $HTTPS_PROXY like the hub clients do (a proxy-only
    network is online), and a middlebox that accepts connections but never answers (or answers with a
    certificate that is not the hub's) counts as offline instead of costing the clients' ~50 s of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() not in ("0", "false", ""):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/"
    result: list[bool] = []

    def probe() -> None:
        import urllib.error
        import urllib.request

        try:
            import ssl

            import certifi  # the CA bundle the hub clients use (the system's may be missing)

            context = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            context = None
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout, context=context).close()
            result.append(True)
        except urllib.error.HTTPError as e:  # it answered; 5xx: a proxy that cannot reach it, or the hub is down
            result.append(e.code < 500)
        except (OSError, ValueError):  # DNS, refused, timeout, TLS (URLError is an OSError)
            result.append(False)

    # in a thread: a DNS lookup that hangs is not covered by the socket timeout
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """Switch datasets/transformers/huggingface_hub to offline mode (cache only, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name: str):
    """A fast tokenizer from a local folder or a hub id (offline: cache only, clear error)."""
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    shelf = os.environ.get("HYBRIDLIB_TOKENIZERS_DIR")
    if not local.exists() and shelf and (Path(shelf) / name).is_dir():
        local = Path(shelf) / name  # e.g. $HYBRIDLIB_TOKENIZERS_DIR/bert-base-uncased
    if local.exists():
        if not local.is_dir():
            raise DataError(f"Tokenizer path '{name}' is a file; point 'tokenizer' at the folder holding vocab.txt.")
        try:
            tok = AutoTokenizer.from_pretrained(str(local), use_fast=True)
        except Exception as e:  # transformers raises many types here
            raise DataError(
                f"Could not load a tokenizer from folder '{name}': {e}. The folder needs tokenizer files "
                f"(vocab.txt + tokenizer_config.json, or tokenizer.json)."
            ) from None
    else:
        offline = not hub_reachable()
        if offline:
            go_offline()
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as e:
            if offline:
                raise DataError(
                    f"Tokenizer '{name}' is not a local folder and the Hugging Face hub is unreachable "
                    f"(offline). Point 'tokenizer' at a local folder (e.g. -p tokenizer ../shared/tokenizers/bert-base-uncased), "
                    f"or set HYBRIDLIB_TOKENIZERS_DIR to a folder holding {name}/."
                ) from None
            raise DataError(f"Could not load tokenizer '{name}': {e}") from None
    if not tok.is_fast:
        raise DataError(f"Tokenizer '{name}' has no fast (Rust) implementation; hybridlib needs a fast tokenizer.")
    if tok.pad_token_id is None:
        raise DataError(f"Tokenizer '{name}' defines no padding token; use a tokenizer with one (e.g. BERT's).")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the tokenizer's vocabulary and class (identifies it in caches and checkpoints)."""
    h = hashlib.sha256(type(tok).__name__.encode())
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    h.update(repr(getattr(tok, "do_lower_case", None)).encode())
    return h.hexdigest()[:16]


def special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text (BERT: [CLS] and [SEP])."""
    plain = tok("hello", add_special_tokens=False)["input_ids"]
    full = tok("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens and uncut.

    Calls the Rust tokenizer directly, and its batch encoder that skips character offsets (never used
    here) when it has one: ~20% less CPU than ``tok(texts)`` on IMDB, same ids. A backend configured to
    truncate or pad by itself goes through ``tok(...)``, which switches that off for the call.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def encode_texts(tok, texts: list[str], max_length: int, truncation: str) -> tuple[list[list[int]], list[int]]:
    """Token ids with special tokens, cut to ``max_length`` keeping the head (or head and tail),
    and each text's full length before the cut (for the truncation statistics of 01)."""
    prefix, suffix = special_tokens(tok)
    n_special = len(prefix) + len(suffix)
    budget = max(max_length - n_special, 1)
    head = budget if truncation == "head" else max(budget // 4, min(budget, 1))
    enc = token_ids(tok, texts)
    out = []
    for ids in enc:
        if len(ids) > budget:
            ids = ids[:head] + (ids[len(ids) - (budget - head) :] if budget > head else [])
        out.append(prefix + ids + suffix)
    return out, [len(ids) + n_special for ids in enc]


# ----------------------------------------------------------------------------- raw data


def resolve_data_dir(cfg: Config) -> Path | None:
    """The local data folder: ``data_dir``, else ``$HYBRIDLIB_DATA_DIR/<dataset>`` when it exists."""
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data_dir '{cfg.data_dir}' does not exist (or is not a folder). Point data_dir at a folder "
                f"holding {cfg.train_split}.parquet/.csv/.jsonl and {cfg.test_split}.*, or unset it to load "
                f"'{cfg.dataset}' from the Hugging Face hub."
            )
        return path
    root = os.environ.get("HYBRIDLIB_DATA_DIR")
    if root and (Path(root) / cfg.dataset).is_dir():
        return Path(root) / cfg.dataset
    return None


def _split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{split}{ext}" for ext in DATA_EXTENSIONS if (folder / f"{split}{ext}").is_file()]
    if not found:
        have = sorted(p.name for p in folder.iterdir() if p.suffix in DATA_EXTENSIONS)
        raise DataError(
            f"Split '{split}' not found in {folder}: expected {split}.parquet, {split}.csv or {split}.jsonl; "
            f"the folder holds {have or 'no data files'}. Rename the file or set train_split/test_split."
        )
    return found[0]


def _is_empty_file(path: Path) -> bool:
    """True if a data file holds no rows (a csv may still hold its header line)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = sum(1 for line in f if line.strip())
        return lines <= (1 if path.suffix == ".csv" else 0)
    except Exception:
        return False


def load_raw(cfg: Config):
    """A DatasetDict with the train and test splits, from local files or the hub."""
    import datasets

    folder = resolve_data_dir(cfg)
    splits = {"train": cfg.train_split, "test": cfg.test_split}
    if folder is not None:
        files = {key: _split_file(folder, split) for key, split in splits.items()}
        kinds = {DATA_EXTENSIONS[p.suffix] for p in files.values()}
        if len(kinds) > 1:
            raise DataError(f"Train and test files in {folder} have different formats ({kinds}); use one format.")
        try:
            return datasets.load_dataset(kinds.pop(), data_files={k: str(p) for k, p in files.items()})
        except Exception as e:
            for key, p in files.items():  # an empty file makes datasets fail with an obscure message
                if _is_empty_file(p):
                    raise DataError(
                        f"The {splits[key]} split ({p}) is empty; it needs at least one row. Fill it or point "
                        f"{key}_split at another file."
                    ) from None
            cause = e.__cause__ or e.__context__
            detail = f"{e} ({type(cause).__name__}: {cause})" if cause is not None else str(e)
            raise DataError(f"Could not read the data files in {folder}: {detail}") from None

    offline = not hub_reachable()
    if offline:
        go_offline()
    try:
        raw = datasets.load_dataset(cfg.dataset)
    except Exception as e:
        if offline:
            raise DataError(
                f"Dataset '{cfg.dataset}' cannot be loaded: the Hugging Face hub is unreachable (offline) and it is "
                f"not in the local cache. Point data_dir at local files (e.g. -p data_dir ../shared/data/imdb), or "
                f"set HYBRIDLIB_DATA_DIR to a folder holding {cfg.dataset}/train.parquet and test.parquet."
            ) from None
        raise DataError(f"Could not load dataset '{cfg.dataset}' from the hub: {e}") from None
    missing = [s for s in splits.values() if s not in raw]
    if missing:
        raise DataError(
            f"Dataset '{cfg.dataset}' has no split {missing}; it has {list(raw)}. Set train_split/test_split."
        )
    return datasets.DatasetDict({key: raw[split] for key, split in splits.items()})


def _check_columns(ds, cfg: Config, split: str) -> None:
    import datasets

    if cfg.text_column == cfg.label_column:
        raise DataError(
            f"text_column and label_column are both '{cfg.text_column}'; they must name two different columns "
            f"(the {split} split has {ds.column_names})."
        )
    for key in ("text_column", "label_column"):
        col = getattr(cfg, key)
        if col not in ds.column_names:
            raise DataError(
                f"Column '{col}' ({key}) is not in the {split} split; its columns are {ds.column_names}. "
                f"Set {key} to one of them."
            )
    if len(ds) == 0:
        raise DataError(f"The {split} split is empty; it needs at least one row.")
    text, label = ds.features[cfg.text_column], ds.features[cfg.label_column]
    if not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string", "null")):
        raise DataError(
            f"Column '{cfg.text_column}' (text_column) of the {split} split holds {text}, not text (strings). "
            f"Set text_column to the column with the texts; the columns are {ds.column_names}."
        )
    if not isinstance(label, (datasets.ClassLabel, datasets.Value)):
        raise DataError(
            f"Column '{cfg.label_column}' (label_column) of the {split} split holds {type(label).__name__} values, "
            f"not one label per row (an int or a string). Set label_column to the label column; the columns are "
            f"{ds.column_names}."
        )


def _check_nulls(ds, col: str, split: str) -> None:
    if ds._indices is None and ds.data.column(col).null_count == 0:
        return  # Arrow's null count: no copy of the column into Python (corpora larger than memory)
    nulls = [i for i, v in enumerate(ds[col]) if v is None]
    if nulls:
        raise DataError(
            f"Column '{col}' of the {split} split has {len(nulls)} missing value(s) (rows {nulls[:5]}"
            f"{' ...' if len(nulls) > 5 else ''}). Drop or fill those rows. (Empty strings are allowed: "
            f"they become a text of special tokens only.)"
        )


def encode_labels(raw, cfg: Config):
    """Rename columns to text/label, make labels a ClassLabel, return (DatasetDict, label_names)."""
    import datasets

    for split, ds in raw.items():
        _check_columns(ds, cfg, split)
    raw = raw.select_columns([cfg.text_column, cfg.label_column])
    renames = {c: n for c, n in ((cfg.text_column, "text"), (cfg.label_column, "label")) if c != n}
    if renames:  # all at once: label_column may be called "text" (or text_column "label")
        raw = raw.rename_columns(renames)
    for split, ds in raw.items():
        _check_nulls(ds, "text", split)
        _check_nulls(ds, "label", split)

    feature = raw["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(cfg.label_names or feature.names)
        if len(names) != feature.num_classes:
            raise DataError(
                f"label_names has {len(names)} names but the dataset's labels have {feature.num_classes} classes "
                f"({feature.names}). Give one name per class, or drop label_names."
            )
        return raw.cast_column("label", datasets.ClassLabel(names=names)), names

    distinct = set(raw["train"].unique("label")) | set(raw["test"].unique("label"))
    is_int = all(isinstance(v, (int, np.integer)) for v in distinct)
    values = sorted(distinct) if is_int else sorted(distinct, key=str)  # numeric order: 2 before 10
    if cfg.label_names:
        names = list(cfg.label_names)
        allowed = set(range(len(names))) if is_int else set(names)
        bad = [v for v in values if v not in allowed]
        if bad:
            expect = f"ids 0..{len(names) - 1}" if is_int else f"one of {names}"
            raise DataError(
                f"Labels {bad[:10]} are outside label_names {names} (expected {expect}). "
                f"Fix label_names or the data."
            )
    elif is_int:
        if values != list(range(len(values))):
            raise DataError(
                f"Integer labels must be 0..K-1, got {values[:10]}. Map them to 0..K-1 or give label_names."
            )
        names = [str(v) for v in values]
    else:
        names = [str(v) for v in values]
    if len(names) < 2:
        raise DataError(f"Classification needs at least 2 classes; the data has {names}.")
    if not is_int:
        index = {n: i for i, n in enumerate(names)}
        raw = raw.map(lambda b: {"label": [index[str(v)] for v in b["label"]]}, batched=True, desc="labels")
    return raw.cast_column("label", datasets.ClassLabel(names=names)), names


# ----------------------------------------------------------------------------- tokenize + split


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
    import datasets

    return datasets.DatasetDict(out)


def split_train_val(dsd, cfg: Config):
    """train/validation (stratified, seeded) from train; test as given; sample caps applied."""
    import datasets

    train, test = dsd["train"], dsd["test"]
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
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
    if cfg.max_eval_samples:
        if cfg.max_eval_samples < len(val):
            val = val.select(range(cfg.max_eval_samples))
        if cfg.max_eval_samples < len(test):
            test = test.shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
    return datasets.DatasetDict({"train": parts["train"], "validation": val, "test": test})


def preflight(cfg: Config) -> None:
    """Fail before a run starts if its data or tokenizer cannot be found (cheap checks only)."""
    load_tokenizer(cfg.tokenizer)
    if resolve_data_dir(cfg) is None and not hub_reachable():
        load_raw(cfg)  # offline: succeeds only from the local datasets cache, else a clear DataError


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
    splits = split_train_val(tokenize(raw, tok, cfg), cfg)
    return Data(splits=splits, label_names=names, tokenizer=tok, tokenizer_id=tokenizer_fingerprint(tok))


# ----------------------------------------------------------------------------- batching


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches of indices. With ``bucket``, texts of similar length share a batch.

    Shuffles by (seed, epoch), so a resumed run sees the same batches. With several processes,
    each rank takes every ``world_size``-th batch of the same global order (disjoint shards); the
    training batch list is padded by repetition so all ranks take the same number of steps.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool,
        bucket: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pool_batches: int = 50,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.bucket = batch_size, shuffle, bucket
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pool = batch_size * pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket:
            # sort within pools of ~50 batches: little padding, still random across pools
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


class Collator:
    """Pads a list of examples to the longest in the batch (never to a global maximum)."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = self.pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            x = r["input_ids"][:longest]
            ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": ids.ne(self.pad_id)}
        if "label" in rows[0]:
            out["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return out


def make_loader(
    ds,
    cfg: Config,
    pad_id: int,
    train: bool,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    bucket: bool | None = None,
    pad_to: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a tokenized split. Rows are read from Arrow per batch (no full copy)."""
    lengths = np.asarray(ds["length"], dtype=np.int64)
    ds = ds.select_columns(["input_ids", "label"]).with_format("numpy")
    sampler = LengthBucketSampler(
        lengths,
        batch_size=batch_size or (cfg.batch_size // world_size if train else cfg.eval_batch_size),
        shuffle=train,
        bucket=cfg.bucket_by_length if bucket is None else bucket,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=Collator(pad_id, pad_to),
        num_workers=cfg.num_workers,
    )
