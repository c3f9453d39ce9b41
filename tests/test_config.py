"""hybridlib.config: defaults, params files, validation messages, CLI value coercion."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from hybridlib.config import Config, load_config, parse_cli_value, read_params_file
from hybridlib.errors import ConfigError


def write_yaml(tmp_path, text: str, name: str = "params.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.branches == ["cnn", "lstm"]
    assert cfg.cnn_kernel_sizes == [3, 4, 5]
    # list defaults are fresh copies, not shared between instances
    other = load_config()
    other.branches.append("x")
    assert Config().branches == ["cnn", "lstm"]


def test_defaults_are_valid():
    """Every default value passes the same validation as a params file."""
    defaults = dataclasses.asdict(Config())
    assert load_config(overrides=defaults) == Config()


def test_tiny_params_file_loads(tiny_params, tiny_data_dir, tiny_tokenizer_dir):
    cfg = load_config(tiny_params)
    assert cfg.dataset == "tiny"
    assert cfg.data_dir == str(tiny_data_dir)
    assert cfg.tokenizer == str(tiny_tokenizer_dir)
    assert cfg.label_names == ["sports", "business", "science"]
    assert cfg.embed_dim == 16 and cfg.max_length == 64 and cfg.epochs == 2
    # keys not in the file keep their defaults
    assert cfg.weight_decay == Config().weight_decay


def test_params_file_and_overrides(tmp_path):
    path = write_yaml(tmp_path, "epochs: 3\nbatch_size: 8\n")
    cfg = load_config(path, overrides={"epochs": 7})
    assert cfg.epochs == 7  # overrides win
    assert cfg.batch_size == 8


def test_empty_params_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "# nothing set\n")) == Config()


@pytest.mark.parametrize(
    "key,suggestion", [("epoch", "epochs"), ("lstm_hiden", "lstm_hidden"), ("batchsize", "batch_size")]
)
def test_unknown_key_suggests_close_match(tmp_path, key, suggestion):
    path = write_yaml(tmp_path, f"{key}: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert f"Did you mean '{suggestion}'" in msg
    assert str(path) in msg


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, "learning_rate: 0.1\n"))
    assert "'learning_rate'" in str(e.value)
    assert "Did you mean" not in str(e.value)


def test_unknown_key_in_overrides():
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config(overrides={"epoch": 1})


@pytest.mark.parametrize(
    "line,key",
    [
        ('lr: "fast"', "lr"),
        ("epochs: -1", "epochs"),
        ("epochs: 0", "epochs"),
        ("epochs: 2.5", "epochs"),
        ("epochs: true", "epochs"),
        ("max_length: 0", "max_length"),
        ("branches: [cnn, gru]", "branches"),
        ("branches: []", "branches"),
        ("lstm_pooling: median", "lstm_pooling"),
        ("truncation: tail", "truncation"),
        ("precision: fp8", "precision"),
        ("dropout: 1.0", "dropout"),
        ("val_size: 0", "val_size"),
        ("lr: .nan", "lr"),
        ("lr: 0", "lr"),
        ("lstm_layers: 3", "lstm_layers"),
        ("cnn_kernel_sizes: [3, 0]", "cnn_kernel_sizes"),
        ("bucket_by_length: maybe", "bucket_by_length"),
        ("label_names: {a: 1}", "label_names"),
    ],
)
def test_bad_values_rejected_naming_the_key(tmp_path, line, key):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path, line + "\n"))
    assert f"'{key}'" in str(e.value)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    path = write_yaml(tmp_path, "lr: 1e-3\nweight_decay: 5E-4\n")
    assert isinstance(yaml.safe_load(path.read_text())["lr"], str)  # PyYAML 1.1 quirk this guards against
    cfg = load_config(path)
    assert cfg.lr == pytest.approx(0.001) and isinstance(cfg.lr, float)
    assert cfg.weight_decay == pytest.approx(5e-4)


def test_int_given_for_float_field(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "lr: 1\ngrad_clip: 0\n"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.grad_clip == 0.0


def test_optional_fields_accept_null(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "max_train_samples: null\nlabel_names: ~\ndata_dir: null\n"))
    assert cfg.max_train_samples is None and cfg.label_names is None and cfg.data_dir is None


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "epochs: 3\nbranches: [cnn, lstm\nlr: 0.1\n", name="broken.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "broken.yaml" in msg
    assert "YAML" in msg
    assert "line" in msg


def test_params_file_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- epochs\n- 3\n", name="list.yaml")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


def test_missing_params_file(tmp_path):
    path = tmp_path / "nope" / "missing_params.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "missing_params.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="missing_params.yaml"):
        read_params_file(path)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(overrides={"epochs": "many"})


@pytest.mark.parametrize(
    "text,parsed",
    [
        ("3", 3),
        ("0.5", 0.5),
        ("[3,4]", [3, 4]),
        ("[3, 4, 5]", [3, 4, 5]),
        ("cnn", "cnn"),
        ("true", True),
        ("null", None),
        ("ag_news", "ag_news"),
        ("[cnn, lstm]", ["cnn", "lstm"]),
    ],
)
def test_parse_cli_value(text, parsed):
    assert parse_cli_value(text) == parsed


def test_parse_cli_value_never_raises_on_odd_text():
    assert parse_cli_value("[unclosed") == "[unclosed"
    assert parse_cli_value("a: b: c") == "a: b: c"


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("epochs", "3", 3),
        ("cnn_kernel_sizes", "[3,4]", [3, 4]),
        ("cnn_kernel_sizes", "3,4", [3, 4]),
        ("cnn_kernel_sizes", "2", [2]),
        ("branches", "cnn", ["cnn"]),
        ("branches", "[cnn, lstm]", ["cnn", "lstm"]),
        ("lr", "1e-3", 0.001),
        ("lr", "0.01", 0.01),
        ("bucket_by_length", "false", False),
        ("max_train_samples", "null", None),
        ("max_train_samples", "100", 100),
        ("label_names", "[a, b]", ["a", "b"]),
        ("tokenizer", "bert-base-uncased", "bert-base-uncased"),
        ("dataset", "123", "123"),
    ],
)
def test_cli_values_coerced_by_load_config(key, text, expected):
    cfg = load_config(overrides={key: parse_cli_value(text)})
    got = getattr(cfg, key)
    assert got == (pytest.approx(expected) if isinstance(expected, float) else expected)
    if expected is not None:
        assert type(got) is type(expected)


@pytest.mark.parametrize(
    "key,text", [("epochs", "three"), ("branches", "gru"), ("lr", "fast"), ("lstm_pooling", "[max]")]
)
def test_bad_cli_values_rejected(key, text):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides={key: parse_cli_value(text)})


def test_named_pretrained_embeddings_are_not_taken_for_paths(tmp_path):
    from hybridlib.runs import resolve_paths

    out = resolve_paths({"pretrained_embeddings": "minilm", "data_dir": "data"}, tmp_path)
    assert out["pretrained_embeddings"] == "minilm"
    assert out["data_dir"] == str((tmp_path / "data").resolve())
    assert resolve_paths({"pretrained_embeddings": "vecs.npy"}, tmp_path)["pretrained_embeddings"] == str(tmp_path / "vecs.npy")
