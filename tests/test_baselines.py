"""hybridlib.baselines: the TF-IDF + LR baseline on the run's own split, and the probability ensemble."""

from __future__ import annotations

import numpy as np
import pytest

from hybridlib.baselines import ensemble, tfidf_logreg
from hybridlib.data import prepare_data


def test_tfidf_logreg_scores_the_same_splits_and_returns_their_probabilities(tiny_cfg, tiny_tokenizer):
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    summary, probs, _ = tfidf_logreg(data, seed=0, c_grid=(1.0, 4.0))
    assert summary["C"] in (1.0, 4.0)
    for split in ("validation", "test"):
        p, y = probs[split], np.asarray(data.splits[split]["label"])
        assert p.shape == (len(y), len(data.label_names))
        assert np.allclose(p.sum(1), 1.0)
    y_test = np.asarray(data.splits["test"]["label"])
    assert summary["test_accuracy"] == pytest.approx((probs["test"].argmax(1) == y_test).mean())
    assert summary["val_accuracy"] > 0.5  # the tiny texts carry their label in their words


def test_tfidf_logreg_fits_the_c_grid_in_parallel_with_the_serial_result(tiny_cfg, tiny_tokenizer):
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    grid = (0.01, 1.0, 100.0)  # far apart: different validation scores and probabilities per C
    serial, p1, pipe1 = tfidf_logreg(data, seed=0, c_grid=grid, n_jobs=1)
    parallel, p2, pipe2 = tfidf_logreg(data, seed=0, c_grid=grid, n_jobs=2)
    assert parallel["C"] == serial["C"] and parallel["val_accuracy"] == serial["val_accuracy"]
    for split in ("validation", "test"):
        np.testing.assert_allclose(p2[split], p1[split], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pipe2["logreg"].coef_, pipe1["logreg"].coef_)


def test_tfidf_logreg_on_a_capped_sample_says_so_and_repeats(tiny_cfg, tiny_tokenizer):
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    n = len(data.splits["train"])
    full, p_full, _ = tfidf_logreg(data, seed=0, c_grid=(4.0,), max_train=n)  # a cap above the split: all texts
    assert (full["max_train_samples"], full["num_train"]) == (n, n)
    capped, p1, pipe1 = tfidf_logreg(data, seed=0, c_grid=(4.0,), max_train=n // 2)
    again, p2, pipe2 = tfidf_logreg(data, seed=0, c_grid=(4.0,), max_train=n // 2)
    assert capped["num_train"] == n // 2 and capped["max_train_samples"] == n // 2
    np.testing.assert_array_equal(pipe1["logreg"].coef_, pipe2["logreg"].coef_)  # the sample is seeded
    assert not np.array_equal(p1["test"], p_full["test"])


def one_hot_noisy(labels: np.ndarray, correct: float, rng: np.random.Generator, classes: int = 3) -> np.ndarray:
    """Probabilities that put 0.8 on the true class for a ``correct`` share of rows, else on a wrong class."""
    guess = np.where(rng.random(len(labels)) < correct, labels, (labels + 1) % classes)
    p = np.full((len(labels), classes), 0.2 / (classes - 1))
    p[np.arange(len(labels)), guess] = 0.8
    return p


def test_ensemble_weight_is_chosen_on_validation_and_only_scored_on_test():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, 2000) for s in ("validation", "test")}
    weak = {s: one_hot_noisy(y, 0.6, rng) for s, y in labels.items()}
    strong = {s: one_hot_noisy(y, 0.9, rng) for s, y in labels.items()}
    res = ensemble(weak, strong, labels)
    assert res["weight_other"] > 0.5  # leans on the better classifier
    assert res["test_accuracy"] >= (strong["test"].argmax(1) == labels["test"]).mean() - 0.01
    assert ensemble(strong, weak, labels)["weight_other"] < 0.5
    # the test labels never choose the weight: scrambling them leaves it unchanged
    scrambled = {**labels, "test": rng.permutation(labels["test"])}
    assert ensemble(weak, strong, scrambled)["weight_other"] == res["weight_other"]
    # two independent classifiers' errors partly cancel: the mix beats either
    a = {s: one_hot_noisy(y, 0.8, rng) for s, y in labels.items()}
    b = {s: one_hot_noisy(y, 0.8, rng) for s, y in labels.items()}
    mixed = ensemble(a, b, labels)
    assert 0.2 < mixed["weight_other"] < 0.8


def test_every_evaluated_run_reports_the_baseline_and_the_ensemble(tmp_path):
    import json

    from tiny_run import make_tiny_run

    from hybridlib.evaluation import baseline_table

    metrics = json.loads((make_tiny_run(tmp_path, epochs=1, baseline=True) / "metrics.json").read_text())
    base = metrics["baselines"]["tfidf_logreg"]
    ens = metrics["ensembles"]["model+tfidf_logreg"]
    assert 0.0 <= ens["weight_other"] <= 1.0
    assert 0.0 <= ens["test_accuracy"] <= 1.0 and 0.0 <= base["test_accuracy"] <= 1.0
    table = baseline_table(metrics)
    assert list(table.index[:2]) == ["cnn+lstm", "tfidf_logreg"]
    assert table.index[2].startswith("cnn+lstm+tfidf_logreg (probabilities, weight")
    assert table.loc["tfidf_logreg", "test_accuracy"] == pytest.approx(base["test_accuracy"], abs=1e-4)


def test_saved_baseline_round_trips_without_pickle(tiny_cfg, tiny_tokenizer, tmp_path):
    from hybridlib.baselines import load_tfidf_logreg, save_tfidf_logreg, tfidf_proba

    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    _, probs, pipe = tfidf_logreg(data, seed=0, c_grid=(4.0,))
    save_tfidf_logreg(pipe, tmp_path / "b.npz")
    loaded = load_tfidf_logreg(tmp_path / "b.npz")
    texts = list(data.splits["test"]["text"]) + ["unseen words only", "", "Ünïcödé café, the team scored"]
    k = len(data.label_names)
    assert np.array_equal(tfidf_proba(loaded, texts, k), tfidf_proba(pipe, texts, k))
    assert np.allclose(tfidf_proba(loaded, list(data.splits["test"]["text"]), k), probs["test"])


def test_loading_a_bad_baseline_file_is_a_clear_error(tmp_path):
    from hybridlib.baselines import load_tfidf_logreg
    from hybridlib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist.*baseline: false"):
        load_tfidf_logreg(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a TF-IDF baseline saved by hybridlib"):
        load_tfidf_logreg(tmp_path / "junk.npz")
    # an object array would need pickle to load: refused, never unpickled
    np.savez(tmp_path / "pickled.npz", terms=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="not a TF-IDF baseline"):
        load_tfidf_logreg(tmp_path / "pickled.npz")
