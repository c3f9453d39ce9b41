"""Load a trained model and predict labels and class probabilities for raw texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.checkpoint import check_compatible, load_checkpoint
from hybridlib.config import config_from_dict
from hybridlib.data import encode_texts, load_tokenizer
from hybridlib.errors import CheckpointError, DataError
from hybridlib.model import build_model
from hybridlib.runtime import resolve_device


def load_model(path: str | Path, device: torch.device | str = "cpu", vocab_size: int | None = None, num_classes: int | None = None):
    """(model in eval mode on ``device``, checkpoint dict); refuses mismatched vocab/classes."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_compatible(ckpt, vocab_size, num_classes)
    cfg = config_from_dict(ckpt["config"])
    cfg.pretrained_embeddings = None  # the trained weights are in the checkpoint
    model = build_model(cfg, ckpt["tokenizer"]["vocab_size"], len(ckpt["label_names"]), ckpt["tokenizer"]["pad_id"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


class Predictor:
    """Predict with a trained run: ``Predictor.from_run("outputs/R").predict("a text")``."""

    def __init__(self, model, tokenizer, checkpoint: dict[str, Any], device: torch.device, batch_size: int = 64):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.device, self.batch_size = device, batch_size
        self.cfg = config_from_dict(checkpoint["config"])
        self.label_names: list[str] = list(checkpoint["label_names"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", tokenizer: str | None = None) -> Predictor:
        """Load ``model.pt``; the tokenizer comes from ``tokenizer/`` beside it, else the one named in it."""
        path = Path(path)
        ckpt = load_checkpoint(path)
        local = path.parent / "tokenizer"
        tok = load_tokenizer(tokenizer or (str(local) if local.is_dir() else ckpt["tokenizer"]["name"]))
        dev = resolve_device(device)
        model, ckpt = load_model(path, dev, vocab_size=len(tok))
        return cls(model, tok, ckpt, dev)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        run_dir = Path(run_dir)
        if not (run_dir / "model.pt").is_file():
            raise CheckpointError(f"{run_dir} holds no model.pt: it is not a finished run (train it first).")
        return cls.from_checkpoint(run_dir / "model.pt", device)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts, self.cfg.max_length, self.cfg.truncation)[0]

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes)."""
        ids = self.encode(texts)
        order = np.argsort([len(x) for x in ids])  # similar lengths share a batch
        probs = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        pad = self.checkpoint["tokenizer"]["pad_id"]
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            longest = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), longest), pad, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : len(ids[i])] = torch.as_tensor(ids[i])
            batch = batch.to(self.device)
            logits = self.model(batch, batch.ne(pad))
            probs[idx] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return probs

    def predict(self, texts: str | list[str]) -> list[dict[str, Any]]:
        """Per text: ``label`` (name), ``index`` and ``probabilities`` ({name: p}, summing to 1)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise DataError("predict() takes a string or a list of strings.")
        if not texts:
            return []
        probs = self.predict_proba(list(texts))
        out = []
        for p in probs:
            k = int(p.argmax())
            out.append({
                "label": self.label_names[k],
                "index": k,
                "probabilities": {n: float(v) for n, v in zip(self.label_names, p)},
            })
        return out
