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
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hybridlib.baselines import load_tfidf_logreg, mix_probs, tfidf_proba
from hybridlib.batching import padded_length
from hybridlib.checkpoints import check_compatible, checkpoint_config, load_checkpoint, model_from_checkpoint
from hybridlib.errors import CheckpointError, DataError
from hybridlib.explain import explain
from hybridlib.files import METRICS_FILE, MODEL_FILE, TFIDF_FILE, TOKENIZER_DIR, read_json
from hybridlib.model import HybridClassifier
from hybridlib.runtime import CUDA_PAD_MULTIPLE, resolve_device
from hybridlib.threads import CPUThreads
from hybridlib.tokens import encode_texts, load_tokenizer, special_tokens

_SPACE = re.compile(r"\s")
_side_thread: ThreadPoolExecutor | None = None  # runs the CNN branch beside the LSTM, see forward()


def _side() -> ThreadPoolExecutor:
    global _side_thread
    if _side_thread is None:
        _side_thread = ThreadPoolExecutor(1, thread_name_prefix="hybridlib-cnn")
    return _side_thread


def _forget_side_thread() -> None:  # a forked child has no copy of the thread: start a new one there
    global _side_thread
    _side_thread = None


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_side_thread)


def _branches_side_by_side(model: HybridClassifier, device: torch.device) -> bool:
    """Run the two branches concurrently? On a CPU when torch uses one thread and there is a second core
    (a call of a few texts would otherwise leave the other cores idle)."""
    return (model.lstm is not None and model.cnn is not None and device.type == "cpu"
            and torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1)


@torch.no_grad()
def forward(model: HybridClassifier, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's logits; on one CPU thread, its CNN branch runs on a second thread beside the BiLSTM."""
    if not _branches_side_by_side(model, ids.device):
        return model(ids, mask)
    x, mask, lengths = model.embed(ids, mask)

    def cnn() -> torch.Tensor:
        torch.set_num_threads(1)  # this thread's own OpenMP setting, as the caller's
        with torch.no_grad():
            return model.cnn(x, mask, lengths)

    beside = _side().submit(cnn)
    return model.classify({"lstm": model.lstm(x, mask, lengths), "cnn": beside.result()})


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
        # CUDA: batch lengths in multiples of 64, as in training (a few shapes, each set up once by cuDNN)
        self.pad_multiple = CUDA_PAD_MULTIPLE if device.type == "cuda" else 1
        prefix, suffix = special_tokens(tokenizer)
        self._n_special = len(prefix) + len(suffix)
        # texts longer than this many characters are cut to the parts the model reads (see _shorten)
        self._clip_chars = max(10_000, 40 * self.cfg.max_length)
        self.tfidf, self.tfidf_weight = None, 0.0  # set by use_ensemble()
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

        ``ensemble``: predict with the model + TF-IDF ensemble the run's evaluation measured (see use_ensemble).
        """
        run_dir = Path(run_dir)
        if not (run_dir / MODEL_FILE).is_file():
            raise CheckpointError(f"{run_dir} holds no {MODEL_FILE}: it is not a finished run (train it first).")
        predictor = cls.from_checkpoint(run_dir / MODEL_FILE, device, batch_size=batch_size, num_threads=num_threads)
        if ensemble:
            predictor.use_ensemble(run_dir)
        return predictor

    def use_ensemble(self, run_dir: str | Path) -> None:
        """Mix in the run's TF-IDF + LR baseline: ``(1 - w) * model + w * tfidf`` with the weight ``w`` its
        evaluation chose on validation (metrics.json "ensembles"), so predictions match the reported figure."""
        run_dir = Path(run_dir)
        try:
            metrics = read_json(run_dir / METRICS_FILE)
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
        """Run torch on CPU with the thread count chosen for a call of ``n_texts`` texts (see from_checkpoint);
        yields a function to call before each batch (the automatic policy re-checks the free cores there)."""
        n = self.num_threads or (1 if n_texts <= 8 else None)
        if self.device.type != "cpu":
            yield lambda: None
            return
        if n is None:
            if self._auto is None:
                self._auto = CPUThreads(None, self.device)
            yield self._auto.update
            return
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield lambda: None
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
        """(input_ids, attention_mask) on the device, padded to the longest (rounded up to ``pad_multiple``);
        an empty sequence becomes one pad token (zero embedding) so it still has a length."""
        ids = [x if x else [self.pad_id] for x in ids]
        longest = padded_length(max(len(x) for x in ids), self.pad_multiple, self.cfg.max_length)
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
        with self.threads(len(texts)) as before_batch:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch, mask = self.batch_tensors([ids[i] for i in idx])
                before_batch()
                logits = forward(self.model, batch, mask)
                probs[idx] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        if self.tfidf is not None:
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
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [{"text": t, "label": r["label"], **r["probabilities"]} for t, r in zip(texts, self.predict(texts), strict=True)]
        return pd.DataFrame(rows, columns=["text", "label", *self.label_names]).round(digits)

    def explain(self, text: str, method: str = "gradient", target: str | int | None = None) -> dict[str, Any]:
        """Predict one text and attribute the decision to its tokens; see :func:`hybridlib.explain.explain`."""
        with self.threads(1):
            return explain(self, text, method=method, target=target)
