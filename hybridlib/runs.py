"""Run directories: where runs live, naming, finding the newest, and the notebooks' parameters."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hybridlib.config import NAMED_EMBEDDINGS, Config, load_config
from hybridlib.errors import RunError

PATH_FIELDS = ("data_dir", "pretrained_embeddings", "run_dir")
PLAIN = (str, int, float, bool, list, tuple, dict, type(None))  # parameter values (imports etc. are not)


def project_root() -> Path:
    """The folder holding notebooks/ and params/ (the repo), found from this package or the cwd."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here, Path.cwd(), *Path.cwd().parents):
        if (cand / "notebooks").is_dir() and (cand / "params").is_dir():
            return cand
    return Path.cwd()


def outputs_root() -> Path:
    """Where runs go: $HYBRIDLIB_OUTPUTS, else <project>/outputs."""
    return Path(os.environ.get("HYBRIDLIB_OUTPUTS") or project_root() / "outputs")


def default_run_name(cfg: Config) -> str:
    return f"{cfg.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(path: Path) -> Path:
    """Create a new, empty run folder; refuse one that exists (runs are never overwritten)."""
    if path.exists():
        raise RunError(
            f"Run folder {path} already exists; hybridlib never overwrites a run. Pick another --run-name, "
            f"or continue that run with `hybridlib run --resume {path}`."
        )
    path.mkdir(parents=True)
    return path


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """Finished runs (with model.pt) under ``root``, newest first, with dataset and test accuracy."""
    root = root or outputs_root()
    runs = []
    for d in root.iterdir() if root.is_dir() else []:
        if (d / "model.pt").is_file():
            info = {"run_dir": d, "name": d.name, "mtime": (d / "model.pt").stat().st_mtime,
                    "dataset": None, "test_accuracy": None}
            if (d / "metrics.json").is_file():
                m = json.loads((d / "metrics.json").read_text())
                info.update(dataset=m.get("dataset"), test_accuracy=m.get("test_accuracy"))
            runs.append(info)
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)


def latest_run(root: Path | None = None) -> Path:
    runs = list_runs(root)
    if not runs:
        raise RunError(
            f"No finished run under {root or outputs_root()}. Train one first (02_training or `hybridlib run`)."
        )
    return runs[0]["run_dir"]


def resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative path parameters absolute against ``base`` (tokenizer only if such a folder exists)."""
    out = dict(values)
    for key in PATH_FIELDS:
        if key == "pretrained_embeddings" and out.get(key) in NAMED_EMBEDDINGS:
            continue  # a named source, not a path
        if out.get(key) and not Path(out[key]).expanduser().is_absolute():
            out[key] = str((base / out[key]).resolve())
    tok = out.get("tokenizer")
    if tok and not Path(tok).is_absolute() and (base / tok).is_dir():
        out["tokenizer"] = str((base / tok).resolve())
    return out


class NotebookParams:
    """The parameters of a notebook: create it in the first cell, before the ``parameters`` cell.

    Every name defined after it (in the ``parameters`` cell, or injected by papermill ``-p``/``-f``)
    is a parameter: ``params_file`` names a YAML to start from (default: $HYBRIDLIB_PARAMS, else the
    Config defaults), every other name must be a Config field. Relative paths are taken from the
    project root, so the same values work in JupyterLab, papermill and the CLI.
    """

    def __init__(self, namespace: dict[str, Any]):
        self.namespace = namespace
        self.before = set(namespace)

    def values(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.namespace.items()
            if k not in self.before and not k.startswith("_") and isinstance(v, PLAIN)
        }

    def config(self) -> Config:
        """The validated Config for data exploration and training."""
        values = self.values()
        params_file = values.pop("params_file", None) or os.environ.get("HYBRIDLIB_PARAMS")
        if values.get("run_dir") is None:
            values.pop("run_dir", None)
        root = project_root()
        if params_file and not Path(params_file).is_absolute():
            params_file = str(root / params_file)
        cfg = load_config(params_file, values)
        return Config(**resolve_paths(cfg.to_dict(), root))

    def run_config(self) -> tuple[Config, Path]:
        """(Config, run folder) of a trained run: ``run_dir`` or the newest run; its params.yaml."""
        values = self.values()
        run_dir = values.pop("run_dir", None)
        values.pop("params_file", None)
        run = Path(resolve_paths({"run_dir": run_dir}, project_root())["run_dir"]) if run_dir else latest_run()
        if not (run / "params.yaml").is_file():
            raise RunError(f"{run} is not a hybridlib run (no params.yaml). Set run_dir to a folder under outputs/.")
        values["resume"] = False
        return load_config(run / "params.yaml", values), run


def start_run(cfg: Config) -> Path:
    """The run folder for training: ``cfg.run_dir``, or a new outputs/<dataset>-<timestamp>. Writes params.yaml."""
    from hybridlib.config import save_config

    run = Path(cfg.run_dir) if cfg.run_dir else create_run_dir(outputs_root() / default_run_name(cfg))
    run.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run.resolve())
    if not (run / "params.yaml").exists():
        save_config(cfg, run / "params.yaml")
    return run
