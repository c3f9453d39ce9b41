"""How fast is a prediction in the widget? Median latency over N clicks on a ~230-word review.

    python benchmarks/predict_latency.py                         # every finished run under outputs/
    python benchmarks/predict_latency.py outputs/imdb-2026...    # given runs
    python benchmarks/predict_latency.py --synthetic params/imdb.yaml -p tokenizer ../shared/tokenizers/bert-base-uncased
        # an untrained model of that size (same cost as a trained one), built in a temp folder

Reports, per run: the widget's Predict click (predict + explanation + HTML), Predictor.predict alone
and Predictor.explain alone; median and 90th percentile in ms. The widget's target is 200 ms. A run with a
baseline also times ``Predictor.from_run(run, ensemble=True)``: loading, and predict with the ensemble.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from hybridlib.checkpoints import model_checkpoint, save_checkpoint
from hybridlib.config import load_config, parse_cli_value
from hybridlib.files import MODEL_FILE, NBLR_FILE, TOKENIZER_DIR
from hybridlib.model import build_model
from hybridlib.prediction import Predictor
from hybridlib.runs import list_runs
from hybridlib.tokens import load_tokenizer, tokenizer_fingerprint
from hybridlib.widgets import make_predict_widget

REVIEW = (
    "I went into this film with modest expectations, having heard mixed things from friends, and I came out "
    "genuinely surprised. The first half hour is slow: the director takes his time introducing the family, the "
    "small coastal town and the old boat the father refuses to sell. Some of the dialogue in these scenes feels "
    "stiff, and one subplot about a local election goes nowhere. But once the storm arrives, the film finds its "
    "rhythm. The camera work during the rescue sequence is tense and beautifully controlled, never confusing, and "
    "the sound design makes you feel every wave hitting the hull. The performances are the real reason to watch. "
    "The lead actress, who I had only seen in comedies before, is quietly devastating as the eldest daughter who "
    "has to decide between leaving and staying. Her final scene with her father, almost without words, is one of "
    "the best things I have seen this year. The supporting cast is solid, although the younger brother is written "
    "as a cliche. The score is a little too insistent at times, telling you what to feel when the images already "
    "do. At just over two hours it could lose fifteen minutes without harm. Still, it is an honest, moving and "
    "well made story about family and place, and I would recommend it to anyone who enjoys character driven "
    "drama. Worth seeing on a big screen if you can."
)


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return f"median {1000 * statistics.median(xs):6.1f} ms   p90 {1000 * p90:6.1f} ms"


def synthetic_run(params: str, overrides: dict, folder: Path) -> Path:
    """An untrained model with the size and tokenizer of ``params`` saved as a run (model.pt + tokenizer/)."""
    cfg = load_config(params, overrides)
    cfg.pretrained_embeddings = None
    tok = load_tokenizer(cfg.tokenizer)
    labels = cfg.label_names or ["neg", "pos"]
    model = build_model(cfg, len(tok), len(labels), tok.pad_token_id)
    run = folder / f"synthetic-{cfg.dataset}"
    run.mkdir(parents=True)
    tok.save_pretrained(str(run / TOKENIZER_DIR))
    data = SimpleNamespace(label_names=labels, tokenizer_id=tokenizer_fingerprint(tok), vocab_size=len(tok),
                           pad_id=tok.pad_token_id)
    save_checkpoint(model_checkpoint(model, cfg, data, epoch=0, best_metric=0.0), run / MODEL_FILE)
    return run


def bench(run: Path, n: int) -> None:
    t = time.perf_counter()
    wd = make_predict_widget(run_dir=run)
    wd.text.value = REVIEW
    wd.button.click()  # loads the model (once) and warms up
    if wd.last is None:
        print(f"{run}: the widget showed no result: {wd.message.value}")
        return
    load = time.perf_counter() - t
    predictor: Predictor = wd.predictor()
    clicks, preds, expl = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        wd.button.click()
        clicks.append(time.perf_counter() - t)
    for _ in range(n):
        t = time.perf_counter()
        predictor.predict(REVIEW)
        preds.append(time.perf_counter() - t)
    for _ in range(n):
        t = time.perf_counter()
        predictor.explain(REVIEW)
        expl.append(time.perf_counter() - t)
    n_tok = len(predictor.encode([REVIEW])[0])
    params = sum(p.numel() for p in predictor.model.parameters())
    print(f"{run.name}: {params:,} parameters, {len(REVIEW.split())} words -> {n_tok} tokens "
          f"(max_length {predictor.cfg.max_length}); first click incl. loading {1000 * load:.0f} ms")
    print(f"  widget click (predict + explain + HTML)  {stats(clicks)}")
    print(f"  Predictor.predict                        {stats(preds)}")
    print(f"  Predictor.explain                        {stats(expl)}")
    print(f"  label {wd.last['label']}  probabilities {({k: round(v, 3) for k, v in wd.last['probabilities'].items()})}")
    if (run / NBLR_FILE).is_file():
        t = time.perf_counter()
        ensemble = Predictor.from_run(run, ensemble=True)
        load = time.perf_counter() - t
        ensemble.predict(REVIEW)  # warm-up
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ensemble.predict(REVIEW)
            times.append(time.perf_counter() - t)
        print(f"  Predictor.predict, ensemble=True         {stats(times)}   (loading {1000 * load:.0f} ms)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (default: every finished run under outputs/)")
    ap.add_argument("-n", type=int, default=20, help="clicks to time (default 20)")
    ap.add_argument("--synthetic", metavar="PARAMS", help="also time an untrained model built from this params file")
    ap.add_argument("-p", nargs=2, action="append", metavar=("KEY", "VALUE"), help="override for --synthetic")
    a = ap.parse_args(argv)
    runs = list(a.runs) or [r["run_dir"] for r in list_runs()]
    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic:
            runs.append(synthetic_run(a.synthetic, {k: parse_cli_value(v) for k, v in a.p or []}, Path(tmp)))
        if not runs:
            print("No runs to time: train one, or pass --synthetic params/imdb.yaml", file=sys.stderr)
            return 1
        for run in runs:
            bench(Path(run), a.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
