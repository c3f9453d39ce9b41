"""`python -m hybridlib predict`: texts from --text, --file and stdin; a table, or JSON lines with --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_run import tiny_run

from hybridlib import Predictor

LABELS = ["sports", "business", "science"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_run(tmp_path_factory) / "model.pt"


def predict(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "hybridlib", "predict", *map(str, args)],
        input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, text=True, encoding="utf-8", timeout=timeout,
    )


def test_text_prints_a_table(checkpoint):
    r = predict("--checkpoint", checkpoint, "--text", "The team scored a goal in the match.",
                "--text", "Shares fell as the company reported weak earnings.")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["label", *LABELS, "text"]
    assert len(lines) == 3
    assert lines[1].split()[0] == "sports" and lines[1].endswith("The team scored a goal in the match.")
    assert lines[2].split()[0] == "business"
    probs = [float(x) for x in lines[1].split()[1:4]]
    assert sum(probs) == pytest.approx(1.0, abs=2e-4)


def test_file_with_json_lines(checkpoint, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("The coach praised the team.\n\n   \nStock markets and investors 😀\n", encoding="utf-8")
    r = predict("--checkpoint", checkpoint, "--file", f, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["text"] for row in rows] == ["The coach praised the team.", "Stock markets and investors 😀"]
    for row in rows:
        assert set(row) == {"text", "label", "index", "probabilities"}
        assert row["label"] in LABELS and LABELS[row["index"]] == row["label"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_stdin_and_a_run_folder(checkpoint):
    r = predict("--checkpoint", checkpoint.parent, "--json",
                stdin="Scientists study cells in the laboratory.\r\nThe team won the match.\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["text"] for row in rows] == ["Scientists study cells in the laboratory.", "The team won the match."]
    assert all(row["label"] in LABELS for row in rows)


def test_errors_are_one_line_and_exit_2(checkpoint, tmp_path):
    r = predict("--checkpoint", checkpoint)  # no text, empty stdin
    assert r.returncode == 2 and "Nothing to predict" in r.stderr and "Traceback" not in r.stderr
    r = predict("--checkpoint", tmp_path / "missing.pt", "--text", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = predict("--checkpoint", checkpoint, "--file", tmp_path / "nope.txt")
    assert r.returncode == 2 and "Cannot read --file" in r.stderr and "Traceback" not in r.stderr


def test_ensemble_flag(checkpoint):
    text = "The team scored a goal in the match."
    plain = predict("--checkpoint", checkpoint.parent, "--json", "--text", text)
    mixed = predict("--checkpoint", checkpoint, "--json", "--ensemble", "--text", text)
    assert plain.returncode == 0 and mixed.returncode == 0, plain.stderr + mixed.stderr
    p, m = json.loads(plain.stdout)["probabilities"], json.loads(mixed.stdout)["probabilities"]
    assert sum(m.values()) == pytest.approx(1.0, abs=1e-5)
    weight = json.loads((checkpoint.parent / "metrics.json").read_text())["ensembles"]["model+tfidf_logreg"]["weight_other"]
    if weight > 0:
        assert p != m
    else:  # validation chose the model alone: the same numbers, up to float rounding
        assert m == pytest.approx(p, abs=1e-6)
    served = Predictor.from_run(checkpoint.parent, ensemble=True).predict(text)[0]["probabilities"]
    assert m == pytest.approx(served, abs=1e-6)  # the CLI serves exactly the library's ensemble
