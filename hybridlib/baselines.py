"""The classic baseline every run is measured against: NB-LR (NBSVM with a logistic regression, Wang & Manning
2012): binarized presence of 1-3-grams of words and punctuation marks (hashed), each class's naive-Bayes log-count
ratio ``r``, a logistic regression per class on the r-scaled features, C and the interpolation β chosen on the same
validation split, scored on the same test split; and the ensemble of the model with it: a logistic regression on
both class log-probabilities (a stack), fitted on validation.

The fitted baseline is saved beside the model as ``nblr.npz`` (plain arrays, no pickle) and the stack in metrics.json,
so ``Predictor.from_run(run, ensemble=True)`` can serve the ensemble too. Older runs keep what they saved: TF-IDF + LR
(``tfidf_logreg.npz``, :func:`load_tfidf_logreg`) before NB-LR, a probability average (``weight_other``) before the stack.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import expit, softmax
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.parallel import Parallel, delayed

from hybridlib.errors import CheckpointError
from hybridlib.files import NBLR_FILE, TFIDF_FILE, atomic_write

NGRAMS = (1, 3)
TOKENS = r"(?u)\b\w+\b|[^\w\s]"  # words of any length and each punctuation mark, as NBSVM's papers tokenized
TOKENS_V1 = r"(?u)\b\w\w+\b"  # sklearn's default, words of 2+ characters: nblr.npz files of version 1 (round 14)
HASH_FEATURES = 2 ** 23  # the n-gram cap: hashed buckets, no vocabulary held, memory bounded whatever the corpus
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
BETA_GRID = (0.1, 0.25, 0.5, 0.75, 1.0)  # Wang & Manning's interpolation w' = (1 - beta) * mean|w| + beta * w
NB_ALPHA = 1.0  # the naive-Bayes count smoothing
STACK_C = 1.0  # the stack's regularisation, fixed before round 14's screen
STACK_FOLDS = 5


def ngram_presence(texts, buckets: np.ndarray | None = None, tokens: str = TOKENS) -> sp.csr_matrix:
    """Binary 1-3-gram presence of ``texts``, hashed into HASH_FEATURES buckets (stateless: nothing to fit);
    with ``buckets`` (sorted), only those columns, in that order (n-grams in other buckets are dropped)."""
    vec = HashingVectorizer(ngram_range=NGRAMS, n_features=HASH_FEATURES, binary=True, norm=None,
                            alternate_sign=False, strip_accents="unicode", token_pattern=tokens)
    x = vec.transform(texts)
    return x if buckets is None else _columns(x, buckets)


def _columns(x: sp.csr_matrix, buckets: np.ndarray) -> sp.csr_matrix:
    """``x[:, buckets]`` for sorted ``buckets``; x[:, buckets] itself would index all 2^23 columns on every call."""
    pos = np.minimum(np.searchsorted(buckets, x.indices), max(len(buckets) - 1, 0))
    hit = buckets[pos] == x.indices if len(buckets) else np.zeros(len(x.indices), dtype=bool)
    indptr = np.concatenate([[0], np.cumsum(hit)])[x.indptr]
    return sp.csr_matrix((x.data[hit], pos[hit], indptr), shape=(x.shape[0], len(buckets)))


@dataclass
class NBLR:
    """A fitted NB-LR over the hashed n-gram ``buckets`` seen in training: ``coef`` (rows, len(buckets)), one row
    for two classes (class 1), else one per class; ``tokens``: the token pattern its n-grams are made of."""
    buckets: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    num_classes: int
    tokens: str = TOKENS

    def predict_proba(self, texts) -> np.ndarray:
        """Class probabilities (len(texts), num_classes): sigmoids of the scores; one-vs-rest ones renormalised."""
        x = ngram_presence(texts, self.buckets, self.tokens)
        return _probabilities(x @ self.coef.T + self.intercept, self.num_classes)


def _probabilities(scores: np.ndarray, num_classes: int) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-scores))
    if num_classes == 2:
        return np.hstack([1.0 - s, s])
    return s / s.sum(1, keepdims=True)


def log_count_ratio(x: sp.csr_matrix, positive: np.ndarray, alpha: float = NB_ALPHA) -> np.ndarray:
    """Wang & Manning's r = log((p / |p|_1) / (q / |q|_1)), p and q the smoothed n-gram counts in and out of a class."""
    p = np.asarray(x[positive].sum(0)).ravel() + alpha
    q = np.asarray(x[~positive].sum(0)).ravel() + alpha
    return np.log(p / p.sum()) - np.log(q / q.sum())


def _fit_classes(scaled: list[sp.csr_matrix], targets: list[np.ndarray], c: float, seed: int,
                 ) -> list[tuple[np.ndarray, float]]:
    """(weights, intercept) of one binary LR per class; a class with one target value only gets a constant score."""
    fits = []
    for x, y in zip(scaled, targets):
        if y.min() == y.max():
            fits.append((np.zeros(x.shape[1]), 30.0 if y[0] else -30.0))
            continue
        clf = LogisticRegression(C=c, solver="liblinear", dual=True, max_iter=1000, random_state=seed).fit(x, y)
        fits.append((clf.coef_[0], float(clf.intercept_[0])))
    return fits


def _interpolated(fits: list[tuple[np.ndarray, float]], ratios: list[np.ndarray], beta: float,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(coef, intercept): per class w' = (1 - beta) * mean|w| + beta * w, times r (so it applies to the presence
    features themselves), in float32 as saved."""
    coef = [((1 - beta) * np.abs(w[r != 0]).mean() + beta * w) * r if (r != 0).any() else w * r
            for (w, _), r in zip(fits, ratios)]
    return np.vstack(coef).astype(np.float32), np.asarray([b for _, b in fits])


def _sample(train, max_train: int | None, seed: int):
    """At most ``max_train`` training texts: a seeded sample, in split order."""
    if max_train and max_train < len(train):
        return train.select(np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False)))
    return train


def nblr(data, seed: int = 0, c_grid: tuple[float, ...] = C_GRID, beta_grid: tuple[float, ...] = BETA_GRID,
         n_jobs: int = 1, max_train: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], NBLR]:
    """Fit NB-LR for each (C, β), keep the best on validation accuracy (the first of equals, in grid order).

    The features are the buckets seen in training (the others get no weight). ``n_jobs``: the values of C are fitted
    in this many processes at once (joblib); the result is the same. ``max_train``: fit on a sample of at most this
    many training texts (seeded, in split order); None: all. Returns (summary for metrics.json; class probabilities
    {"validation": (N, C), "test": (N, C)} for :func:`ensemble`; the fitted :class:`NBLR` for :func:`save_nblr`).
    """
    t0 = time.perf_counter()
    train, val, test = _sample(data.splits["train"], max_train, seed), data.splits["validation"], data.splits["test"]
    x_train = ngram_presence(train["text"])
    seen = np.unique(x_train.indices)  # the buckets the training texts fill: the features
    x_train = _columns(x_train, seen)
    x_val, x_test = (ngram_presence(s["text"], seen) for s in (val, test))
    y_train, y_val, y_test = (np.asarray(s["label"]) for s in (train, val, test))
    num_classes = len(data.label_names)
    targets = [1] if num_classes == 2 else list(range(num_classes))
    ratios = [log_count_ratio(x_train, y_train == k) for k in targets]
    scaled = [x_train.multiply(r).tocsr() for r in ratios]
    del x_train  # the fits read only the scaled copies: one matrix fewer held beside liblinear's own copies
    ys = [(y_train == k).astype(int) for k in targets]
    # processes, not threads: liblinear draws from one process-wide random generator, so fits in threads at once
    # change each other's results
    fits = Parallel(n_jobs=max(1, min(n_jobs, len(c_grid))))(
        delayed(_fit_classes)(scaled, ys, c, seed) for c in c_grid)
    best = None
    for c, per_class in zip(c_grid, fits):
        for beta in beta_grid:
            coef, intercept = _interpolated(per_class, ratios, beta)
            acc = accuracy_score(y_val, _probabilities(x_val @ coef.T + intercept, num_classes).argmax(1))
            if best is None or acc > best[0]:
                best = (acc, c, beta, coef, intercept)
    val_acc, c, beta, coef, intercept = best
    probs = {split: _probabilities(x @ coef.T + intercept, num_classes) for split, x in (("validation", x_val), ("test", x_test))}
    model = NBLR(seen, coef, intercept, num_classes)
    pred = probs["test"].argmax(1)
    summary = {
        "name": "nblr_1-3gram_hashed",
        "C": c,
        "beta": beta,
        "hash_features": HASH_FEATURES,
        "token_pattern": model.tokens,
        "max_train_samples": max_train,
        "num_train": len(train),
        "val_accuracy": float(val_acc),
        "test_accuracy": float(accuracy_score(y_test, pred)),
        "test_macro_f1": float(f1_score(y_test, pred, average="macro")),
        "seconds": time.perf_counter() - t0,
    }
    return summary, probs, model


def save_nblr(model: NBLR, path: str | Path) -> None:
    """Write a fitted NB-LR as plain arrays (its buckets, coefficients, intercepts, settings): loadable without pickle."""
    params = {"format": "hybridlib-nblr", "version": 2, "hash_features": HASH_FEATURES, "ngram_range": list(NGRAMS),
              "token_pattern": model.tokens, "num_classes": model.num_classes}
    arrays = {"buckets": model.buckets.astype(np.int32), "coef": model.coef.astype(np.float32),
              "intercept": np.asarray(model.intercept, dtype=np.float64),
              "params": np.frombuffer(json.dumps(params).encode("utf-8"), dtype=np.uint8)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)


def load_nblr(path: str | Path) -> NBLR:
    """The NB-LR saved by :func:`save_nblr` (``allow_pickle=False``: a crafted file cannot run code); a file whose
    arrays do not fit together is refused."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            params = json.loads(bytes(z["params"]).decode("utf-8"))
            buckets, coef, intercept = z["buckets"].astype(np.int64), z["coef"], z["intercept"]
        tokens = params.get("token_pattern", TOKENS_V1)
        settings = (params.get("format"), params.get("hash_features"), params.get("ngram_range"))
        if settings != ("hybridlib-nblr", HASH_FEATURES, list(NGRAMS)) or tokens not in (TOKENS, TOKENS_V1):
            raise ValueError(f"settings {params}")
        num_classes = int(params["num_classes"])
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist: the run was evaluated without the baseline (baseline: false) "
            f"or by an older hybridlib that did not save it. Predict without the ensemble, or train a new run."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError covers bad UTF-8 and JSON
        raise CheckpointError(f"{path} is not an NB-LR baseline saved by hybridlib ({type(e).__name__}: {e}).") from None
    rows = 1 if num_classes == 2 else num_classes
    problems = [what for what, bad in (
        ("n-gram buckets", buckets.ndim != 1 or np.any(np.diff(buckets) <= 0)
         or (len(buckets) and (buckets[0] < 0 or buckets[-1] >= HASH_FEATURES))),
        ("coefficients", coef.shape != (rows, len(buckets)) or not np.all(np.isfinite(coef))),
        ("intercepts", intercept.shape != (rows,) or not np.all(np.isfinite(intercept))),
    ) if bad]
    if num_classes < 2 or problems:
        raise CheckpointError(f"{path} is damaged: its {', '.join(problems) or 'class count'} do not fit "
                              f"{num_classes} classes. Evaluate the run again to rewrite it.")
    return NBLR(buckets, coef, intercept, num_classes, tokens)


def _all_classes(p: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """A probability column per class seen in fitting (``classes``) put in a (N, num_classes) matrix."""
    full = np.zeros((p.shape[0], num_classes))
    full[:, classes] = p
    return full


def tfidf_proba(pipe: Pipeline, texts: list[str], num_classes: int) -> np.ndarray:
    """Class probabilities (len(texts), num_classes) of a fitted TF-IDF + LR pipeline."""
    return _all_classes(pipe.predict_proba(texts), pipe.named_steps["logreg"].classes_, num_classes)


def load_tfidf_logreg(path: str | Path) -> Pipeline:
    """The TF-IDF + LR pipeline of a run made before NB-LR, from its tfidf_logreg.npz (``allow_pickle=False``: a
    crafted file cannot run code)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            terms = bytes(z["terms"]).decode("utf-8").split("\n")
            params = json.loads(bytes(z["params"]).decode("utf-8"))
            idf, coef, intercept, classes = z["idf"], z["coef"], z["intercept"], z["classes"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist: the run was evaluated without the TF-IDF baseline (baseline: false) "
            f"or by an older hybridlib that did not save it. Predict without the ensemble, or train a new run."
        ) from None
    except (OSError, ValueError, KeyError) as e:  # ValueError covers bad UTF-8 and JSON
        raise CheckpointError(f"{path} is not a TF-IDF baseline saved by hybridlib ({type(e).__name__}: {e}).") from None
    if not (len(terms) == len(idf) == coef.shape[1]):
        raise CheckpointError(f"{path} is inconsistent: {len(terms)} terms, {len(idf)} idf values, {coef.shape[1]} coefficients.")
    params["ngram_range"] = tuple(params["ngram_range"])
    params["dtype"] = np.dtype(params["dtype"])
    vec = TfidfVectorizer(vocabulary={t: i for i, t in enumerate(terms)}, **params)
    vec.idf_ = idf
    clf = LogisticRegression()
    clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, classes
    return Pipeline([("tfidf", vec), ("logreg", clf)])


def log_features(*probs: np.ndarray) -> np.ndarray:
    """The stack's inputs: the predictors' class log-probabilities side by side (clipped at 1e-7)."""
    return np.hstack([np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1.0)) for p in probs])


@dataclass
class Stack:
    """The ensemble: a logistic regression on the model's and the baseline's class log-probabilities, fitted on the
    validation split (``classes``: the labels it saw there; the others get probability 0)."""
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    num_classes: int

    @classmethod
    def fit(cls, model_probs: np.ndarray, other_probs: np.ndarray, labels: np.ndarray) -> Stack:
        classes, num_classes = np.unique(labels), model_probs.shape[1]
        if len(classes) < 2:  # one class seen: it gets every text
            return cls(np.zeros((1, 2 * num_classes)), np.zeros(1), classes, num_classes)
        clf = LogisticRegression(C=STACK_C, max_iter=2000).fit(log_features(model_probs, other_probs), labels)
        return cls(clf.coef_, clf.intercept_, clf.classes_, num_classes)

    def predict_proba(self, model_probs: np.ndarray, other_probs: np.ndarray) -> np.ndarray:
        """Class probabilities (N, num_classes), as the fitted LogisticRegression's predict_proba."""
        scores = log_features(model_probs, other_probs) @ self.coef.T + self.intercept
        if len(self.classes) == 1:
            p = np.ones((len(scores), 1))
        elif len(self.classes) == 2:
            p = np.hstack([1.0 - expit(scores), expit(scores)])
        else:
            p = softmax(scores, axis=1)
        return _all_classes(p, self.classes, self.num_classes)

    def to_dict(self) -> dict[str, list]:
        return {"coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "classes": self.classes.tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], num_classes: int) -> Stack:
        """The stack saved in metrics.json; ValueError where its arrays do not fit ``num_classes`` classes."""
        coef, intercept = np.asarray(values["coef"], dtype=np.float64), np.asarray(values["intercept"], dtype=np.float64)
        classes = np.asarray(values["classes"], dtype=np.int64)
        rows = 1 if len(classes) <= 2 else len(classes)
        if (coef.shape != (rows, 2 * num_classes) or intercept.shape != (rows,) or len(np.unique(classes)) != len(classes)
                or classes.min(initial=0) < 0 or classes.max(initial=0) >= num_classes
                or not (np.isfinite(coef).all() and np.isfinite(intercept).all())):
            raise ValueError(f"a stack of shape {coef.shape} over classes {classes.tolist()} for {num_classes} classes")
        return cls(coef, intercept, classes, num_classes)


def stack_cv_predictions(model_probs: np.ndarray, other_probs: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-fold labels of the stack on these texts (stratified folds; fewer than STACK_FOLDS where the largest
    class has fewer texts; in sample where it has one)."""
    folds = min(STACK_FOLDS, int(np.bincount(labels).max()))
    if folds < 2:
        return Stack.fit(model_probs, other_probs, labels).predict_proba(model_probs, other_probs).argmax(1)
    pred = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():  # "the least populated class has only k members": tiny validation splits
        warnings.simplefilter("ignore", UserWarning)
        split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(model_probs, labels))
    for fit, held in split:
        stack = Stack.fit(model_probs[fit], other_probs[fit], labels[fit])
        pred[held] = stack.predict_proba(model_probs[held], other_probs[held]).argmax(1)
    return pred


def ensemble(model_probs: dict[str, np.ndarray], other_probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             seed: int = 0) -> dict[str, Any]:
    """The model + baseline :class:`Stack`, fitted on the validation split; the test split is only scored.

    Its validation accuracy is out of sample: STACK_FOLDS-fold cross-validated on validation (``seed``: the folds).
    Each argument maps "validation" and "test" to (N, C) probabilities / (N,) labels in the same row order. Returns
    the metrics.json entry, the fitted stack under "stack" (what :func:`load_ensemble` reads back).
    """
    stack = Stack.fit(model_probs["validation"], other_probs["validation"], labels["validation"])
    val_pred = stack_cv_predictions(model_probs["validation"], other_probs["validation"], labels["validation"], seed)
    test_pred = stack.predict_proba(model_probs["test"], other_probs["test"]).argmax(1)
    return {
        "method": "stack",
        "val_accuracy": float(accuracy_score(labels["validation"], val_pred)),
        "test_accuracy": float(accuracy_score(labels["test"], test_pred)),
        "test_macro_f1": float(f1_score(labels["test"], test_pred, average="macro")),
        "stack": stack.to_dict(),
    }


def load_ensemble(entry: dict[str, Any], num_classes: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A metrics.json "ensembles" entry as (model probs, baseline probs) -> class probabilities: its stack, or, in
    runs made before the stack, the mix ``(1 - w) * model + w * baseline`` with its ``weight_other``."""
    if "stack" in entry:
        return Stack.from_dict(entry["stack"], num_classes).predict_proba
    weight = float(entry["weight_other"])
    return lambda model, other: mix_probs(model, other, weight)


def mix_probs(model_probs: np.ndarray, other_probs: np.ndarray, weight_other: float) -> np.ndarray:
    """The ensemble of runs made before the stack: ``(1 - w) * model + w * other``, renormalised (a float32 softmax sums to 1 only within ~1e-7)."""
    p = (1 - weight_other) * np.asarray(model_probs, dtype=np.float64) + weight_other * np.asarray(other_probs, dtype=np.float64)
    return p / p.sum(1, keepdims=True)


def load_baseline(run_dir: Path, name: str, num_classes: int) -> Callable[[list[str]], np.ndarray]:
    """A run's saved baseline ``name`` (``nblr``, or ``tfidf_logreg`` in runs made before NB-LR) as texts -> class
    probabilities (len(texts), num_classes); refused when it was fitted for other classes."""
    if name == "nblr":
        model = load_nblr(run_dir / NBLR_FILE)
        if model.num_classes != num_classes:
            raise CheckpointError(f"{run_dir / NBLR_FILE} has {model.num_classes} classes, the model {num_classes} "
                                  f"labels: they are not from the same run.")
        return model.predict_proba
    pipe = load_tfidf_logreg(run_dir / TFIDF_FILE)
    classes = pipe.named_steps["logreg"].classes_
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise CheckpointError(f"{run_dir / TFIDF_FILE} has classes {classes.tolist()}, the model "
                              f"{num_classes} labels: they are not from the same run.")
    return lambda texts: tfidf_proba(pipe, texts, num_classes)
