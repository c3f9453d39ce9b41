"""hybridlib.rawdata, tokens, data, batching: local loading, label encoding, checks, tokenizing (cached),
splitting, batching."""

from __future__ import annotations

import dataclasses
import warnings

import fixtures
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridlib import data as hd
from hybridlib.batching import Collator, LengthBucketSampler, make_loader
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.errors import DataError
from hybridlib.locations import data_folder, tokenizer_folder
from hybridlib.rawdata import load_raw, natural_key
from hybridlib.runs import start_run
from hybridlib.runtime import Dist
from hybridlib.tokens import encode_texts, load_tokenizer, tokenizer_fingerprint


@pytest.fixture
def cfg_for(tiny_params):
    """cfg_for(data_dir, **overrides): the tiny config pointed at another data folder."""

    def make(data_dir, **overrides):
        return load_config(tiny_params, overrides={"data_dir": str(data_dir), **overrides})

    return make


def write_parquet(folder, split, columns: dict, schema=None):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), folder / f"{split}.parquet")


def split_rows(d, split):
    s = d.splits[split]
    return list(zip(s["text"], s["label"], strict=True))


# ----------------------------------------------------------------------------- loading


def test_prepare_data_tiny(tiny_cfg, tiny_tokenizer):
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert set(d.splits) == {"train", "validation", "test"}
    assert len(d.splits["train"]) + len(d.splits["validation"]) == 240
    assert len(d.splits["validation"]) == round(240 * tiny_cfg.val_size)
    assert len(d.splits["test"]) == 80
    assert d.label_names == ["sports", "business", "science"]
    assert d.pad_id == 0
    assert d.vocab_size == len(tiny_tokenizer)
    for name in ("text", "label", "input_ids", "length"):
        assert name in d.splits["train"].column_names
    row = d.splits["train"][0]
    assert row["length"] == len(row["input_ids"]) <= tiny_cfg.max_length
    assert row["input_ids"][0] == tiny_tokenizer.cls_token_id
    assert row["input_ids"][-1] == tiny_tokenizer.sep_token_id


def test_prepare_data_loads_tokenizer_from_cfg(tiny_cfg):
    d = prepare_data(tiny_cfg)
    assert d.tokenizer.is_fast
    assert d.tokenizer_id == tokenizer_fingerprint(d.tokenizer)


def test_formats_give_the_same_result(tmp_path, cfg_for, tiny_tokenizer):
    results = {}
    for fmt in ("parquet", "csv", "jsonl"):
        folder = fixtures.make_tiny_dataset(tmp_path / fmt, n_train=60, n_test=20, fmt=fmt)
        assert (folder / f"train.{fmt}").is_file() and (folder / f"test.{fmt}").is_file()
        d = prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)
        results[fmt] = {s: split_rows(d, s) for s in ("train", "validation", "test")}
        results[fmt]["names"] = d.label_names
    assert results["parquet"] == results["csv"] == results["jsonl"]


def test_a_broken_jsonl_line_is_named_by_file_and_line(tmp_path, cfg_for):
    folder = fixtures.make_tiny_dataset(tmp_path / "j", n_train=30, n_test=10, fmt="jsonl")
    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[11] = lines[11].replace(",", "", 1)  # '{"text": "..." "label": 2}'
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 12: not one JSON object \(Expecting ',' delimiter"):
        load_raw(cfg_for(folder))


def test_a_split_in_two_files_is_refused(tmp_path, cfg_for):
    """train.csv beside train.parquet: which one is meant is the user's call, not a silent pick."""
    folder = fixtures.make_tiny_dataset(tmp_path / "both", n_train=30, n_test=10)
    fixtures.make_tiny_dataset(tmp_path / "both", n_train=60, n_test=10, fmt="csv")
    (folder / "test.csv").unlink()
    with pytest.raises(DataError, match=r"Split 'train' is in 2 files .*\['train.parquet', 'train.csv'\]"):
        load_raw(cfg_for(folder))


def test_string_labels_sorted_names(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "s", n_train=60, n_test=20, string_labels=True)
    d = prepare_data(cfg_for(folder, label_names=None), tokenizer=tiny_tokenizer)
    assert d.label_names == ["business", "science", "sports"]
    raw = pd.read_parquet(folder / "test.parquet")
    by_text = dict(zip(raw["text"], raw["label"], strict=True))
    for text, label in split_rows(d, "test"):
        assert d.label_names[label] == by_text[text]


STARS = ["1 star", "2 stars", "3 stars", "9 stars", "10 stars", "11 stars"]


def test_natural_key_orders_numbers_by_value():
    assert sorted(["10 stars", "2 stars", "1 star", "11 stars", "9 stars", "3 stars"], key=natural_key) == STARS
    assert sorted(["b2", "a10", "a9", "b10"], key=natural_key) == ["a9", "a10", "b2", "b10"]
    assert sorted(["class 10", "class 2", "other"], key=natural_key) == ["class 2", "class 10", "other"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_string_labels_are_ordered_naturally(tmp_path, cfg_for, tiny_tokenizer, fmt):
    """No label_names: the distinct labels in natural order (1 star, 2 stars, ..., 10 stars), not as strings
    sort ("10 stars" before "2 stars"); every text keeps its own label."""
    texts, ids = fixtures.make_texts(120, seed=4)
    labels = [STARS[(i * 7 + y) % len(STARS)] for i, y in enumerate(ids)]
    folder = tmp_path / fmt
    folder.mkdir()
    for split, rows in (("train", slice(0, 96)), ("test", slice(96, None))):
        df = pd.DataFrame({"text": texts[rows], "label": labels[rows]})
        if fmt == "csv":
            df.to_csv(folder / f"{split}.csv", index=False)
        else:
            df.to_parquet(folder / f"{split}.parquet", index=False)
    d = prepare_data(cfg_for(folder, label_names=None, val_size=0.25), tokenizer=tiny_tokenizer)
    assert d.label_names == STARS
    assert d.splits["train"].features["label"].names == STARS
    by_text = dict(zip(texts, labels, strict=True))
    for split in ("train", "validation", "test"):
        for text, label in split_rows(d, split):
            assert d.label_names[label] == by_text[text]


def test_metrics_follow_the_natural_label_order(tmp_path, tiny_params, tiny_tokenizer):
    """The natural order is the order of the model's outputs, the checkpoint, metrics.json (per_class, the rows and
    columns of the confusion matrix), the report and the Predictor."""
    from hybridlib.checkpoints import load_checkpoint
    from hybridlib.evaluation import evaluate_run
    from hybridlib.prediction import Predictor
    from hybridlib.runs import read_metrics
    from hybridlib.training import train

    names = ["1 star", "2 stars", "10 stars"]  # the 3 tiny classes (sports, business, science) renamed
    folder = tmp_path / "stars"
    for split, n, seed in (("train", 240, 0), ("test", 60, 1)):
        texts, ids = fixtures.make_texts(n, seed=seed)
        write_parquet(folder, split, {"text": texts, "label": [names[y] for y in ids]})
    test_labels = [names[y] for y in fixtures.make_texts(60, seed=1)[1]]
    cfg = load_config(tiny_params, {"data_dir": str(folder), "label_names": None, "epochs": 1})
    data = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert data.label_names == names
    run = tmp_path / "run"
    train(cfg, run, data, progress=False)
    m = evaluate_run(cfg, run, data, progress=False)["metrics"]
    assert load_checkpoint(run / "model.pt")["label_names"] == names
    assert m["label_names"] == list(m["per_class"]) == names == read_metrics(run)["label_names"]
    assert [row_sum for row_sum in map(sum, m["confusion_matrix"])] == [test_labels.count(n) for n in names]
    assert [m["per_class"][n]["support"] for n in names] == [test_labels.count(n) for n in names]
    report = (run / "classification_report.txt").read_text()
    assert report.index("1 star") < report.index("2 stars") < report.index("10 stars")
    assert list(Predictor.from_run(run).predict("a goal")[0]["probabilities"]) == names


def test_string_labels_follow_label_names_order(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "s", n_train=60, n_test=20, string_labels=True)
    names = ["science", "sports", "business"]
    d = prepare_data(cfg_for(folder, label_names=names), tokenizer=tiny_tokenizer)
    assert d.label_names == names
    assert d.splits["train"].features["label"].names == names
    raw = pd.read_parquet(folder / "train.parquet")
    by_text = dict(zip(raw["text"], raw["label"], strict=True))
    for text, label in split_rows(d, "train") + split_rows(d, "validation"):
        assert names[label] == by_text[text]


def test_int_labels_with_label_names(tiny_cfg, tiny_tokenizer, tiny_data_dir):
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert d.label_names == ["sports", "business", "science"]
    raw = pd.read_parquet(tiny_data_dir / "test.parquet")
    by_text = dict(zip(raw["text"], raw["label"], strict=True))
    for text, label in split_rows(d, "test"):
        assert label == by_text[text]


def test_int_labels_without_label_names(tiny_cfg, tiny_tokenizer):
    tiny_cfg.label_names = None
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert d.label_names == ["0", "1", "2"]


def test_int_labels_many_classes_without_label_names(tmp_path, cfg_for, tiny_tokenizer):
    """Twelve classes 0..11: the ids must be checked numerically (not as strings: "10" < "2")."""
    k = 12
    words = [f"word{i}" for i in range(k)]
    texts = [f"{words[i % k]} text number {i}" for i in range(12 * k)]
    labels = [i % k for i in range(12 * k)]
    folder = tmp_path / "many"
    write_parquet(folder, "train", {"text": texts, "label": labels})
    write_parquet(folder, "test", {"text": texts[:k], "label": labels[:k]})
    d = prepare_data(cfg_for(folder, label_names=None, val_size=0.5), tokenizer=tiny_tokenizer)
    assert d.label_names == [str(i) for i in range(k)]
    assert sorted(set(d.splits["test"]["label"])) == list(range(k))


def test_int_label_outside_label_names(tiny_cfg, tiny_tokenizer):
    tiny_cfg.label_names = ["sports", "business"]  # the data has ids 0, 1, 2
    with pytest.raises(DataError) as e:
        prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert "[2]" in str(e.value)
    assert "label_names" in str(e.value)


@pytest.mark.parametrize("where", ["train", "test_only"])
def test_string_label_outside_label_names(tmp_path, cfg_for, tiny_tokenizer, where):
    folder = fixtures.make_tiny_dataset(tmp_path / "s", n_train=60, n_test=20, string_labels=True)
    if where == "train":  # label_names leaves out a class of the data
        cfg, bad = cfg_for(folder, label_names=["sports", "business"]), "'science'"
    else:  # a label that appears only in the test split
        write_parquet(folder, "test", {"text": ["a football match", "a new planet"], "label": ["sports", "weather"]})
        cfg, bad = cfg_for(folder), "'weather'"
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert bad in str(e.value) and "label_names" in str(e.value)


def test_ids_written_as_text_are_pointed_out(tmp_path, cfg_for, tiny_tokenizer):
    folder = tmp_path / "digits"
    texts = [f"text {i}" for i in range(30)]
    for split, n in (("train", 30), ("test", 6)):
        write_parquet(folder, split, {"text": texts[:n], "label": [str(i % 3) for i in range(n)]})
    with pytest.raises(DataError, match="class ids written as text: write them as numbers"):
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)  # label_names: sports, business, science


def test_int_labels_not_0_to_k(tmp_path, cfg_for, tiny_tokenizer):
    folder = tmp_path / "gap"
    texts = [f"text {i}" for i in range(40)]
    write_parquet(folder, "train", {"text": texts, "label": [1 + 2 * (i % 2) for i in range(40)]})  # 1 and 3
    write_parquet(folder, "test", {"text": texts[:4], "label": [1, 3, 1, 3]})
    with pytest.raises(DataError, match="0..K-1"):
        prepare_data(cfg_for(folder, label_names=None), tokenizer=tiny_tokenizer)


def test_single_class_rejected(tmp_path, cfg_for, tiny_tokenizer):
    folder = tmp_path / "one"
    write_parquet(folder, "train", {"text": ["a b c"] * 20, "label": ["x"] * 20})
    write_parquet(folder, "test", {"text": ["a"], "label": ["x"]})
    with pytest.raises(DataError, match="at least 2 classes"):
        prepare_data(cfg_for(folder, label_names=None), tokenizer=tiny_tokenizer)


def test_missing_data_dir(tmp_path, cfg_for):
    cfg = cfg_for(tmp_path / "does_not_exist")
    with pytest.raises(DataError) as e:
        load_raw(cfg)
    assert "data_dir" in str(e.value)
    assert "does_not_exist" in str(e.value)


def test_missing_split(tmp_path, cfg_for):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    (folder / "test.parquet").unlink()
    with pytest.raises(DataError) as e:
        load_raw(cfg_for(folder))
    msg = str(e.value)
    assert "'test'" in msg
    assert "train.parquet" in msg  # lists what the folder holds


def test_custom_split_names(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=60, n_test=20)
    (folder / "test.parquet").rename(folder / "heldout.parquet")
    d = prepare_data(cfg_for(folder, test_split="heldout"), tokenizer=tiny_tokenizer)
    assert len(d.splits["test"]) == 20


@pytest.mark.parametrize("missing", ["text", "label"])
def test_missing_column_lists_existing_columns(tmp_path, cfg_for, tiny_tokenizer, missing):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    for split in ("train", "test"):
        df = pd.read_parquet(folder / f"{split}.parquet").rename(columns={missing: "renamed"})
        df.to_parquet(folder / f"{split}.parquet", index=False)
    with pytest.raises(DataError) as e:
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)
    msg = str(e.value)
    assert f"'{missing}'" in msg
    assert "renamed" in msg
    assert f"{missing}_column" in msg


def test_other_column_names(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=60, n_test=20)
    for split in ("train", "test"):
        df = pd.read_parquet(folder / f"{split}.parquet").rename(columns={"text": "body", "label": "topic"})
        df["extra"] = 1
        df.to_parquet(folder / f"{split}.parquet", index=False)
    d = prepare_data(cfg_for(folder, text_column="body", label_column="topic"), tokenizer=tiny_tokenizer)
    assert {"text", "label"} <= set(d.splits["test"].column_names)
    assert "extra" not in d.splits["test"].column_names


def test_null_text(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    df = pd.read_parquet(folder / "train.parquet")
    df.loc[[3, 7], "text"] = None
    df.to_parquet(folder / "train.parquet", index=False)
    with pytest.raises(DataError) as e:
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)
    msg = str(e.value)
    assert "'text'" in msg and "2 missing" in msg and "[3, 7]" in msg


def test_null_label(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    df = pd.read_parquet(folder / "test.parquet")
    labels = [None if i == 4 else int(v) for i, v in enumerate(df["label"])]
    write_parquet(folder, "test", {"text": list(df["text"]), "label": pa.array(labels, pa.int64())})
    with pytest.raises(DataError, match="'label'"):
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)


def test_text_and_label_column_the_same(tmp_path, cfg_for, tiny_tokenizer):
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    with pytest.raises(DataError, match="both 'label'"):
        prepare_data(cfg_for(folder, text_column="label"), tokenizer=tiny_tokenizer)


def test_text_column_that_is_not_text(tmp_path, cfg_for, tiny_tokenizer):
    folder = tmp_path / "d"
    for split in ("train", "test"):
        write_parquet(folder, split, {"text": ["a b"] * 6, "label": [0, 1] * 3, "views": list(range(6))})
    with pytest.raises(DataError) as e:
        prepare_data(cfg_for(folder, text_column="views"), tokenizer=tiny_tokenizer)
    assert "'views'" in str(e.value) and "not text" in str(e.value) and "['text', 'label', 'views']" in str(e.value)


def test_label_column_of_lists(tmp_path, cfg_for, tiny_tokenizer):
    folder = tmp_path / "d"
    for split in ("train", "test"):
        write_parquet(folder, split, {"text": ["a b"] * 6, "label": [0, 1] * 3, "tags": [[1, 2]] * 6})
    with pytest.raises(DataError, match="'tags'.*not one label per row"):
        prepare_data(cfg_for(folder, label_column="tags", label_names=None), tokenizer=tiny_tokenizer)


def test_label_column_called_text(tmp_path, cfg_for, tiny_tokenizer):
    """Columns body (texts) and text (labels): renaming used to collide (KeyError inside datasets)."""
    texts, labels = fixtures.make_texts(60, seed=3)
    folder = tmp_path / "d"
    write_parquet(folder, "train", {"body": texts, "text": [fixtures.LABEL_NAMES[y] for y in labels]})
    write_parquet(folder, "test", {"body": texts[:9], "text": [fixtures.LABEL_NAMES[y] for y in labels[:9]]})
    d = prepare_data(cfg_for(folder, text_column="body", label_column="text"), tokenizer=tiny_tokenizer)
    assert d.splits["test"]["text"] == texts[:9]
    assert [d.label_names[y] for y in d.splits["test"]["label"]] == [fixtures.LABEL_NAMES[y] for y in labels[:9]]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split_file(tmp_path, cfg_for, tiny_tokenizer, split, fmt):
    """A split file without rows (csv: header only) is named as empty, not 'an error occurred while generating'."""
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10, fmt=fmt)
    empty = folder / f"{split}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": [], "label": []}, schema=pa.schema([("text", pa.string()), ("label", pa.int64())])), empty)
    else:
        empty.write_text("text,label\n" if fmt == "csv" else "")
    with pytest.raises(DataError) as e:
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)
    assert f"The {split} split" in str(e.value) and "is empty" in str(e.value) and empty.name in str(e.value)


def test_whitespace_only_text_is_kept_as_special_tokens_only(tmp_path, cfg_for, tiny_tokenizer):
    """The documented rule: empty (and blank) texts are kept and become [CLS] [SEP]; the model reads them."""
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=60, n_test=20)
    texts, labels = fixtures.make_texts(20, seed=1_000_003)
    texts[0], texts[1] = "", "   \n\t "
    write_parquet(folder, "test", {"text": texts, "label": labels})
    d = prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)
    blank = [r for r in d.splits["test"] if not r["text"].strip()]
    assert len(blank) == 2
    for r in blank:
        assert r["input_ids"] == [tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id]


# ----------------------------------------------------------------------------- splitting


def test_validation_split_stratified(tiny_cfg, tiny_tokenizer):
    tiny_cfg.val_size = 0.25
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    counts = np.bincount(d.splits["validation"]["label"], minlength=3)
    assert counts.sum() == 60
    assert counts.tolist() == [20, 20, 20]  # 80 rows of each class in train, 25% each
    train_texts = set(d.splits["train"]["text"])
    assert not train_texts & set(d.splits["validation"]["text"])


def test_validation_split_fixed_by_seed(tiny_cfg, tiny_tokenizer):
    a = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    b = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert a.splits["validation"]["text"] == b.splits["validation"]["text"]
    assert a.splits["train"]["text"] == b.splits["train"]["text"]
    tiny_cfg.seed = tiny_cfg.seed + 1
    c = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert set(c.splits["validation"]["text"]) != set(a.splits["validation"]["text"])
    assert a.splits["test"]["text"] == c.splits["test"]["text"]  # test is never resampled without a cap


def test_max_train_samples(tiny_cfg, tiny_tokenizer):
    tiny_cfg.max_train_samples = 100
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert len(d.splits["train"]) + len(d.splits["validation"]) == 100
    assert len(d.splits["validation"]) == round(100 * tiny_cfg.val_size)
    assert len(d.splits["test"]) == 80


def test_a_quick_run_tokenizes_only_its_sample(tiny_cfg, tiny_tokenizer, monkeypatch):
    """The sample caps are applied before tokenizing: a quick run on a big corpus does not tokenize all of it."""
    encoded = []
    monkeypatch.setattr(hd, "encode_texts", lambda tok, texts, *a: encoded.append(len(texts)) or encode_texts(tok, texts, *a))
    tiny_cfg.max_train_samples, tiny_cfg.max_eval_samples = 100, 10
    tiny_cfg.max_length = 37  # a tokenization no other test caches
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert sum(encoded) == 100 + 10  # of 240 + 80
    assert len(d.splits["train"]) == 100 - round(100 * tiny_cfg.val_size) and len(d.splits["test"]) == 10


def test_max_eval_samples(tiny_cfg, tiny_tokenizer):
    tiny_cfg.max_eval_samples = 10
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    assert len(d.splits["validation"]) == 10
    assert len(d.splits["test"]) == 10
    assert len(d.splits["train"]) == 240 - round(240 * tiny_cfg.val_size)
    other = prepare_data(dataclasses.replace(tiny_cfg, seed=tiny_cfg.seed + 1), tokenizer=tiny_tokenizer)
    assert other.splits["test"]["text"] == d.splits["test"]["text"]  # runs over seeds score the same test texts
    assert other.splits["validation"]["text"] != d.splits["validation"]["text"]  # (their validation is their own)


def test_a_class_without_training_texts_is_warned_about(tmp_path, cfg_for, tiny_tokenizer):
    """A class named in label_names (or seen only in test) that no training text has: said, not silently kept."""
    folder = fixtures.make_tiny_dataset(tmp_path / "w", n_train=60, n_test=20)
    names = ["sports", "business", "science", "politics"]
    with pytest.warns(UserWarning, match=r"No training text has the class\(es\) \['politics'\]"):
        d = prepare_data(cfg_for(folder, label_names=names), tokenizer=tiny_tokenizer)
    assert d.label_names == names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_data(cfg_for(folder), tokenizer=tiny_tokenizer)  # every class has training texts: no warning


def test_too_small_for_validation(tiny_cfg, tiny_tokenizer):
    tiny_cfg.max_train_samples = 5
    with pytest.raises(DataError, match="val_size"):
        prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)


# ----------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_loads_fast(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert tok.is_fast
    assert tok.pad_token_id == 0
    assert 300 <= len(tok) <= 500
    for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert t in tok.get_vocab()


def test_real_words_are_not_unk(tiny_tokenizer):
    text = "The football team scored a goal while scientists studied the market economy."
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    # keywords of every class are whole tokens of the tiny vocabulary
    vocab = tiny_tokenizer.get_vocab()
    for words in fixtures.KEYWORDS.values():
        assert sum(w in vocab for w in words) >= len(words) // 2
    # lowercase: case does not change the ids
    assert tiny_tokenizer("FOOTBALL Market")["input_ids"] == tiny_tokenizer("football market")["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="is a file"):
        f = tmp_path / "vocab.txt"
        f.write_text("[PAD]\n")
        load_tokenizer(str(f))
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    (empty / "train.csv").write_text("text,label\n")  # e.g. a data folder given as the tokenizer
    with pytest.raises(DataError) as e:
        load_tokenizer(str(empty))
    assert str(e.value).startswith(f"Tokenizer folder '{empty}' holds no tokenizer: it needs tokenizer.json")
    assert "sentencepiece" not in str(e.value)  # not transformers' guesses at other tokenizer kinds


def test_tokenizer_fingerprint(tiny_tokenizer, tmp_path):
    fp = tokenizer_fingerprint(tiny_tokenizer)
    assert fp == tokenizer_fingerprint(tiny_tokenizer)
    other = load_tokenizer(str(fixtures.make_tiny_tokenizer(tmp_path / "t2", vocab_size=300)))
    assert tokenizer_fingerprint(other) != fp


def test_tokenizing_twice_hits_the_cache(tmp_path, cfg_for, tiny_tokenizer, monkeypatch):
    folder = fixtures.make_tiny_dataset(tmp_path / "fresh", n_train=60, n_test=20, seed=7)
    cfg = cfg_for(folder)
    calls = []
    real = hd.encode_texts

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(hd, "encode_texts", counting)
    first = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert calls, "the first call should tokenize"
    n_first = len(calls)
    second = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert len(calls) == n_first, "the second call re-tokenized instead of using the datasets cache"
    for split in ("train", "validation", "test"):
        assert first.splits[split]["input_ids"] == second.splits[split]["input_ids"]
    # a different max_length is a different cache entry
    cfg.max_length = 16
    third = prepare_data(cfg, tokenizer=tiny_tokenizer)
    assert len(calls) > n_first
    assert max(third.splits["train"]["length"]) <= 16


def _long_text(tok, n_words: int) -> tuple[str, list[str]]:
    """A text of ``n_words`` distinct in-vocabulary words (one token each)."""
    vocab = tok.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and len(w) > 3 and not w.startswith("##"))
    assert len(words) >= n_words
    return " ".join(words[:n_words]), words[:n_words]


@pytest.mark.parametrize("max_length", [16, 17, 64])
def test_head_tail_truncation_keeps_first_and_last_tokens(tmp_path, cfg_for, tiny_tokenizer, max_length):
    text, words = _long_text(tiny_tokenizer, 80)
    folder = tmp_path / "long"
    write_parquet(folder, "train", {"text": [text] * 10 + ["short text"] * 10, "label": [0] * 10 + [1] * 10})
    write_parquet(folder, "test", {"text": [text, "short text"], "label": [0, 1]})
    cfg = cfg_for(folder, label_names=None, truncation="head_tail", max_length=max_length, val_size=0.2)
    d = prepare_data(cfg, tokenizer=tiny_tokenizer)
    row = [r for r in d.splits["test"] if r["text"] == text][0]
    ids = row["input_ids"]
    all_ids = tiny_tokenizer.convert_tokens_to_ids(words)
    assert len(ids) == max_length == row["length"]
    assert ids[0] == tiny_tokenizer.cls_token_id and ids[-1] == tiny_tokenizer.sep_token_id
    body = ids[1:-1]
    assert body[0] == all_ids[0], "head_tail lost the first token"
    assert body[-1] == all_ids[-1], "head_tail lost the last token"
    budget = max_length - 2
    head = budget // 4
    assert body == all_ids[:head] + all_ids[len(all_ids) - (budget - head) :]
    short = [r for r in d.splits["test"] if r["text"] == "short text"][0]
    assert short["input_ids"] == tiny_tokenizer("short text")["input_ids"]  # short texts are not cut


def test_head_truncation_keeps_the_head(tmp_path, cfg_for, tiny_tokenizer):
    text, words = _long_text(tiny_tokenizer, 80)
    folder = tmp_path / "long"
    write_parquet(folder, "train", {"text": [text] * 10 + ["short text"] * 10, "label": [0] * 10 + [1] * 10})
    write_parquet(folder, "test", {"text": [text], "label": [0]})
    cfg = cfg_for(folder, label_names=None, truncation="head", max_length=20, val_size=0.2)
    d = prepare_data(cfg, tokenizer=tiny_tokenizer)
    ids = d.splits["test"][0]["input_ids"]
    assert len(ids) == 20
    assert ids[1:-1] == tiny_tokenizer.convert_tokens_to_ids(words)[:18]
    assert ids[-1] == tiny_tokenizer.sep_token_id


# ----------------------------------------------------------------------------- local data folder (the hub is tested in test_cli.py)


def test_hybridlib_data_dir_env(tmp_path, monkeypatch, tiny_data_dir):
    import shutil

    shutil.copytree(tiny_data_dir, tmp_path / "tiny")
    monkeypatch.setenv("HYBRIDLIB_DATA_DIR", str(tmp_path))
    cfg = load_config(overrides={"dataset": "tiny"})
    assert data_folder(cfg) == tmp_path / "tiny"
    raw = load_raw(cfg)
    assert len(raw["train"]) == 240 and len(raw["test"]) == 80


def test_env_folders_are_pinned_into_the_runs_params(tmp_path, monkeypatch, tiny_data_dir, tiny_tokenizer_dir):
    """Folders found through relative $HYBRIDLIB_DATA_DIR / $HYBRIDLIB_TOKENIZERS_DIR are written into the Config as
    absolute paths: the notebooks (which run in notebooks/) find them, and params.yaml says where the data was."""
    import shutil

    shutil.copytree(tiny_data_dir, tmp_path / "data" / "tiny")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizers" / "tok")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYBRIDLIB_DATA_DIR", "data")
    monkeypatch.setenv("HYBRIDLIB_TOKENIZERS_DIR", "tokenizers")
    cfg = load_config(overrides={"dataset": "tiny", "tokenizer": "tok", "run_dir": str(tmp_path / "run")})
    assert cfg.data_dir is None and cfg.tokenizer == "tok"
    start_run(cfg)
    saved = load_config(tmp_path / "run" / "params.yaml")
    assert saved.data_dir == str(tmp_path / "data" / "tiny") and saved.tokenizer == str(tmp_path / "tokenizers" / "tok")
    monkeypatch.chdir(tmp_path / "run")  # elsewhere, without the variables: the run's params still find both
    monkeypatch.delenv("HYBRIDLIB_DATA_DIR")
    monkeypatch.delenv("HYBRIDLIB_TOKENIZERS_DIR")
    assert data_folder(saved) == tmp_path / "data" / "tiny" and tokenizer_folder(saved.tokenizer) is not None


# ----------------------------------------------------------------------------- batching


def _all_indices(batches) -> list[int]:
    return sorted(int(i) for b in batches for i in b)


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n,batch_size", [(100, 16), (64, 16), (7, 3), (1, 4)])
def test_sampler_covers_every_index_once(bucket, n, batch_size):
    lengths = np.random.default_rng(0).integers(1, 50, size=n)
    for shuffle in (True, False):
        s = LengthBucketSampler(lengths, batch_size, shuffle=shuffle, bucket=bucket, seed=3)
        for epoch in range(3):
            s.set_epoch(epoch)
            batches = list(s)
            assert _all_indices(batches) == list(range(n))
            assert len(batches) == len(s) == -(-n // batch_size)
            assert all(1 <= len(b) <= batch_size for b in batches)


def test_sampler_order_changes_with_epoch_and_is_reproducible():
    lengths = np.random.default_rng(1).integers(1, 50, size=200)
    s = LengthBucketSampler(lengths, 8, shuffle=True, bucket=True, seed=5)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert e1 != e2
    again = LengthBucketSampler(lengths, 8, shuffle=True, bucket=True, seed=5)
    again.set_epoch(1)
    assert list(again) == e1
    other_seed = LengthBucketSampler(lengths, 8, shuffle=True, bucket=True, seed=6)
    other_seed.set_epoch(1)
    assert list(other_seed) != e1


def test_sampler_without_shuffle_is_sequential():
    s = LengthBucketSampler(np.arange(10), 4, shuffle=False, bucket=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sampler_buckets_reduce_padding():
    lengths = np.random.default_rng(2).integers(1, 200, size=400)

    def padding(bucket):
        s = LengthBucketSampler(lengths, 16, shuffle=True, bucket=bucket, seed=0)
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in s)

    assert padding(True) < padding(False) / 2


@pytest.mark.parametrize("n_batches", [10, 9])
def test_sampler_two_ranks(n_batches):
    n, bs = n_batches * 8, 8
    lengths = np.random.default_rng(4).integers(1, 50, size=n)
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            s = LengthBucketSampler(lengths, bs, shuffle=True, bucket=True, seed=9, dist=Dist(rank, 2))
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len(shards[0]) == len(shards[1])  # same number of steps on every rank
        assert set(_all_indices(shards[0] + shards[1])) == set(range(n))
        if n_batches % 2 == 0:  # no padding batches needed: the shards are disjoint
            a, b = set(_all_indices(shards[0])), set(_all_indices(shards[1]))
            assert not a & b
            assert len(a) + len(b) == n


def test_sampler_two_ranks_eval_disjoint():
    lengths = np.arange(50)
    shards = [list(LengthBucketSampler(lengths, 8, shuffle=False, bucket=False, dist=Dist(r, 2))) for r in (0, 1)]
    a, b = _all_indices(shards[0]), _all_indices(shards[1])
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(50))


def test_collator_pads_to_the_batch_longest():
    c = Collator(pad_id=0)
    rows = [
        {"input_ids": np.array([2, 10, 11, 3]), "label": np.int64(1)},
        {"input_ids": np.array([2, 12, 3]), "label": np.int64(0)},
    ]
    out = c(rows)
    assert out["input_ids"].shape == (2, 4)
    assert out["input_ids"].tolist() == [[2, 10, 11, 3], [2, 12, 3, 0]]
    assert out["attention_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert out["labels"].tolist() == [1, 0]
    assert out["input_ids"].dtype == torch.long
    no_labels = c([{"input_ids": [5, 6]}])
    assert "labels" not in no_labels and no_labels["input_ids"].shape == (1, 2)


def test_collator_pad_to():
    out = Collator(pad_id=0, pad_to=6)([{"input_ids": [2, 3], "label": 0}])
    assert out["input_ids"].tolist() == [[2, 3, 0, 0, 0, 0]]


def test_loader_pads_per_batch(tiny_cfg, tiny_tokenizer):
    tiny_cfg.max_length = 48  # some texts are cut to 48, many are shorter
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    ds = d.splits["train"]
    lengths = np.asarray(ds["length"])
    assert lengths.max() == tiny_cfg.max_length and lengths.min() < tiny_cfg.max_length // 2
    widths, seen = [], []
    loader = make_loader(ds, tiny_cfg, d.pad_id, epoch=1)
    sampler_batches = list(loader.batch_sampler)
    for batch, idx in zip(loader, sampler_batches, strict=True):
        assert batch["input_ids"].shape[1] == lengths[idx].max()
        assert batch["attention_mask"].sum(1).tolist() == lengths[idx].tolist()
        widths.append(batch["input_ids"].shape[1])
        seen.extend(idx)
    assert sorted(seen) == list(range(len(ds)))
    assert min(widths) < tiny_cfg.max_length  # not padded to max_length


def test_session_uses_a_private_hf_cache(hf_cache_dir, tiny_cfg, tiny_tokenizer):
    import datasets.config

    assert str(datasets.config.HF_DATASETS_CACHE).startswith(str(hf_cache_dir))
    d = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    for f in d.splits["train"].cache_files:
        assert f["filename"].startswith(str(hf_cache_dir))


def test_loaders_leave_the_global_rng_alone(tiny_cfg, tiny_tokenizer):
    """Dropout draws from torch's global RNG: making and iterating loaders (training, validation) must not
    advance it, or a run's training would depend on how many loaders it happens to make."""
    data = prepare_data(tiny_cfg, tokenizer=tiny_tokenizer)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for epoch in (1, None):  # a training loader, an evaluation one
        for _ in make_loader(data.splits["train"], tiny_cfg, data.pad_id, epoch=epoch):
            pass
    assert torch.equal(torch.rand(3), expected)
