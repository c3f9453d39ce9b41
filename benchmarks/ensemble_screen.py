"""Screen ensembles on finished runs: the shipped model + baseline average against cheap, principled alternatives.

    python benchmarks/ensemble_screen.py outputs/ag_news-val30-s45 outputs/ag_news-val30-s46 ... [--json FILE]

For each run folder (trained and evaluated by ``hybridlib run``) it rebuilds the run's splits from its params.yaml
(``load_config`` + ``prepare_data``: the very splits the run used) and computes validation and test class
probabilities of three predictors: ``best`` (model.pt: the kept weights, averaged from ``swa_start`` on), ``last``
(last.pt's weights at the last epoch, not averaged) and ``baseline`` (the run's nblr.npz, or tfidf_logreg.npz in runs made before NB-LR). Candidates:

- ``incumbent``: what a run ships (hybridlib.baselines.ensemble: the stack since round 14);
- ``mix``: the ensemble before round 14, ``(1 - w)·best + w·baseline``, w on validation log-loss (``mix_weight`` here);
- ``best+last, baseline``: best and last averaged with equal weights, then the same mix with the baseline;
- ``stack best, baseline`` / ``stack best, last, baseline``: a logistic regression on the predictors' log-probabilities,
  fitted on the validation split; its validation accuracy is 5-fold cross-validated (out of sample), its test
  accuracy from the fit on the whole validation split.

Round 14's candidates, every validation figure out of sample (5-fold cross-validation on validation):

- ``mix (CV)``: the shipped mix, w chosen on the four other folds by log-loss;
- ``stack (CV)``: ``stack best, baseline`` again;
- ``choose (nested)``: per run, whichever of the two has the higher cross-validated accuracy (ties: the mix),
  estimated by nested cross-validation; its test accuracy: the choice made on all of validation, fitted on it.

``--baseline nblr`` replaces the run's baseline by NB-LR (hybridlib.baselines.nblr) fitted on the run's own split
(for runs made before NB-LR). Validation accuracy decides (docs/accuracy.md, rounds 13 and 14); test accuracy is reported.
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
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from hybridlib.baselines import Stack, ensemble, load_baseline, log_features, mix_probs, nblr, stack_cv_predictions
from hybridlib.checkpoints import load_checkpoint, load_model, model_from_checkpoint
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.evaluation import evaluate_split
from hybridlib.files import LAST_FILE, MODEL_FILE, NBLR_FILE, PARAMS_FILE

SPLITS = ("validation", "test")
MIX_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))  # the grid the shipped mix searched before round 14


def run_probabilities(run_dir: Path, baseline: str = "run",
                      ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], str]:
    """({predictor: {split: (N, C) probabilities}}, {split: labels}, dataset name) for one finished run; with
    ``baseline`` "nblr", the "baseline" entry holds NB-LR's probabilities, fitted on the run's split."""
    cfg = load_config(run_dir / PARAMS_FILE)
    data = prepare_data(cfg)
    best, ckpt = load_model(run_dir / MODEL_FILE)
    last = model_from_checkpoint({**ckpt, "model": load_checkpoint(run_dir / LAST_FILE)["model"]})
    if baseline == "run":  # its own: NB-LR, or TF-IDF + LR in runs made before NB-LR
        own = load_baseline(run_dir, "nblr" if (run_dir / NBLR_FILE).is_file() else "tfidf_logreg", len(data.label_names))
    probs: dict[str, dict[str, np.ndarray]] = {"best": {}, "last": {}, "baseline": {}}
    labels = {}
    for split in SPLITS:
        ds = data.splits[split]
        with torch.inference_mode():
            out = evaluate_split(best, ds, cfg, data.pad_id, progress=False)
            probs["best"][split], labels[split] = out["probs"].astype(np.float64), out["labels"]
            probs["last"][split] = evaluate_split(last, ds, cfg, data.pad_id, progress=False)["probs"].astype(np.float64)
        if baseline == "run":
            probs["baseline"][split] = own(list(ds["text"]))
    if baseline == "nblr":
        probs["baseline"] = nblr(data, cfg.seed, n_jobs=2)[1]
    return probs, labels, cfg.dataset


def mix_weight(model: np.ndarray, other: np.ndarray, labels: np.ndarray) -> float:
    """The weight of ``other`` in the mix with the lowest log-loss on these texts."""
    classes = list(range(model.shape[1]))
    return float(MIX_WEIGHTS[int(np.argmin([log_loss(labels, mix_probs(model, other, w), labels=classes)
                                            for w in MIX_WEIGHTS]))])


def mixed(model: dict[str, np.ndarray], other: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """The mix with its weight chosen on validation: in-sample validation accuracy, test accuracy."""
    w = mix_weight(model["validation"], other["validation"], labels["validation"])
    return {"weight_other": w, **{f"{'val' if s == 'validation' else s}_accuracy": float(
        accuracy_score(labels[s], mix_probs(model[s], other[s], w).argmax(1))) for s in SPLITS}}


def stacked(parts: list[dict[str, np.ndarray]], labels: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """A logistic regression on the parts' log-probabilities: 5-fold CV accuracy on validation, test accuracy of
    the fit on all of validation (hybridlib's Stack where the parts are two)."""
    def features(split: str) -> np.ndarray:
        return log_features(*(p[split] for p in parts))

    clf = LogisticRegression(C=1.0, max_iter=2000)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    cv_pred = cross_val_predict(clf, features("validation"), labels["validation"], cv=folds)
    clf.fit(features("validation"), labels["validation"])
    return {"val_accuracy": float((cv_pred == labels["validation"]).mean()),
            "test_accuracy": float((clf.predict(features("test")) == labels["test"]).mean())}


def cv_predictions(kind: str, model: np.ndarray, other: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """5-fold out-of-fold predictions on these texts of the mix ("mix"), the stack ("stack") or "choose"."""
    if kind == "stack":
        return stack_cv_predictions(model, other, y, seed)
    pred = np.empty(len(y), dtype=np.int64)
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(model, y):
        pred[held] = fitted(kind, model[fit], other[fit], y[fit])(model[held], other[held])
    return pred


def fitted(kind: str, model: np.ndarray, other: np.ndarray, y: np.ndarray):
    """A predictor (model probs, other probs) -> labels: the mix, the stack, or "choose" (by 5-fold CV here)."""
    if kind == "choose":
        acc = {k: (cv_predictions(k, model, other, y, seed=0) == y).mean() for k in ("mix", "stack")}
        kind = "stack" if acc["stack"] > acc["mix"] else "mix"
    if kind == "mix":
        w = mix_weight(model, other, y)
        return lambda m, o: mix_probs(m, o, w).argmax(1)
    stack = Stack.fit(model, other, y)
    return lambda m, o: stack.predict_proba(m, o).argmax(1)


def round14(probs: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Out-of-sample validation accuracy (5-fold CV; "choose": nested, outer folds seeded 1) and test accuracy of
    the mix, the stack and the per-run choice between them, on the model's best weights and the baseline."""
    (mv, ov), (mt, ot) = ((probs["best"][s], probs["baseline"][s]) for s in SPLITS)
    y = labels["validation"]
    rows = {}
    for kind, name in (("mix", "mix (CV)"), ("stack", "stack (CV)"), ("choose", "choose (nested)")):
        val = cv_predictions(kind, mv, ov, y, seed=1 if kind == "choose" else 0)
        test = fitted(kind, mv, ov, y)(mt, ot)
        rows[name] = {"val_accuracy": float((val == y).mean()), "test_accuracy": float((test == labels["test"]).mean()),
                      "val_correct": int((val == y).sum()), "val_texts": len(y)}
    return rows


def screen(run_dir: Path, baseline: str = "run") -> dict[str, Any]:
    probs, labels, dataset = run_probabilities(run_dir, baseline)
    row: dict[str, Any] = {"run": run_dir.name, "dataset": dataset}
    for name, p in probs.items():
        accuracy = [float((p[s].argmax(1) == labels[s]).mean()) for s in SPLITS]
        row[name] = dict(zip(("val_accuracy", "test_accuracy"), accuracy))
    row["incumbent"] = ensemble(probs["best"], probs["baseline"], labels)
    row["mix"] = mixed(probs["best"], probs["baseline"], labels)
    both = {s: (probs["best"][s] + probs["last"][s]) / 2 for s in SPLITS}
    row["best+last, baseline"] = mixed(both, probs["baseline"], labels)
    row["stack best, baseline"] = stacked([probs["best"], probs["baseline"]], labels, seed=0)
    row["stack best, last, baseline"] = stacked([probs["best"], probs["last"], probs["baseline"]], labels, seed=0)
    row.update(round14(probs, labels))
    return row


CANDIDATES = ("best", "last", "baseline", "incumbent", "mix", "best+last, baseline", "stack best, baseline", "stack best, last, baseline",
              "mix (CV)", "stack (CV)", "choose (nested)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--baseline", choices=("run", "nblr"), default="run",
                    help="the run's own baseline, or NB-LR fitted on the run's split")
    a = ap.parse_args(argv)
    rows = []
    print(f"{'run':28s}" + "".join(f"{c[:24]:>26s}" for c in CANDIDATES) + "   (val / test %)")
    for run in a.runs:
        r = screen(run, a.baseline)
        rows.append(r)
        print(f"{r['run']:28s}" + "".join(
            f"{100 * r[c]['val_accuracy']:>13.2f} / {100 * r[c]['test_accuracy']:<10.2f}" for c in CANDIDATES), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
