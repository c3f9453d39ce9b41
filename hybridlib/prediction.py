"""Load a trained model and predict labels and class probabilities for raw texts.

``Predictor.from_run("outputs/R").predict(["a text", ...])`` → per text: the label name, its class
index and the probability of every class. ``Predictor.explain(text)`` also says which tokens pushed
the decision (see :mod:`hybridlib.explain`). ``Predictor.from_run(R, ensemble=True)`` serves the run's
model + TF-IDF ensemble instead (the row of metrics.json "ensembles", same weight); explain() always
explains the neural model alone.

Empty or whitespace-only texts are not an error: they are encoded as the tokenizer's special tokens
only ([CLS] [SEP] for BERT), so the model answers for "no evidence" (in practice: the class it leans
to by default). Texts longer than ``max_length`` tokens are truncated exactly as in training
(``truncation``: head, or head and tail); very long texts (a book) are shortened to the parts the
model would read before tokenizing, so a 1 MB text costs about as much as a short one.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.checkpoint import check_compatible, load_checkpoint
from hybridlib.config import config_from_dict
from hybridlib.data import encode_texts, load_tokenizer, special_tokens
from hybridlib.errors import CheckpointError, DataError
from hybridlib.model import build_model, for_loading
from hybridlib.runtime import resolve_device

_SPACE = re.compile(r"\s")


def _model_from(ckpt: dict[str, Any], device: torch.device | str):
    cfg = for_loading(config_from_dict(ckpt["config"]))
    model = build_model(cfg, ckpt["tokenizer"]["vocab_size"], len(ckpt["label_names"]), ckpt["tokenizer"]["pad_id"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", vocab_size: int | None = None, num_classes: int | None = None):
    """(model in eval mode on ``device``, checkpoint dict); refuses mismatched vocab/classes."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_compatible(ckpt, vocab_size, num_classes)
    return _model_from(ckpt, device), ckpt


class Predictor:
    """Predict with a trained run: ``Predictor.from_run("outputs/R").predict("a text")``."""

    def __init__(self, model, tokenizer, checkpoint: dict[str, Any], device: torch.device, batch_size: int = 64,
                 num_threads: int | None = None):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.device, self.batch_size, self.num_threads = device, batch_size, num_threads
        # we truncate ourselves: silence "sequence length is longer than the specified maximum"
        self.tokenizer.model_max_length = 1 << 30
        self.cfg = config_from_dict(checkpoint["config"])
        self.label_names: list[str] = list(checkpoint["label_names"])
        self.pad_id: int = int(checkpoint["tokenizer"]["pad_id"])
        prefix, suffix = special_tokens(tokenizer)
        self._n_special = len(prefix) + len(suffix)
        # texts longer than this many characters are cut to the parts the model reads (see _shorten)
        self._clip_chars = max(10_000, 40 * self.cfg.max_length)
        self.tfidf, self.tfidf_weight = None, 0.0  # set by use_ensemble()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", tokenizer: str | None = None,
                        batch_size: int = 64, num_threads: int | None = None) -> Predictor:
        """Load ``model.pt``; the tokenizer comes from ``tokenizer/`` beside it, else the one named in it.

        ``device``: "cpu" (default), "cuda", "cuda:N" or "auto". ``batch_size``: texts per forward pass.
        ``num_threads`` (CPU): torch threads while predicting; None = one thread for calls of at most
        8 texts (interactive use: several threads only add synchronisation, and stall badly when the
        CPU is busy), torch's setting for larger calls.
        """
        path = Path(path)
        ckpt = load_checkpoint(path, map_location="cpu")
        local = path.parent / "tokenizer"
        tok = load_tokenizer(tokenizer or (str(local) if local.is_dir() else ckpt["tokenizer"]["name"]))
        check_compatible(ckpt, vocab_size=len(tok))
        dev = resolve_device(device)
        return cls(_model_from(ckpt, dev), tok, ckpt, dev, batch_size, num_threads)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", batch_size: int = 64,
                 num_threads: int | None = None, ensemble: bool = False) -> Predictor:
        """Load a finished run folder (its ``model.pt`` and ``tokenizer/``); arguments as from_checkpoint.

        ``ensemble``: predict with the model + TF-IDF ensemble the run's evaluation measured (see use_ensemble).
        """
        run_dir = Path(run_dir)
        if not (run_dir / "model.pt").is_file():
            raise CheckpointError(f"{run_dir} holds no model.pt: it is not a finished run (train it first).")
        predictor = cls.from_checkpoint(run_dir / "model.pt", device, batch_size=batch_size, num_threads=num_threads)
        if ensemble:
            predictor.use_ensemble(run_dir)
        return predictor

    def use_ensemble(self, run_dir: str | Path) -> None:
        """Mix in the run's TF-IDF + LR baseline: ``(1 - w) * model + w * tfidf`` with the weight ``w`` its
        evaluation chose on validation (metrics.json "ensembles"), so predictions match the reported figure."""
        import json

        from hybridlib.baselines import TFIDF_FILE, load_tfidf_logreg

        run_dir = Path(run_dir)
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            weight = float(metrics["ensembles"]["model+tfidf_logreg"]["weight_other"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"{run_dir} has no model+TF-IDF ensemble in metrics.json: the run was not evaluated yet "
                f"(03_evaluation), or with baseline: false. Predict without the ensemble."
            ) from None
        pipe = load_tfidf_logreg(run_dir / TFIDF_FILE)
        classes = pipe.named_steps["logreg"].classes_
        if len(classes) and (classes.min() < 0 or classes.max() >= len(self.label_names)):
            raise CheckpointError(f"{run_dir / TFIDF_FILE} has classes {classes.tolist()}, the model "
                                  f"{len(self.label_names)} labels: they are not from the same run.")
        self.tfidf, self.tfidf_weight = pipe, weight

    @contextlib.contextmanager
    def threads(self, n_texts: int):
        """Run torch on CPU with the thread count chosen for a call of ``n_texts`` texts (see from_checkpoint)."""
        n = self.num_threads or (1 if n_texts <= 8 else None)
        before = torch.get_num_threads()
        if self.device.type != "cpu" or not n or n == before:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ encoding

    def _budget(self) -> tuple[int, int]:
        """(head, tail): how many text tokens the model reads from the start and from the end."""
        budget = max(self.cfg.max_length - self._n_special, 1)
        head = budget if self.cfg.truncation == "head" else budget // 4
        return head, budget - head

    def _shorten(self, text: str) -> tuple[str, int, int]:
        """(short text, cut, shift): a very long text cut to its head (and tail), at whitespace, when that
        provably keeps every token the model reads; ``cut``/``shift`` map positions back (see explain).
        Returns the text unchanged (cut = len) when it is short or the cut cannot be proven safe."""
        n, cap = len(text), self._clip_chars
        if n <= 2 * cap + 1:
            return text, n, 0
        head, tail = self._budget()
        h_end = max((m.start() for m in _SPACE.finditer(text, cap // 2, cap)), default=None)
        t_start = next((m.start() for m in _SPACE.finditer(text, n - cap, n - cap // 2)), None) if tail else n
        if h_end is None or t_start is None:  # no whitespace to cut at (e.g. one huge "word")
            return text, n, 0
        parts = [text[:h_end]] + ([text[t_start:]] if tail else [])
        counts = [len(x) for x in self.tokenizer(parts, add_special_tokens=False)["input_ids"]]
        if counts[0] < head or (tail and counts[1] < tail):
            return text, n, 0  # whitespace-heavy text: too few tokens in the kept parts
        if not tail:
            return parts[0], h_end, 0
        return parts[0] + " " + parts[1], h_end, t_start - h_end - 1

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model reads them (special tokens, truncated as in training)."""
        short = [self._shorten(t)[0] for t in texts]
        return encode_texts(self.tokenizer, short, self.cfg.max_length, self.cfg.truncation)[0]

    def batch_tensors(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) on the device, padded to the longest; an empty sequence becomes
        one pad token (zero embedding) so it still has a length."""
        ids = [x if x else [self.pad_id] for x in ids]
        longest = max(len(x) for x in ids)
        batch = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.bool)
        for row, x in enumerate(ids):
            batch[row, : len(x)] = torch.as_tensor(x)
            mask[row, : len(x)] = True
        return batch.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes); batches of ``batch_size``."""
        ids = self.encode(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch
        probs = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        with self.threads(len(texts)):
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch, mask = self.batch_tensors([ids[i] for i in idx])
                logits = self.model(batch, mask)
                probs[idx] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        if self.tfidf is not None:
            from hybridlib.baselines import mix_probs, tfidf_proba

            other = tfidf_proba(self.tfidf, list(texts), len(self.label_names))
            probs = mix_probs(probs, other, self.tfidf_weight).astype(np.float32)
        return probs

    def _result(self, p: np.ndarray) -> dict[str, Any]:
        k = int(p.argmax())
        return {
            "label": self.label_names[k],
            "index": k,
            "probabilities": {n: float(v) for n, v in zip(self.label_names, p, strict=True)},
        }

    def predict(self, texts: str | list[str]) -> list[dict[str, Any]]:
        """Per text: ``label`` (name), ``index`` and ``probabilities`` ({name: p}, summing to 1).

        One string gives a list of one result. Empty texts are classified from the special tokens alone.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise DataError("predict() takes a string or a list of strings.")
        if not texts:
            return []
        return [self._result(p) for p in self.predict_proba(list(texts))]

    def table(self, texts: str | list[str], digits: int = 3):
        """The predictions as a pandas DataFrame: text, label, then one probability column per class."""
        import pandas as pd

        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [{"text": t, "label": r["label"], **r["probabilities"]} for t, r in zip(texts, self.predict(texts), strict=True)]
        return pd.DataFrame(rows, columns=["text", "label", *self.label_names]).round(digits)

    def explain(self, text: str, method: str = "gradient", target: str | int | None = None) -> dict[str, Any]:
        """Predict one text and attribute the decision to its tokens; see :func:`hybridlib.explain.explain`."""
        from hybridlib.explain import explain

        with self.threads(1):
            return explain(self, text, method=method, target=target)
