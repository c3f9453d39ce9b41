"""Run folders: creating and checking one, finding the finished ones, and their history and metrics."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path
from typing import Any

from hybridlib.config import Config, read_params_file
from hybridlib.errors import ConfigError, RunError
from hybridlib.files import (
    LAST_FILE,
    LOG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    damaged,
    read_json,
    refused_as_run_error,
    write_text,
)
from hybridlib.locations import pin_locations, project_root

LOG_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def outputs_root() -> Path:
    """Where runs go: $HYBRIDLIB_OUTPUTS, else <project>/outputs."""
    return Path(os.environ.get("HYBRIDLIB_OUTPUTS") or project_root() / "outputs")


def default_run_name(cfg: Config, root: Path | None = None) -> str:
    """<dataset>-<timestamp>, with -2, -3, ... when ``root`` already holds a run of that name (same second)."""
    name = f"{cfg.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = root is not None and (root / name).exists()
    suffix = 2
    while taken and (root / f"{name}-{suffix}").exists():
        suffix += 1
    return f"{name}-{suffix}" if taken else name


def check_new_run_dir(path: Path) -> None:
    """Refuse a run folder that exists (runs are never overwritten)."""
    if path.exists():
        raise RunError(
            f"Run folder {path} already exists; hybridlib never overwrites a run. Pick another --run-name, "
            f"or continue that run with `hybridlib run --resume {path}`."
        )


def create_run_dir(path: Path) -> Path:
    """Create a new, empty run folder; refuse one that exists."""
    check_new_run_dir(path)
    with refused_as_run_error(path, "create the run folder", creating=True):
        path.mkdir(parents=True)
    return path


def start_run(cfg: Config) -> Path:
    """The run folder for training: ``cfg.run_dir``, or a new outputs/<dataset>-<timestamp>. Writes params.yaml
    (if absent) and sets ``cfg.run_dir``."""
    pin_locations(cfg)
    run = Path(cfg.run_dir) if cfg.run_dir else create_run_dir(outputs_root() / default_run_name(cfg, outputs_root()))
    run.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run.resolve())
    if not (run / PARAMS_FILE).exists():
        write_text(run / PARAMS_FILE, cfg.to_yaml())
    return run


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Never train over a finished or interrupted run unless asked to resume it."""
    if resume:
        if not (run_dir / LAST_FILE).is_file():
            raise RunError(
                f"Cannot resume: {run_dir / LAST_FILE} does not exist (the run never finished an epoch). "
                f"Start a new run instead."
            )
        return
    for name in (MODEL_FILE, LAST_FILE):
        if (run_dir / name).exists():
            raise RunError(
                f"{run_dir} already holds a trained model ({name}); hybridlib never overwrites a run. "
                f"Choose a new run_dir (or --run-name), or continue it with resume=True / `hybridlib run --resume {run_dir}`."
            )


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """Finished runs (with model.pt) under ``root``, newest first, with dataset and test accuracy."""
    root = root or outputs_root()
    runs = []
    for d in root.iterdir() if root.is_dir() else []:
        if (d / MODEL_FILE).is_file():
            info = {"run_dir": d, "name": d.name, "mtime": (d / MODEL_FILE).stat().st_mtime,
                    "dataset": None, "test_accuracy": None}
            if (d / METRICS_FILE).is_file():
                try:
                    m = read_json(d / METRICS_FILE)
                except RunError as e:  # listed all the same: a damaged run never hides the others
                    m = {"damaged": str(e)}
                info.update(dataset=m.get("dataset"), test_accuracy=m.get("test_accuracy"), damaged=m.get("damaged"))
            else:  # trained, not evaluated yet: its dataset all the same
                with contextlib.suppress(ConfigError):
                    info["dataset"] = read_params_file(d / PARAMS_FILE).get("dataset")
            runs.append(info)
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)


def latest_run(root: Path | None = None) -> Path:
    runs = list_runs(root)
    if not runs:
        raise RunError(
            f"No finished run under {root or outputs_root()}. Train one first (02_training or `hybridlib run`)."
        )
    return runs[0]["run_dir"]


def write_history(history: list[dict[str, float]], run_dir: str | Path) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    w.writeheader()
    w.writerows(history)
    write_text(Path(run_dir) / LOG_FILE, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """training_log.csv as a list of rows ([] when the run has not finished an epoch)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    with refused_as_run_error(path, "read"), open(path, encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames
    if not header:
        raise damaged(path, "the file is empty")
    for i, row in enumerate(rows, 2):
        if None in row or None in row.values():
            raise damaged(path, f"line {i} does not have the header's {len(header)} columns")
        try:
            rows[i - 2] = {k: float(v) for k, v in row.items()}
        except ValueError as e:
            raise damaged(path, f"line {i}: {e}") from None
    return rows


def read_metrics(run_dir: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """metrics.json of a finished, evaluated run; one without ``keys`` is damaged (e.g. edited by hand)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {METRICS_FILE}: it is not a finished, evaluated run.")
    metrics = read_json(path)
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise damaged(path, f"no {', '.join(missing)}")
    return metrics
