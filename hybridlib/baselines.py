"""The classic baseline every run is measured against: TF-IDF (1-2-grams) + logistic regression,
fitted on exactly the same train split, tuned on the same validation split, scored on the same test."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

C_GRID = (1.0, 4.0, 16.0)


def tfidf_logreg(data, seed: int = 0, c_grid: tuple[float, ...] = C_GRID) -> dict[str, Any]:
    """Fit TF-IDF 1-2-gram + LR for each C, keep the best on validation, report test accuracy/F1."""
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
    return {
        "name": "tfidf_1-2gram_logreg",
        "C": c,
        "val_accuracy": float(val_acc),
        "test_accuracy": float(accuracy_score(y_test, pred)),
        "test_macro_f1": float(f1_score(y_test, pred, average="macro")),
        "seconds": time.perf_counter() - t0,
    }
