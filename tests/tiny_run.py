"""A tiny trained run (model.pt, tokenizer/, params.yaml, metrics.json) for the prediction tests.

Trained once per test session (a few seconds; 5 epochs reach about 96 % on its test split, so the
tests that read its predictions and explanations see a model that has learnt the task) and shared
by test_prediction, test_predict_cli, test_old_runs, test_widgets and test_browser: call
``tiny_run(tmp_path_factory)``; treat the folder as read-only.
"""

from __future__ import annotations

from pathlib import Path

import fixtures

_CACHE: dict[str, Path] = {}


def make_tiny_run(root: Path, name: str = "tiny-run", **overrides) -> Path:
    """Train and evaluate a tiny model into ``root/outputs/<name>``; return the run folder."""
    from hybridlib.config import load_config
    from hybridlib.data import prepare_data
    from hybridlib.evaluation import evaluate_run
    from hybridlib.runs import start_run
    from hybridlib.training import train

    root = Path(root)
    data_dir = fixtures.make_tiny_dataset(root / "data")
    tok_dir = fixtures.make_tiny_tokenizer(root / "tokenizer")
    params = fixtures.write_tiny_params(root / "tiny.yaml", data_dir, tok_dir, **{"epochs": 5, **overrides})
    run_dir = root / "outputs" / name
    cfg = load_config(params, {"run_dir": str(run_dir)})
    start_run(cfg)  # writes params.yaml, as a pipeline run does
    data = prepare_data(cfg)
    train(cfg, run_dir, data, progress=False)
    evaluate_run(cfg, run_dir, data, progress=False)
    return run_dir


def tiny_run(tmp_path_factory) -> Path:
    """The session's tiny run (trained on first use)."""
    if "run" not in _CACHE:
        _CACHE["run"] = make_tiny_run(tmp_path_factory.mktemp("tiny_run"), baseline=True)  # + nblr.npz
    return _CACHE["run"]


def train_until_epoch(cfg, run_dir: Path, data, epoch: int) -> None:
    """Train ``cfg`` until ``epoch`` is saved in last.pt, then stop as an interruption (Ctrl-C) would."""
    import pytest

    from hybridlib import training
    from hybridlib.checkpoints import load_checkpoint

    real = training.save_epoch

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if load_checkpoint(Path(run_dir) / "last.pt")["epoch"] == epoch:
            raise KeyboardInterrupt

    training.save_epoch = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train(cfg, run_dir, data, progress=False)
    finally:
        training.save_epoch = real
