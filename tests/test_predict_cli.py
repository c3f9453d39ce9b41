"""`hybridlib predict`: texts from --text, --file and stdin; a table, or JSON lines with --json.

Through ``hybridlib.cli.main`` in this process (test_cli.py starts ``python -m hybridlib`` itself).
"""

from __future__ import annotations

import io
import json
import sys

import pytest
from tiny_run import tiny_run

from hybridlib import Predictor
from hybridlib.cli import main

LABELS = ["sports", "business", "science"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_run(tmp_path_factory) / "model.pt"


@pytest.fixture
def predict(capsys, monkeypatch):
    """predict(*args, stdin="") -> (exit code, stdout, stderr) of `hybridlib predict ARGS` in this process."""

    def run(*args, stdin: str = ""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(["predict", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_text_prints_a_table(checkpoint, predict):
    code, out, err = predict("--checkpoint", checkpoint, "--text", "The team scored a goal in the match.",
                             "--text", "Shares fell as the company reported weak earnings.")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["label", *LABELS, "text"]
    assert len(lines) == 3
    assert lines[1].split()[0] == "sports" and lines[1].endswith("The team scored a goal in the match.")
    assert lines[2].split()[0] == "business"
    probs = [float(x) for x in lines[1].split()[1:4]]
    assert sum(probs) == pytest.approx(1.0, abs=2e-4)


def test_file_with_json_lines(checkpoint, predict, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("The coach praised the team.\n\n   \nStock markets and investors 😀\n", encoding="utf-8")
    code, out, err = predict("--checkpoint", checkpoint, "--file", f, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["text"] for row in rows] == ["The coach praised the team.", "Stock markets and investors 😀"]
    for row in rows:
        assert set(row) == {"text", "label", "index", "probabilities"}
        assert row["label"] in LABELS and LABELS[row["index"]] == row["label"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_stdin_and_a_run_folder(checkpoint, predict):
    """Texts piped in (Windows line ends too), the run folder given instead of its model.pt."""
    code, out, err = predict("--checkpoint", checkpoint.parent, "--json",
                             stdin="Scientists study cells in the laboratory.\r\n\nThe team won the match.\n")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [row["text"] for row in rows] == ["Scientists study cells in the laboratory.", "The team won the match."]
    assert all(row["label"] in LABELS for row in rows)


def test_errors_are_one_line_and_exit_2(checkpoint, predict, tmp_path):
    for args, needle in (
        (["--checkpoint", checkpoint], "Nothing to predict"),  # no text, empty stdin
        (["--checkpoint", tmp_path / "missing.pt", "--text", "x"], "does not exist"),
        (["--checkpoint", checkpoint, "--file", tmp_path / "nope.txt"], "Cannot read --file"),
    ):
        code, out, err = predict(*args)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
        assert out == ""


def test_ensemble_flag(checkpoint, predict):
    text = "The team scored a goal in the match."
    code_plain, plain, _ = predict("--checkpoint", checkpoint.parent, "--json", "--text", text)
    code_mixed, mixed, err = predict("--checkpoint", checkpoint, "--json", "--ensemble", "--text", text)
    assert code_plain == code_mixed == 0, err
    p, m = json.loads(plain)["probabilities"], json.loads(mixed)["probabilities"]
    assert sum(m.values()) == pytest.approx(1.0, abs=1e-5)
    assert m != pytest.approx(p, abs=1e-6)  # the stack is not the model alone
    served = Predictor.from_run(checkpoint.parent, ensemble=True).predict(text)[0]["probabilities"]
    assert m == pytest.approx(served, abs=1e-6)  # the CLI serves exactly the library's ensemble
    code, table, err = predict("--checkpoint", checkpoint, "--ensemble", "--text", text)
    assert code == 0 and table.startswith("The run's ensemble:"), err  # the table says whose predictions it shows
