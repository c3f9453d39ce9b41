"""hybridlib bench on the tiny generated data: it runs end to end and reports every figure (no timing checks);
and the premise of its training comparison: the naive reference (every batch padded to ``max_length``, the
"padded" LSTM path) computes the same function as the project's path, on every device here."""

from __future__ import annotations

import json

import fixtures
import pytest
import torch

from hybridlib.batching import make_loader
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.training import init_model

bench = fixtures.load_benchmark("bench")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

SECTIONS = {
    "training": ["speedup", "padded_token_ratio"],
    "inference": ["eval_texts_per_s", "eval_tokens_per_s", "predict_p50_ms", "predict_p95_ms"],
    "tokenization": ["train_texts_per_s", "train_tokens_per_s", "train_tokenize_s", "prepare_cold_total_s",
                     "prepare_cached_s"],
    "memory": ["peak_rss_mb"],
}
PATH_KEYS = ["samples_per_s", "tokens_per_s", "padded_tokens_per_s", "seconds", "steps", "samples"]


def test_bench_json_has_every_figure(tiny_params, capsys):
    code = bench.main([str(tiny_params), "--json", "--steps", "2", "--warmup", "1", "--eval-texts", "32",
                 "--predict-n", "4", "-p", "batch_size", "8"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON only
    for section, keys in SECTIONS.items():
        for key in keys:
            value = out[section][key]
            assert isinstance(value, (int, float)) and value > 0, (section, key, value)
    for path in ("hybridlib", "naive"):
        for key in PATH_KEYS:
            assert out["training"][path][key] > 0, (path, key)
        assert out["training"][path]["steps"] == 2
    # both paths trained on the same samples; padding to max_length changes no logit
    assert out["training"]["hybridlib"]["samples"] == out["training"]["naive"]["samples"]
    # the naive path pads every batch to max_length: it computes on more tokens per sample
    assert out["training"]["naive"]["padding_fraction"] > out["training"]["hybridlib"]["padding_fraction"]
    # the second prepare_data reused the tokenized files of the first
    assert out["tokenization"]["cold"] is True and out["tokenization"]["cache_reused"] is True
    assert out["tokenization"]["train_texts"] > 0 and out["machine"]["torch_threads"] >= 1


def test_bench_table(tiny_params, capsys):
    code = bench.main([str(tiny_params), "--steps", "1", "--warmup", "1", "--eval-texts", "16",
                 "--predict-n", "3", "--no-cold"])
    assert code == 0
    text = capsys.readouterr().out
    for phrase in ("training", "naive", "speedup", "evaluation path", "Predictor.predict", "cached", "peak RSS"):
        assert phrase in text


def first_batch(tiny_params, device: str):
    """(model in eval mode, the first training batch of the project's loader, cfg) on ``device``, in fp32."""
    cfg = load_config(tiny_params, {"batch_size": 8, "device": device, "precision": "fp32"})
    data = prepare_data(cfg)
    model = init_model(cfg, data, torch.device(device)).eval()
    return model, next(iter(make_loader(data.splits["train"], cfg, data.pad_id, epoch=1))), cfg, data


@pytest.mark.parametrize("device", DEVICES)
def test_padding_every_batch_to_max_length_changes_no_logit(tiny_params, device):
    model, batch, cfg, data = first_batch(tiny_params, device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.size(1) < cfg.max_length  # padded per batch: shorter than the naive reference's batches
    wide = torch.full((ids.size(0), cfg.max_length), data.pad_id, dtype=ids.dtype)
    wide[:, : ids.size(1)] = ids
    wide_mask = torch.zeros_like(wide, dtype=torch.bool)
    wide_mask[:, : mask.size(1)] = mask
    with torch.inference_mode():
        a = model(ids.to(device), mask.to(device)).float()
        b = model(wide.to(device), wide_mask.to(device)).float()
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_both_lstm_paths_give_the_same_features_on_a_real_batch(tiny_params, device):
    """The naive reference runs the "padded" LSTM path on every device, the project "packed" on CUDA."""
    model, batch, _, _ = first_batch(tiny_params, device)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = {}
    with torch.no_grad():  # not inference_mode: switching paths re-packs the weights on CUDA
        for path in ("padded", "packed"):
            model.lstm.path = path
            out[path] = model.branch_features(ids, mask)["lstm"].float()
    finite = torch.isfinite(out["padded"])
    assert torch.equal(finite, torch.isfinite(out["packed"])) and finite.any()
    assert (out["padded"][finite] - out["packed"][finite]).abs().max() < 1e-5
