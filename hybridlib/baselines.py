"""The classic baseline every run is measured against: TF-IDF (1-2-grams) + logistic regression,
fitted on exactly the same train split, tuned on the same validation split, scored on the same test;
and the ensemble of the model with it (class probabilities averaged, weight chosen on validation).

The fitted baseline is saved beside the model as ``tfidf_logreg.npz`` (plain arrays, no pickle), so
``Predictor.from_run(run, ensemble=True)`` can serve the ensemble too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.utils.parallel import Parallel, delayed

from hybridlib.errors import CheckpointError
from hybridlib.files import atomic_write

C_GRID = (1.0, 4.0, 16.0)
ENSEMBLE_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))
# what TfidfVectorizer.transform needs besides the vocabulary and idf (fit-only settings such as min_df are not)
_VECTORIZER_KEYS = ("lowercase", "strip_accents", "token_pattern", "ngram_range", "analyzer", "norm", "use_idf",
                    "smooth_idf", "sublinear_tf", "dtype")


def tfidf_logreg(data, seed: int = 0, c_grid: tuple[float, ...] = C_GRID, n_jobs: int = 1,
                 max_train: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], Pipeline]:
    """Fit TF-IDF 1-2-gram + LR for each C, keep the best on validation (the first of equals, in grid order).

    ``n_jobs``: the values of C are fitted in this many processes at once (joblib); the result is the same.
    ``max_train``: fit on a sample of at most this many training texts (seeded, in split order); None: all.
    Returns (summary for metrics.json: C, validation and test accuracy, test macro F1, seconds;
    class probabilities {"validation": (N, C), "test": (N, C)} for :func:`ensemble`;
    the fitted ``Pipeline([("tfidf", ...), ("logreg", ...)])`` for :func:`save_tfidf_logreg`).
    """
    t0 = time.perf_counter()
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    if max_train and max_train < len(train):
        train = train.select(np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False)))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_df=0.9, sublinear_tf=True, strip_accents="unicode")
    x_train = vec.fit_transform(train["text"])
    x_val, x_test = vec.transform(val["text"]), vec.transform(test["text"])
    y_train, y_val, y_test = (np.asarray(s["label"]) for s in (train, val, test))
    fitted = Parallel(n_jobs=max(1, min(n_jobs, len(c_grid))))(
        delayed(LogisticRegression(C=c, max_iter=2000, random_state=seed).fit)(x_train, y_train) for c in c_grid)
    best = None
    for c, clf in zip(c_grid, fitted):
        acc = accuracy_score(y_val, clf.predict(x_val))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    pred = clf.predict(x_test)
    summary = {
        "name": "tfidf_1-2gram_logreg",
        "C": c,
        "max_train_samples": max_train,
        "num_train": len(train),
        "val_accuracy": float(val_acc),
        "test_accuracy": float(accuracy_score(y_test, pred)),
        "test_macro_f1": float(f1_score(y_test, pred, average="macro")),
        "seconds": time.perf_counter() - t0,
    }
    num_classes = len(data.label_names)
    probs = {split: _all_classes(clf, clf.predict_proba(x), num_classes) for split, x in (("validation", x_val), ("test", x_test))}
    return summary, probs, Pipeline([("tfidf", vec), ("logreg", clf)])


def _all_classes(clf, p: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba has a column per class seen in training only: put them in a (N, num_classes) matrix."""
    full = np.zeros((p.shape[0], num_classes))
    full[:, clf.classes_] = p
    return full


def tfidf_proba(pipe: Pipeline, texts: list[str], num_classes: int) -> np.ndarray:
    """Class probabilities (len(texts), num_classes) of a fitted TF-IDF + LR pipeline."""
    return _all_classes(pipe.named_steps["logreg"], pipe.predict_proba(texts), num_classes)


def save_tfidf_logreg(pipe: Pipeline, path: str | Path) -> None:
    """Write a fitted pipeline as plain arrays (vocabulary, idf, coefficients): loadable without pickle."""
    vec, clf = pipe.named_steps["tfidf"], pipe.named_steps["logreg"]
    params = {k: v for k, v in vec.get_params().items() if k in _VECTORIZER_KEYS}
    params["dtype"] = np.dtype(params["dtype"]).name
    arrays = {
        # terms are \w-runs joined by single spaces (the default token_pattern), so "\n" separates them safely
        "terms": np.frombuffer("\n".join(vec.get_feature_names_out()).encode("utf-8"), dtype=np.uint8),
        "idf": vec.idf_, "coef": clf.coef_, "intercept": clf.intercept_, "classes": clf.classes_,
        "params": np.frombuffer(json.dumps(params).encode("utf-8"), dtype=np.uint8),
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)


def load_tfidf_logreg(path: str | Path) -> Pipeline:
    """The pipeline saved by :func:`save_tfidf_logreg` (``allow_pickle=False``: a crafted file cannot run code)."""
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


def ensemble(model_probs: dict[str, np.ndarray], other_probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             weights: tuple[float, ...] = ENSEMBLE_WEIGHTS) -> dict[str, Any]:
    """Average two classifiers' class probabilities, ``(1 - w) * model + w * other``.

    ``w`` is the grid value with the lowest validation log-loss (smoother than accuracy on a few thousand
    texts, so less tuned to the validation set's noise); the test split is only scored. Each argument maps
    "validation" and "test" to (N, C) probabilities / (N,) labels in the same row order.
    """
    def mix(split: str, w: float) -> np.ndarray:
        return mix_probs(model_probs[split], other_probs[split], w)

    num_classes = model_probs["validation"].shape[1]
    val_loss = [log_loss(labels["validation"], mix("validation", w), labels=list(range(num_classes))) for w in weights]
    w = float(weights[int(np.argmin(val_loss))])
    val_pred, test_pred = mix("validation", w).argmax(1), mix("test", w).argmax(1)
    return {
        "weight_other": w,
        "val_accuracy": float(accuracy_score(labels["validation"], val_pred)),
        "test_accuracy": float(accuracy_score(labels["test"], test_pred)),
        "test_macro_f1": float(f1_score(labels["test"], test_pred, average="macro")),
    }


def mix_probs(model_probs: np.ndarray, other_probs: np.ndarray, weight_other: float) -> np.ndarray:
    """``(1 - w) * model + w * other``, renormalised (a float32 softmax sums to 1 only within ~1e-7)."""
    p = (1 - weight_other) * np.asarray(model_probs, dtype=np.float64) + weight_other * np.asarray(other_probs, dtype=np.float64)
    return p / p.sum(1, keepdims=True)
