"""Where things are: the project root, the path parameters of a params file, and the local data and tokenizer
folders that stand in for the Hugging Face hub. File-system checks only, so a missing folder is refused at once,
before datasets or transformers load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hybridlib.errors import ConfigError, DataError

# parameters that hold paths (relative ones are taken from the project root or the cwd: hybridlib.config.load_config)
PATH_FIELDS = ("data_dir", "pretrained_embeddings", "run_dir")
# pretrained_embeddings values that name a source, not a file (see hybridlib.embeddings)
NAMED_EMBEDDINGS = ("ppmi",)


def project_root() -> Path:
    """The folder holding notebooks/ and params/ (the repo), found from this package or the cwd."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here, Path.cwd(), *Path.cwd().parents):
        if (cand / "notebooks").is_dir() and (cand / "params").is_dir():
            return cand
    return Path.cwd()


def resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative path parameters absolute against ``base`` (tokenizer only if such a folder exists)."""
    out = dict(values)
    for key in PATH_FIELDS:
        if key == "pretrained_embeddings" and out.get(key) in NAMED_EMBEDDINGS:
            continue  # a named source, not a path
        if out.get(key) and not Path(out[key]).expanduser().is_absolute():
            out[key] = str((base / out[key]).resolve())
    tok = out.get("tokenizer")
    if tok and not Path(tok).is_absolute() and (base / tok).is_dir():
        out["tokenizer"] = str((base / tok).resolve())
    return out


def data_folder(cfg: Any) -> Path | None:
    """The local data folder of a Config: ``data_dir``, else ``$HYBRIDLIB_DATA_DIR/<dataset>`` when it exists; None: the hub."""
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


def tokenizer_folder(name: str) -> Path | None:
    """The local folder of tokenizer ``name`` (itself, or ``$HYBRIDLIB_TOKENIZERS_DIR/<name>``); None: a hub id.
    A name that can only be a path (``/``, ``.``, ``~``) must be an existing folder."""
    local = Path(name).expanduser()
    shelf = os.environ.get("HYBRIDLIB_TOKENIZERS_DIR")
    if not local.exists() and shelf and (Path(shelf) / name).is_dir():
        local = Path(shelf) / name  # e.g. $HYBRIDLIB_TOKENIZERS_DIR/bert-base-uncased
    if local.exists() and not local.is_dir():
        raise DataError(f"Tokenizer path '{name}' is a file; point 'tokenizer' at the folder holding vocab.txt.")
    if not local.exists() and name.startswith(("/", ".", "~")):
        raise DataError(f"Tokenizer folder '{name}' does not exist. Point 'tokenizer' at a folder holding "
                        f"vocab.txt (e.g. -p tokenizer ../shared/tokenizers/bert-base-uncased), or use a hub id.")
    return local if local.exists() else None


def embeddings_file(source: str) -> Path:
    """The file of word vectors ``pretrained_embeddings`` names (not a named source such as 'ppmi')."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained_embeddings: {source!r} is neither 'ppmi' nor an existing file. Point it at a "
                          f".pt/.npy/.safetensors matrix (vocab x dim), or use 'ppmi'.")
    return path


def pin_locations(cfg: Any) -> None:
    """Refuse a data folder or tokenizer folder that does not exist (file-system checks only: fast), and write the
    local folders found (also through the environment variables) into ``cfg`` as absolute paths: a run's
    params.yaml then says where its data came from, and its notebooks, which run in notebooks/, find them."""
    data = data_folder(cfg)
    tok = tokenizer_folder(cfg.tokenizer)
    if cfg.pretrained_embeddings and cfg.pretrained_embeddings not in NAMED_EMBEDDINGS:
        embeddings_file(cfg.pretrained_embeddings)
    if data is not None:
        cfg.data_dir = str(data.resolve())
    if tok is not None:
        cfg.tokenizer = str(tok.resolve())
