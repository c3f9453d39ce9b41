"""Load a trained model and predict labels and class probabilities for raw texts.

``Predictor.from_run("outputs/R").predict(["a text", ...])`` → per text: the label name, its class
index and the probability of every class. ``Predictor.explain(text)`` also says which tokens pushed
the decision (see :mod:`hybridlib.explain`). ``Predictor.from_run(R, ensemble=True)`` serves the run's
model + baseline ensemble instead (the row of metrics.json "ensembles", same stack); explain() always
explains the neural model alone. Texts are read as in training (:meth:`Predictor.encode`); an empty one is
classified from the special tokens alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hybridlib.baselines import load_baseline, load_ensemble
from hybridlib.batching import Collator, predict_logits
from hybridlib.checkpoints import check_compatible, checkpoint_config, load_checkpoint, model_from_checkpoint
from hybridlib.errors import CheckpointError, DataError
from hybridlib.explain import explain
from hybridlib.files import METRICS_FILE, MODEL_FILE, TOKENIZER_DIR, read_json
from hybridlib.model import SideThread
from hybridlib.runtime import CUDA_PAD_MULTIPLE, resolve_device
from hybridlib.threads import CPUThreads
from hybridlib.tokens import encode_texts, load_tokenizer, shorten


class Predictor:
    """Predict with a trained run: ``Predictor.from_run("outputs/R").predict("a text")``."""

    def __init__(self, model, tokenizer, checkpoint: dict[str, Any], device: torch.device, batch_size: int = 64,
                 num_threads: int | None = None):
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.device, self.batch_size, self.num_threads = device, batch_size, num_threads
        # we truncate ourselves: silence "sequence length is longer than the specified maximum"
        self.tokenizer.model_max_length = 1 << 30
        self.cfg = checkpoint_config(checkpoint)
        self.label_names: list[str] = list(checkpoint["label_names"])
        self.pad_id: int = int(checkpoint["tokenizer"]["pad_id"])
        # batches as in training and evaluation (CUDA: lengths in multiples of 64, a few shapes cuDNN sets up once)
        self.collate = Collator(self.pad_id, None, CUDA_PAD_MULTIPLE if device.type == "cuda" else 1,
                                self.cfg.max_length)
        model.side_thread = SideThread()  # one-thread CPU calls: the CNN beside the BiLSTM (HybridClassifier)
        self.baseline = self.combine = None  # set by use_ensemble(): texts -> class probabilities; the ensemble
        self._auto: CPUThreads | None = None  # the thread policy of large calls (made on first use)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", tokenizer: str | None = None,
                        batch_size: int = 64, num_threads: int | None = None) -> Predictor:
        """Load ``model.pt``; the tokenizer comes from ``tokenizer/`` beside it, else the one named in it.

        ``device``: "cpu" (default), "cuda", "cuda:N" or "auto". ``batch_size``: texts per forward pass.
        ``num_threads`` (CPU): torch threads while predicting; None = one thread for calls of at most
        8 texts (interactive use: several threads only add synchronisation, and stall when the CPU is
        busy), the automatic policy of :class:`hybridlib.threads.CPUThreads` for larger calls.
        """
        path = Path(path)
        ckpt = load_checkpoint(path, map_location="cpu")
        local = path.parent / TOKENIZER_DIR
        tok = load_tokenizer(tokenizer or (str(local) if local.is_dir() else ckpt["tokenizer"]["name"]))
        check_compatible(ckpt, vocab_size=len(tok))
        dev = resolve_device(device)
        return cls(model_from_checkpoint(ckpt, dev), tok, ckpt, dev, batch_size, num_threads)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", batch_size: int = 64,
                 num_threads: int | None = None, ensemble: bool = False) -> Predictor:
        """Load a finished run folder (its ``model.pt`` and ``tokenizer/``); arguments as from_checkpoint.

        ``ensemble``: predict with the model + baseline ensemble the run's evaluation measured (see use_ensemble).
        """
        run_dir = Path(run_dir)
        if not (run_dir / MODEL_FILE).is_file():
            raise CheckpointError(f"{run_dir} holds no {MODEL_FILE}: it is not a finished run (train it first).")
        predictor = cls.from_checkpoint(run_dir / MODEL_FILE, device, batch_size=batch_size, num_threads=num_threads)
        if ensemble:
            predictor.use_ensemble(run_dir)
        return predictor

    def use_ensemble(self, run_dir: str | Path) -> None:
        """Combine the model with the run's classic baseline as its evaluation did (metrics.json "ensembles": the
        stack fitted on validation; a probability average in runs made before it), so predictions match the
        reported figure. The baseline is NB-LR (nblr.npz), or TF-IDF + LR (tfidf_logreg.npz) in runs made before it."""
        run_dir = Path(run_dir)
        try:
            ensembles = read_json(run_dir / METRICS_FILE)["ensembles"]
            name = next(n for n in ("nblr", "tfidf_logreg") if f"model+{n}" in ensembles)
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            raise CheckpointError(
                f"{run_dir} has no model + baseline ensemble in metrics.json: the run was not evaluated yet "
                f"(03_evaluation), or with baseline: false. Predict without the ensemble."
            ) from None
        try:
            combine = load_ensemble(ensembles[f"model+{name}"], len(self.label_names))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{run_dir / METRICS_FILE}: its model+{name} ensemble is damaged ({e}). "
                                  f"Evaluate the run again (03_evaluation) to rewrite it.") from None
        self.baseline, self.combine = load_baseline(run_dir, name, len(self.label_names)), combine

    @contextlib.contextmanager
    def threads(self, n_texts: int):
        """Run torch on CPU with the thread count chosen for a call of ``n_texts`` texts (see from_checkpoint);
        yields the automatic policy (update() it before each batch: it re-checks the free cores), else None."""
        n = self.num_threads or (1 if n_texts <= 8 else None)
        if self.device.type != "cpu":
            yield None
            return
        if n is None:
            if self._auto is None:
                self._auto = CPUThreads(None, self.device)
            yield self._auto
            return
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield None
        finally:
            torch.set_num_threads(before)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model reads them: as training and evaluation tokenize (:func:`hybridlib.tokens.encode_texts`);
        a very long text is first cut to the parts the model reads (:func:`hybridlib.tokens.shorten`)."""
        cfg = self.cfg
        short = [shorten(self.tokenizer, t, cfg.max_length, cfg.truncation)[0] for t in texts]
        return encode_texts(self.tokenizer, short, cfg.max_length, cfg.truncation)[0]

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_classes); batches of ``batch_size``."""
        ids = self.encode(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch
        chunks = [order[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        batches = (self.collate([{"input_ids": ids[i]} for i in idx]) for idx in chunks)
        probs = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        with self.threads(len(texts)) as threads:
            for idx, (logits, _) in zip(chunks, predict_logits(self.model, batches, self.device, None, threads)):
                probs[idx] = torch.softmax(logits, dim=1).cpu().numpy()
        if self.baseline is not None:
            probs = self.combine(probs, self.baseline(list(texts))).astype(np.float32)
        return probs

    def result(self, probs: np.ndarray) -> dict[str, Any]:
        """One text's result from its class probabilities: ``label``, ``index``, ``probabilities``."""
        k = int(probs.argmax())
        return {
            "label": self.label_names[k],
            "index": k,
            "probabilities": {n: float(v) for n, v in zip(self.label_names, probs, strict=True)},
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
        return [self.result(p) for p in self.predict_proba(list(texts))]

    def table(self, texts: str | list[str], digits: int = 3):
        """The predictions as a pandas DataFrame: text, label, then one probability column per class."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [{"text": t, "label": r["label"], **r["probabilities"]} for t, r in zip(texts, self.predict(texts), strict=True)]
        return pd.DataFrame(rows, columns=["text", "label", *self.label_names]).round(digits)

    def explain(self, text: str, method: str = "gradient", target: str | int | None = None) -> dict[str, Any]:
        """Predict one text and attribute the decision to its tokens; see :func:`hybridlib.explain.explain`."""
        with self.threads(1):
            return explain(self, text, method=method, target=target)
