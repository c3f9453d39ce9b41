"""The prediction widget driven headlessly: set the text, click Predict, read the HTML it shows."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tiny_run import tiny_run

from hybridlib.widgets import examples_for, make_predict_widget, render_explanation

SPORTS = "The coach said the team scored a late goal to win the championship match."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def widget(run_dir):
    return make_predict_widget(runs_root=run_dir.parent)


def test_predict_shows_label_bars_and_explanation(widget):
    widget.text.value = SPORTS
    widget.button.click()
    assert widget.message.value == ""
    assert widget.last is not None and widget.last["label"] == "sports"
    html = widget.result.value
    assert "Predicted: <b>sports</b>" in html
    assert html.count('class="hl-bar"') == 3
    for name in ("sports", "business", "science"):
        assert f'data-class="{name}"' in html
    assert widget.explanation.value.count('class="hl-token"') == len(widget.last["words"]) > 5
    assert "background:rgba(" in widget.explanation.value
    assert " ms)" in widget.result.value and not widget.button.disabled  # the time it took


def test_empty_text_shows_a_message(widget):
    widget.text.value = SPORTS
    widget.button.click()
    widget.text.value = "   \n  "
    widget.button.click()
    assert "Type a text" in widget.message.value and "hl-warning" in widget.message.value
    assert widget.result.value == "" and widget.explanation.value == ""
    assert widget.last is None


def test_no_runs_shows_a_message(tmp_path):
    wd = make_predict_widget(runs_root=tmp_path / "outputs")
    assert "No finished run" in wd.message.value
    assert wd.run_picker.options == () and wd.run_picker.disabled
    wd.text.value = SPORTS
    wd.button.click()  # no exception
    assert "No finished run" in wd.message.value and wd.result.value == ""


def test_example_buttons_fill_the_text_and_predict(widget):
    assert [b.tooltip for b in widget.example_buttons] == examples_for("tiny")
    widget.example_buttons[0].click()
    assert widget.text.value == examples_for("tiny")[0]
    assert widget.last is not None and "Predicted:" in widget.result.value


def test_user_text_is_escaped(widget):
    widget.text.value = "<script>alert('goal')</script> <i>team</i> & match"
    widget.button.click()
    html = widget.explanation.value
    assert "<script>" not in html and "<i>" not in html
    assert "&lt;" in html and "&gt;" in html and "&amp;" in html


def test_run_picker_lists_runs_newest_first_with_dataset_and_accuracy(run_dir, tmp_path):
    root = tmp_path / "outputs"
    for i, name in enumerate(["older", "newer"]):
        shutil.copytree(run_dir, root / name)
        os.utime(root / name / "model.pt", (1_000_000 + i, 1_000_000 + i))
    (root / "unfinished").mkdir()  # no model.pt: not listed
    acc = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    wd = make_predict_widget(runs_root=root)
    labels = [label for label, _ in wd.run_picker.options]
    assert labels == [f"newer · tiny · test acc {acc:.3f}", f"older · tiny · test acc {acc:.3f}"]
    assert wd.run_picker.value == str((root / "newer").resolve())
    # run_dir selects a run, also one outside runs_root
    wd = make_predict_widget(runs_root=root, run_dir=run_dir)
    assert wd.run_picker.value == str(run_dir.resolve()) and len(wd.run_picker.options) == 3


def test_a_broken_run_shows_an_error_not_a_traceback(run_dir, tmp_path):
    bad = tmp_path / "outputs" / "broken"
    shutil.copytree(run_dir, bad)
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    wd = make_predict_widget(runs_root=bad.parent)
    wd.text.value = SPORTS
    wd.button.click()
    assert "hl-error" in wd.message.value and str(bad / "model.pt") in wd.message.value
    assert wd.result.value == "" and not wd.button.disabled


def test_long_text_is_shown_elided(widget):
    text = "goal team " * 20_000 + "the end"
    widget.text.value = text
    widget.button.click()
    assert widget.last["truncated"] is True
    assert "not read by the model" in widget.explanation.value
    assert len(widget.explanation.value) < 60_000


def test_render_explanation_without_words():
    html = render_explanation("", {"words": [], "target": "sports", "method": "gradient"})
    assert "No tokens" in html
