"""Screen ensembles on finished runs: the shipped model + TF-IDF average against cheap, principled alternatives.

    python benchmarks/ensemble_screen.py outputs/ag_news-val30-s45 outputs/ag_news-val30-s46 ... [--json FILE]

For each run folder (trained and evaluated by ``hybridlib run``) it rebuilds the run's splits from its params.yaml
(``load_config`` + ``prepare_data``: the very splits the run used) and computes validation and test class
probabilities of three predictors: ``best`` (model.pt: the kept weights, averaged from ``swa_start`` on), ``last``
(last.pt's weights at the last epoch, not averaged) and ``tfidf`` (the run's tfidf_logreg.npz). Candidates:

- ``incumbent``: what the run ships, ``(1 - w)·best + w·tfidf``, w on validation log-loss (hybridlib.baselines.ensemble);
- ``best+last, tfidf``: best and last averaged with equal weights, then the same mix with tfidf;
- ``stack best, tfidf`` / ``stack best, last, tfidf``: a logistic regression on the predictors' log-probabilities,
  fitted on the validation split; its validation accuracy is 5-fold cross-validated (out of sample), its test
  accuracy from the fit on the whole validation split.

Validation accuracy decides (docs/accuracy.md, round 13); test accuracy is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from hybridlib.baselines import ensemble, load_tfidf_logreg, tfidf_proba
from hybridlib.checkpoints import load_checkpoint, load_model, model_from_checkpoint
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.evaluation import evaluate_split
from hybridlib.files import LAST_FILE, MODEL_FILE, PARAMS_FILE, TFIDF_FILE

SPLITS = ("validation", "test")


def run_probabilities(run_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], str]:
    """({predictor: {split: (N, C) probabilities}}, {split: labels}, dataset name) for one finished run."""
    cfg = load_config(run_dir / PARAMS_FILE)
    data = prepare_data(cfg)
    best, ckpt = load_model(run_dir / MODEL_FILE)
    last = model_from_checkpoint({**ckpt, "model": load_checkpoint(run_dir / LAST_FILE)["model"]})
    pipe = load_tfidf_logreg(run_dir / TFIDF_FILE)
    probs: dict[str, dict[str, np.ndarray]] = {"best": {}, "last": {}, "tfidf": {}}
    labels = {}
    for split in SPLITS:
        ds = data.splits[split]
        with torch.inference_mode():
            out = evaluate_split(best, ds, cfg, data.pad_id, progress=False)
            probs["best"][split], labels[split] = out["probs"].astype(np.float64), out["labels"]
            probs["last"][split] = evaluate_split(last, ds, cfg, data.pad_id, progress=False)["probs"].astype(np.float64)
        probs["tfidf"][split] = tfidf_proba(pipe, list(ds["text"]), len(data.label_names))
    return probs, labels, cfg.dataset


def stacked(parts: list[dict[str, np.ndarray]], labels: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """A logistic regression on the parts' log-probabilities: 5-fold CV accuracy on validation, test accuracy of
    the fit on all of validation."""
    def features(split: str) -> np.ndarray:
        return np.hstack([np.log(np.clip(p[split], 1e-7, 1.0)) for p in parts])

    clf = LogisticRegression(C=1.0, max_iter=2000)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    cv_pred = cross_val_predict(clf, features("validation"), labels["validation"], cv=folds)
    clf.fit(features("validation"), labels["validation"])
    return {"val_accuracy": float((cv_pred == labels["validation"]).mean()),
            "test_accuracy": float((clf.predict(features("test")) == labels["test"]).mean())}


def screen(run_dir: Path) -> dict[str, Any]:
    probs, labels, dataset = run_probabilities(run_dir)
    row: dict[str, Any] = {"run": run_dir.name, "dataset": dataset}
    for name, p in probs.items():
        accuracy = [float((p[s].argmax(1) == labels[s]).mean()) for s in SPLITS]
        row[name] = dict(zip(("val_accuracy", "test_accuracy"), accuracy))
    row["incumbent"] = ensemble(probs["best"], probs["tfidf"], labels)
    both = {s: (probs["best"][s] + probs["last"][s]) / 2 for s in SPLITS}
    row["best+last, tfidf"] = ensemble(both, probs["tfidf"], labels)
    row["stack best, tfidf"] = stacked([probs["best"], probs["tfidf"]], labels, seed=0)
    row["stack best, last, tfidf"] = stacked([probs["best"], probs["last"], probs["tfidf"]], labels, seed=0)
    return row


CANDIDATES = ("best", "last", "tfidf", "incumbent", "best+last, tfidf", "stack best, tfidf", "stack best, last, tfidf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    rows = []
    print(f"{'run':28s}" + "".join(f"{c[:24]:>26s}" for c in CANDIDATES) + "   (val / test %)")
    for run in a.runs:
        r = screen(run)
        rows.append(r)
        print(f"{r['run']:28s}" + "".join(
            f"{100 * r[c]['val_accuracy']:>13.2f} / {100 * r[c]['test_accuracy']:<10.2f}" for c in CANDIDATES), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
