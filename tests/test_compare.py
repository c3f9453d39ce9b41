"""hybridlib.compare: runs grouped into experiments by their params, mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridlib.compare import compare_runs, write_comparison
from hybridlib.config import Config
from hybridlib.errors import RunError


def fake_run(root: Path, name: str, acc: float, seed: int, drop: tuple[str, ...] = (), ens: float | None = None,
             baseline: str = "nblr", **params) -> Path:
    """A finished run folder as evaluate_run leaves it (metrics.json + training_log.csv)."""
    run = root / name
    run.mkdir()
    p = {**Config().to_dict(), "seed": seed, **params}
    for k in drop:  # a run made before this param existed
        p.pop(k)
    metrics = {"dataset": "toy", "test_accuracy": acc, "test_macro_f1": acc - 0.01, "best_val_accuracy": acc + 0.01,
               "train_seconds": 10.0 * seed, "num_parameters": 123, "params": p,
               "baselines": {baseline: {"test_accuracy": 0.8}}}
    if ens is not None:
        metrics["ensembles"] = {f"model+{baseline}": {"test_accuracy": ens}}
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
    assert table.loc["branches=cnn", "model+nblr_test_%"] == "87.00 ± 2.00"
    assert table.loc["branches=cnn+lstm", "model+nblr_test_%"] == ""  # a run made before ensembles
    assert table.loc["branches=cnn", "nblr_test_%"] == "80.00 ± 0.00"
    # a run given twice (once by another path) counts once; one run may be given as itself (notebook 06: runs = "…")
    table, _ = compare_runs([runs[0], runs[0].parent / ".." / runs[0].parent.name / runs[0].name, runs[1]])
    assert list(table["seeds"]) == [2]
    table, loaded = compare_runs(str(runs[0]))
    assert list(table["seeds"]) == [1] and len(loaded) == 1


def test_runs_made_before_nblr_keep_their_tf_idf_columns(tmp_path):
    runs = [fake_run(tmp_path, "old", 0.80, 1, ens=0.85, baseline="tfidf_logreg"),
            fake_run(tmp_path, "new", 0.82, 2, ens=0.88)]
    table, _ = compare_runs(runs)
    row = table.iloc[0]
    assert (row["tfidf_logreg_test_%"], row["model+tfidf_logreg_test_%"]) == ("80.00", "85.00")
    assert (row["nblr_test_%"], row["model+nblr_test_%"]) == ("80.00", "88.00")


def test_runs_are_told_apart_by_experiment_fields_only(tmp_path):
    """Seed, machine, run and location fields (where the data and tokenizer lie on this machine) never split an
    experiment; any data/model/training field does, and only it is named."""
    same = [fake_run(tmp_path, "a", 0.80, 1),
            fake_run(tmp_path, "b", 0.82, 2, num_threads=4, device="cuda", precision="bf16", eval_batch_size=8,
                     num_workers=2, num_processes=2, run_dir="/elsewhere/b", resume=True, baseline=False,
                     data_dir="/mnt/data/toy", tokenizer="/mnt/tokenizers/bert-base-uncased")]
    other = [fake_run(tmp_path, "c", 0.9, 1, lr=0.01), fake_run(tmp_path, "d", 0.7, 1, max_length=64)]
    table, runs = compare_runs(same + other)
    assert list(table.index) == ["max_length=256, lr=0.002", "max_length=256, lr=0.01", "max_length=64, lr=0.002"]
    assert table.loc["max_length=256, lr=0.002", "seeds"] == 2
    assert [r["experiment"] for r in runs][:2] == ["max_length=256, lr=0.002"] * 2


def test_experiment_fields_and_retired_keys_are_what_compare_uses(tmp_path, monkeypatch):
    from hybridlib import compare
    from hybridlib.config import RETIRED, experiment_fields

    seen = []
    real = compare.experiment_key
    monkeypatch.setattr(compare, "experiment_key", lambda params, varying: seen.append(set(params)) or real(params, varying))
    compare_runs([fake_run(tmp_path, "a", 0.8, 1), fake_run(tmp_path, "b", 0.8, 2)])
    assert seen[0] == set(experiment_fields()) | set(RETIRED)


def test_params_of_older_runs_count_as_their_defaults(tmp_path):
    """A run made before a param existed counts as its default; a retired option at its "off" value (every run of
    the previous main wrote branch_norm: false) is the same experiment as a run without it; switched on, another."""
    now = fake_run(tmp_path, "now", 0.80, 1)
    before_aux = fake_run(tmp_path, "before-aux", 0.81, 2, drop=("branch_aux_loss",))
    old = fake_run(tmp_path, "old", 0.82, 3, branch_norm=False, ema_decay=0.0, unseen_embeddings="random")
    norm = fake_run(tmp_path, "norm", 0.85, 4, branch_norm=True, ema_decay=0.0, unseen_embeddings="random")
    table, _ = compare_runs([now, before_aux, old, norm])
    assert list(table.index) == ["branch_norm=False", "branch_norm=True"]
    assert table.loc["branch_norm=False", "seeds"] == 3


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
