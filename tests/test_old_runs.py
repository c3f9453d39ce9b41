"""Old runs still work (issue #16): model.pt / last.pt / params.yaml as the previous main (hybridlib 0.1.0,
checkpoint format 1) wrote them load, predict, evaluate and resume; a retired option that was switched on
is refused with a message naming the version to use.

Format 1 differs from format 2 in ``config``: every field of the old Config, including the options removed
since (``branch_norm``, ``ema_decay``, ``unseen_embeddings``, ``freeze_embeddings``, ``lr_schedule``,
``label_smoothing``; ``lstm_pooling`` could be ``both``, ``pretrained_embeddings`` ``minilm``). The files
are made the simplest faithful way: the session's tiny run (trained by the current code) rewritten into
the old format (old config dict, ``format_version`` 1, the old key order, params.yaml with every old key).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures import fit_tfidf_logreg, save_tfidf_logreg
from tiny_run import tiny_run

from hybridlib import Predictor
from hybridlib.baselines import load_tfidf_logreg, mix_probs, tfidf_proba
from hybridlib.checkpoints import checkpoint_config, load_checkpoint
from hybridlib.cli import main
from hybridlib.config import FIELDS, RETIRED, Config, fields_of, load_config
from hybridlib.data import prepare_data
from hybridlib.errors import ConfigError
from hybridlib.evaluation import evaluate_checkpoint
from hybridlib.files import LAST_FILE, MODEL_FILE, NBLR_FILE, PARAMS_FILE, TFIDF_FILE
from hybridlib.training import train

# The fields of the previous main's Config, in its order (git show e670417:hybridlib/config.py).
OLD_FIELDS = [
    "dataset", "data_dir", "train_split", "test_split", "text_column", "label_column", "label_names", "val_size",
    "max_train_samples", "max_eval_samples", "tokenizer", "max_length", "truncation", "branches", "embed_dim",
    "embed_dropout", "lstm_hidden", "lstm_layers", "lstm_pooling", "cnn_kernel_sizes", "cnn_filters", "mlp_hidden",
    "branch_norm", "branch_aux_loss", "dropout", "pretrained_embeddings", "freeze_embeddings", "unseen_embeddings",
    "epochs", "batch_size", "eval_batch_size", "lr", "weight_decay", "lr_schedule", "warmup_ratio", "grad_clip",
    "label_smoothing", "adversarial_eps", "ema_decay", "patience", "seed", "device", "precision", "bucket_by_length",
    "num_workers", "num_threads", "num_processes", "run_dir", "resume", "baseline",
]
OLD_OFF = {"branch_norm": False, "ema_decay": 0.0, "unseen_embeddings": "random",  # their defaults then
           "freeze_embeddings": False, "lr_schedule": "linear", "label_smoothing": 0.0}
# (key, value, the version the refusal names)
SWITCHED_ON = [("ema_decay", 0.9, "0.1.0"), ("lstm_pooling", "both", "0.1.0"), ("branch_norm", True, "0.1.0"),
               ("unseen_embeddings", "zero", "0.1.0"), ("freeze_embeddings", True, "0.3.2"),
               ("lr_schedule", "cosine", "0.3.2"), ("label_smoothing", 0.1, "0.3.2"),
               ("pretrained_embeddings", "minilm", "0.3.2")]
TEXTS = ["The coach said the team scored a late goal to win the championship match.",
         "Shares of the company fell as investors sold stock after weak quarterly earnings.",
         "Scientists in the laboratory study cells and the genome.", ""]


def old_config(cfg: Config, **old_values) -> dict:
    """``cfg`` as the previous main's ``Config.to_dict()``: every old field, retired ones at their defaults."""
    now = cfg.to_dict()
    out = {k: OLD_OFF[k] if k in OLD_OFF else now[k] for k in OLD_FIELDS}
    out.update(old_values)
    return out


def write_old_format(run_dir: Path, **old_values) -> None:
    """Rewrite a run's model.pt, last.pt, params.yaml and metrics.json as the previous main wrote them.

    ``old_values``: old options to set (e.g. ema_decay=0.9), as if the run had been trained with them."""
    cfg = load_config(run_dir / PARAMS_FILE)
    old = old_config(cfg, **old_values)
    for name in (MODEL_FILE, LAST_FILE):
        new = load_checkpoint(run_dir / name)
        ckpt = {"format_version": 1, "model": new["model"], "config": old, "label_names": new["label_names"],
                "tokenizer": new["tokenizer"], "epoch": new["epoch"], "best_metric": new["best_metric"]}
        if name == LAST_FILE:
            ckpt.update(optimizer=new["optimizer"], scheduler=new["scheduler"], rng=new["rng"], history=new["history"],
                        best_epoch=new["best_epoch"], bad_epochs=new["bad_epochs"], scaler=new["scaler"])
            if old["ema_decay"]:  # the previous main kept the moving average beside the raw weights
                ckpt["ema"] = {**{f"module.{k}": v for k, v in new["model"].items()}, "n_averaged": torch.tensor(7)}
        torch.save(ckpt, run_dir / name)
    (run_dir / PARAMS_FILE).write_text(yaml.safe_dump(old, sort_keys=False), encoding="utf-8")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the baseline then: TF-IDF + LR in tfidf_logreg.npz, under its own name in metrics.json, mixed by a weight
    (run_dir / NBLR_FILE).unlink()
    save_tfidf_logreg(fit_tfidf_logreg(TEXTS[:3] * 2, [0, 1, 2] * 2), run_dir / TFIDF_FILE)
    metrics["baselines"] = {"tfidf_logreg": {**metrics["baselines"]["nblr"], "name": "tfidf_1-2gram_logreg"}}
    ens = {k: v for k, v in metrics["ensembles"]["model+nblr"].items() if k not in ("method", "stack")}
    metrics["ensembles"] = {"model+tfidf_logreg": {**ens, "weight_other": 0.4}}
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "params": old}, indent=2))


def copy_run(src: Path, dst: Path, old: bool = True, **old_values) -> Path:
    shutil.copytree(src, dst)
    if old:
        write_old_format(dst, **old_values)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The session's tiny run (format 2) and a copy of it in format 1."""
    new = tiny_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("old_runs")
    return {"new": new, "old": copy_run(new, root / "old-run"), "root": root}


def probabilities(predictor: Predictor) -> np.ndarray:
    return predictor.predict_proba(TEXTS)


# ----------------------------------------------------------------------------- the emulation is faithful


def test_the_old_files_are_format_1_with_every_old_key(runs):
    assert set(OLD_FIELDS) - set(OLD_OFF) <= set(FIELDS)  # the old fields: today's plus the retired ones
    assert set(OLD_OFF) == set(RETIRED)
    for name in (MODEL_FILE, LAST_FILE):
        ckpt = torch.load(runs["old"] / name, map_location="cpu", weights_only=True)
        assert ckpt["format_version"] == 1
        assert list(ckpt["config"]) == OLD_FIELDS
        assert {k: ckpt["config"][k] for k in OLD_OFF} == OLD_OFF and ckpt["config"]["lstm_pooling"] == "max"
        assert ckpt["config"]["num_threads"] == 1 and ckpt["config"]["lr"] == 0.01  # every group, not only data/model
    params = yaml.safe_load((runs["old"] / PARAMS_FILE).read_text())
    assert list(params) == OLD_FIELDS and params["ema_decay"] == 0.0
    current = load_checkpoint(runs["new"] / MODEL_FILE)
    assert current["format_version"] == 2 and set(current["config"]) == set(fields_of("data", "model"))


def test_an_old_checkpoint_config_drops_the_retired_keys(runs):
    ckpt = load_checkpoint(runs["old"] / MODEL_FILE)
    cfg = checkpoint_config(ckpt)
    assert cfg.group("data", "model") == checkpoint_config(load_checkpoint(runs["new"] / MODEL_FILE)).group("data", "model")
    assert not set(RETIRED) & set(cfg.to_dict())
    assert load_config(runs["old"] / PARAMS_FILE) == load_config(runs["new"] / PARAMS_FILE)


# ----------------------------------------------------------------------------- predict, evaluate, resume


def test_an_old_run_predicts_as_it_did(runs):
    reference = probabilities(Predictor.from_run(runs["new"]))
    for predictor in (Predictor.from_run(runs["old"]), Predictor.from_checkpoint(runs["old"] / MODEL_FILE),
                      Predictor.from_run(runs["old"], ensemble=True)):
        assert predictor.label_names == ["sports", "business", "science"]
        if predictor.baseline is None:
            np.testing.assert_array_equal(probabilities(predictor), reference)
    assert Predictor.from_run(runs["old"]).predict(TEXTS[0])[0]["label"] == "sports"
    # its ensemble: the model with the TF-IDF + LR baseline of runs made before NB-LR, at the weight it reported
    weight = json.loads((runs["old"] / "metrics.json").read_text())["ensembles"]["model+tfidf_logreg"]["weight_other"]
    tfidf = tfidf_proba(load_tfidf_logreg(runs["old"] / TFIDF_FILE), TEXTS, 3)
    np.testing.assert_allclose(probabilities(Predictor.from_run(runs["old"], ensemble=True)),
                               mix_probs(reference, tfidf, weight), atol=1e-6)


def test_an_old_model_evaluates_as_it_did(runs):
    old = evaluate_checkpoint(runs["old"] / MODEL_FILE, progress=False)["metrics"]
    new = evaluate_checkpoint(runs["new"] / MODEL_FILE, progress=False)["metrics"]
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "label_names", "num_examples"):
        assert old[key] == new[key], key
    assert old["accuracy"] > 0.8


def resume(run_dir: Path, data, epochs: int):
    cfg = load_config(run_dir / PARAMS_FILE, {"resume": True, "epochs": epochs, "run_dir": str(run_dir)})
    return train(cfg, run_dir, data, progress=False)


def test_an_old_last_pt_resumes_exactly_like_a_new_one(runs):
    """Resuming the old last.pt (one more epoch) continues its history and gives the weights the same last.pt in
    format 2 gives; what it writes is format 2."""
    old = copy_run(runs["new"], runs["root"] / "resume-old")
    new = copy_run(runs["new"], runs["root"] / "resume-new", old=False)
    history = load_checkpoint(old / LAST_FILE)["history"]
    data = prepare_data(load_config(old / PARAMS_FILE))
    a = resume(old, data, epochs=len(history) + 1)
    b = resume(new, data, epochs=len(history) + 1)
    assert len(a.history) == len(history) + 1 and a.history[:-1] == history
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.history] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in b.history]
    last_a, last_b = load_checkpoint(old / LAST_FILE), load_checkpoint(new / LAST_FILE)
    assert last_a["epoch"] == len(history) + 1 and last_a["format_version"] == 2
    for k in last_b["model"]:
        assert torch.equal(last_a["model"][k], last_b["model"][k]), k


# ----------------------------------------------------------------------------- retired options switched on


@pytest.fixture(scope="module")
def switched_on(runs):
    """{(key, value): a copy of the tiny run in format 1 as if trained with that retired option on}."""
    return {(k, v): copy_run(runs["new"], runs["root"] / f"on-{k}", **{k: v}) for k, v, _ in SWITCHED_ON}


def assert_refused(call, key, version) -> None:
    with pytest.raises(ConfigError) as e:
        call()
    assert f"'{key}'" in str(e.value) and f"hybridlib {version}" in str(e.value), str(e.value)


@pytest.mark.parametrize("key,value,version", SWITCHED_ON, ids=[k for k, _, _ in SWITCHED_ON])
def test_a_retired_option_switched_on_is_refused_everywhere(switched_on, key, value, version, capsys):
    run = switched_on[(key, value)]
    assert yaml.safe_load((run / PARAMS_FILE).read_text())[key] == value
    assert_refused(lambda: load_config(run / PARAMS_FILE), key, version)  # what 02-05 and `hybridlib run --resume` read
    assert_refused(lambda: load_config(overrides={key: value}), key, version)  # a params file or -p
    assert_refused(lambda: checkpoint_config(load_checkpoint(run / MODEL_FILE)), key, version)
    assert_refused(lambda: Predictor.from_run(run), key, version)
    assert_refused(lambda: Predictor.from_checkpoint(run / LAST_FILE), key, version)
    assert_refused(lambda: evaluate_checkpoint(run / MODEL_FILE, progress=False), key, version)
    # resuming reads the run's params.yaml: refused before anything is written
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert_refused(lambda: train(load_config(run / PARAMS_FILE, {"resume": True}), run, progress=False), key, version)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / MODEL_FILE)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"hybridlib {version}" in err and "Traceback" not in err
