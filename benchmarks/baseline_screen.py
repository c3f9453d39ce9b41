"""Screen the classic baseline on the pipeline's own splits: TF-IDF 1-2-gram + LR (the baseline of runs made before
round 14) against NB-LR (hybridlib.baselines.nblr, every run's baseline since: NBSVM with a logistic regression,
Wang & Manning 2012; Mesnil et al. 2014).

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

TFIDF_C_GRID = (1.0, 4.0, 16.0)  # the grid of the TF-IDF + LR baseline runs fitted before NB-LR replaced it
TFIDF_WIDE_C_GRID = (1.0, 4.0, 16.0, 64.0)  # ... and the next step up (round 12)


def tfidf_logreg(data, seed: int, c_grid: tuple[float, ...] = TFIDF_C_GRID) -> dict[str, Any]:
    """TF-IDF 1-2-gram + LR as every run fitted it until round 14: the best C on validation (the first of equals)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_df=0.9, sublinear_tf=True, strip_accents="unicode")
    x_train = vec.fit_transform(train["text"])
    x_val, x_test = vec.transform(val["text"]), vec.transform(test["text"])
    y_train, y_val, y_test = (np.asarray(s["label"]) for s in (train, val, test))
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, y_train)
        acc = float((clf.predict(x_val) == y_val).mean())
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    val_acc, c, clf = best
    return {"C": c, "val_accuracy": val_acc, "test_accuracy": float((clf.predict(x_test) == y_test).mean())}


def fit_tfidf_wide(data, seed: int) -> dict[str, Any]:
    return tfidf_logreg(data, seed, c_grid=TFIDF_WIDE_C_GRID)


def fit_nblr(data, seed: int) -> dict[str, Any]:
    """The pipeline's baseline (hybridlib.baselines.nblr), one job."""
    from hybridlib.baselines import nblr

    summary, _, model = nblr(data, seed)
    return {**{k: summary[k] for k in ("C", "beta", "val_accuracy", "test_accuracy")}, "nonzero_weights": int((model.coef != 0).any(0).sum())}


BASELINES = {"tfidf_logreg": tfidf_logreg, "tfidf_wide": fit_tfidf_wide, "nblr": fit_nblr}


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
