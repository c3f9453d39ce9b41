"""Execute the numbered notebooks with papermill into one run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hybridlib.config import Config, load_config, read_params_file, save_config, validate
from hybridlib.errors import HybridlibError, RunError
from hybridlib.runs import create_run_dir, default_run_name, outputs_root, project_root, resolve_paths

NOTEBOOKS = [
    "01_data_exploration.ipynb",
    "02_training.ipynb",
    "03_evaluation.ipynb",
    "04_visualization.ipynb",
    "05_prediction.ipynb",
]


def prepare_run(
    params_file: str | Path | None,
    overrides: dict[str, Any] | None = None,
    run_name: str | None = None,
    outputs: str | Path | None = None,
) -> tuple[Config, Path]:
    """Validate params, create the run folder and write its resolved params.yaml (nothing else)."""
    cwd = Path.cwd()
    values = read_params_file(params_file) if params_file else {}
    values = validate(values, source=str(params_file))
    values.update(validate(overrides or {}, source="-p"))
    # paths in a params file are relative to the project root, paths from -p to where you run
    file_paths = resolve_paths({k: v for k, v in values.items() if k not in (overrides or {})}, project_root())
    cli_paths = resolve_paths({k: v for k, v in values.items() if k in (overrides or {})}, cwd)
    cfg = load_config(None, {**file_paths, **cli_paths})
    from hybridlib.data import preflight

    preflight(cfg)  # a missing dataset/tokenizer fails here, before a run folder exists
    root = Path(outputs) if outputs else outputs_root()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else root / (run_name or default_run_name(cfg))
    create_run_dir(run_dir.resolve())
    cfg.run_dir = str(run_dir.resolve())
    save_config(cfg, run_dir / "params.yaml")
    return cfg, run_dir.resolve()


def execute(run_dir: Path, notebooks: list[str] | None = None, notebooks_dir: Path | None = None,
            extra: dict[str, Any] | None = None, progress: bool = True) -> None:
    """Run each notebook with ``params_file=<run>/params.yaml``, saving the executed copy in the run."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_dir = notebooks_dir or project_root() / "notebooks"
    for name in notebooks or NOTEBOOKS:
        src = nb_dir / name
        if not src.is_file():
            raise RunError(f"Notebook {src} not found; run from the project folder or pass --notebooks DIR.")
        print(f"[hybridlib] {name} -> {run_dir / name}", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(
                str(src),
                str(run_dir / name),
                parameters={"params_file": str(run_dir / "params.yaml"), "run_dir": str(run_dir), **(extra or {})},
                cwd=str(nb_dir),
                progress_bar=progress,
                kernel_name="python3",
            )
        except PapermillExecutionError as e:
            kind = e.ename
            if kind in {c.__name__ for c in _user_errors()}:
                raise RunError(f"{name} stopped: {e.evalue} (executed notebook: {run_dir / name})") from None
            raise RunError(
                f"{name} failed with {kind}: {e.evalue}. The executed notebook with the full traceback is "
                f"{run_dir / name}; fix the cause and continue with `hybridlib run --resume {run_dir}`."
            ) from None


def _user_errors() -> list[type]:
    out, todo = [], [HybridlibError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def run(params_file, overrides=None, run_name=None, outputs=None, notebooks_dir=None, progress=True) -> Path:
    """Validate params, create ``outputs/<run_name>/`` and execute the notebooks into it."""
    cfg, run_dir = prepare_run(params_file, overrides, run_name, outputs)
    execute(run_dir, notebooks_dir=notebooks_dir, progress=progress)
    return run_dir


def resume(run_dir: str | Path, notebooks_dir=None, progress=True) -> Path:
    """Continue an interrupted run from its last.pt and re-execute its notebooks."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "params.yaml").is_file():
        raise RunError(f"{run_dir} is not a hybridlib run (no params.yaml); pass a folder under outputs/.")
    resuming = (run_dir / "last.pt").is_file()
    if not resuming and (run_dir / "model.pt").is_file():
        raise RunError(f"{run_dir} has a model.pt but no last.pt; it cannot be resumed.")
    execute(run_dir, notebooks_dir=notebooks_dir, extra={"resume": resuming}, progress=progress)
    return run_dir
