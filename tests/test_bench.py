"""hybridlib bench on the tiny generated data: it runs end to end and reports every figure (no timing checks)."""

from __future__ import annotations

import json

from hybridlib.cli import main

SECTIONS = {
    "training": ["speedup", "padded_token_ratio"],
    "inference": ["eval_texts_per_s", "eval_tokens_per_s", "predict_p50_ms", "predict_p95_ms"],
    "tokenization": ["train_texts_per_s", "train_tokens_per_s", "train_tokenize_s", "prepare_cold_total_s",
                     "prepare_cached_s"],
    "memory": ["peak_rss_mb"],
}
PATH_KEYS = ["samples_per_s", "tokens_per_s", "padded_tokens_per_s", "seconds", "steps", "samples"]


def test_bench_json_has_every_figure(tiny_params, capsys):
    code = main(["bench", str(tiny_params), "--json", "--steps", "2", "--warmup", "1", "--eval-texts", "32",
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
    assert out["training"]["padding_invariance_max_abs_diff"] < 1e-4
    # the naive path pads every batch to max_length: it computes on more tokens per sample
    assert out["training"]["naive"]["padding_fraction"] > out["training"]["hybridlib"]["padding_fraction"]
    # the second prepare_data reused the tokenized files of the first
    assert out["tokenization"]["cold"] is True and out["tokenization"]["cache_reused"] is True
    assert out["tokenization"]["train_texts"] > 0 and out["machine"]["torch_threads"] >= 1


def test_bench_table(tiny_params, capsys):
    code = main(["bench", str(tiny_params), "--steps", "1", "--warmup", "1", "--eval-texts", "16",
                 "--predict-n", "3", "--no-cold"])
    assert code == 0
    text = capsys.readouterr().out
    for phrase in ("training", "naive", "speedup", "evaluation path", "Predictor.predict", "cached", "peak RSS"):
        assert phrase in text
