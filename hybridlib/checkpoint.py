"""Checkpoints as plain dicts of tensors and plain types, written atomically, loaded safely.

``model.pt`` (best epoch): ``model``, ``config``, ``label_names``, ``tokenizer``, ``epoch``,
``best_metric``. ``last.pt`` (every epoch) adds ``optimizer``, ``scheduler``, ``rng``, ``history``,
``bad_epochs`` for ``--resume``. Both load with ``torch.load(..., weights_only=True)``: a file that
would need to run code to unpickle is refused.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.errors import CheckpointError

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files of atomic writes that a killed process left in ``folder``; return them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); clear errors for missing, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist. Pass the model.pt of a finished run (outputs/RUN/model.pt).")
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


def check_compatible(ckpt: dict[str, Any], vocab_size: int | None = None, num_classes: int | None = None) -> None:
    """Refuse a checkpoint whose vocabulary size or label count differs from what is in use."""
    want_vocab = ckpt["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab_size != want_vocab:
        raise CheckpointError(
            f"The checkpoint was trained with a vocabulary of {want_vocab} tokens, but the tokenizer in use has "
            f"{vocab_size}. Use the tokenizer it was trained with ({ckpt['tokenizer']['name']})."
        )
    have = len(ckpt["label_names"])
    if num_classes is not None and num_classes != have:
        raise CheckpointError(
            f"The checkpoint predicts {have} classes ({ckpt['label_names']}), but the data/params in use have "
            f"{num_classes}. Evaluate it on the dataset it was trained for, or set label_names to match."
        )


# ----------------------------------------------------------------------------- RNG state as plain types


def get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
