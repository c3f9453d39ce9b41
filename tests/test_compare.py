"""hybridlib.compare: runs grouped into experiments by their params, mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridlib.compare import compare_runs, write_comparison
from hybridlib.config import Config
from hybridlib.errors import RunError


def fake_run(root: Path, name: str, acc: float, seed: int, drop: tuple[str, ...] = (), ens: float | None = None,
             **params) -> Path:
    """A finished run folder as evaluate_run leaves it (metrics.json + training_log.csv)."""
    run = root / name
    run.mkdir()
    p = {**Config().to_dict(), "seed": seed, **params}
    for k in drop:  # a run made before this param existed
        p.pop(k)
    metrics = {"dataset": "toy", "test_accuracy": acc, "test_macro_f1": acc - 0.01, "best_val_accuracy": acc + 0.01,
               "train_seconds": 10.0 * seed, "num_parameters": 123, "params": p,
               "baselines": {"tfidf_logreg": {"test_accuracy": 0.8}}}
    if ens is not None:
        metrics["ensembles"] = {"model+tfidf_logreg": {"test_accuracy": ens}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "training_log.csv").write_text(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds\n1,0.5,0.7,0.4,0.75,0.001,5.0\n"
    )
    return run


def test_runs_that_differ_only_in_seed_form_one_experiment(tmp_path):
    runs = [fake_run(tmp_path, f"cnn{s}", acc, s, branches=["cnn"], ens=acc + 0.05)
            for s, acc in ((1, 0.80), (2, 0.82), (3, 0.84))]
    runs.append(fake_run(tmp_path, "hybrid", 0.9, 1, branches=["cnn", "lstm"]))
    table, _ = compare_runs(runs)
    assert list(table.index) == ["branches=cnn", "branches=cnn+lstm"]
    assert table.loc["branches=cnn", "seeds"] == 3
    assert table.loc["branches=cnn", "test_accuracy_%"] == "82.00 ± 2.00"  # sample std (ddof=1)
    assert table.loc["branches=cnn+lstm", "test_accuracy_%"] == "90.00"
    assert table.loc["branches=cnn", "model+tfidf_logreg_test_%"] == "87.00 ± 2.00"
    assert table.loc["branches=cnn+lstm", "model+tfidf_logreg_test_%"] == ""  # a run made before ensembles


def test_a_param_missing_from_an_older_run_counts_as_its_default(tmp_path):
    old = fake_run(tmp_path, "old", 0.80, 1, drop=("branch_norm",))
    new = fake_run(tmp_path, "new", 0.82, 2, branch_norm=False)
    other = fake_run(tmp_path, "norm", 0.85, 3, branch_norm=True)
    table, _ = compare_runs([old, new, other])
    assert list(table.index) == ["branch_norm=False", "branch_norm=True"]
    assert table.loc["branch_norm=False", "seeds"] == 2


def test_write_comparison_writes_markdown_csv_and_curves(tmp_path):
    runs = [fake_run(tmp_path, f"r{s}", 0.8, s) for s in (1, 2)]
    _, paths = write_comparison(runs, tmp_path / "out")
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv", "val_curves.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| same params | toy | 2 |" in paths[0].read_text()


def test_an_unfinished_run_is_refused_by_name(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(RunError, match="half has no metrics.json"):
        compare_runs([tmp_path / "half"])
