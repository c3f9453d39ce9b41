"""Every committed params file takes the README's quick-run overrides (`-p epochs 1`, sample caps, `max_length`),
from the command line and through papermill on notebook 02, and a run's terminal shows each epoch's line.

The params files run as committed: their dataset and tokenizer names are served from a shelf of tiny stand-ins
($HYBRIDLIB_DATA_DIR/<dataset> with as many classes as the file's label_names, $HYBRIDLIB_TOKENIZERS_DIR/<tokenizer>
holding a tiny WordPiece vocabulary), so nothing but the overrides differs from a user's run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fixtures
import papermill as pm
import pytest
import yaml

from hybridlib.config import FIELDS, load_config

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "params").glob("*.yaml"))
QUICK = {"epochs": 1, "max_train_samples": 120, "max_eval_samples": 40}
EPOCH_LINE = re.compile(r"^epoch 1: train_loss \d\.\d{4} .* val_acc \d\.\d{4} \(\d+\.\ds\)", re.M)


@pytest.fixture(scope="module")
def shelf(tmp_path_factory) -> dict[str, str]:
    """Environment variables serving every committed params file's dataset and tokenizer from tiny stand-ins."""
    root = tmp_path_factory.mktemp("shelf")
    texts, _ = fixtures.make_texts(400, seed=7)
    for path in COMMITTED:
        values = yaml.safe_load(path.read_text())
        num_classes = len(values.get("label_names") or fixtures.LABEL_NAMES)
        folder = root / "data" / values.get("dataset", FIELDS["dataset"].default)
        folder.mkdir(parents=True, exist_ok=True)
        for split, (lo, hi) in {"train": (0, 300), "test": (300, 400)}.items():
            rows = {"text": texts[lo:hi], "label": [i % num_classes for i in range(hi - lo)]}
            fixtures.write_rows(rows, folder / f"{split}.parquet", "parquet")
        fixtures.make_tiny_tokenizer(root / "tokenizers" / values.get("tokenizer", FIELDS["tokenizer"].default), texts)
    return {"HYBRIDLIB_DATA_DIR": str(root / "data"), "HYBRIDLIB_TOKENIZERS_DIR": str(root / "tokenizers")}


@pytest.mark.parametrize("params", COMMITTED, ids=lambda p: p.stem)
@pytest.mark.parametrize("key,value", [("epochs", 1), ("max_train_samples", 1), ("max_eval_samples", 1),
                                       ("max_length", 2)])
def test_a_quick_run_override_alone_is_never_refused(params, key, value):
    cfg = load_config(params, {key: value})
    assert getattr(cfg, key) == value
    assert cfg.swa_start <= cfg.epochs


def test_a_shorter_run_starts_weight_averaging_at_its_last_epoch(capsys):
    cfg = load_config(ROOT / "params" / "imdb.yaml", {"epochs": 1})
    assert (cfg.epochs, cfg.swa_start) == (1, 1)
    assert "epochs 1 < swa_start 2: weight averaging starts at epoch 1." in capsys.readouterr().err
    assert load_config(ROOT / "params" / "imdb.yaml", {"epochs": 3}).swa_start == 2  # within the run: as written


@pytest.mark.parametrize("values,overrides", [({"epochs": 2, "swa_start": 3}, {}),
                                              ({}, {"epochs": 2, "swa_start": 3}),
                                              ({"epochs": 2}, {"swa_start": 3})],
                         ids=["file", "overrides", "swa_start_override"])
def test_settings_that_contradict_themselves_are_still_refused(tmp_path, values, overrides):
    from hybridlib.errors import ConfigError

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="swa_start is 3 but epochs is 2"):
        load_config(params, overrides)


@pytest.mark.parametrize("params", COMMITTED, ids=lambda p: p.stem)
def test_quick_run_from_the_command_line(params, shelf, tmp_path):
    """`hybridlib run PARAMS -p epochs 1 -p max_train_samples N ...` as the README says: all five notebooks, and
    the terminal shows which notebook runs and the epoch's line with its validation accuracy as it lands."""
    args = [a for k, v in {**QUICK, "max_length": 16}.items() for a in ("-p", k, str(v))]
    res = subprocess.run([sys.executable, "-m", "hybridlib", "run", str(params), "--outputs", str(tmp_path),
                          "--run-name", "quick", *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, **shelf})
    assert res.returncode == 0, res.stderr[-3000:]
    assert EPOCH_LINE.search(res.stdout), res.stdout[-3000:]
    assert "[hybridlib] 2/5 02_training.ipynb" in res.stderr
    assert "Traceback" not in res.stderr and "without encryption" not in res.stderr, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "quick" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["params"]["epochs"] == 1


@pytest.mark.parametrize("params", COMMITTED, ids=lambda p: p.stem)
def test_quick_run_through_papermill_on_notebook_02(params, shelf, tmp_path, monkeypatch):
    """papermill notebooks/02_training.ipynb out.ipynb -p params_file PARAMS -p epochs 1 (+ sample caps)."""
    for k, v in shelf.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "notebooks" / "02_training.ipynb"), str(tmp_path / "02.ipynb"),
                        parameters={"params_file": str(params), "run_dir": str(run), **QUICK},
                        cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    log = (run / "training_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[1].startswith("1,"), log
    assert yaml.safe_load((run / "params.yaml").read_text())["epochs"] == 1
