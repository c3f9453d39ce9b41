"""Run a model over a split and turn its predictions into metrics, reports and mistake tables."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import sklearn
import torch
import transformers
from IPython.display import display
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from hybridlib.baselines import ensemble, nblr, save_nblr
from hybridlib.batching import make_loader, predict_logits
from hybridlib.checkpoints import (
    check_compatible,
    checkpoint_config,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
)
from hybridlib.config import FIELDS, Config, load_config, read_params_file, validate
from hybridlib.data import Data, prepare_data
from hybridlib.errors import ConfigError
from hybridlib.files import (
    METRICS_FILE,
    MODEL_FILE,
    NBLR_FILE,
    PARAMS_FILE,
    REPORT_FILE,
    TOKENIZER_DIR,
    TRAIN_INFO_FILE,
    read_json,
    write_json,
    write_text,
)
from hybridlib.model import count_parameters
from hybridlib.runlock import run_lock
from hybridlib.runs import read_history
from hybridlib.runtime import precision_name, progress_bar, resolve_device, resolve_precision
from hybridlib.threads import CPUThreads
from hybridlib.tokens import load_tokenizer

# the data fields that describe a dataset (not how it is tokenized): evaluating on another dataset drops the run's
DATASET_FIELDS = ("data_dir", "train_split", "test_split", "text_column", "label_column", "encoding", "label_names")


def evaluate_split(model, ds, cfg: Config, pad_id: int, progress: bool = True,
                   threads: CPUThreads | None = None) -> dict[str, np.ndarray]:
    """Predictions for a whole tokenized split, in the split's row order, on the model's device with
    ``cfg.precision``: {"logits", "probs", "preds", "labels"}."""
    device = next(model.parameters()).device
    loader = make_loader(ds, cfg, pad_id, device)
    rows = list(loader.batch_sampler)  # the loader's order (length buckets): each batch's rows in the split
    logits, labels = None, np.zeros(len(ds), dtype=np.int64)
    batches = progress_bar(loader, "Evaluating", disable=not progress)
    for idx, (out, batch) in zip(rows, predict_logits(model, batches, device, resolve_precision(cfg.precision, device),
                                                       threads), strict=True):
        if logits is None:
            logits = np.zeros((len(ds), out.size(1)), dtype=np.float32)
        logits[idx], labels[idx] = out.cpu().numpy(), batch["labels"].numpy()
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return {"logits": logits, "probs": probs, "preds": probs.argmax(1), "labels": labels}


def compute_metrics(labels: np.ndarray, preds: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix."""
    idx = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=idx, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, preds, labels=idx).tolist(),
        "label_names": list(label_names),
    }


def report_text(labels: np.ndarray, preds: np.ndarray, label_names: list[str]) -> str:
    return classification_report(
        labels, preds, labels=list(range(len(label_names))), target_names=label_names, digits=4, zero_division=0
    )


def confident_mistakes(texts: list[str], result: dict[str, np.ndarray], label_names: list[str], k: int = 10):
    """The ``k`` wrong predictions the model was surest of, as a DataFrame."""
    wrong = np.flatnonzero(result["preds"] != result["labels"])
    conf = result["probs"][wrong, result["preds"][wrong]]
    top = wrong[np.argsort(-conf)[:k]]
    return pd.DataFrame(
        {
            "text": [texts[i][:300] for i in top],
            "true": [label_names[result["labels"][i]] for i in top],
            "predicted": [label_names[result["preds"][i]] for i in top],
            "confidence": result["probs"][top, result["preds"][top]].round(4),
        }
    )


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


def evaluate_run(cfg: Config, run_dir: str | Path, data: Data, device: torch.device | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's best model.pt on the test split; write metrics.json and classification_report.txt
    (and, with ``baseline``, fit the NB-LR baseline, save it and score the ensemble). Holds the run's lock."""
    with run_lock(run_dir):
        return _evaluate_run(cfg, Path(run_dir), data, device, progress)


def _evaluate_run(cfg: Config, run_dir: Path, data: Data, device: torch.device | None, progress: bool) -> dict[str, Any]:
    device = device or resolve_device(cfg.device)
    threads = CPUThreads(cfg.num_threads, device)
    model, ckpt = load_model(run_dir / MODEL_FILE, device, vocab_size=data.vocab_size, label_names=data.label_names)
    amp = resolve_precision(cfg.precision, device)
    test = evaluate_split(model, data.splits["test"], cfg, data.pad_id, progress, threads)
    m = compute_metrics(test["labels"], test["preds"], data.label_names)
    history = read_history(run_dir)
    train_info = read_json(run_dir / TRAIN_INFO_FILE) if (run_dir / TRAIN_INFO_FILE).is_file() else {}
    metrics = {
        "run_name": run_dir.name,
        "dataset": cfg.dataset,
        "test_accuracy": m["accuracy"],
        "test_macro_f1": m["macro_f1"],
        "best_val_accuracy": float(ckpt["best_metric"]),
        "best_epoch": int(ckpt["epoch"]),
        "epochs_run": len(history),
        "train_seconds": float(sum(r["seconds"] for r in history)),
        "num_parameters": count_parameters(model),
        **{"train_" + k: v for k, v in train_info.items()},
        "num_train": len(data.splits["train"]),
        "num_validation": len(data.splits["validation"]),
        "num_test": len(data.splits["test"]),
        **{k: m[k] for k in ("per_class", "confusion_matrix", "label_names")},
        "device": str(device),
        "precision": precision_name(amp),
        "params": cfg.to_dict(),
        "versions": library_versions(),
    }
    if cfg.baseline:
        summary, base_probs, fitted = nblr(data, cfg.seed, n_jobs=threads.count, max_train=cfg.baseline_max_train_samples)
        save_nblr(fitted, run_dir / NBLR_FILE)  # Predictor.from_run(run, ensemble=True) serves the ensemble
        metrics["baselines"] = {"nblr": summary}
        val = evaluate_split(model, data.splits["validation"], cfg, data.pad_id, progress, threads)
        metrics["ensembles"] = {"model+nblr": ensemble(
            {"validation": val["probs"], "test": test["probs"]}, base_probs,
            {"validation": val["labels"], "test": test["labels"]}, cfg.seed)}
    write_json(run_dir / METRICS_FILE, metrics)
    report = report_text(test["labels"], test["preds"], data.label_names)
    write_text(run_dir / REPORT_FILE, report)
    return {"metrics": metrics, "report": report, "test": test}


def evaluate_checkpoint(path: str | Path, split: str = "test", overrides: dict[str, Any] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Metrics of a saved model on a split of its dataset (or of another, via ``overrides``)."""
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"--split must be train, validation or test, got {split!r}.")
    path = Path(path)
    ckpt = load_checkpoint(path)
    values = checkpoint_config(ckpt).group("data", "model")
    if (path.parent / PARAMS_FILE).is_file():  # the run's seed: its validation split and sample caps depend on it
        values["seed"] = read_params_file(path.parent / PARAMS_FILE).get("seed", FIELDS["seed"].default)
    overrides = validate(overrides or {}, source="-p")
    if overrides.get("dataset", values["dataset"]) != values["dataset"]:
        for key in DATASET_FIELDS:  # another dataset: not the training data's folder, columns or class names
            values.pop(key)
    cfg = load_config(overrides=overrides, base=values)
    device = resolve_device(cfg.device)
    threads = CPUThreads(cfg.num_threads, device)
    local_tok = path.parent / TOKENIZER_DIR
    tok = load_tokenizer(str(local_tok) if local_tok.is_dir() and "tokenizer" not in overrides else cfg.tokenizer)
    check_compatible(ckpt, vocab_size=len(tok))  # before tokenizing a whole dataset with the wrong tokenizer
    data = prepare_data(cfg, tok)
    check_compatible(ckpt, label_names=data.label_names)
    model = model_from_checkpoint(ckpt, device)
    res = evaluate_split(model, data.splits[split], cfg, data.pad_id, progress, threads)
    m = compute_metrics(res["labels"], res["preds"], data.label_names)
    cap = "max_train_samples" if split == "train" else "max_eval_samples"
    sampled = getattr(cfg, cap) and (split == "train" or len(res["labels"]) == getattr(cfg, cap))  # the cap cut it
    m.update(split=split, dataset=cfg.dataset, num_examples=int(len(res["labels"])), checkpoint=str(path),
             sample_cap={cap: getattr(cfg, cap)} if sampled else None)
    return {"metrics": m, "report": report_text(res["labels"], res["preds"], data.label_names)}


def metrics_table(metrics: dict[str, Any]):
    """Headline numbers and per-class scores of a metrics dict as DataFrames (for notebooks)."""
    keys = ("test_accuracy", "test_macro_f1", "best_val_accuracy", "best_epoch", "train_seconds", "num_parameters")
    head = pd.Series({k: round(metrics[k], 4) if isinstance(metrics[k], float) else metrics[k] for k in keys
                      if k in metrics}, name="value", dtype=object)  # object: 4398952 and 0.59, not 4.398952e+06
    display(head.to_frame())
    return pd.DataFrame(metrics["per_class"]).T.round(4)


def baseline_table(metrics: dict[str, Any]):
    """The model beside the classic baselines fitted on the same split (rows), as a DataFrame."""
    rows = [{
        "model": "+".join(metrics["params"]["branches"]),
        "val_accuracy": metrics["best_val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "test_macro_f1": metrics["test_macro_f1"],
    }]
    for name, b in metrics.get("baselines", {}).items():
        rows.append({"model": name, **{k: b[k] for k in ("val_accuracy", "test_accuracy", "test_macro_f1")}})
    for name, e in metrics.get("ensembles", {}).items():
        how = ("stack: logistic regression on both, validation accuracy cross-validated" if "stack" in e
               else f"probabilities, weight {e['weight_other']:.2f} on the second")
        label = name.replace("model", rows[0]["model"]) + f" ({how})"
        rows.append({"model": label, **{k: e[k] for k in ("val_accuracy", "test_accuracy", "test_macro_f1")}})
    return pd.DataFrame(rows).set_index("model").round(4)
