"""Command line: ``hybridlib run|train|evaluate|predict|visualize|compare|params ...`` (``hybridlib -h``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hybridlib.config import Config, describe, load_config, parse_cli_value, validate
from hybridlib.errors import HybridlibError
from hybridlib.locations import pin_locations

# Each command imports the modules it runs when it starts, so that --help, `hybridlib params` and a refused
# parameter answer without loading torch, datasets or papermill.


def _overrides(pairs: list[list[str]] | None) -> dict[str, Any]:
    return validate({k: parse_cli_value(v) for k, v in (pairs or [])}, source="-p")


def config_from_args(a: argparse.Namespace) -> Config:
    """The command's Config; a bad parameter or a missing data or tokenizer folder is refused here, before the
    command loads torch."""
    cfg = load_config(a.params, _overrides(a.parameter))
    pin_locations(cfg)
    return cfg


def _existing(path: str, expected: str) -> None:
    """Refuse a path argument that does not exist before the command loads torch."""
    if not Path(path).exists():
        raise HybridlibError(f"'{path}' does not exist. Pass {expected}.")


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
        help="Override a parameter (as papermill's -p; values parsed as YAML: 3, 1e-3, [cnn], null).",
    )


def cmd_run(a: argparse.Namespace) -> int:
    if a.resume:
        if a.params or a.parameter or a.run_name:
            raise HybridlibError("--resume takes only the run folder; its params.yaml is reused unchanged.")
        from hybridlib import pipeline

        run_dir = pipeline.resume(a.resume, notebooks_dir=a.notebooks)
    else:
        if not a.params:
            raise HybridlibError("hybridlib run needs a params file, e.g. `hybridlib run params/ag_news.yaml`.")
        cfg = config_from_args(a)
        from hybridlib import pipeline

        run_dir = pipeline.run(cfg, a.run_name, a.outputs, a.notebooks)
    from hybridlib.files import METRICS_FILE, read_json

    metrics = Path(run_dir) / METRICS_FILE
    print(f"Run finished: {run_dir}")
    if metrics.is_file():
        print(_summary(read_json(metrics)))
    return 0


def _summary(m: dict[str, Any]) -> str:
    """A finished run's headline figures, from its metrics.json: the model's, then its baseline's and ensemble's."""
    others = [f"{name} {v['test_accuracy']:.4f}" for group in ("baselines", "ensembles")
              for name, v in m.get(group, {}).items()]
    return (f"test_accuracy {m['test_accuracy']:.4f}  test_macro_f1 {m['test_macro_f1']:.4f}  "
            f"best_val_accuracy {m['best_val_accuracy']:.4f} (epoch {m['best_epoch']})"
            + (f"\ntest_accuracy of the baseline and ensemble: {', '.join(others)}" if others else ""))


def cmd_train(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    from hybridlib import pipeline

    result, run_dir = pipeline.train_only(cfg, a.run_name, a.outputs)
    if result is not None:
        print(f"Training finished: {run_dir} (best val_accuracy {result.best_val_accuracy:.4f} at epoch "
              f"{result.best_epoch}). Evaluate and plot it with: hybridlib run --resume {run_dir}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    over = _overrides(a.parameter)
    if a.dataset:
        over["dataset"] = a.dataset
    _existing(a.checkpoint, "a finished run's folder or its model.pt (outputs/RUN/model.pt)")
    from hybridlib.evaluation import evaluate_checkpoint
    from hybridlib.files import MODEL_FILE

    path = Path(a.checkpoint) / MODEL_FILE if Path(a.checkpoint).is_dir() else Path(a.checkpoint)
    out = evaluate_checkpoint(path, a.split, over, progress=not a.json)
    if a.json:
        print(json.dumps(out["metrics"], indent=2))
    else:
        m = out["metrics"]
        cap = "".join(f"; a sample: {k} {v}, -p {k} null for all" for k, v in (m["sample_cap"] or {}).items())
        print(f"{a.split}: accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}  ({m['num_examples']} texts{cap})")
        print(out["report"])
    return 0


def _read_texts(a: argparse.Namespace) -> list[str]:
    texts = list(a.text or [])
    if a.file:
        try:
            lines = Path(a.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise HybridlibError(f"Cannot read --file {a.file}: {e}") from None
        texts += [line for line in lines if line.strip()]
    if not texts and not sys.stdin.isatty():
        texts += [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise HybridlibError("Nothing to predict: pass --text \"...\" (repeatable), --file FILE, or pipe texts on stdin.")
    return texts


def cmd_predict(a: argparse.Namespace) -> int:
    texts = _read_texts(a)  # before loading the model: a missing text fails fast
    _existing(a.checkpoint, "a run folder (outputs/RUN) or its model.pt")
    from hybridlib.prediction import Predictor

    is_run = Path(a.checkpoint).is_dir()  # a run folder works too
    if is_run:
        predictor = Predictor.from_run(a.checkpoint, device=a.device)
    else:
        predictor = Predictor.from_checkpoint(a.checkpoint, device=a.device)
    if a.ensemble:
        predictor.use_ensemble(a.checkpoint if is_run else Path(a.checkpoint).parent)
    results = predictor.predict(texts)
    if a.json:
        for t, r in zip(texts, results, strict=True):
            print(json.dumps({"text": t, **r}))
        return 0
    names = predictor.label_names
    if a.ensemble:
        print("The run's ensemble: the model with its classic baseline, as its metrics.json measured.")
    width = max(8, *(len(n) for n in names))
    print(f"{'label':<{width}}  " + "  ".join(f"{n[:10]:>10}" for n in names) + "  text")
    for t, r in zip(texts, results, strict=True):
        probs = "  ".join(f"{r['probabilities'][n]:>10.4f}" for n in names)
        short = t.replace("\n", " ")
        print(f"{r['label']:<{width}}  {probs}  {short[:60]}{'...' if len(short) > 60 else ''}")
    return 0


def cmd_visualize(a: argparse.Namespace) -> int:
    _existing(a.run_dir, "a run folder (outputs/RUN)")
    from hybridlib.plots import save_run_plots

    paths, metrics = save_run_plots(a.run_dir)
    for p in paths:
        print(f"wrote {p}")
    if metrics:
        print(_summary(metrics))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    for run in a.runs:
        _existing(run, "run folders (outputs/RUN)")
    from hybridlib.compare import to_markdown, write_comparison

    table, paths = write_comparison(a.runs, a.out)
    print(to_markdown(table))
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_params(a: argparse.Namespace) -> int:
    print(describe())
    return 0


def command(sub: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose `hybridlib NAME --help` says what it does (its description defaults to its help)."""
    return sub.add_parser(name, help=help, description=kwargs.pop("description", help), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlib", description="CNN ∥ BiLSTM text classification, run by notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = command(sub, "run", help="Execute the numbered notebooks with papermill into outputs/<run_name>/.")
    p.add_argument("params", nargs="?", help="Params YAML, e.g. params/imdb.yaml.")
    p.add_argument("--run-name", help="Name of the run folder (default: <dataset>-<timestamp>); must not exist.")
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue an interrupted run (its last.pt) and finish its notebooks.")
    p.add_argument("--outputs", help="Folder for runs (default: $HYBRIDLIB_OUTPUTS or ./outputs).")
    p.add_argument("--notebooks", type=Path, help="Folder with the numbered notebooks (default: the project's).")
    add_overrides(p)
    p.set_defaults(func=cmd_run)

    p = command(
        sub, "train", help="Train only (no notebooks): on num_processes processes here, or as one rank under torchrun.",
        description="Train a run without executing the notebooks. Under torchrun (several GPUs or machines): "
        "torchrun --nproc-per-node 4 -m hybridlib train params/ag_news.yaml --run-name NAME. "
        "Evaluate afterwards with `hybridlib run --resume RUN`.")
    p.add_argument("params", help="Params YAML: a template (params/ag_news.yaml) or a run's own outputs/RUN/params.yaml.")
    p.add_argument("--run-name", help="Name of the new run folder (default: <dataset>-<timestamp>).")
    p.add_argument("--outputs", help="Folder for runs (default: $HYBRIDLIB_OUTPUTS or ./outputs).")
    add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = command(sub, "evaluate", help="Evaluate a checkpoint on a dataset split.")
    p.add_argument("--checkpoint", required=True, help="A run's model.pt (or the run folder).")
    p.add_argument("--dataset", help="Dataset to evaluate on (default: the checkpoint's).")
    p.add_argument("--split", default="test", help="test (default), validation or train.")
    p.add_argument("--json", action="store_true", help="Print the metrics as JSON.")
    add_overrides(p)
    p.set_defaults(func=cmd_evaluate)

    p = command(sub, "predict", help="Predict labels and class probabilities for texts.")
    p.add_argument("--checkpoint", required=True, help="A run's model.pt (or the run folder).")
    p.add_argument("--text", action="append", help="A text to classify (repeatable).")
    p.add_argument("--file", help="A file with one text per line.")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto.")
    p.add_argument("--json", action="store_true", help="Print one JSON object per text.")
    p.add_argument("--ensemble", action="store_true",
                   help="Combine with the run's classic baseline, as its metrics.json 'ensembles' measured.")
    p.set_defaults(func=cmd_predict)

    p = command(sub, "visualize", help="Write a run's plots and print its metrics.")
    p.add_argument("--run-dir", required=True, help="A run folder, e.g. outputs/imdb-20260101-120000.")
    p.set_defaults(func=cmd_visualize)

    p = command(sub, "compare", help="Tabulate runs side by side (mean ± std over seeds) and overlay their curves.")
    p.add_argument("runs", nargs="+", help="Run folders, e.g. outputs/imdb-*.")
    p.add_argument("--out", default="outputs/comparison", help="Where to write comparison.md/.csv and val_curves.png.")
    p.set_defaults(func=cmd_compare)

    p = command(sub, "params", help="List every parameter with its type, default and meaning.")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HybridlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # pipeline.Interrupted says where the run stands and how to resume it
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed our output (`| head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
