"""Notebook tests (`pytest --nbmake notebooks`): every numbered notebook, in any order or alone, on
tiny generated data and a tiny WordPiece vocabulary (no network, no ../shared).

At start-up this builds the tiny data, tokenizer and a trained, evaluated fixture run in a temporary
outputs folder, so 03-06 have a run to read without 02. The notebooks read their inputs from the
environment variables set here, which their kernels inherit. After a notebook runs without errors,
its item still fails unless the notebook produced what it should (files, metrics well above chance):
see ``CHECKS`` below.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
# tiny data has 3 balanced classes (chance 1/3); the tiny models learn it (params/tiny.yaml: 1.0 on validation)
MIN_ACCURACY = 0.8
FIXTURE_RUN = "fixture-run"
PNG = b"\x89PNG\r\n\x1a\n"

Snapshot = dict[str, tuple[int, int]]
_PROBLEMS = pytest.StashKey[list[str]]()


def pytest_configure(config) -> None:
    if not config.getoption("nbmake", default=False):
        return
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # pytest-xdist's controller runs no test: each worker prepares its own
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures

    work = Path(tempfile.mkdtemp(prefix="hybridlib-notebooks-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    fixtures.make_tiny_dataset(work / "data" / "tiny")
    texts, _ = fixtures.make_texts(600, seed=12345)
    fixtures.make_tiny_tokenizer(work / "tokenizers" / "tiny-wordpiece", texts)
    os.environ.update(
        HYBRIDLIB_PARAMS=str(ROOT / "params" / "tiny.yaml"),
        HYBRIDLIB_DATA_DIR=str(work / "data"),
        HYBRIDLIB_TOKENIZERS_DIR=str(work / "tokenizers"),
        HYBRIDLIB_OUTPUTS=str(work / "outputs"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    # keep the private caches tests/conftest.py set up (if loaded), else make our own
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))

    # A trained and evaluated run (with the TF-IDF baseline), so 03-06 never depend on 02 having run.
    from tiny_run import make_tiny_run

    make_tiny_run(work, name=FIXTURE_RUN, baseline=True)  # -> $HYBRIDLIB_OUTPUTS/fixture-run (+ tfidf_logreg.npz)


# ----------------------------------------------------------------------------- what each notebook must produce


def _snapshot(root: Path) -> Snapshot:
    """Every file under ``root``: relative path -> (mtime_ns, size)."""
    out: Snapshot = {}
    for p in root.rglob("*") if root.is_dir() else []:
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def _written(before: Snapshot, after: Snapshot) -> set[str]:
    return {k for k, v in after.items() if before.get(k) != v}


def _newest_run(outputs: Path) -> Path | None:
    """The run a notebook with ``run_dir = None`` reads: the finished run (model.pt) written last."""
    runs = [d for d in outputs.iterdir() if (d / "model.pt").is_file()] if outputs.is_dir() else []
    return max(runs, key=lambda d: (d / "model.pt").stat().st_mtime_ns, default=None)


def _best_val_accuracy(log: Path) -> float:
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log} has no rows")
    return max(float(r["val_accuracy"]) for r in rows)


def _nonempty(path: Path, problems: list[str], png: bool = False) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        problems.append(f"{path} is missing or empty")
    elif png and not path.read_bytes().startswith(PNG):
        problems.append(f"{path} is not a PNG image")


def _check_01(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    # run_dir = None: exploration shows, it writes no run
    return [f"01 wrote {sorted(written)} under the outputs folder; with run_dir = None it should write nothing"] \
        if written else []


def _check_02(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    new_runs = sorted({w.split("/")[0] for w in written if w.split("/")[0] + "/params.yaml" not in before})
    if len(new_runs) != 1:
        return [f"02 should create exactly one new run folder under {outputs}, created {new_runs}"]
    run = outputs / new_runs[0]
    problems = [f"{run / name} is missing" for name in ("model.pt", "last.pt", "training_log.csv", "params.yaml")
                if not (run / name).is_file()]
    if not (run / "tokenizer").is_dir() or not any((run / "tokenizer").iterdir()):
        problems.append(f"{run / 'tokenizer'} is missing or empty")
    if (run / "training_log.csv").is_file():
        acc = _best_val_accuracy(run / "training_log.csv")
        if acc < MIN_ACCURACY:
            problems.append(f"best validation accuracy {acc:.3f} in {run / 'training_log.csv'} is below "
                            f"{MIN_ACCURACY} (3 classes, chance 0.33): the model did not learn the tiny task")
    return problems


def _check_03(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    if newest is None:
        return [f"no finished run under {outputs} before 03 ran (the fixture run is missing)"]
    metrics = newest / "metrics.json"
    if f"{newest.name}/metrics.json" not in written:
        return [f"03 did not write {metrics} (the newest run, which run_dir = None selects)"]
    problems = []
    acc = json.loads(metrics.read_text()).get("test_accuracy")
    if not isinstance(acc, (int, float)) or acc < MIN_ACCURACY:
        problems.append(f"test_accuracy {acc!r} in {metrics} is not above {MIN_ACCURACY} (3 classes, chance 0.33)")
    if f"{newest.name}/classification_report.txt" not in written:
        problems.append(f"03 did not write {newest / 'classification_report.txt'}")
    _nonempty(newest / "classification_report.txt", problems)
    others = sorted(w for w in written if not w.startswith(newest.name + "/"))
    if others:
        problems.append(f"03 wrote outside its run {newest}: {others}")
    return problems


def _check_04(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    if newest is None:
        return [f"no finished run under {outputs} before 04 ran (the fixture run is missing)"]
    names = ["loss_acc_curves.png"]
    if (newest / "metrics.json").is_file():  # an evaluated run: the test confusion matrix too
        names.append("confusion_matrix.png")
    problems = [f"04 did not write {newest / n}" for n in names if f"{newest.name}/{n}" not in written]
    for n in names:
        _nonempty(newest / n, problems, png=True)
    return problems


def _check_05(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    return [f"05 (prediction) should only read its run, but wrote {sorted(written)}"] if written else []


def _check_06(outputs: Path, before: Snapshot, written: set[str], newest: Path | None) -> list[str]:
    out = outputs / "comparison"
    problems = [f"06 did not write {out / n}" for n in ("comparison.md", "comparison.csv", "val_curves.png")
                if f"comparison/{n}" not in written]
    _nonempty(out / "val_curves.png", problems, png=True)
    if (out / "comparison.csv").is_file():
        with open(out / "comparison.csv", newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) < 2:
            problems.append(f"{out / 'comparison.csv'} has no run in it (the fixture run at least is evaluated)")
    return problems


CHECKS: dict[str, Callable[[Path, Snapshot, set[str], Path | None], list[str]]] = {
    "01": _check_01, "02": _check_02, "03": _check_03, "04": _check_04, "05": _check_05, "06": _check_06,
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Around an nbmake notebook: note the outputs folder before it, check what it produced after it."""
    check = CHECKS.get(Path(str(getattr(item, "filename", ""))).name[:2]) if getattr(item, "nbmake", False) else None
    if check is None:
        return (yield)
    outputs = Path(os.environ["HYBRIDLIB_OUTPUTS"])
    before, newest = _snapshot(outputs), _newest_run(outputs)
    result = yield  # a notebook error raises here: nbmake reports it
    after = _snapshot(outputs)
    try:
        item.stash[_PROBLEMS] = check(outputs, before, _written(before, after), newest)
    except Exception as e:  # a product that cannot be read is a failure of the notebook, not of this hook
        item.stash[_PROBLEMS] = [f"could not check the products: {type(e).__name__}: {e}"]
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail a notebook that ran without errors but did not produce what it should, with the reasons."""
    report = yield
    problems = item.stash.get(_PROBLEMS, None)
    if report.when == "call" and report.passed and problems:
        report.outcome = "failed"
        report.longrepr = (f"{Path(item.filename).name} ran without errors, but did not produce what it should:\n"
                           + "\n".join(f"  - {p}" for p in problems))
    return report
