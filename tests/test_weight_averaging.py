"""swa_start: from that epoch on, validation and model.pt use the running average of the end-of-epoch weights;
last.pt carries the average so that a resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_run import train_until_epoch

from hybridlib import training
from hybridlib.checkpoints import load_checkpoint
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.errors import ConfigError
from hybridlib.runs import read_history

EPOCHS, SWA_START = 4, 2


@pytest.fixture(scope="module")
def swa_cfg(tiny_params):
    return load_config(tiny_params, overrides={"epochs": EPOCHS, "swa_start": SWA_START})


@pytest.fixture(scope="module")
def swa_data(swa_cfg):
    return prepare_data(swa_cfg)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, swa_cfg, swa_data):
    """An uninterrupted run, with each epoch's last weights and the weights it validated and could keep."""
    raw, kept = [], []
    real = training.save_epoch

    def record(loop, kept_model, *args, **kwargs):
        raw.append(weights(loop.model))
        kept.append(weights(kept_model))
        real(loop, kept_model, *args, **kwargs)

    training.save_epoch = record
    try:
        run_dir = tmp_path_factory.mktemp("swa") / "run"
        result = training.train(swa_cfg, run_dir, swa_data, progress=False)
    finally:
        training.save_epoch = real
    return run_dir, result, raw, kept


def test_kept_weights_are_the_average_from_swa_start(recorded):
    _, _, raw, kept = recorded
    assert len(raw) == len(kept) == EPOCHS
    for key in raw[0]:
        torch.testing.assert_close(kept[0][key], raw[0][key], rtol=0, atol=0)  # before swa_start: the weights
        for epoch in range(SWA_START, EPOCHS + 1):
            expected = torch.stack([raw[e - 1][key].float() for e in range(SWA_START, epoch + 1)]).mean(0)
            torch.testing.assert_close(kept[epoch - 1][key].float(), expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(kept[-1][k], raw[-1][k]) for k in raw[-1])  # the average is not the last weights


def test_validation_and_model_pt_use_the_kept_weights(recorded, swa_cfg, swa_data):
    run_dir, result, _, kept = recorded
    model = training.init_model(swa_cfg, swa_data, torch.device("cpu"), pretrained=False)
    for epoch, row in enumerate(read_history(run_dir), 1):
        model.load_state_dict(kept[epoch - 1])
        loss, acc = training.validate(model, swa_data.splits["validation"], swa_cfg, swa_data.pad_id)
        assert (loss, acc) == pytest.approx((row["val_loss"], row["val_accuracy"]))
    best = load_checkpoint(run_dir / "model.pt")
    assert best["epoch"] == result.best_epoch
    for key, value in kept[result.best_epoch - 1].items():
        assert torch.equal(best["model"][key], value), key


def test_a_resumed_run_ends_like_an_uninterrupted_one(recorded, swa_cfg, swa_data, tmp_path):
    """Stopped after epoch 3 (the average holds epochs 2 and 3), then resumed: same log, model.pt and last.pt."""
    run_dir = tmp_path / "run"
    train_until_epoch(swa_cfg, run_dir, swa_data, 3)
    training.train(dataclasses.replace(swa_cfg, resume=True), run_dir, swa_data, progress=False)
    reference = recorded[0]
    assert [(r["epoch"], r["val_loss"], r["val_accuracy"]) for r in read_history(run_dir)] == \
        [(r["epoch"], r["val_loss"], r["val_accuracy"]) for r in read_history(reference)]
    for name in ("model.pt", "last.pt"):
        mine, ref = load_checkpoint(run_dir / name), load_checkpoint(reference / name)
        assert mine["epoch"] == ref["epoch"]
        for key in ref["model"]:
            assert torch.equal(mine["model"][key], ref["model"][key]), (name, key)
    last, ref_last = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    for key in ref_last["averaged"]:
        assert torch.equal(last["averaged"][key], ref_last["averaged"][key]), key


@pytest.mark.parametrize("swa_start", [5, 9])
def test_swa_start_after_the_last_epoch_is_refused(tiny_params, swa_start):
    with pytest.raises(ConfigError, match=r"swa_start is \d+ but epochs is 4.*at most epochs"):
        load_config(tiny_params, overrides={"epochs": 4, "swa_start": swa_start})
