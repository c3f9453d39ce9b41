"""The notebooks' parameters, read by name from the notebook's namespace (docs/architecture.md, "The notebooks
are the source"): ``params_file`` and the Config fields, looked up at every call, so re-running a cell gives the
same Config. A defined parameter overrides even when None; any other variable is ignored, and a variable named
like a Config field is read as that parameter (tests/test_notebooks.py checks that notebooks never assign one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hybridlib.config import FIELDS, Config, load_config, validate
from hybridlib.errors import ConfigError, RunError
from hybridlib.files import PARAMS_FILE
from hybridlib.locations import project_root, resolve_paths
from hybridlib.runs import latest_run, outputs_root

SOURCE = "the notebook's parameters"
_PARAMETER_TYPES = (str, int, float, bool, list, tuple, type(None))  # what a parameter cell or papermill sets


def _plain(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def notebook_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """The Config fields defined in ``namespace`` (None values included), validated; nothing else."""
    clean: dict[str, Any] = {}
    for key in FIELDS:
        if key not in namespace:
            continue
        value = _plain(namespace[key])
        try:
            clean.update(validate({key: value}, source=SOURCE))
        except ConfigError as e:
            if isinstance(value, _PARAMETER_TYPES):
                raise
            raise ConfigError(  # an object, not a parameter value: most likely a variable of the user's own
                f"{e} In a notebook every name that is a Config field is read as a parameter: "
                f"give a variable of your own another name."
            ) from None
    return clean


def _params_file(namespace: dict[str, Any], root: Path) -> tuple[Path | None, str]:
    """The params file to start from, and where it came from (for the printed summary)."""
    value = _plain(namespace.get("params_file"))
    where = "params_file"
    if value is None:
        value, where = os.environ.get("HYBRIDLIB_PARAMS") or None, "$HYBRIDLIB_PARAMS"
    if value is None:
        return None, "the Config defaults (params_file = None, $HYBRIDLIB_PARAMS unset)"
    if not isinstance(value, str):
        raise ConfigError(f"Parameter 'params_file': got {value!r}, expected a path to a params YAML (or None).")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    return path, f"{path} ({where})"


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items()) or "none"


def notebook_config(namespace: dict[str, Any]) -> Config:
    """The Config of a data or training notebook (01, 02): ``params_file`` (None: $HYBRIDLIB_PARAMS, else the
    defaults) with the Config fields defined in ``namespace`` on top."""
    root = project_root()
    params_file, source = _params_file(namespace, root)
    overrides = notebook_parameters(namespace)
    cfg = load_config(params_file, overrides, overrides_dir=root)
    print(f"[hybridlib] params from {source}; set in the notebook: {_describe(overrides)}")
    return cfg


def notebook_run(namespace: dict[str, Any]) -> tuple[Config, Path]:
    """(Config, run folder) for the notebooks that read a trained run (03, 04, 05): ``run_dir`` (None: the newest
    finished run), its params.yaml with the other Config fields defined in ``namespace`` on top, ``resume`` False."""
    root = project_root()
    overrides = notebook_parameters(namespace)
    run_dir = overrides.pop("run_dir", None)
    overrides.pop("resume", None)
    if run_dir is None:
        run = Path(latest_run()).resolve()
        print(f"[hybridlib] run_dir is None: using the newest finished run, {run}")
    else:
        run = Path(resolve_paths({"run_dir": run_dir}, root)["run_dir"])
        if not run.is_dir():
            guess = outputs_root() / run_dir
            hint = f" Did you mean {guess}?" if not Path(run_dir).is_absolute() and guess.is_dir() else ""
            raise RunError(f"run_dir {run_dir!r}: there is no folder {run} (relative paths are taken from the "
                           f"project root).{hint} Set run_dir to a run folder, e.g. under {outputs_root()}.")
        print(f"[hybridlib] run {run}")
    if not (run / PARAMS_FILE).is_file():
        raise RunError(f"{run} is not a hybridlib run (no {PARAMS_FILE}). Set run_dir to a run folder under outputs/.")
    if overrides:
        print(f"[hybridlib] set in the notebook, over the run's params.yaml: {_describe(overrides)}")
    cfg = load_config(run / PARAMS_FILE, {**overrides, "run_dir": str(run), "resume": False}, overrides_dir=root)
    check_run_parameters(cfg, load_config(run / PARAMS_FILE))
    return cfg, run


def check_run_parameters(cfg: Config, saved: Config) -> None:
    """Refuse a parameter that would score, plot or serve a trained run as something it is not: its data, model and
    training are its own (machine and run parameters, and where the data now lies, may be set)."""
    changed = cfg.differs_from(saved, "data", "model", "training")
    if changed:
        key = changed[0]
        raise ConfigError(
            f"Parameter '{key}' is {getattr(cfg, key)!r} here but {getattr(saved, key)!r} in the run's "
            f"{PARAMS_FILE}: this notebook reads a trained run, whose data, model and training are its own. "
            f"Remove it here (machine and run parameters, e.g. eval_batch_size or baseline, may be set), or "
            f"train a new run with it (01/02, or `hybridlib run ... -p {key} ...`).")
