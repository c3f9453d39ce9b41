"""Damaged files in a run folder (a metrics.json cut short by a crash or edited by hand, an empty or mangled
training_log.csv, a params.yaml that no longer parses): every reader names the file and what to do, and a
damaged run never takes the others down (compare skips it with a line saying why)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_run import tiny_run as make_or_get_tiny_run

from hybridlib.cli import main
from hybridlib.compare import compare_runs
from hybridlib.errors import HybridlibError
from hybridlib.files import LOG_FILE, METRICS_FILE, PARAMS_FILE, TRAIN_INFO_FILE, read_json
from hybridlib.runs import list_runs, read_history


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished, evaluated run on the tiny data."""
    return make_or_get_tiny_run(tmp_path_factory)


DAMAGE = {
    "metrics_cut_short": (METRICS_FILE, lambda text: text[: len(text) // 2], "not valid JSON"),
    "metrics_not_an_object": (METRICS_FILE, lambda text: "[1, 2]", "not an object"),
    "metrics_missing_keys": (METRICS_FILE, lambda text: json.dumps({"dataset": "tiny"}), "no params, test_accuracy"),
    "log_empty": (LOG_FILE, lambda text: "", "the file is empty"),
    "log_ragged": (LOG_FILE, lambda text: text + "7,0.5\n", "does not have the header's 7 columns"),
    "log_not_numbers": (LOG_FILE, lambda text: text.replace("\n1,", "\none,", 1), "line 2"),
}


def damaged_copy(run: Path, where: Path, name: str) -> Path:
    file, damage, _ = DAMAGE[name]
    copy = where / f"damaged-{name}"
    shutil.copytree(run, copy)
    (copy / file).write_text(damage((copy / file).read_text()))
    return copy


@pytest.mark.parametrize("name", DAMAGE)
def test_compare_skips_a_damaged_run_naming_the_file(tiny_run, tmp_path, capsys, name):
    bad = damaged_copy(tiny_run, tmp_path, name)
    table, runs = compare_runs([tiny_run, bad])
    assert [r["run_dir"] for r in runs] == [str(tiny_run)] and len(table) == 1
    err = capsys.readouterr().err
    file, _, problem = DAMAGE[name]
    assert f"skipping {bad}: {bad / file} is damaged" in err and problem in err and "--resume" in err, err


@pytest.mark.parametrize("name", DAMAGE)
def test_visualize_names_the_damaged_file_and_the_fix(tiny_run, tmp_path, capsys, name):
    bad = damaged_copy(tiny_run, tmp_path, name)
    assert main(["visualize", "--run-dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad / DAMAGE[name][0]} is damaged") and "Traceback" not in err, err
    assert f"hybridlib run --resume {bad}" in err


def test_the_run_picker_lists_a_run_with_damaged_metrics(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "good")
    bad = damaged_copy(tiny_run, tmp_path, "metrics_cut_short")
    runs = {r["name"]: r for r in list_runs(tmp_path)}
    assert runs["good"]["test_accuracy"] is not None and runs["good"]["damaged"] is None
    assert runs[bad.name]["test_accuracy"] is None and "is damaged" in runs[bad.name]["damaged"]


def test_the_run_picker_names_the_dataset_of_a_run_not_evaluated_yet(tiny_run, tmp_path):
    for name, params in (("trained", None), ("bad-params", "epochs: [1, 2\n")):
        shutil.copytree(tiny_run, tmp_path / name)
        (tmp_path / name / "metrics.json").unlink()
        if params:
            (tmp_path / name / PARAMS_FILE).write_text(params)
    runs = {r["name"]: r for r in list_runs(tmp_path)}
    assert runs["trained"]["dataset"] == "tiny" and runs["trained"]["test_accuracy"] is None
    assert runs["bad-params"]["dataset"] is None  # listed all the same


def test_a_params_file_that_no_longer_parses_is_named(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad-params"
    shutil.copytree(tiny_run, bad)
    (bad / PARAMS_FILE).write_text("epochs: [1, 2\n")
    assert main(["run", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad / PARAMS_FILE}' is not valid YAML" in err and "Traceback" not in err, err


def test_readers_raise_the_damaged_error(tmp_path):
    (tmp_path / TRAIN_INFO_FILE).write_text('{"peak_rss_mb": ')
    with pytest.raises(HybridlibError, match=rf"{TRAIN_INFO_FILE} is damaged \(not valid JSON.*--resume"):
        read_json(tmp_path / TRAIN_INFO_FILE)
    (tmp_path / LOG_FILE).write_bytes(b"")
    with pytest.raises(HybridlibError, match="the file is empty"):
        read_history(tmp_path)
