"""hybridlib.Predictor: loading a run, predict() on single texts, lists and awkward inputs, explain()."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import pickle
import shutil

import fixtures
import numpy as np
import pytest
import torch
from tiny_run import tiny_run

from hybridlib import Predictor
from hybridlib import model as model_module
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.errors import CheckpointError, ConfigError, DataError
from hybridlib.model import SideThread
from hybridlib.tokens import encode_texts, shorten

SPORTS = "The coach said the team scored a late goal to win the championship match."
BUSINESS = "Shares of the company fell as investors sold stock after weak quarterly earnings."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_run(run_dir)


def check_result(r, names):
    assert set(r) == {"label", "index", "probabilities"}
    assert r["label"] in names and names[r["index"]] == r["label"]
    assert list(r["probabilities"]) == names
    assert all(0.0 <= p <= 1.0 and math.isfinite(p) for p in r["probabilities"].values())
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["probabilities"][r["label"]] == max(r["probabilities"].values())


# ----------------------------------------------------------------------------- loading


def test_from_run_loads_model_and_the_runs_own_tokenizer(run_dir, predictor):
    assert predictor.label_names == ["sports", "business", "science"]
    assert predictor.device == torch.device("cpu")
    assert not predictor.model.training
    # the tokenizer saved beside the checkpoint, not the one the params name
    assert predictor.tokenizer.name_or_path == str(run_dir / "tokenizer")


def test_from_checkpoint_and_from_run_agree(run_dir, predictor):
    other = Predictor.from_checkpoint(run_dir / "model.pt")
    assert other.predict([SPORTS, BUSINESS]) == predictor.predict([SPORTS, BUSINESS])


def test_a_copied_run_predicts_without_its_training_files(run_dir, predictor, tmp_path):
    """model.pt + tokenizer/ are all a run needs to predict later (offline, elsewhere)."""
    copy = tmp_path / "copied-run"
    copy.mkdir()
    shutil.copy(run_dir / "model.pt", copy / "model.pt")
    shutil.copytree(run_dir / "tokenizer", copy / "tokenizer")
    assert Predictor.from_run(copy).predict(SPORTS) == predictor.predict(SPORTS)


def test_from_run_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no model.pt"):
        Predictor.from_run(tmp_path)


def test_cuda_when_asked(run_dir):
    if torch.cuda.is_available():
        p = Predictor.from_run(run_dir, device="cuda")
        assert p.device.type == "cuda"
        assert p.predict(SPORTS)[0]["probabilities"] == pytest.approx(
            Predictor.from_run(run_dir).predict(SPORTS)[0]["probabilities"], abs=1e-4)
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Predictor.from_run(run_dir, device="cuda")


# ----------------------------------------------------------------------------- predict


def test_predict_single_text(predictor):
    out = predictor.predict(SPORTS)
    assert isinstance(out, list) and len(out) == 1
    check_result(out[0], predictor.label_names)
    assert out[0]["label"] == "sports"  # the tiny model learns its keywords


def test_predict_list(predictor):
    texts = [SPORTS, BUSINESS, "Scientists in the laboratory study cells and the genome."]
    out = predictor.predict(texts)
    assert len(out) == 3
    for r in out:
        check_result(r, predictor.label_names)
    assert [r["label"] for r in out] == ["sports", "business", "science"]
    assert predictor.predict([]) == []


def test_predict_batches_give_the_same_results(run_dir, predictor):
    texts = [SPORTS, BUSINESS, "goal", "market " * 40, "", "stock and planet and team"] * 3
    small = Predictor.from_run(run_dir, batch_size=2)
    a = np.array([list(r["probabilities"].values()) for r in predictor.predict(texts)])
    b = np.array([list(r["probabilities"].values()) for r in small.predict(texts)])
    one = np.array([list(predictor.predict(t)[0]["probabilities"].values()) for t in texts])
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, one, atol=1e-5)


def test_padding_batches_to_a_multiple_as_on_cuda_changes_no_prediction(run_dir, predictor):
    texts = [SPORTS, BUSINESS, "goal", "market " * 40, "", "stock and planet and team"]
    padded = Predictor.from_run(run_dir, batch_size=4)
    padded.collate.pad_multiple = 16  # CUDA's policy (CUDA_PAD_MULTIPLE), at a size the tiny run's texts reach
    ids = padded.encode(texts)
    batch = padded.collate([{"input_ids": x} for x in ids[:3]])
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in ids[:3]]
    np.testing.assert_allclose(padded.predict_proba(texts), predictor.predict_proba(texts), atol=1e-5)
    a, b = padded.explain(SPORTS), predictor.explain(SPORTS)
    assert a["tokens"] == b["tokens"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_predict_rejects_what_is_not_text(predictor):
    with pytest.raises(DataError):
        predictor.predict(42)
    with pytest.raises(DataError):
        predictor.predict(["ok", None])


EDGE_CASES = {
    "empty": "",
    "whitespace": "  \n\t  \r\n ",
    "one_mb": ("The team scored a goal in the match. " * 30_000)[:1_000_000],
    "one_mb_no_spaces": "x" * 1_000_000,
    "emoji": "🏈⚽🏆 team goal!!! 😀😀😀 📈💰",
    "chinese": "球队在决赛中获胜。股票市场下跌。",
    "arabic": "فاز الفريق بالمباراة النهائية",
    "cyrillic": "Команда выиграла финальный матч",
    "hindi": "टीम ने फाइनल मैच जीता",
    "html": "<html><body><h1>Goal!</h1><script>alert('x')</script><p>The team &amp; coach</p></body></html>",
    "control_chars": "team\x00goal\x07\x1b[31m match\u200b\ufeff",
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_predict_edge_cases_give_a_label_and_probabilities_summing_to_1(predictor, name):
    out = predictor.predict(EDGE_CASES[name])
    assert len(out) == 1
    check_result(out[0], predictor.label_names)


def test_empty_text_rule_is_special_tokens_only(predictor):
    """Documented rule: empty / whitespace-only text = the special tokens alone ([CLS] [SEP]), not an error."""
    assert predictor.encode([""]) == predictor.encode(["   \n "]) == [[predictor.tokenizer.cls_token_id,
                                                                       predictor.tokenizer.sep_token_id]]
    assert predictor.predict("") == predictor.predict("  \t\n")


def test_a_sequence_without_any_token_still_predicts(predictor):
    batch = predictor.collate([{"input_ids": []}])  # e.g. a tokenizer without special tokens, empty text
    assert batch["attention_mask"].sum().item() == 1
    with torch.no_grad():
        assert torch.isfinite(predictor.model(batch["input_ids"], batch["attention_mask"])).all()


def test_inference_runs_the_branches_side_by_side_with_the_same_logits(predictor, monkeypatch):
    """Predictor gives the model a ``side_thread``: on one CPU thread with a second core, its CNN branch runs there
    beside the BiLSTM at inference, and the logits are the sequential ones, bit for bit; without a second core,
    with more torch threads or with autograd on, the branches run one after the other."""
    model = predictor.model
    assert isinstance(model.side_thread, SideThread)
    batch = predictor.collate([{"input_ids": x} for x in predictor.encode([SPORTS, BUSINESS, "", "goal market " * 60])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    used = []
    start = SideThread.start
    monkeypatch.setattr(SideThread, "start", lambda *a: used.append(1) or start(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(model, "side_thread", None)
        with torch.no_grad():
            expected = model(ids, mask)
        monkeypatch.setattr(model, "side_thread", SideThread())
        for cores, grad, beside in ((2, False, True), (1, False, False), (2, True, False)):
            monkeypatch.setattr(model_module.os, "cpu_count", lambda n=cores: n)  # any machine: pretend
            used.clear()
            with torch.set_grad_enabled(grad):
                got = model(ids, mask)
            assert bool(used) is beside, (cores, grad)
            assert got.requires_grad is grad
            if not grad:  # (with autograd the LSTM takes its training kernels)
                assert torch.equal(got, expected), cores
    finally:
        torch.set_num_threads(before)


def test_the_side_thread_reports_errors_and_is_never_shared(predictor, monkeypatch):
    def broken(*_):
        raise RuntimeError("cnn failed")

    with pytest.raises(RuntimeError, match="cnn failed"):
        SideThread().start(broken)()
    side = predictor.model.side_thread
    assert copy.deepcopy(predictor.model).side_thread is not side
    assert pickle.loads(pickle.dumps(side)) is not side
    # a forked child (multiprocessing's fork, a web server's workers) starts its own thread instead of waiting
    # for the parent's, which it has no copy of
    monkeypatch.setattr(model_module.os, "cpu_count", lambda: 2)
    expected = predictor.predict(SPORTS)  # the parent's side thread is running now
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=lambda: results.put(predictor.predict(SPORTS)))
    child.start()
    try:
        assert results.get(timeout=120) == expected
    finally:
        child.join(10)
        child.kill()


@pytest.mark.parametrize(("max_length", "truncation"), [(64, "head_tail"), (4, "head_tail"), (5, "head")])
def test_prediction_and_explain_read_the_ids_evaluation_reads(run_dir, max_length, truncation):
    """One cut (tokens.encode_texts): Predictor.encode and explain() give a text the ids that training and
    evaluation tokenized it to, at any max_length (also below 6, where head_tail keeps a head of one token)."""
    test = prepare_data(load_config(run_dir / "params.yaml", {"max_length": max_length, "truncation": truncation}))
    test = test.splits["test"].select(range(40))
    predictor = Predictor.from_run(run_dir)
    predictor.cfg.max_length, predictor.cfg.truncation = max_length, truncation
    texts = list(test["text"])
    ids = predictor.encode(texts)
    assert ids == [[int(i) for i in x] for x in test["input_ids"]]
    long = " ".join(texts)  # cut at every max_length
    (cut,) = encode_texts(predictor.tokenizer, [long], max_length, truncation)[0]
    assert predictor.encode([long]) == [cut]
    assert predictor.explain(long)["tokens"] == predictor.tokenizer.convert_ids_to_tokens(cut[1:-1])


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
def test_long_texts_are_shortened_without_changing_what_the_model_reads(predictor, truncation, monkeypatch):
    monkeypatch.setattr(predictor.cfg, "truncation", truncation)
    words = ["goal", "market", "research", "the", "of", "naïve", "日本", "😀", "team,", "stock."]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=120_000)) + "\n  end"
    short, _, _ = shorten(predictor.tokenizer, text, predictor.cfg.max_length, truncation)
    assert len(short) < 3 * max(10_000, 40 * predictor.cfg.max_length) < len(text)
    full = encode_texts(predictor.tokenizer, [text], predictor.cfg.max_length, truncation)[0]
    assert predictor.encode([text]) == full
    # texts the shortcut cannot prove safe are tokenized whole
    for odd in ["x" * 100_000, " " * 60_000 + "goal team" + " " * 60_000]:
        assert predictor.encode([odd]) == encode_texts(predictor.tokenizer, [odd], predictor.cfg.max_length, truncation)[0]


def test_table(predictor):
    df = predictor.table([SPORTS, BUSINESS])
    assert list(df.columns) == ["text", "label", "sports", "business", "science"]
    assert list(df["label"]) == ["sports", "business"]
    assert df[["sports", "business", "science"]].sum(axis=1).round(2).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- explain


@pytest.mark.parametrize("method", ["gradient", "occlusion"])
def test_explain_returns_the_prediction_and_token_scores(predictor, method):
    text = "The coach said the TEAM scored; market shares fell."
    e = predictor.explain(text, method=method)
    p = predictor.predict(text)[0]
    assert e["label"] == p["label"] and e["index"] == p["index"] and e["target"] == p["label"]
    assert e["probabilities"] == pytest.approx(p["probabilities"], abs=1e-5)
    assert e["method"] == method and e["truncated"] is False
    assert len(e["tokens"]) == len(e["scores"]) == len(e["spans"]) > 5
    assert all(math.isfinite(s) for s in e["scores"]) and any(s != 0 for s in e["scores"])
    for tok, (s, end) in zip(e["tokens"], e["spans"], strict=True):
        if tok != "[UNK]":
            assert text[s:end].lower() == tok.removeprefix("##")
    # words: pieces summed per word, in order, covering the text's words
    assert [w["text"] for w in e["words"]] == ["The", "coach", "said", "the", "TEAM", "scored", ";", "market",
                                              "shares", "fell", "."]
    assert sum(w["score"] for w in e["words"]) == pytest.approx(sum(e["scores"]), abs=1e-4)


def test_explain_keywords_push_towards_their_class(predictor):
    """On texts like its training data that it classifies right, the word whose occlusion costs the class most is
    one of that class's keywords (about 40 % of the words are; a filler word may win now and then)."""
    texts, labels = fixtures.make_texts(12, seed=123, min_words=6, max_words=12)
    tops = []
    for text, y in zip(texts, labels, strict=True):
        name = fixtures.LABEL_NAMES[y]
        if predictor.predict([text])[0]["label"] == name:
            e = predictor.explain(text, method="occlusion", target=name)
            tops.append(max(e["words"], key=lambda w: w["score"])["text"].lower() in fixtures.KEYWORDS[name])
    assert len(tops) >= 9 and sum(tops) >= 0.8 * len(tops), tops
    with pytest.raises(DataError, match="not a class of this model"):
        predictor.explain("x", target="no-such-class")
    with pytest.raises(DataError, match="not a class of this model"):
        predictor.explain("x", target=len(fixtures.LABEL_NAMES))
    assert predictor.explain("x", target=1)["target"] == fixtures.LABEL_NAMES[1]
    with pytest.raises(DataError):
        predictor.explain("x", method="magic")


def test_explain_truncated_text_maps_spans_back(predictor, monkeypatch):
    monkeypatch.setattr(predictor.cfg, "truncation", "head_tail")
    text = "goal team " * 40_000 + "MIDDLE " + "market stock " * 40_000 + "finale"
    e = predictor.explain(text)
    assert e["truncated"] is True
    assert len(e["tokens"]) == predictor.cfg.max_length - 2
    assert e["words"][-1]["text"] == "finale" and e["words"][-1]["end"] == len(text)
    assert all(text[w["start"]:w["end"]] == w["text"] for w in e["words"])
    assert "MIDDLE" not in {w["text"] for w in e["words"]}


def test_explain_empty_text(predictor):
    e = predictor.explain("")
    assert e["tokens"] == [] and e["words"] == []
    check_result({k: e[k] for k in ("label", "index", "probabilities")}, predictor.label_names)


# ----------------------------------------------------------------------------- the model + NB-LR ensemble


def test_ensemble_predictions_are_the_evaluated_stack(run_dir, predictor):
    """from_run(ensemble=True) stacks the saved baseline with the model as the evaluation fitted it, and on the
    test split it scores what metrics.json reports for the ensemble."""
    from hybridlib.baselines import Stack, load_nblr
    from hybridlib.config import load_config
    from hybridlib.data import prepare_data

    ens = Predictor.from_run(run_dir, ensemble=True)
    reported = json.loads((run_dir / "metrics.json").read_text())["ensembles"]["model+nblr"]
    texts = [SPORTS, BUSINESS, "", "words the baseline never saw"]
    baseline = load_nblr(run_dir / "nblr.npz").predict_proba(texts)
    stack = Stack.from_dict(reported["stack"], len(predictor.label_names))
    expected = stack.predict_proba(predictor.predict_proba(texts), baseline)
    assert np.allclose(ens.predict_proba(texts), expected, atol=1e-6)
    for r in ens.predict(texts):
        check_result(r, ens.label_names)

    test = prepare_data(load_config(run_dir / "params.yaml")).splits["test"]
    acc = (ens.predict_proba(list(test["text"])).argmax(1) == np.asarray(test["label"])).mean()
    assert acc == pytest.approx(reported["test_accuracy"])


def test_ensemble_of_a_run_without_baseline_is_a_clear_error(run_dir, tmp_path):
    copy = tmp_path / "no-baseline"
    shutil.copytree(run_dir, copy)
    (copy / "nblr.npz").unlink()
    with pytest.raises(CheckpointError, match="nblr.npz does not exist"):
        Predictor.from_run(copy, ensemble=True)
    (copy / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="no model \\+ baseline ensemble in metrics.json"):
        Predictor.from_run(copy, ensemble=True)
    Predictor.from_run(copy).predict(SPORTS)  # the model alone still works


def test_ensemble_of_a_run_made_before_the_stack_is_its_mix_and_a_damaged_stack_is_refused(run_dir, predictor, tmp_path):
    from hybridlib.baselines import load_nblr, mix_probs

    copy = tmp_path / "mix-era"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    entry = metrics["ensembles"]["model+nblr"]
    old = {k: v for k, v in entry.items() if k not in ("stack", "method")} | {"weight_other": 0.35}
    (copy / "metrics.json").write_text(json.dumps({**metrics, "ensembles": {"model+nblr": old}}))
    texts = [SPORTS, BUSINESS]
    expected = mix_probs(predictor.predict_proba(texts), load_nblr(copy / "nblr.npz").predict_proba(texts), 0.35)
    assert np.allclose(Predictor.from_run(copy, ensemble=True).predict_proba(texts), expected, atol=1e-6)
    damaged = {**entry, "stack": {**entry["stack"], "coef": [[0.0]]}}
    (copy / "metrics.json").write_text(json.dumps({**metrics, "ensembles": {"model+nblr": damaged}}))
    with pytest.raises(CheckpointError, match="model\\+nblr ensemble is damaged.*Evaluate the run again"):
        Predictor.from_run(copy, ensemble=True)
