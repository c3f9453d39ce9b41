"""hybridlib.baselines: the NB-LR baseline on the run's own split, the stacked ensemble, and what runs made before
them saved (TF-IDF + LR files, a probability mix)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from hybridlib.baselines import (
    Stack,
    ensemble,
    load_ensemble,
    load_nblr,
    log_count_ratio,
    log_features,
    mix_probs,
    nblr,
    save_nblr,
)
from hybridlib.data import prepare_data
from hybridlib.errors import CheckpointError


def binary(data):
    """The tiny 3-class data as a 2-class task: class 0 against the others."""
    splits = {k: ds.map(lambda e: {"label": int(e["label"] == 0)}) for k, ds in data.splits.items()}
    return SimpleNamespace(splits=splits, label_names=["other", data.label_names[0]])


@pytest.fixture
def tiny_data(tiny_cfg, tiny_tokenizer):
    return prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)


@pytest.mark.parametrize("classes", [3, 2])
def test_nblr_scores_the_same_splits_and_its_model_gives_the_same_probabilities(tiny_data, classes):
    data = tiny_data if classes == 3 else binary(tiny_data)
    summary, probs, model = nblr(data, seed=0, c_grid=(0.1, 1.0), beta_grid=(0.5, 1.0))
    assert summary["C"] in (0.1, 1.0) and summary["beta"] in (0.5, 1.0) and summary["name"] == "nblr_1-3gram_hashed"
    assert model.coef.shape[0] == (1 if classes == 2 else 3) and model.num_classes == classes
    for split in ("validation", "test"):
        p, y = probs[split], np.asarray(data.splits[split]["label"])
        assert p.shape == (len(y), classes)
        assert np.allclose(p.sum(1), 1.0)
        # the fit scores the buckets seen in training; the model hashes the texts again: the same numbers
        np.testing.assert_allclose(model.predict_proba(data.splits[split]["text"]), p, rtol=0, atol=1e-9)
    y_test = np.asarray(data.splits["test"]["label"])
    assert summary["test_accuracy"] == pytest.approx((probs["test"].argmax(1) == y_test).mean())
    assert summary["val_accuracy"] > 0.7  # the tiny texts carry their label in their words


def test_ngram_columns_are_scipys_column_selection(tiny_data):
    from hybridlib.baselines import ngram_presence

    texts = list(tiny_data.splits["train"]["text"]) + ["", "Ünïcödé café"]
    full = ngram_presence(texts)
    rng = np.random.default_rng(0)
    for buckets in (np.unique(full.indices), np.unique(rng.choice(full.indices, 40)), np.array([], dtype=np.int64)):
        np.testing.assert_array_equal(ngram_presence(texts, buckets).toarray(), full[:, buckets].toarray())


def test_log_count_ratio_is_wang_and_mannings():
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float))
    r = log_count_ratio(x, np.array([True, True, False]), alpha=1.0)
    p, q = np.array([3, 2, 1]), np.array([1, 1, 2])  # counts + 1 in and out of the class
    np.testing.assert_allclose(r, np.log(p / p.sum()) - np.log(q / q.sum()))
    assert r[1] > 0 > r[2]  # an n-gram only in the class pushes towards it, one only outside away from it


def test_nblr_fits_the_c_grid_in_parallel_with_the_serial_result(tiny_data):
    grid = (0.01, 1.0, 100.0)  # far apart: different validation scores and probabilities per C
    serial, p1, m1 = nblr(tiny_data, seed=0, c_grid=grid, n_jobs=1)
    parallel, p2, m2 = nblr(tiny_data, seed=0, c_grid=grid, n_jobs=2)
    assert (parallel["C"], parallel["beta"], parallel["val_accuracy"]) == (serial["C"], serial["beta"], serial["val_accuracy"])
    for split in ("validation", "test"):
        np.testing.assert_array_equal(p2[split], p1[split])
    np.testing.assert_array_equal(m1.coef, m2.coef)


def test_nblr_on_a_capped_sample_says_so_and_repeats(tiny_data):
    n = len(tiny_data.splits["train"])
    full, p_full, _ = nblr(tiny_data, seed=0, c_grid=(1.0,), max_train=n)  # a cap above the split: all texts
    assert (full["max_train_samples"], full["num_train"]) == (n, n)
    capped, p1, m1 = nblr(tiny_data, seed=0, c_grid=(1.0,), max_train=n // 2)
    again, p2, m2 = nblr(tiny_data, seed=0, c_grid=(1.0,), max_train=n // 2)
    assert capped["num_train"] == n // 2 and capped["max_train_samples"] == n // 2
    np.testing.assert_array_equal(p1["test"], p2["test"])  # the sample is seeded
    assert not np.array_equal(p1["test"], p_full["test"])


def one_hot_noisy(labels: np.ndarray, correct: float, rng: np.random.Generator, classes: int = 3) -> np.ndarray:
    """Probabilities that put 0.8 on the true class for a ``correct`` share of rows, else on a wrong class."""
    guess = np.where(rng.random(len(labels)) < correct, labels, (labels + 1) % classes)
    p = np.full((len(labels), classes), 0.2 / (classes - 1))
    p[np.arange(len(labels)), guess] = 0.8
    return p


def test_the_stack_is_fitted_on_validation_and_only_scored_on_test():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, 2000) for s in ("validation", "test")}
    weak = {s: one_hot_noisy(y, 0.6, rng) for s, y in labels.items()}
    strong = {s: one_hot_noisy(y, 0.9, rng) for s, y in labels.items()}
    res = ensemble(weak, strong, labels)
    assert res["method"] == "stack"
    assert res["test_accuracy"] >= (strong["test"].argmax(1) == labels["test"]).mean() - 0.01  # leans on the better
    # the test labels never fit it: scrambling them leaves the stack unchanged
    scrambled = {**labels, "test": rng.permutation(labels["test"])}
    assert ensemble(weak, strong, scrambled)["stack"] == res["stack"]
    # two independent classifiers' errors partly cancel: the stack beats either
    a = {s: one_hot_noisy(y, 0.8, rng) for s, y in labels.items()}
    b = {s: one_hot_noisy(y, 0.8, rng) for s, y in labels.items()}
    both = ensemble(a, b, labels)
    assert both["test_accuracy"] > max((p["test"].argmax(1) == labels["test"]).mean() for p in (a, b)) + 0.03


@pytest.mark.parametrize("classes", [2, 4])
def test_the_stack_is_sklearns_logistic_regression_and_its_validation_figure_is_cross_validated(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(classes)
    labels = {s: rng.integers(0, classes, 600) for s in ("validation", "test")}
    model = {s: one_hot_noisy(y, 0.7, rng, classes) for s, y in labels.items()}
    other = {s: rng.dirichlet(np.ones(classes), 600) for s in labels}
    res = ensemble(model, other, labels, seed=7)
    x = {s: log_features(model[s], other[s]) for s in labels}
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x["validation"], labels["validation"])
    stack = Stack.from_dict(res["stack"], classes)
    np.testing.assert_allclose(stack.predict_proba(model["test"], other["test"]), clf.predict_proba(x["test"]), atol=1e-9)
    assert res["test_accuracy"] == (clf.predict(x["test"]) == labels["test"]).mean()
    out_of_fold = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x["validation"], labels["validation"],
                                    cv=StratifiedKFold(5, shuffle=True, random_state=7))
    assert res["val_accuracy"] == (out_of_fold == labels["validation"]).mean()


@pytest.mark.parametrize("val_labels", [[0, 1], [2, 2, 2], [0, 0, 1]])
def test_the_stack_of_a_tiny_validation_split_still_predicts(val_labels):
    y = np.asarray(val_labels)
    probs = {"validation": np.full((len(y), 3), 1 / 3), "test": np.eye(3)}
    res = ensemble(probs, probs, {"validation": y, "test": np.arange(3)})
    served = load_ensemble(res, 3)(np.eye(3), np.eye(3))
    assert served.shape == (3, 3) and np.allclose(served.sum(1), 1.0)
    if len(set(val_labels)) == 1:  # one class seen: it gets every text
        assert (served.argmax(1) == val_labels[0]).all()


def test_a_damaged_stack_is_refused_and_a_mix_from_before_the_stack_is_served():
    rng = np.random.default_rng(1)
    labels = {s: rng.integers(0, 3, 300) for s in ("validation", "test")}
    probs = {s: one_hot_noisy(y, 0.7, rng) for s, y in labels.items()}
    entry = ensemble(probs, probs, labels)
    for bad in ({"coef": [[1.0, 2.0]]}, {"classes": [0, 1, 5]}, {"intercept": [0.0]}, {"coef": "x"}):
        with pytest.raises((ValueError, TypeError)):
            load_ensemble({**entry, "stack": {**entry["stack"], **bad}}, 3)
    with pytest.raises(ValueError):
        load_ensemble(entry, 4)  # another run's class count
    old = load_ensemble({"weight_other": 0.3, "test_accuracy": 0.5}, 3)
    np.testing.assert_allclose(old(probs["test"], probs["test"][::-1]), mix_probs(probs["test"], probs["test"][::-1], 0.3))


def test_every_evaluated_run_reports_the_baseline_and_the_ensemble(tmp_path):
    import json

    from tiny_run import make_tiny_run

    from hybridlib.evaluation import baseline_table

    metrics = json.loads((make_tiny_run(tmp_path, epochs=1, baseline=True) / "metrics.json").read_text())
    base = metrics["baselines"]["nblr"]
    ens = metrics["ensembles"]["model+nblr"]
    assert base["hash_features"] == 2 ** 23 and base["num_train"] > 0
    assert ens["method"] == "stack" and len(ens["stack"]["intercept"]) == 3
    assert 0.0 <= ens["test_accuracy"] <= 1.0 and 0.0 <= base["test_accuracy"] <= 1.0
    table = baseline_table(metrics)
    assert list(table.index[:2]) == ["cnn+lstm", "nblr"]
    assert table.index[2].startswith("cnn+lstm+nblr (stack")
    assert table.loc["nblr", "test_accuracy"] == pytest.approx(base["test_accuracy"], abs=1e-4)


TEXTS = ["unseen words only", "", "Ünïcödé café, the team scored", "the team scored a goal " * 50]


@pytest.mark.parametrize("classes", [3, 2])
def test_saved_nblr_round_trips_without_pickle(tiny_data, tmp_path, classes):
    data = tiny_data if classes == 3 else binary(tiny_data)
    _, probs, model = nblr(data, seed=0, c_grid=(1.0,))
    save_nblr(model, tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    loaded = load_nblr(tmp_path / "b.npz")
    texts = list(data.splits["test"]["text"]) + TEXTS
    np.testing.assert_array_equal(loaded.predict_proba(texts), model.predict_proba(texts))
    np.testing.assert_allclose(loaded.predict_proba(data.splits["test"]["text"]), probs["test"], rtol=0, atol=1e-9)


def tampered(path, out, **arrays):
    """A copy of the saved file ``path`` with some arrays replaced."""
    with np.load(path, allow_pickle=False) as z:
        np.savez(out, **{**{k: z[k] for k in z.files}, **arrays})
    return out


def refuses_missing_junk_and_pickled(load, tmp_path, what: str, key: str) -> None:
    """``load`` names a missing file and refuses a non-zip file and one whose ``key`` array needs pickle."""
    with pytest.raises(CheckpointError, match="does not exist.*baseline: false"):
        load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=f"not {what} saved by hybridlib"):
        load(tmp_path / "junk.npz")
    # an object array would need pickle to load: refused, never unpickled
    np.savez(tmp_path / "pickled.npz", **{key: np.array([{"a": 1}], dtype=object)}, allow_pickle=True)
    with pytest.raises(CheckpointError, match=f"not {what}"):
        load(tmp_path / "pickled.npz")


def test_loading_a_bad_nblr_file_is_a_clear_error(tiny_data, tmp_path):
    refuses_missing_junk_and_pickled(load_nblr, tmp_path, "an NB-LR baseline", "params")
    good = tmp_path / "good.npz"
    save_nblr(nblr(tiny_data, seed=0, c_grid=(1.0,))[2], good)
    with np.load(good) as z:
        buckets, coef = z["buckets"], z["coef"]
    nan = coef.copy()
    nan[0, 0] = np.nan
    for name, arrays, what in [
        ("bucket", {"buckets": np.append(buckets[:-1], 2 ** 23)}, "n-gram buckets"),
        ("unsorted", {"buckets": buckets[::-1]}, "n-gram buckets"),
        ("columns", {"coef": coef[:, :-1]}, "coefficients"),
        ("nan", {"coef": nan}, "coefficients"),
        ("intercept", {"intercept": np.zeros(2)}, "intercepts"),
    ]:
        with pytest.raises(CheckpointError, match=f"is damaged: its {what}"):
            load_nblr(tampered(good, tmp_path / f"{name}.npz", **arrays))
    settings = np.frombuffer(b'{"format": "something else"}', dtype=np.uint8)
    with pytest.raises(CheckpointError, match="not an NB-LR baseline"):
        load_nblr(tampered(good, tmp_path / "format.npz", params=settings))


def test_an_nblr_file_from_before_punctuation_tokens_reads_texts_as_it_was_fitted(tiny_data, tmp_path):
    """Version 1 (round 14) made n-grams of sklearn's default tokens (words of 2+ characters) and did not say so."""
    from hybridlib.baselines import TOKENS, TOKENS_V1, ngram_presence

    good = tmp_path / "good.npz"
    model = nblr(tiny_data, seed=0, c_grid=(1.0,))[2]
    save_nblr(model, good)
    v1 = {"format": "hybridlib-nblr", "version": 1, "hash_features": 2 ** 23, "ngram_range": [1, 3], "num_classes": 3}
    old = load_nblr(tampered(good, tmp_path / "v1.npz", params=np.frombuffer(json.dumps(v1).encode(), np.uint8)))
    assert (old.tokens, load_nblr(good).tokens) == (TOKENS_V1, TOKENS)
    texts = ["a film I liked !", "a b c ? ! x"] + list(tiny_data.splits["test"]["text"])
    x_old, x_new = (ngram_presence(texts, model.buckets, t) for t in (TOKENS_V1, TOKENS))
    assert (x_old != x_new).nnz > 0  # the two patterns make different n-grams of these texts
    sigmoid = 1.0 / (1.0 + np.exp(-(x_old @ model.coef.T + model.intercept)))  # one-vs-rest, renormalised
    np.testing.assert_allclose(old.predict_proba(texts), sigmoid / sigmoid.sum(1, keepdims=True), rtol=0, atol=1e-12)
    assert not np.allclose(old.predict_proba(texts), model.predict_proba(texts))
    with pytest.raises(CheckpointError, match="not an NB-LR baseline"):
        bad = {**v1, "version": 2, "token_pattern": "(a+)+$"}
        load_nblr(tampered(good, tmp_path / "bad.npz", params=np.frombuffer(json.dumps(bad).encode(), np.uint8)))


def test_a_tfidf_baseline_saved_before_nblr_still_loads(tmp_path):
    from fixtures import fit_tfidf_logreg, save_tfidf_logreg

    from hybridlib.baselines import load_tfidf_logreg, tfidf_proba

    texts, labels = ["the team scored a goal", "shares fell on weak earnings", "cells and the genome"] * 2, [0, 1, 2] * 2
    pipe = fit_tfidf_logreg(texts, labels)
    save_tfidf_logreg(pipe, tmp_path / "b.npz")
    loaded = load_tfidf_logreg(tmp_path / "b.npz")
    np.testing.assert_array_equal(tfidf_proba(loaded, texts + TEXTS, 3), tfidf_proba(pipe, texts + TEXTS, 3))
    refuses_missing_junk_and_pickled(load_tfidf_logreg, tmp_path, "a TF-IDF baseline", "terms")
