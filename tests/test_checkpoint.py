"""hybridlib.checkpoint + training outputs: safe loading, round trip, compatibility, never overwrite."""

from __future__ import annotations

import csv
import hashlib
import os

import pytest
import torch

from hybridlib.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from hybridlib.config import Config, config_from_dict
from hybridlib.data import prepare_data
from hybridlib.errors import CheckpointError, RunError
from hybridlib.model import build_model, for_loading
from hybridlib.training import LOG_COLUMNS, train, validate

CKPT_KEYS = {"model", "config", "label_names", "tokenizer", "epoch", "best_metric"}
EPOCHS = 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_params):
    """One tiny training run (2 epochs) shared by the tests of this module."""
    from hybridlib.config import load_config

    cfg = load_config(tiny_params, overrides={"epochs": EPOCHS})
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-run"
    result = train(cfg, run_dir, progress=False)
    return cfg, run_dir, result


def rebuild(ckpt: dict) -> torch.nn.Module:
    cfg = for_loading(config_from_dict(ckpt["config"]))
    tok = ckpt["tokenizer"]
    model = build_model(cfg, tok["vocab_size"], len(ckpt["label_names"]), tok["pad_id"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def sample_batch(vocab_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (6, 20), generator=g)
    for i, n in enumerate([20, 15, 9, 4, 2, 1]):
        ids[i, n:] = pad_id
    return ids, ids.ne(pad_id)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- training outputs


def test_training_writes_run_files(trained_run):
    cfg, run_dir, result = trained_run
    assert (run_dir / "model.pt").is_file()
    assert (run_dir / "last.pt").is_file()
    assert (run_dir / "training_log.csv").is_file()
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
        assert reader.fieldnames == [
            "epoch",
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "lr",
            "seconds",
        ]
    assert LOG_COLUMNS == reader.fieldnames
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, EPOCHS + 1))
    for row, hist in zip(rows, result.history, strict=True):
        for key in LOG_COLUMNS:
            assert float(row[key]) == pytest.approx(hist[key])
        assert 0.0 <= float(row["train_accuracy"]) <= 1.0 and 0.0 <= float(row["val_accuracy"]) <= 1.0
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0 and float(row["seconds"]) >= 0


def test_model_pt_loads_with_weights_only(trained_run):
    _, run_dir, result = trained_run
    raw = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert CKPT_KEYS <= set(raw)
    ckpt = load_checkpoint(run_dir / "model.pt")
    assert CKPT_KEYS <= set(ckpt)
    assert ckpt["label_names"] == ["sports", "business", "science"]
    assert ckpt["epoch"] == result.best_epoch
    assert ckpt["best_metric"] == pytest.approx(result.best_val_accuracy)
    assert {"vocab_size", "pad_id", "name"} <= set(ckpt["tokenizer"])
    assert isinstance(ckpt["config"], dict)
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    for a, b in zip(raw["model"].values(), ckpt["model"].values(), strict=True):
        assert torch.equal(a, b)
    # last.pt (resume state) loads safely too
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == EPOCHS
    assert {"optimizer", "scheduler", "rng", "history"} <= set(last)


def test_config_round_trips(trained_run):
    cfg, run_dir, _ = trained_run
    ckpt = load_checkpoint(run_dir / "model.pt")
    assert config_from_dict(ckpt["config"]) == cfg


def test_rebuilt_model_gives_identical_logits(trained_run, tiny_tokenizer):
    cfg, run_dir, result = trained_run
    ckpt = load_checkpoint(run_dir / "model.pt")
    a = rebuild(ckpt)
    b = rebuild(torch.load(run_dir / "model.pt", weights_only=True))
    ids, mask = sample_batch(ckpt["tokenizer"]["vocab_size"], ckpt["tokenizer"]["pad_id"])
    with torch.no_grad():
        la, lb = a(ids, mask), b(ids, mask)
    assert torch.equal(la, lb)
    assert la.shape == (6, 3) and torch.isfinite(la).all()

    # It is the trained model: on the same validation split it reproduces the logged metrics exactly.
    data = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert ckpt["tokenizer"]["vocab_size"] == data.vocab_size
    val_loss, val_acc = validate(a, data.splits["validation"], cfg, data.pad_id, torch.device("cpu"), None)
    assert val_acc == pytest.approx(ckpt["best_metric"], abs=1e-9)
    best_row = result.history[ckpt["epoch"] - 1]
    assert val_loss == pytest.approx(best_row["val_loss"], rel=1e-5)

    last = load_checkpoint(run_dir / "last.pt")
    if last["epoch"] == ckpt["epoch"]:  # best epoch was the last one: same weights in both files
        with torch.no_grad():
            assert torch.equal(rebuild(last)(ids, mask), la)


# ----------------------------------------------------------------------------- compatibility


def test_check_compatible(trained_run):
    _, run_dir, _ = trained_run
    ckpt = load_checkpoint(run_dir / "model.pt")
    vocab = ckpt["tokenizer"]["vocab_size"]
    check_compatible(ckpt, vocab_size=vocab, num_classes=3)  # matching: no error
    check_compatible(ckpt)

    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, vocab_size=vocab + 1, num_classes=3)
    assert str(vocab) in str(e.value) and str(vocab + 1) in str(e.value)
    assert "vocabulary" in str(e.value)

    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, vocab_size=vocab, num_classes=2)
    msg = str(e.value)
    assert "3 classes" in msg and "2" in msg
    assert "sports" in msg


# ----------------------------------------------------------------------------- unsafe / foreign files


class _Payload:
    """Unpickling this would create ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "model.pt"
    torch.save({"model": {}, "config": {}, "payload": _Payload(str(marker))}, evil)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert "model.pt" in str(e.value)
    assert "Refused" in str(e.value) or "refused" in str(e.value)

    # control: the payload is live (an unsafe load does run it), so the refusal above is meaningful
    unsafe = torch.load(evil, weights_only=False)
    unsafe["payload"].close()
    assert marker.exists()


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
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)


def test_save_checkpoint_is_atomic_and_loadable(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    ckpt = {"model": {"w": torch.arange(3.0)}, "config": Config().to_dict(), "label_names": ["a", "b"]}
    save_checkpoint(ckpt, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]


# ----------------------------------------------------------------------------- never overwrite a run


@pytest.mark.parametrize("existing", ["model.pt", "last.pt"])
def test_training_refuses_existing_run(tmp_path, tiny_cfg, existing):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = run_dir / existing
    old.write_bytes(os.urandom(256))
    before = sha256(old)
    with pytest.raises(RunError) as e:
        train(tiny_cfg, run_dir, progress=False)
    assert existing in str(e.value)
    assert sha256(old) == before
    assert sorted(p.name for p in run_dir.iterdir()) == [existing]


def test_training_refuses_existing_real_run(trained_run, tiny_cfg):
    _, run_dir, _ = trained_run
    before = {p.name: sha256(p) for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(RunError):
        train(tiny_cfg, run_dir, progress=False)
    assert {p.name: sha256(p) for p in run_dir.iterdir() if p.is_file()} == before


def test_resume_without_last_pt(tmp_path, tiny_cfg):
    tiny_cfg.resume = True
    with pytest.raises(RunError, match="last.pt"):
        train(tiny_cfg, tmp_path / "new-run", progress=False)


def test_ema_saves_and_validates_the_average_and_resumes_exactly(tmp_path, tiny_cfg):
    """ema_decay: model.pt holds the moving average (the weights whose validation accuracy was logged),
    last.pt the raw weights plus the average; a resumed run ends exactly like an uninterrupted one."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, epochs=3, ema_decay=0.9, patience=0)
    data = prepare_data(cfg)
    full = train(cfg, tmp_path / "full", data, progress=False)
    best, last = load_checkpoint(tmp_path / "full" / "model.pt"), load_checkpoint(tmp_path / "full" / "last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert ema.keys() == last["model"].keys()
    assert any(not torch.equal(ema[k], last["model"][k]) for k in ema)  # the average is not the raw weights
    model = rebuild(best)
    _, val_acc = validate(model, data.splits["validation"], cfg, data.pad_id, torch.device("cpu"), None)
    assert val_acc == pytest.approx(full.history[best["epoch"] - 1]["val_accuracy"])
    if best["epoch"] == 3:
        assert all(torch.equal(best["model"][k], ema[k]) for k in ema)

    # stop after epoch 2 (the same 3-epoch schedule), then resume: the same weights and log
    import hybridlib.training as T

    part = tmp_path / "part"
    real_validate, calls = T.validate, []

    def validate_then_stop(*args, **kwargs):
        out = real_validate(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after epoch 2's checkpoints, before epoch 3 is saved
        return out

    T.validate = validate_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, part, data, progress=False)
    finally:
        T.validate = real_validate
    assert load_checkpoint(part / "last.pt")["epoch"] == 2
    resumed = train(dataclasses.replace(cfg, resume=True), part, data, progress=False)
    assert [r["val_accuracy"] for r in resumed.history] == [r["val_accuracy"] for r in full.history]
    for name in ("model.pt", "last.pt"):
        a, b = load_checkpoint(part / name), load_checkpoint(tmp_path / "full" / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    with pytest.raises(RunError, match="saved without ema_decay"):
        no_ema = tmp_path / "no-ema"
        train(dataclasses.replace(cfg, ema_decay=0.0, epochs=1), no_ema, data, progress=False)
        train(dataclasses.replace(cfg, epochs=1, resume=True), no_ema, data, progress=False)
