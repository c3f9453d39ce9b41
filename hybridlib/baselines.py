"""The classic baseline every run is measured against: TF-IDF (1-2-grams) + logistic regression,
fitted on exactly the same train split, tuned on the same validation split, scored on the same test;
and the ensemble of the model with it (class probabilities averaged, weight chosen on validation)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss

C_GRID = (1.0, 4.0, 16.0)
ENSEMBLE_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))


def tfidf_logreg(data, seed: int = 0, c_grid: tuple[float, ...] = C_GRID) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit TF-IDF 1-2-gram + LR for each C, keep the best on validation.

    Returns (summary for metrics.json: C, validation and test accuracy, test macro F1, seconds;
    class probabilities {"validation": (N, C), "test": (N, C)} for :func:`ensemble`).
    """
    t0 = time.perf_counter()
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_df=0.9, sublinear_tf=True, strip_accents="unicode")
    x_train = vec.fit_transform(train["text"])
    x_val, x_test = vec.transform(val["text"]), vec.transform(test["text"])
    y_train, y_val, y_test = (np.asarray(s["label"]) for s in (train, val, test))
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, y_train)
        acc = accuracy_score(y_val, clf.predict(x_val))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    pred = clf.predict(x_test)
    summary = {
        "name": "tfidf_1-2gram_logreg",
        "C": c,
        "val_accuracy": float(val_acc),
        "test_accuracy": float(accuracy_score(y_test, pred)),
        "test_macro_f1": float(f1_score(y_test, pred, average="macro")),
        "seconds": time.perf_counter() - t0,
    }
    num_classes = len(data.label_names)
    probs = {split: _all_classes(clf, clf.predict_proba(x), num_classes) for split, x in (("validation", x_val), ("test", x_test))}
    return summary, probs


def _all_classes(clf, p: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba has a column per class seen in training only: put them in a (N, num_classes) matrix."""
    full = np.zeros((p.shape[0], num_classes))
    full[:, clf.classes_] = p
    return full


def ensemble(model_probs: dict[str, np.ndarray], other_probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             weights: tuple[float, ...] = ENSEMBLE_WEIGHTS) -> dict[str, Any]:
    """Average two classifiers' class probabilities, ``(1 - w) * model + w * other``.

    ``w`` is the grid value with the lowest validation log-loss (smoother than accuracy on a few thousand
    texts, so less tuned to the validation set's noise); the test split is only scored. Each argument maps
    "validation" and "test" to (N, C) probabilities / (N,) labels in the same row order.
    """
    def mix(split: str, w: float) -> np.ndarray:
        p = (1 - w) * np.asarray(model_probs[split], dtype=np.float64) + w * np.asarray(other_probs[split], dtype=np.float64)
        return p / p.sum(1, keepdims=True)  # a float32 softmax sums to 1 only within ~1e-7

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
