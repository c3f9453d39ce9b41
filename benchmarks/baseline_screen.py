"""Screen the classic baseline on the pipeline's own splits: TF-IDF 1-2-gram + LR (hybridlib.baselines, as every
run fits it) against NB-LR (NBSVM with a logistic regression: Wang & Manning 2012; Mesnil et al. 2014).

    OMP_NUM_THREADS=1 python benchmarks/baseline_screen.py params/imdb.yaml -p data_dir ../shared/data/imdb \\
        -p tokenizer ../shared/tokenizers/bert-base-uncased -p val_size 0.3 --seeds 42 43 44

Each (seed, baseline) is fitted in a fresh process (one at a time), which builds the splits with hybridlib's
``load_config`` + ``prepare_data`` and reports validation and test accuracy, the fit's wall and CPU seconds
(vectorizing, the C grid, scoring validation and test) and the process's peak RSS (data included; the RSS before
the fit is shown beside it). ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np

from hybridlib.config import load_config, parse_cli_value

NB_NGRAMS = (1, 3)
NB_HASH_FEATURES = 2 ** 23  # the n-gram cap: 8.4M hashed buckets, memory bounded whatever the corpus size
# round 12 (docs/accuracy.md): round 11's grids (C 0.03-10, beta 0.25-1) widened at the edges its choices hit
NB_C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
NB_BETA_GRID = (0.1, 0.25, 0.5, 0.75, 1.0)  # Wang & Manning's interpolation w' = (1 - beta) * mean|w| + beta * w
TFIDF_WIDE_C_GRID = (1.0, 4.0, 16.0, 64.0)  # the pipeline's C grid (1, 4, 16) and the next step up
NB_ALPHA = 1.0  # the naive-Bayes count smoothing


def nb_vectorizer():
    """Binarized 1-3-gram presence, hashed (no vocabulary to hold or save)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(ngram_range=NB_NGRAMS, n_features=NB_HASH_FEATURES, binary=True, norm=None,
                             alternate_sign=False, strip_accents="unicode")


def log_count_ratio(x, positive: np.ndarray, alpha: float = NB_ALPHA) -> np.ndarray:
    """Wang & Manning's r = log((p / |p|_1) / (q / |q|_1)) over the n-grams seen in training (0 elsewhere)."""
    p = np.asarray(x[positive].sum(0)).ravel()
    q = np.asarray(x[~positive].sum(0)).ravel()
    seen = (p + q) > 0
    p, q = np.where(seen, p + alpha, 0.0), np.where(seen, q + alpha, 0.0)
    r = np.zeros_like(p)
    r[seen] = np.log(p[seen] / p.sum()) - np.log(q[seen] / q.sum())
    return r


def nblr_probs(scores: np.ndarray) -> np.ndarray:
    """Class probabilities from the per-class decision values: a binary task has one column (class 1);
    one-vs-rest sigmoids are renormalised to sum to 1."""
    s = 1.0 / (1.0 + np.exp(-scores))
    if s.shape[1] == 1:
        return np.hstack([1.0 - s, s])
    return s / s.sum(1, keepdims=True)


def interpolated(fits: list[tuple[np.ndarray, float]], ratios: list[np.ndarray], beta: float,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per class: w' = (1 - beta) * mean|w| + beta * w over the n-grams seen in training, then the linear
    function of the unscaled presence features, w' * r (r is 0 for unseen n-grams)."""
    coef = []
    for (w, _), r in zip(fits, ratios):
        seen = r != 0
        mean_abs = np.abs(w[seen]).mean() if seen.any() else 0.0
        coef.append(((1 - beta) * mean_abs + beta * w) * r)
    return np.vstack(coef), np.asarray([b for _, b in fits])


def fit_nblr(data, seed: int, probs: dict | None = None) -> dict[str, Any]:
    """NB-LR on data's splits: one (binary) or one-per-class (one-vs-rest) LR on r-scaled n-gram presence;
    one C for all classes, the best validation accuracy (the first of equals, in grid order). ``probs``, if
    given, receives the chosen fit's validation and test class probabilities."""
    from sklearn.linear_model import LogisticRegression

    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    vec = nb_vectorizer()
    x_train, x_val, x_test = (vec.transform(s["text"]) for s in (train, val, test))
    y_train, y_val, y_test = (np.asarray(s["label"]) for s in (train, val, test))
    num_classes = len(data.label_names)
    targets = [1] if num_classes == 2 else list(range(num_classes))
    ratios = [log_count_ratio(x_train, y_train == k) for k in targets]
    scaled = [x_train.multiply(r).tocsr() for r in ratios]
    best = None
    for c in NB_C_GRID:
        fits = []
        for k, xk in zip(targets, scaled):
            clf = LogisticRegression(C=c, solver="liblinear", dual=True, max_iter=1000, random_state=seed)
            clf.fit(xk, (y_train == k).astype(int))
            fits.append((clf.coef_[0], clf.intercept_[0]))
        for beta in NB_BETA_GRID:
            coef, intercept = interpolated(fits, ratios, beta)
            acc = float((nblr_probs(x_val @ coef.T + intercept).argmax(1) == y_val).mean())
            if best is None or acc > best[0]:
                best = (acc, c, beta, coef, intercept)
    val_acc, c, beta, coef, intercept = best
    p_test = nblr_probs(x_test @ coef.T + intercept)
    if probs is not None:
        probs.update(validation=nblr_probs(x_val @ coef.T + intercept), test=p_test)
    return {"C": c, "beta": beta, "val_accuracy": val_acc, "test_accuracy": float((p_test.argmax(1) == y_test).mean()),
            "nonzero_weights": int((coef != 0).any(0).sum())}


def fit_tfidf(data, seed: int, **grid: Any) -> dict[str, Any]:
    """Today's baseline, exactly as evaluation.py calls it (one job); ``grid``: another ``c_grid``."""
    from hybridlib.baselines import tfidf_logreg

    summary, _, _ = tfidf_logreg(data, seed=seed, n_jobs=1, **grid)
    return {k: summary[k] for k in ("C", "val_accuracy", "test_accuracy")}


def fit_tfidf_wide(data, seed: int) -> dict[str, Any]:
    return fit_tfidf(data, seed, c_grid=TFIDF_WIDE_C_GRID)


BASELINES = {"tfidf_logreg": fit_tfidf, "tfidf_wide": fit_tfidf_wide, "nblr": fit_nblr}


def screen_one(params: str, overrides: dict[str, Any], seed: int, name: str) -> dict[str, Any]:
    """One baseline on one seed's splits, in this (fresh) process."""
    from hybridlib.data import prepare_data
    from hybridlib.runtime import peak_rss_mb

    cfg = load_config(params, {**overrides, "seed": seed})
    data = prepare_data(cfg)
    rss_before = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    row = BASELINES[name](data, seed)
    row.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)
    return {"dataset": cfg.dataset, "seed": seed, "baseline": name, "num_train": len(data.splits["train"]),
            "num_validation": len(data.splits["validation"]), "num_test": len(data.splits["test"]), **row,
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=list(BASELINES))
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    overrides = {k: parse_cli_value(v) for k, v in a.parameter}
    load_config(a.params, overrides)  # a bad parameter fails here, before any fit
    rows = []
    print("dataset  seed  baseline      C     beta  val acc  test acc  wall s  CPU s  RSS before -> peak MB", flush=True)
    for seed in a.seeds:
        for name in a.baselines:
            # a fresh process per fit: its peak RSS is this fit's (plus the data's), not the previous one's
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                r = pool.submit(screen_one, a.params, overrides, seed, name).result()
            rows.append(r)
            print(f"{r['dataset']:8s} {seed:4d}  {name:12s} {r['C']:6g} {r.get('beta', ''):5}  {100 * r['val_accuracy']:6.2f}  "
                  f"{100 * r['test_accuracy']:7.2f}  {r['wall_s']:6.1f} {r['cpu_s']:6.1f}  "
                  f"{r['rss_before_mb']:6.0f} -> {r['peak_rss_mb']:6.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
