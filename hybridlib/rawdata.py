"""Raw data: find and load the train and test splits (local files or the hub), check their columns, and
encode the labels as class ids."""

from __future__ import annotations

import codecs
import json
import math
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hybridlib.config import Config
from hybridlib.errors import ConfigError, DataError
from hybridlib.hub import go_offline, hub_reachable
from hybridlib.locations import data_folder

DATA_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


def _split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{split}{ext}" for ext in DATA_EXTENSIONS if (folder / f"{split}{ext}").is_file()]
    if not found:
        have = sorted(p.name for p in folder.iterdir() if p.suffix in DATA_EXTENSIONS)
        raise DataError(
            f"Split '{split}' not found in {folder}: expected {split}.parquet, {split}.csv or {split}.jsonl; "
            f"the folder holds {have or 'no data files'}. Rename the file or set train_split/test_split."
        )
    if len(found) > 1:
        raise DataError(f"Split '{split}' is in {len(found)} files in {folder}: {[p.name for p in found]}. Keep one "
                        f"(move the others out of the folder).")
    return found[0]


def _is_empty_file(path: Path) -> bool:
    """True if a data file holds no rows (a csv may still hold its header line)."""
    try:
        if path.suffix == ".parquet":
            return pq.read_metadata(path).num_rows == 0
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = sum(1 for line in f if line.strip())
        return lines <= (1 if path.suffix == ".csv" else 0)
    except Exception:
        return False


def load_raw(cfg: Config):
    """A DatasetDict with the train and test splits, from local files or the hub."""
    folder = data_folder(cfg)
    splits = {"train": cfg.train_split, "test": cfg.test_split}
    if folder is not None:
        files = {key: _split_file(folder, split) for key, split in splits.items()}
        kinds = {DATA_EXTENSIONS[p.suffix] for p in files.values()}
        if len(kinds) > 1:
            raise DataError(f"Train and test files in {folder} have different formats ({kinds}); use one format.")
        kind = kinds.pop()
        options = _encoding_option(cfg, kind)
        try:
            raw = datasets.load_dataset(kind, data_files={k: str(p) for k, p in files.items()}, **options)
        except Exception as e:
            for key, p in files.items():  # an empty file makes datasets fail with an obscure message
                if _is_empty_file(p):
                    raise DataError(
                        f"The {splits[key]} split ({p}) is empty; it needs at least one row. Fill it or point "
                        f"{key}_split at another file."
                    ) from None
            if _caused_by(e, UnicodeDecodeError):  # name the file and line, which datasets does not
                for p in files.values():
                    _check_decodes(p, cfg.encoding)
            for p in files.values():
                if p.suffix == ".jsonl":
                    _check_json_lines(p, cfg.encoding)
            cause = e.__cause__ or e.__context__
            detail = f"{e} ({type(cause).__name__}: {cause})" if cause is not None else str(e)
            raise DataError(f"Could not read the data files in {folder}: {detail}") from None
        for key, p in files.items():  # pyarrow's json reader keeps bytes that are not UTF-8 (tokenizing would fail)
            if kind == "json" and not _valid_utf8(raw[key]):
                _check_decodes(p, cfg.encoding)
        return raw

    offline = not hub_reachable()
    if offline:
        go_offline()
    try:
        raw = datasets.load_dataset(cfg.dataset)
    except Exception as e:
        if offline:
            raise DataError(
                f"Dataset '{cfg.dataset}' cannot be loaded: the Hugging Face hub is unreachable (offline) and it is "
                f"not in the local cache. Point data_dir at a folder of local files (-p data_dir DIR, DIR holding "
                f"train.parquet and test.parquet), or set HYBRIDLIB_DATA_DIR to a folder holding {cfg.dataset}/."
            ) from None
        raise DataError(f"Could not load dataset '{cfg.dataset}' from the hub: {e}") from None
    missing = [s for s in splits.values() if s not in raw]
    if missing:
        raise DataError(
            f"Dataset '{cfg.dataset}' has no split {missing}; it has {list(raw)}. Set train_split/test_split."
        )
    return datasets.DatasetDict({key: raw[split] for key, split in splits.items()})


def _encoding_option(cfg: Config, kind: str) -> dict[str, str]:
    """``encoding=`` for datasets' csv/json builders (only when not UTF-8, so the usual cache keys stay as they were)."""
    try:
        name = codecs.lookup(cfg.encoding).name
    except LookupError:
        raise ConfigError(
            f"Parameter 'encoding': {cfg.encoding!r} is not a text encoding Python knows. Use the encoding of the "
            f"data files, e.g. utf-8 (the default), latin-1 or cp1252."
        ) from None
    return {"encoding": cfg.encoding} if kind != "parquet" and name != "utf-8" else {}


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _valid_utf8(ds) -> bool:
    try:
        ds.data.table.validate(full=True)  # checks every string in C++, without copying the column
    except pa.ArrowInvalid:
        return False
    return True


def _check_decodes(path: Path, encoding: str) -> None:
    """Raise a DataError naming the first line of ``path`` that is not valid ``encoding`` text (the file, line,
    column and bytes), and the two fixes."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as e:
                bad = " ".join(f"0x{b:02x}" for b in line[e.start:e.end])
                text = line[max(0, e.start - 30): e.end + 30].decode(encoding, errors="replace").strip()
                raise DataError(
                    f"{path} is not valid {encoding} text: line {number}, byte {e.start + 1} of the line is {bad} "
                    f"(in \"{text}\"). Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set the "
                    f"parameter encoding to the file's encoding (-p encoding latin-1, or encoding: cp1252 in the "
                    f"params file)."
                ) from None


def _check_json_lines(path: Path, encoding: str) -> None:
    """Raise a DataError naming the first line of a .jsonl file that is not one JSON object (file, line, why)."""
    with open(path, encoding=encoding, errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                ok = not line.strip() or isinstance(json.loads(line), dict)
            except ValueError as e:
                ok, why = False, str(e)
            else:
                why = "not an object"
            if not ok:
                raise DataError(f"{path}, line {number}: not one JSON object ({why}). Each line of a .jsonl file "
                                f"holds one object, e.g. {{\"text\": \"...\", \"label\": 0}}; fix or remove that line.")


def natural_key(value) -> list:
    """Sort key that orders the numbers inside labels by value: "2 stars" before "10 stars"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(value)) if part]


def _check_columns(ds, cfg: Config, split: str) -> None:
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


def _float_labels_as_ids(raw, distinct: set):
    """Integral float labels (0.0, 1.0, ...: what pandas writes for an int column that once held a missing value)
    as int class ids, (DatasetDict, distinct ids); any other float is refused, naming it."""
    bad = sorted(v for v in distinct if not (math.isfinite(v) and float(v).is_integer()))
    if bad:
        raise DataError(
            f"Labels {[float(v) for v in bad[:10]]} are not class ids: float labels must be whole numbers (0.0, 1.0, "
            f"2.0 are read as the class ids 0, 1, 2). Fix the label column, or store the labels as integers or "
            f"strings."
        )
    return raw.cast_column("label", datasets.Value("int64")), {int(v) for v in distinct}


def encode_labels(raw, cfg: Config):
    """Rename columns to text/label, make labels a ClassLabel, return (DatasetDict, label_names)."""
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
    if any(isinstance(v, (float, np.floating)) for v in distinct):
        raw, distinct = _float_labels_as_ids(raw, distinct)
    is_int = all(isinstance(v, (int, np.integer)) for v in distinct)
    values = sorted(distinct) if is_int else sorted(distinct, key=natural_key)  # "2 stars" before "10 stars"
    if cfg.label_names:
        names = list(cfg.label_names)
        allowed = set(range(len(names))) if is_int else set(names)
        bad = [v for v in values if v not in allowed]
        if bad:
            expect = f"ids 0..{len(names) - 1}" if is_int else f"one of {names}"
            ids = " They look like class ids written as text: write them as numbers in the data." \
                if all(str(v).isdigit() for v in values) else ""
            raise DataError(
                f"Labels {bad[:10]} are outside label_names {names} (expected {expect}). "
                f"Fix label_names or the data.{ids}"
            )
    else:
        if is_int and values != list(range(len(values))):
            raise DataError(
                f"Integer labels must be 0..K-1, got {values[:10]}. Map them to 0..K-1 or give label_names."
            )
        names = [str(v) for v in values]
    if len(names) < 2:
        raise DataError(f"Classification needs at least 2 classes; the data has {names}.")
    if not is_int:
        index = {n: i for i, n in enumerate(names)}
        raw = raw.map(lambda b: {"label": [index[str(v)] for v in b["label"]]}, batched=True, desc="labels")
    return raw.cast_column("label", datasets.ClassLabel(names=names)), names
