"""Compare finished runs side by side: mean ± std over seeds where runs share params, and their
validation curves overlaid. Used by ``hybridlib compare`` and 06_compare_runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hybridlib.config import RETIRED, Config, experiment_fields
from hybridlib.errors import HybridlibError, RunError
from hybridlib.files import write_text
from hybridlib.plots import save_figure
from hybridlib.runs import read_history, read_metrics

NEEDED = ("dataset", "params", "test_accuracy", "test_macro_f1", "best_val_accuracy", "train_seconds",
          "num_parameters")
RunDirs = list[str | Path] | str | Path  # run folders, or one (as notebook 06's papermill parameter may give it)


def load_runs(run_dirs: RunDirs) -> list[dict]:
    """The runs that can be read, each once (one folder may be given as itself); each one that cannot is skipped
    with a line saying which file and why."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs, skipped = [], []
    for d in dict.fromkeys(Path(d).resolve() for d in run_dirs):
        try:
            runs.append({**read_metrics(d, NEEDED), "history": read_history(d), "run_dir": str(d)})
        except HybridlibError as e:
            skipped.append(str(e))
            print(f"[hybridlib] skipping {d}: {e}", file=sys.stderr)
    if not runs:
        raise RunError(f"Nothing to compare: no run could be read. {' '.join(skipped)}")
    return runs


def experiment_key(params: dict, varying: list[str]) -> str:
    """A short label for the experiment: the params that differ between the compared groups."""
    parts = []
    for k in varying:
        v = params.get(k)
        parts.append(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}")
    return ", ".join(parts) or "same params"


def compare_runs(run_dirs: RunDirs) -> tuple[pd.DataFrame, list[dict]]:
    """(table with one row per experiment, mean ± std over its seeds; the loaded runs)."""
    runs = load_runs(run_dirs)
    # a param added after a run was made counts as its default there, a retired one at "off" as absent
    defaults = {**RETIRED, **Config().to_dict()}
    keys = [*experiment_fields(), *RETIRED]
    exp_params = [{k: {**defaults, **r["params"]}[k] for k in keys} for r in runs]
    varying = [k for k in keys if len({json.dumps(p.get(k)) for p in exp_params}) > 1]
    for r, p in zip(runs, exp_params):
        r["experiment"] = experiment_key(p, varying)
    # the baselines and ensembles any run reports (NB-LR; TF-IDF + LR in runs made before it)
    extras = list(dict.fromkeys((kind, name) for kind in ("baselines", "ensembles")
                                for r in runs for name in r.get(kind, {})))
    rows = []
    for exp in dict.fromkeys(r["experiment"] for r in runs):
        group = [r for r in runs if r["experiment"] == exp]

        def stat(values: list[float], pct: bool = True) -> str:
            a = np.asarray(values, dtype=float) * (100 if pct else 1)
            return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"

        def stat_of(kind: str, name: str, group: list[dict] = group) -> str:  # "" where no run of the group has it
            values = [r[kind][name]["test_accuracy"] for r in group if name in r.get(kind, {})]
            return stat(values) if values else ""

        rows.append({
            "experiment": exp,
            "dataset": group[0]["dataset"],
            "seeds": len(group),
            "test_accuracy_%": stat([r["test_accuracy"] for r in group]),
            "test_macro_f1_%": stat([r["test_macro_f1"] for r in group]),
            "best_val_accuracy_%": stat([r["best_val_accuracy"] for r in group]),
            **{f"{name}_test_%": stat_of(kind, name) for kind, name in extras},
            "train_seconds": stat([r["train_seconds"] for r in group], pct=False),
            "parameters": group[0]["num_parameters"],
        })
    return pd.DataFrame(rows).set_index("experiment"), runs


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown would need the tabulate package)."""
    t = table.reset_index()
    lines = ["| " + " | ".join(map(str, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_val_curves(runs: list[dict], path: str | Path | None = None):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        h = r["history"]
        ax.plot([x["epoch"] for x in h], [x["val_accuracy"] for x in h], "o-", ms=3,
                label=f"{r['experiment']} (seed {r['params']['seed']})")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy by run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_comparison(run_dirs: RunDirs, out_dir: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """Write comparison.md, comparison.csv and val_curves.png into ``out_dir``."""
    table, runs = compare_runs(run_dirs)
    out = Path(out_dir)
    paths = [out / "comparison.md", out / "comparison.csv", out / "val_curves.png"]
    write_text(paths[0], to_markdown(table))
    write_text(paths[1], table.to_csv())
    plot_val_curves(runs, paths[2])
    plt.close("all")
    return table, paths
