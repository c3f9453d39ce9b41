"""The prediction widget of 05_prediction (docs/prediction.md): pick a run, type a text, see its label, the class
probabilities and the tokens that pushed the decision. Plain HTML, so it renders in JupyterLab, VS Code and
nbconvert alike, and a prediction takes no plotting library.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import ipywidgets as w

from hybridlib.errors import HybridlibError
from hybridlib.prediction import Predictor
from hybridlib.runs import list_runs, outputs_root

# Example texts per dataset (matched against the run's dataset name), and for anything else.
EXAMPLES: dict[str, list[str]] = {
    "imdb": [
        "A wonderful film: moving, funny and beautifully acted. I would watch it again tomorrow.",
        "Two hours I will never get back. The plot makes no sense and the acting is wooden.",
        "It starts slowly and the middle drags, but the last half hour is genuinely brilliant.",
    ],
    "ag_news": [
        "The team won the championship after a dramatic penalty shoot-out in the final match.",
        "Shares fell sharply after the company reported lower quarterly profits and cut its forecast.",
        "Scientists say the new space telescope has found water vapour on a distant planet.",
        "Leaders of both countries met in the capital to discuss the ceasefire and border security.",
    ],
    "": [
        "The team won the championship after a dramatic final match.",
        "Shares fell sharply as the company reported lower quarterly profits.",
        "Scientists published a study on cells and energy in the laboratory.",
        "A wonderful film: moving, funny and beautifully acted.",
    ],
}

POSITIVE = (46, 160, 67)   # pushed towards the predicted class: green
NEGATIVE = (215, 58, 73)   # pushed away from it: red
BAR = "#4c72b0"
BAR_TOP = "#dd8452"
MAX_SHOWN_CHARS = 20_000   # longer texts are shown elided around what the model read
NO_RUNS = ("No finished run under {root} yet: nothing to predict with. Train one first (notebook 02_training, or "
           "`hybridlib run params/imdb.yaml`), then press ↻.")


def examples_for(dataset: str | None) -> list[str]:
    name = (dataset or "").lower()
    for key, texts in EXAMPLES.items():
        if key and key in name:
            return texts
    return EXAMPLES[""]


def _message_html(text: str, kind: str = "info") -> str:
    colour = {"info": "#31708f", "warning": "#8a6d3b", "error": "#a94442"}[kind]
    back = {"info": "#eef6fb", "warning": "#fcf8e3", "error": "#f2dede"}[kind]
    return (f'<div class="hl-message hl-{kind}" style="color:{colour};background:{back};padding:6px 10px;'
            f'border-radius:4px;margin:4px 0">{html.escape(text)}</div>')


def render_probabilities(result: dict[str, Any], seconds: float | None = None) -> str:
    """The predicted label and a horizontal bar per class (HTML)."""
    label = html.escape(str(result["label"]))
    p_top = result["probabilities"][result["label"]]
    rows = []
    items = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
    for name, p in items:
        colour = BAR_TOP if name == result["label"] else BAR
        rows.append(
            f'<div class="hl-bar-row" style="display:flex;align-items:center;margin:2px 0">'
            f'<span style="width:9em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap">{html.escape(str(name))}</span>'
            f'<span style="flex:1;background:#eee;height:16px;max-width:420px;border-radius:2px">'
            f'<span class="hl-bar" data-class="{html.escape(str(name))}" style="display:block;height:16px;'
            f'width:{100 * p:.1f}%;background:{colour};border-radius:2px"></span></span>'
            f'<span style="width:5em;text-align:right;font-family:monospace">{100 * p:5.1f}%</span></div>'
        )
    timing = f' <span style="color:#888;font-size:85%">({1000 * seconds:.0f} ms)</span>' if seconds is not None else ""
    return (
        f'<div class="hl-result"><div class="hl-label" style="font-size:130%;margin:4px 0 6px 0">'
        f'Predicted: <b>{label}</b> <span style="color:#666">({100 * p_top:.1f}%)</span>{timing}</div>'
        f'<div class="hl-probs" style="max-width:560px">{"".join(rows)}</div></div>'
    )


def _colour(score: float, scale: float) -> str:
    a = min(abs(score) / scale, 1.0) * 0.75 if scale > 0 else 0.0
    r, g, b = POSITIVE if score > 0 else NEGATIVE
    return f"rgba({r},{g},{b},{a:.2f})"


def render_explanation(text: str, explanation: dict[str, Any], top_k: int = 5) -> str:
    """The text with each word's background coloured by its score (green: towards the explained class,
    red: away from it), and the strongest words listed (HTML)."""
    words = explanation["words"]
    target = html.escape(str(explanation["target"]))
    if not words:
        return ('<div class="hl-explain" style="color:#666">No tokens to explain: the text has no tokens '
                'the model could read.</div>')
    scale = max(abs(x["score"]) for x in words) or 1.0
    parts, pos, shown = [], 0, 0
    for wd in words:
        gap = text[pos : wd["start"]]
        if len(gap) > 200:  # text the model did not read (truncation) or long runs of space
            gap_html = (f'{html.escape(gap[:80])}<span class="hl-skipped" style="color:#999">'
                        f' [… {len(gap) - 160:,} characters not read by the model …] </span>{html.escape(gap[-80:])}')
        else:
            gap_html = html.escape(gap)
        parts.append(gap_html)
        parts.append(
            f'<span class="hl-token" title="{wd["score"]:+.3f}" style="background:{_colour(wd["score"], scale)};'
            f'border-radius:3px;padding:0 1px">{html.escape(wd["text"])}</span>'
        )
        pos = wd["end"]
        shown += len(gap) + len(wd["text"])
        if shown > MAX_SHOWN_CHARS:
            break
    rest = text[pos:]
    if explanation.get("truncated") and len(rest) > 80:
        parts.append(f'{html.escape(rest[:80])}<span class="hl-skipped" style="color:#999"> [… {len(rest) - 80:,} '
                     f'more characters not read by the model …]</span>')
    else:
        parts.append(html.escape(rest[:2000]))
    best = sorted(words, key=lambda x: -x["score"])
    best = [x for x in best if any(ch.isalnum() for ch in x["text"])]  # words, not punctuation
    pro = [x for x in best if x["score"] > 0][:top_k]
    con = [x for x in reversed(best) if x["score"] < 0][:top_k]

    def chips(items):
        return ", ".join(f'<b>{html.escape(x["text"])}</b> <span style="color:#888">({x["score"]:+.2f})</span>'
                         for x in items) or "—"

    method = {"gradient": "gradient × input", "occlusion": "occlusion"}.get(explanation.get("method"), "")
    return (
        f'<div class="hl-explain" style="max-width:900px">'
        f'<div style="margin:6px 0 2px 0"><b>Why?</b> Words that pushed towards <b>{target}</b> '
        f'<span style="background:{_colour(1, 1)};padding:0 3px">green</span>, away from it '
        f'<span style="background:{_colour(-1, 1)};padding:0 3px">red</span>'
        f'<span style="color:#888;font-size:85%"> ({method})</span></div>'
        f'<div class="hl-text" style="line-height:1.9;border:1px solid #ddd;border-radius:4px;padding:6px 8px;'
        f'white-space:pre-wrap;max-height:320px;overflow-y:auto">{"".join(parts)}</div>'
        f'<div style="margin-top:4px">Towards {target}: {chips(pro)}</div>'
        f'<div>Away from it: {chips(con)}</div></div>'
    )


def _run_option(info: dict[str, Any]) -> str:
    acc = info.get("test_accuracy")
    acc_text = f"test acc {acc:.3f}" if isinstance(acc, (int, float)) else "not evaluated"
    return f"{info['name']} · {info.get('dataset') or '?'} · {acc_text}"


class PredictWidget(w.VBox):
    """Run picker, text box, Predict button, examples, label + probability bars, highlighted explanation (display
    it, or drive it: ``wd.text.value = "..."; wd.button.click()``; ``wd.last``: the last explanation dict).

    runs_root: folder of runs for the picker (default $HYBRIDLIB_OUTPUTS, else outputs/); run_dir: the run to
    select (added to the picker if it is elsewhere); examples: texts for the example buttons (default: by the
    run's dataset); device: "cpu" or "cuda"; method: "gradient" (gradient × input, fast) or "occlusion".
    """

    def __init__(self, runs_root: str | Path | None = None, run_dir: str | Path | None = None,
                 examples: list[str] | None = None, device: str = "cpu", method: str = "gradient"):
        self.runs_root = Path(runs_root) if runs_root else outputs_root()
        self.device, self.method, self._examples = device, method, examples
        self._predictors: dict[str, Any] = {}
        self._runs: dict[str, dict[str, Any]] = {}
        self.last: dict[str, Any] | None = None

        self.run_picker = w.Dropdown(description="Run", layout=w.Layout(width="640px"),
                                     style={"description_width": "40px"})
        self.refresh_button = w.Button(icon="refresh", tooltip="Look for new runs", layout=w.Layout(width="40px"))
        self.text = w.Textarea(placeholder="Type or paste a text to classify, then press Predict…",
                               rows=6, layout=w.Layout(width="100%", max_width="900px"))
        self.button = w.Button(description="Predict", button_style="primary", icon="play",
                               tooltip="Classify the text")
        self.examples_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.example_buttons: list[w.Button] = []
        self.message = w.HTML()
        self.result = w.HTML()
        self.explanation = w.HTML()
        self.button.add_class("hl-predict-button")
        self.text.add_class("hl-textarea")

        self.button.on_click(lambda _b: self.predict())
        self.refresh_button.on_click(lambda _b: self.refresh_runs())
        self.run_picker.observe(self._on_run_change, names="value")
        super().__init__([
            w.HBox([self.run_picker, self.refresh_button]),
            self.text,
            w.HBox([self.button, w.HTML('<span style="color:#666;margin-left:8px">Examples:</span>'),
                    self.examples_box], layout=w.Layout(align_items="center", flex_flow="row wrap")),
            self.message, self.result, self.explanation,
        ])
        self.add_class("hl-predict-widget")
        self.refresh_runs(select=run_dir)

    def refresh_runs(self, select: str | Path | None = None) -> None:
        """Re-read the runs under ``runs_root`` (newest first); keep or set the selection."""
        try:
            runs = list_runs(self.runs_root)
        except Exception as e:  # an unreadable folder or metrics.json
            runs = []
            self._show(f"Could not list the runs under {self.runs_root}: {e}", "error")
        if select is not None:
            sel = Path(select).resolve()
            if not any(Path(r["run_dir"]).resolve() == sel for r in runs):
                runs.insert(0, {"run_dir": sel, "name": sel.name, "dataset": None, "test_accuracy": None})
        self._runs = {str(Path(r["run_dir"]).resolve()): r for r in runs}
        current = select or self.run_picker.value
        self.run_picker.unobserve(self._on_run_change, names="value")
        self.run_picker.options = [(_run_option(r), key) for key, r in self._runs.items()]
        keys = list(self._runs)
        wanted = str(Path(current).resolve()) if current else None
        self.run_picker.value = wanted if wanted in self._runs else (keys[0] if keys else None)
        self.run_picker.observe(self._on_run_change, names="value")
        self.run_picker.disabled = not keys
        if not keys:
            self._show(NO_RUNS.format(root=self.runs_root), "warning")
        elif self.message.value and "No finished run" in self.message.value:
            self._show("")
        self._set_examples()

    def _set_examples(self) -> None:
        run = self._runs.get(self.run_picker.value or "")
        texts = self._examples if self._examples is not None else examples_for(run and run.get("dataset"))
        self.example_buttons = []
        for t in texts:
            b = w.Button(description=(t[:32] + "…") if len(t) > 33 else t, tooltip=t,
                         layout=w.Layout(width="auto", max_width="260px"))
            b.add_class("hl-example")
            b.on_click(lambda _b, t=t: self._use_example(t))
            self.example_buttons.append(b)
        self.examples_box.children = self.example_buttons

    def _use_example(self, text: str) -> None:
        self.text.value = text
        self.predict()

    def _on_run_change(self, _change) -> None:
        self._set_examples()
        self.result.value = self.explanation.value = ""
        if self.text.value.strip():
            self.predict()

    def predictor(self):
        """The Predictor of the selected run (loaded once per run)."""
        key = self.run_picker.value
        if key not in self._predictors:
            predictor = Predictor.from_run(key, device=self.device)
            predictor.explain("warm up: the first pass is slower", method=self.method)
            self._predictors[key] = predictor
        return self._predictors[key]

    def _show(self, text: str, kind: str = "info") -> None:
        self.message.value = _message_html(text, kind) if text else ""

    def predict(self) -> dict[str, Any] | None:
        """Classify the text box's text and show the result; returns the explanation dict (or None)."""
        self.last = None
        try:
            if not self.run_picker.value:
                self.result.value = self.explanation.value = ""
                self._show(NO_RUNS.format(root=self.runs_root), "warning")
                return None
            text = self.text.value
            if not text.strip():
                self.result.value = self.explanation.value = ""
                self._show("Type a text to classify first (the text box is empty).", "warning")
                return None
            self.button.disabled = True
            if self.run_picker.value not in self._predictors:
                self._show("Loading the model…")
            predictor = self.predictor()
            start = time.perf_counter()
            out = predictor.explain(text, method=self.method)
            self.result.value = render_probabilities(out, time.perf_counter() - start)
            self.explanation.value = render_explanation(text, out)
            self.last = out
            self._show("")
            return out
        except Exception as e:  # shown, not raised: a traceback in a widget callback is lost in the log
            self.result.value = self.explanation.value = ""
            self._show(str(e) if isinstance(e, HybridlibError) else f"Prediction failed ({type(e).__name__}: {e}).",
                       "error")
        finally:
            self.button.disabled = False
        return None


make_predict_widget = PredictWidget  # the name the notebooks and docs use
