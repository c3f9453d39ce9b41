"""hybridlib.config: defaults, groups, params files, validation messages, retired options, CLI value coercion."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from hybridlib import config as C
from hybridlib.config import Config, experiment_fields, fields_of, load_config, parse_cli_value, read_params_file
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


# line of a params file -> (key, what the message must also say); the message always names the key and the file
BAD_LINES = {
    'lr: "fast"': ("lr", "'fast'", "expected a number"),
    "epochs: -1": ("epochs", "-1", ">= 1"),
    "epochs: 0": ("epochs", ">= 1"),
    "epochs: 2.5": ("epochs", "an integer"),
    "epochs: true": ("epochs", "an integer"),
    "max_length: 0": ("max_length", ">= 2"),
    "branches: [cnn, gru]": ("branches", "'gru'", "cnn, lstm"),
    "branches: []": ("branches", "empty"),
    "branches: [cnn, cnn]": ("branches", "more than once"),
    "lstm_pooling: median": ("lstm_pooling", "'max', 'mean'"),
    "truncation: tail": ("truncation", "'head'"),
    "precision: fp8": ("precision", "'fp32'"),
    "device: gpu": ("device", "'gpu'", "cuda"),
    "dropout: 1.0": ("dropout", "< 1.0"),
    "val_size: 0": ("val_size", "> 0.0"),
    "lr: .nan": ("lr", "expected a number"),
    "lr: 0": ("lr", "> 0.0"),
    "lstm_layers: 3": ("lstm_layers", "<= 2"),
    "cnn_kernel_sizes: [3, 0]": ("cnn_kernel_sizes", ">= 1"),
    "bucket_by_length: maybe": ("bucket_by_length", "true or false"),
    "label_names: {a: 1}": ("label_names", "a list of"),
    "label_names: [a, b, a]": ("label_names", "more than once"),
    "seed: -1": ("seed", ">= 0"),  # used to crash in numpy's SeedSequence, after the run folder was made
}


@pytest.mark.parametrize("line", list(BAD_LINES))
def test_bad_values_rejected_naming_the_key_and_the_file(tmp_path, line):
    key, *needles = BAD_LINES[line]
    path = write_yaml(tmp_path, line + "\n", name="mine.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"'{key}' in {path}" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    with pytest.raises(ConfigError, match=f"'{key}'"):  # the same value from -p / a notebook
        load_config(overrides=yaml.safe_load(line))


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


def test_a_key_given_twice_is_refused_by_line(tmp_path):
    """PyYAML keeps the last of two equal keys; a params file that says epochs twice is refused instead."""
    path = write_yaml(tmp_path, "epochs: 1\nlr: 0.1\nepochs: 3\n", name="twice.yaml")
    with pytest.raises(ConfigError, match=r"twice.yaml' is not valid YAML at line 3, column 1: 'epochs' is given twice"):
        load_config(path)
    assert read_params_file(write_yaml(tmp_path, "epochs: 1\nbranches: [cnn]\n"))["branches"] == ["cnn"]


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
    from hybridlib.locations import resolve_paths

    out = resolve_paths({"pretrained_embeddings": "ppmi", "data_dir": "data"}, tmp_path)
    assert out["pretrained_embeddings"] == "ppmi"
    assert out["data_dir"] == str((tmp_path / "data").resolve())
    assert resolve_paths({"pretrained_embeddings": "vecs.npy"}, tmp_path)["pretrained_embeddings"] == str(tmp_path / "vecs.npy")


# ----------------------------------------------------------------------------- groups


def test_every_field_has_one_group_and_help():
    for name, f in C.FIELDS.items():
        assert f.metadata["group"] in C.GROUPS, name
        assert f.metadata["help"].strip(), name
    assert sorted(sum((fields_of(g) for g in C.GROUPS), [])) == sorted(C.FIELDS)  # a partition
    assert fields_of() == []
    assert fields_of("data", "model") == [k for k in C.FIELDS if k in fields_of("data") + fields_of("model")]


def test_groups_hold_what_they_promise():
    assert {"dataset", "data_dir", "label_names", "tokenizer", "max_length", "truncation"} <= set(fields_of("data"))
    assert {"branches", "embed_dim", "lstm_pooling", "cnn_filters", "branch_aux_loss"} <= set(fields_of("model"))
    assert {"lr", "epochs", "seed", "pretrained_embeddings", "adversarial_eps", "swa_start"} <= set(fields_of("training"))
    assert set(fields_of("machine")) == {"device", "precision", "eval_batch_size", "num_workers", "num_threads",
                                         "num_processes"}
    assert set(fields_of("run")) == {"run_dir", "resume", "baseline", "baseline_max_train_samples"}


def test_config_group_returns_those_fields_with_their_values():
    cfg = Config(lr=0.5, embed_dim=7, num_threads=3)
    model = cfg.group("model")
    assert list(model) == fields_of("model") and model["embed_dim"] == 7
    both = cfg.group("data", "model")
    assert list(both) == fields_of("data", "model") and "lr" not in both and "num_threads" not in both
    assert cfg.group("training")["lr"] == 0.5 and cfg.group("machine")["num_threads"] == 3
    assert {k: v for g in C.GROUPS for k, v in cfg.group(g).items()} == cfg.to_dict()


def test_experiment_fields_leave_out_seed_locations_machine_and_run():
    exp = experiment_fields()
    assert exp == [k for k in fields_of("data", "model", "training") if k in exp]  # declaration order
    for key in ("seed", "data_dir", "tokenizer", *fields_of("machine"), *fields_of("run")):
        assert key not in exp, key
    assert {"dataset", "max_length", "label_names", "branches", "lstm_pooling", "lr", "epochs",
            "pretrained_embeddings"} <= set(exp)


# ----------------------------------------------------------------------------- retired options


@pytest.mark.parametrize("key,off", list(C.RETIRED.items()))
def test_a_retired_key_at_its_off_value_is_dropped(tmp_path, key, off):
    """Params files, params.yaml and checkpoints of hybridlib 0.1.0 wrote every retired key at its "off" value."""
    assert key not in C.FIELDS
    path = write_yaml(tmp_path, yaml.safe_dump({key: off, "epochs": 3}))
    assert load_config(path) == Config(epochs=3)
    assert C.validate({key: off}) == {}
    assert C.load_config(base={**Config().to_dict(), key: off}) == Config()


@pytest.mark.parametrize("key,value,version", [
    ("branch_norm", True, "hybridlib 0.1.0"), ("ema_decay", 0.9, "hybridlib 0.1.0"),
    ("unseen_embeddings", "zero", "hybridlib 0.1.0"), ("lstm_pooling", "both", "hybridlib 0.1.0"),
    ("label_smoothing", 0.1, "hybridlib 0.3.2"), ("lr_schedule", "cosine", "hybridlib 0.3.2"),
    ("lr_schedule", "constant", "hybridlib 0.3.2"), ("freeze_embeddings", True, "hybridlib 0.3.2"),
    ("pretrained_embeddings", "minilm", "hybridlib 0.3.2")])
def test_a_retired_option_switched_on_names_the_version_to_use(tmp_path, key, value, version):
    path = write_yaml(tmp_path, yaml.safe_dump({key: value}), name="old.yaml")
    for call in (lambda: load_config(path), lambda: load_config(overrides={key: value}),
                 lambda: C.load_config(base={key: value})):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert f"'{key}'" in msg and repr(value) in msg and version in msg, msg
        assert "docs/accuracy.md" in msg
    assert "old.yaml" in str(pytest.raises(ConfigError, load_config, path).value)

