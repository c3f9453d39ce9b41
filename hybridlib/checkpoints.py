"""Checkpoints (model.pt, last.pt; their keys: docs/architecture.md, "The run folder"): plain dicts of tensors and
plain types, written atomically and loaded with ``weights_only=True``, so a file that would run code is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from hybridlib.config import Config, load_config
from hybridlib.errors import CheckpointError
from hybridlib.files import atomic_write
from hybridlib.model import HybridClassifier, build_model

FORMAT_VERSION = 2  # 1: "config" held every Config field; 2: the data and model groups only


def model_checkpoint(model: torch.nn.Module, cfg: Config, data, epoch: int, best_metric: float) -> dict[str, Any]:
    """The plain dict saved as model.pt (``data``: a hybridlib.data.Data)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.group("data", "model"),
        "label_names": list(data.label_names),
        "tokenizer": {"name": cfg.tokenizer, "fingerprint": data.tokenizer_id, "vocab_size": data.vocab_size,
                      "pad_id": data.pad_id},
        "epoch": epoch,
        "best_metric": best_metric,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), checkpoint_size(ckpt))


def checkpoint_size(obj: Any) -> int:
    """About the bytes ``torch.save`` writes for ``obj``: each tensor storage once, a zip record per storage,
    and a margin for the pickled rest (history, RNG states)."""
    storages: dict[tuple[str, int], int] = {}
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            storages[(str(x.device), s.data_ptr())] = s.nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return sum(storages.values()) + 256 * len(storages) + 256 * 1024


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); clear errors for missing, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist. Pass the model.pt of a finished run (outputs/RUN/model.pt).")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"'{path}' is not a whole PyTorch checkpoint: torch.save writes a zip archive, and this "
                              f"file is not one (another kind of file, or one cut short). Pass the model.pt of a "
                              f"finished run (outputs/RUN/model.pt).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load '{path}': it contains objects other than tensors and plain types, which could run "
            f"code when loaded (weights_only=True rejected it: {str(e).splitlines()[0]}). Only load checkpoints "
            f"written by hybridlib from sources you trust."
        ) from None
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"'{path}' is not a hybridlib checkpoint (expected a dict with 'model' and 'config'). "
            f"Use the model.pt written by `hybridlib run`."
        )
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> Config:
    """The Config a checkpoint was trained with (fields it does not store: their defaults). Works for
    format 1 (every field; retired options at their "off" value are dropped, switched on are refused)."""
    return load_config(base=ckpt["config"])


def check_compatible(ckpt: dict[str, Any], vocab_size: int | None = None, label_names: list[str] | None = None) -> None:
    """Refuse a checkpoint whose vocabulary size or classes differ from what is in use."""
    want_vocab = ckpt["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab_size != want_vocab:
        raise CheckpointError(
            f"The checkpoint was trained with a vocabulary of {want_vocab} tokens, but the tokenizer in use has "
            f"{vocab_size}. Use the tokenizer it was trained with ({ckpt['tokenizer']['name']})."
        )
    have = list(ckpt["label_names"])
    if label_names is not None and list(label_names) != have:
        raise CheckpointError(
            f"The checkpoint predicts {len(have)} classes {have}, but the data in use has {len(label_names)}: "
            f"{list(label_names)}. Evaluate it on the dataset it was trained for, or, if the data's label ids mean "
            f"the checkpoint's classes, set label_names to {have}."
        )


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> HybridClassifier:
    """The checkpoint's model with its weights, in eval mode on ``device``."""
    model = build_model(checkpoint_config(ckpt), ckpt["tokenizer"]["vocab_size"], len(ckpt["label_names"]),
                        ckpt["tokenizer"]["pad_id"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", vocab_size: int | None = None,
               label_names: list[str] | None = None) -> tuple[HybridClassifier, dict[str, Any]]:
    """(model in eval mode on ``device``, checkpoint dict); refuses mismatched vocab/classes."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_compatible(ckpt, vocab_size, label_names)
    return model_from_checkpoint(ckpt, device), ckpt
