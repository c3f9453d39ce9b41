"""hybridlib.checkpoints + what training writes: round trip, format 2, compatibility, bad files.

Malicious pickles, refusing to overwrite a run and checkpoints written on a GPU are in test_reliability.py;
checkpoints of the previous format (1) in test_old_runs.py.
"""

from __future__ import annotations

import csv

import pytest
import torch

from hybridlib.checkpoints import (
    FORMAT_VERSION,
    check_compatible,
    checkpoint_config,
    load_checkpoint,
    load_model,
    model_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from hybridlib.config import Config, fields_of, load_config
from hybridlib.data import prepare_data
from hybridlib.errors import CheckpointError, RunError
from hybridlib.runs import LOG_COLUMNS
from hybridlib.tokens import load_tokenizer
from hybridlib.training import train, validate

CKPT_KEYS = {"format_version", "model", "config", "label_names", "tokenizer", "epoch", "best_metric"}
EPOCHS = 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_params):
    """One tiny training run (2 epochs) shared by the tests of this module."""
    cfg = load_config(tiny_params, overrides={"epochs": EPOCHS})
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-run"
    result = train(cfg, run_dir, progress=False)
    return cfg, run_dir, result


def sample_batch(vocab_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (6, 20), generator=g)
    for i, n in enumerate([20, 15, 9, 4, 2, 1]):
        ids[i, n:] = pad_id
    return ids, ids.ne(pad_id)


# ----------------------------------------------------------------------------- training outputs


def test_training_writes_run_files(trained_run):
    cfg, run_dir, result = trained_run
    for name in ("model.pt", "last.pt", "training_log.csv", "train_info.json", "tokenizer/tokenizer_config.json"):
        assert (run_dir / name).is_file(), name
    assert len(load_tokenizer(str(run_dir / "tokenizer"))) == load_checkpoint(run_dir / "model.pt")["tokenizer"]["vocab_size"]
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    assert len(result.history) == EPOCHS
    assert 1 <= result.best_epoch <= EPOCHS
    assert result.num_parameters > 0
    assert result.best_val_accuracy > 0.5  # 3 easy classes: well above chance (1/3) after 2 epochs


def test_training_log(trained_run):
    cfg, run_dir, result = trained_run
    with open(run_dir / "training_log.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == LOG_COLUMNS == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                                "lr", "seconds"]
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, EPOCHS + 1))
    for row, hist in zip(rows, result.history, strict=True):
        for key in LOG_COLUMNS:
            assert float(row[key]) == pytest.approx(hist[key])
        assert 0.0 <= float(row["train_accuracy"]) <= 1.0 and 0.0 <= float(row["val_accuracy"]) <= 1.0
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0 and float(row["seconds"]) >= 0


def test_model_pt_loads_with_weights_only(trained_run):
    _, run_dir, result = trained_run
    raw = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    ckpt = load_checkpoint(run_dir / "model.pt")
    assert set(raw) == set(ckpt) == CKPT_KEYS
    assert ckpt["label_names"] == ["sports", "business", "science"]
    assert ckpt["epoch"] == result.best_epoch
    assert ckpt["best_metric"] == pytest.approx(result.best_val_accuracy)
    assert {"vocab_size", "pad_id", "name", "fingerprint"} <= set(ckpt["tokenizer"])
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    for a, b in zip(raw["model"].values(), ckpt["model"].values(), strict=True):
        assert torch.equal(a, b)
    # last.pt (resume state) loads safely too
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == EPOCHS
    assert CKPT_KEYS | {"optimizer", "scheduler", "scaler", "rng", "history", "best_epoch", "bad_epochs"} <= set(last)


def test_format_2_stores_the_data_and_model_groups_only(trained_run):
    """model.pt's config is what rebuilds the model and its tokenization; no lr, seed, threads or run folder."""
    cfg, run_dir, _ = trained_run
    for name in ("model.pt", "last.pt"):
        ckpt = load_checkpoint(run_dir / name)
        assert ckpt["format_version"] == FORMAT_VERSION == 2
        assert ckpt["config"] == cfg.group("data", "model")
        assert list(ckpt["config"]) == fields_of("data", "model")
    for key in ("lr", "seed", "epochs", "num_threads", "device", "run_dir", "resume", "adversarial_eps"):
        assert key not in ckpt["config"], key
    restored = checkpoint_config(ckpt)
    assert restored.group("data", "model") == cfg.group("data", "model")
    assert restored.group("training", "machine", "run") == Config().group("training", "machine", "run")  # defaults


def test_rebuilt_model_gives_identical_logits(trained_run, tiny_tokenizer):
    cfg, run_dir, result = trained_run
    ckpt = load_checkpoint(run_dir / "model.pt")
    a = model_from_checkpoint(ckpt)
    b, _ = load_model(run_dir / "model.pt", vocab_size=ckpt["tokenizer"]["vocab_size"], label_names=ckpt["label_names"])
    assert not a.training and not b.training
    ids, mask = sample_batch(ckpt["tokenizer"]["vocab_size"], ckpt["tokenizer"]["pad_id"])
    with torch.no_grad():
        la, lb = a(ids, mask), b(ids, mask)
    assert torch.equal(la, lb)
    assert la.shape == (6, 3) and torch.isfinite(la).all()

    # It is the trained model: on the same validation split it reproduces the logged metrics exactly.
    data = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert ckpt["tokenizer"]["vocab_size"] == data.vocab_size
    val_loss, val_acc = validate(a, data.splits["validation"], cfg, data.pad_id)
    assert val_acc == pytest.approx(ckpt["best_metric"], abs=1e-9)
    best_row = result.history[ckpt["epoch"] - 1]
    assert val_loss == pytest.approx(best_row["val_loss"], rel=1e-5)

    last = load_checkpoint(run_dir / "last.pt")
    if last["epoch"] == ckpt["epoch"]:  # best epoch was the last one: same weights in both files
        with torch.no_grad():
            assert torch.equal(model_from_checkpoint(last)(ids, mask), la)


def test_model_checkpoint_of_an_untrained_model(tiny_cfg, tiny_tokenizer, tmp_path):
    """model_checkpoint + save_checkpoint + model_from_checkpoint round-trip any model (bench writes one)."""
    from hybridlib.model import build_model

    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    model = build_model(tiny_cfg, data.vocab_size, len(data.label_names), data.pad_id).eval()
    save_checkpoint(model_checkpoint(model, tiny_cfg, data, epoch=0, best_metric=-1.0), tmp_path / "m.pt")
    back = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    ids, mask = sample_batch(data.vocab_size, data.pad_id)
    with torch.no_grad():
        assert torch.equal(back(ids, mask), model(ids, mask))


# ----------------------------------------------------------------------------- compatibility


def test_check_compatible(trained_run):
    _, run_dir, _ = trained_run
    ckpt = load_checkpoint(run_dir / "model.pt")
    vocab, names = ckpt["tokenizer"]["vocab_size"], ckpt["label_names"]
    check_compatible(ckpt, vocab_size=vocab, label_names=list(names))  # matching: no error
    check_compatible(ckpt)

    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, vocab_size=vocab + 1, label_names=list(names))
    assert str(vocab) in str(e.value) and str(vocab + 1) in str(e.value)
    assert "vocabulary" in str(e.value)

    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, vocab_size=vocab, label_names=["neg", "pos"])
    msg = str(e.value)
    assert "3 classes" in msg and "has 2" in msg and "neg" in msg
    assert "sports" in msg

    # as many classes, other names: refused too (the ids would be read as the checkpoint's classes)
    with pytest.raises(CheckpointError, match="set label_names to"):
        check_compatible(ckpt, label_names=[n.upper() for n in names])


# ----------------------------------------------------------------------------- missing / foreign files


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_foreign_and_corrupt_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a hybridlib checkpoint"):
        load_checkpoint(plain)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt' is not a whole PyTorch checkpoint"):
        load_checkpoint(junk)
    cut, yaml_file = tmp_path / "cut.pt", tmp_path / "params.yaml"  # neither is taken for an unsafe pickle
    cut.write_bytes(plain.read_bytes()[:300])
    yaml_file.write_text("epochs: 1\n")
    for path in (cut, yaml_file):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert "not a whole PyTorch checkpoint" in str(e.value) and "run code" not in str(e.value)


def test_save_checkpoint_is_atomic_and_loadable(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    ckpt = {"model": {"w": torch.arange(3.0)}, "config": Config().group("data", "model"), "label_names": ["a", "b"]}
    save_checkpoint(ckpt, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]


def test_resume_without_last_pt(tmp_path, tiny_cfg):
    tiny_cfg.resume = True
    with pytest.raises(RunError, match="last.pt"):
        train(tiny_cfg, tmp_path / "new-run", progress=False)
