"""All parameters of a run: one flat, typed dataclass, each field with its group (data, model, training, machine,
run: docs/architecture.md, "Modules"), help text and constraints; ``load_config`` is the one way to build it."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hybridlib.errors import ConfigError
from hybridlib.locations import project_root, resolve_paths

GROUPS = ("data", "model", "training", "machine", "run")
BRANCHES = ("cnn", "lstm")
# Options removed after they failed validation (docs/accuracy.md, "Rejected options"), with the value
# that means "off": a params file, params.yaml or checkpoint with that value still loads.
RETIRED = {"branch_norm": False, "ema_decay": 0.0, "unseen_embeddings": "random", "freeze_embeddings": False,
           "lr_schedule": "linear", "label_smoothing": 0.0}
RETIRED_VALUES = {"lstm_pooling": ("both",), "pretrained_embeddings": ("minilm",)}
# the last version that has each retired option (or value)
V0_1_0 = "hybridlib 0.1.0 (git commit e670417)"
V0_3_2 = "hybridlib 0.3.2 (git commit 610faf9)"
LAST_VERSION_WITH = {"branch_norm": V0_1_0, "ema_decay": V0_1_0, "unseen_embeddings": V0_1_0, "lstm_pooling": V0_1_0,
                     "freeze_embeddings": V0_3_2, "lr_schedule": V0_3_2, "label_smoothing": V0_3_2,
                     "pretrained_embeddings": V0_3_2}


def _f(default: Any, group: str, help: str, **meta: Any) -> Any:
    """A dataclass field with its group, help text and constraints (min, max, choices, ...); ``location``: differs
    between machines, ``repeat``: between repeats of one experiment (neither is part of an experiment)."""
    assert group in GROUPS, group
    meta = {"group": group, "help": help, **meta}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Everything a run needs. Field help texts are the reference documentation (`hybridlib params`)."""

    # --- data: texts, labels, splits, tokens ---
    dataset: str = _f("ag_news", "data", "Hugging Face hub dataset name (e.g. ag_news, imdb), or a name for local data.")
    data_dir: Optional[str] = _f(
        None, "data",
        "Folder with local splits (<split>.parquet/.csv/.jsonl); overrides the hub. "
        "Unset: $HYBRIDLIB_DATA_DIR/<dataset> when it exists.", location=True)
    train_split: str = _f("train", "data", "Name of the training split.")
    test_split: str = _f("test", "data", "Name of the test split (final numbers are reported on it).")
    text_column: str = _f("text", "data", "Column holding the text.")
    label_column: str = _f("label", "data", "Column holding the label (ints, integral floats or strings).")
    encoding: str = _f("utf-8", "data", "Text encoding of local csv/jsonl files, e.g. latin-1 or cp1252.", location=True)
    label_names: Optional[list[str]] = _f(
        None, "data",
        "Class names in label-id order. Default: the dataset's ClassLabel names, else the distinct labels in natural order.",
        unique=True)
    val_size: float = _f(0.1, "data", "Fraction of train held out (stratified) for validation.",
                         min=0.0, max=0.9, exclusive_min=True)
    max_train_samples: Optional[int] = _f(None, "data", "Use at most this many training texts (quick runs).", min=1)
    max_eval_samples: Optional[int] = _f(
        None, "data", "Use at most this many validation and test texts (quick runs; the same test texts for every seed).",
        min=1)
    tokenizer: str = _f("bert-base-uncased", "data", "Hub id or local folder of a fast tokenizer (only its ids are used).",
                        location=True)
    max_length: int = _f(256, "data", "Truncate texts to this many tokens (special tokens included).", min=2)
    truncation: Literal["head", "head_tail"] = _f(
        "head", "data", "How to cut long texts: keep the head, or the head and the tail (first 1/4, last 3/4 of the budget).")

    # --- model: the architecture ---
    branches: list[str] = _f(["cnn", "lstm"], "model", "Which branches to use: any of cnn, lstm.", choices=BRANCHES, unique=True)
    embed_dim: int = _f(128, "model", "Size of the learned token embedding.", min=1)
    embed_dropout: float = _f(0.1, "model", "Word dropout: probability of zeroing a whole token embedding in training.",
                              min=0.0, max=1.0, exclusive_max=True)
    lstm_hidden: int = _f(128, "model", "Hidden size of each LSTM direction.", min=1)
    lstm_layers: int = _f(1, "model", "Number of stacked BiLSTM layers (1 or 2).", min=1, max=2)
    lstm_pooling: Literal["max", "mean"] = _f("max", "model", "How the BiLSTM outputs are pooled over time.")
    cnn_kernel_sizes: list[int] = _f([3, 4, 5], "model", "Kernel widths of the CNN branch.", min=1)
    cnn_filters: int = _f(100, "model", "Filters per kernel width.", min=1)
    mlp_hidden: int = _f(128, "model", "Hidden size of the MLP classifier (0: a single linear layer).", min=0)
    dropout: float = _f(0.5, "model", "Dropout before (and inside) the MLP classifier.", min=0.0, max=1.0, exclusive_max=True)
    branch_aux_loss: float = _f(
        0.0, "model",
        "Weight of per-branch auxiliary losses: each branch also gets its own linear classifier, trained beside the "
        "joint head (loss = CE(joint) + w * mean CE(branch)). 0: off; ignored with one branch. Prediction uses the "
        "joint head only.", min=0.0)

    # --- training: optimisation, initialisation, regularisation ---
    pretrained_embeddings: Optional[str] = _f(
        None, "training",
        "Initialise the embedding: 'ppmi' (co-occurrence vectors of the training split: no outside data), or a "
        ".pt/.npy/.safetensors matrix (vocab x dim).")
    epochs: int = _f(5, "training", "Maximum number of epochs.", min=1)
    batch_size: int = _f(64, "training", "Training batch size (global, across processes).", min=1)
    bucket_by_length: bool = _f(True, "training", "Batch texts of similar length together (less padding).")
    lr: float = _f(2e-3, "training", "Peak learning rate of AdamW.", min=0.0, exclusive_min=True)
    weight_decay: float = _f(0.01, "training", "AdamW weight decay.", min=0.0)
    warmup_ratio: float = _f(0.05, "training", "Fraction of all steps used for linear warm-up (then linear decay to 0).",
                             min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "training", "Clip the gradient norm to this (0: no clipping).", min=0.0)
    adversarial_eps: float = _f(
        0.0, "training",
        "Adversarial training (Miyato et al. 2017): each step also trains on the word embeddings moved by this L2 "
        "norm per text along the loss gradient. A second forward and backward pass per step (0: off).", min=0.0)
    swa_start: int = _f(
        0, "training",
        "Weight averaging (SWA, Izmailov et al. 2018): from this epoch on, validate and keep the equal average of the "
        "weights at the end of this and every later epoch instead of the last weights (0: off).", min=0)
    patience: int = _f(2, "training", "Stop after this many epochs without a better validation accuracy (0: never).", min=0)
    seed: int = _f(42, "training", "Seed for the split, shuffling and initialisation.", min=0, repeat=True)

    # --- machine: where and how fast ---
    device: str = _f("auto", "machine", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
                     pattern=r"auto|cpu|cuda(:\d+)?|mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "machine", "auto: bf16 autocast on CPUs with native bf16, AMP (bf16/fp16) on CUDA; fp32 turns it off.")
    eval_batch_size: int = _f(256, "machine", "Batch size for validation, test and prediction.", min=1)
    num_workers: int = _f(0, "machine", "DataLoader worker processes.", min=0)
    num_threads: Optional[int] = _f(
        None, "machine",
        "CPU threads for torch. Unset: chosen from the free cores and re-checked while running; a number pins it "
        "(bit-for-bit reproducible CPU runs).", min=1)
    num_processes: int = _f(1, "machine", "Training processes (DDP; gloo on CPU, NCCL on CUDA).", min=1)

    # --- run: artifacts and pipeline ---
    run_dir: Optional[str] = _f(None, "run", "Where the run's artifacts go. Default: a new outputs/<dataset>-<timestamp>.",
                                location=True)
    resume: bool = _f(False, "run", "Continue an interrupted run from run_dir/last.pt.")
    baseline: bool = _f(True, "run", "Also fit the classic baseline (NB-LR: naive-Bayes weighted 1-3-grams + logistic "
                        "regression) on the same split, and the ensemble of the model with it.")
    baseline_max_train_samples: Optional[int] = _f(75_000, "run", "Fit the baseline on a seeded sample of at most "
                                                   "this many training texts (bounded memory); unset: all.", min=1)

    def __post_init__(self) -> None:
        if self.swa_start > self.epochs:
            raise ConfigError(
                f"swa_start is {self.swa_start} but epochs is {self.epochs}: the average would never start. "
                f"Set swa_start to at most epochs (or 0: off).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The params.yaml of a run: every field, in declaration order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def group(self, *groups: str) -> dict[str, Any]:
        """The fields of the given groups, as a dict."""
        return {k: v for k, v in self.to_dict().items() if FIELDS[k].metadata["group"] in groups}

    def differs_from(self, other: Config, *groups: str) -> list[str]:
        """The fields of ``groups`` whose values differ from ``other``'s, where the data lies (``location``) aside."""
        mine, theirs = self.group(*groups), other.group(*groups)
        return [k for k in mine if mine[k] != theirs[k] and not FIELDS[k].metadata.get("location")]


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def fields_of(*groups: str) -> list[str]:
    """Names of the fields in ``groups``, in declaration order."""
    return [k for k, f in FIELDS.items() if f.metadata["group"] in groups]


def experiment_fields() -> list[str]:
    """The fields that define an experiment: data, model and training, except the seed and machine-local paths."""
    return [k for k in fields_of("data", "model", "training")
            if not FIELDS[k].metadata.get("repeat") and not FIELDS[k].metadata.get("location")]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to type ``tp`` or raise ValueError (message filled in by the caller)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(key, value, inner)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError
        return value
    if origin is list:
        inner = typing.get_args(tp)[0]
        if isinstance(value, str):  # "3,4,5" or "cnn" from a command line
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [_coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        # PyYAML reads "1e-3" (no dot) as a string: accept it as the number the user meant.
        out = float(value.strip()) if isinstance(value, str) else float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise TypeError(f"unsupported field type {tp}")


def _check_constraints(key: str, value: Any, meta: dict, source: str = "") -> None:
    where = f" in {source}" if source else ""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(
                f"Parameter '{key}'{where}: {v!r} is not allowed; expected any of {', '.join(meta['choices'])}. "
                f"Fix it in the params file or with -p {key} ..."
            )
        if "pattern" in meta and not re.fullmatch(meta["pattern"], str(v)):
            raise ConfigError(f"Parameter '{key}'{where}: {v!r} is not allowed. {FIELDS[key].metadata['help']}")
        lo, hi = meta.get("min"), meta.get("max")
        bad_lo = lo is not None and (v <= lo if meta.get("exclusive_min") else v < lo)
        bad_hi = hi is not None and (v >= hi if meta.get("exclusive_max") else v > hi)
        if bad_lo or bad_hi:
            lo_s = "" if lo is None else (f"> {lo}" if meta.get("exclusive_min") else f">= {lo}")
            hi_s = "" if hi is None else (f"< {hi}" if meta.get("exclusive_max") else f"<= {hi}")
            rng = " and ".join(s for s in (lo_s, hi_s) if s)
            raise ConfigError(
                f"Parameter '{key}'{where}: got {v!r}, expected a value {rng}. {FIELDS[key].metadata['help']}"
            )
    if isinstance(value, list) and not value:
        raise ConfigError(f"Parameter '{key}'{where}: the list is empty. {FIELDS[key].metadata['help']}")
    if isinstance(value, list) and meta.get("unique") and len(set(value)) != len(value):
        dup = sorted({v for v in value if value.count(v) > 1}, key=str)
        raise ConfigError(f"Parameter '{key}'{where}: {dup} appear more than once; list each only once.")


def unknown_key_message(key: str, source: str = "") -> str:
    where = f" in {source}" if source else ""
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Unknown parameter '{key}'{where}.{hint} "
        f"Valid parameters are the fields of hybridlib.Config (see `hybridlib params` or README)."
    )


def _retired(key: str, value: Any, source: str) -> bool:
    """True if ``key`` is a removed option left at its "off" value (to be dropped); raise if it is switched on."""
    where = f" in {source}" if source else ""
    if key in RETIRED:
        if value == RETIRED[key]:
            return True
        raise ConfigError(
            f"Parameter '{key}'{where} is {value!r}, but '{key}' was removed from hybridlib after it failed "
            f"validation (docs/accuracy.md, 'Rejected options'). Delete the line to train without it, or use "
            f"{LAST_VERSION_WITH[key]} to load or reproduce a run that used it."
        )
    if value in RETIRED_VALUES.get(key, ()):
        allowed = _type_name(_HINTS[key]) if typing.get_origin(_HINTS[key]) is Literal else "another value"
        raise ConfigError(
            f"Parameter '{key}'{where}: {value!r} was removed from hybridlib after it failed validation "
            f"(docs/accuracy.md, 'Rejected options'). Use {allowed} ({FIELDS[key].metadata['help']}), "
            f"or {LAST_VERSION_WITH[key]} to load or reproduce a run that used it."
        )
    return False


def validate(values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Check keys and coerce values; return a clean dict of the given keys (retired keys at "off" dropped)."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if _retired(key, value, source):
            continue
        if key not in FIELDS:
            raise ConfigError(unknown_key_message(key, source))
        tp = _HINTS[key]
        try:
            v = _coerce(key, value, tp)
        except (ValueError, TypeError):
            raise ConfigError(
                f"Parameter '{key}'{' in ' + source if source else ''}: got {value!r} "
                f"({type(value).__name__}), expected {_type_name(tp)}. {FIELDS[key].metadata['help']}"
            ) from None
        _check_constraints(key, v, FIELDS[key].metadata, source)
        clean[key] = v
    return clean


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a dict, with clear errors for missing files and bad YAML."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"Params file '{path}' {what}. Pass an existing YAML file, e.g. params/ag_news.yaml or params/imdb.yaml."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            f"Params file '{path}' is not valid YAML{where}: {problem}. "
            f"Each line should read 'key: value' (see params/ag_news.yaml)."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Params file '{path}' must be a mapping of 'key: value' lines, got a {type(data).__name__}."
        )
    return data


def parse_cli_value(text: str) -> Any:
    """Parse a ``-p KEY VALUE`` value the way papermill does (YAML scalars, lists in [..])."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def fit_to_epochs(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A run shortened by an override of ``epochs`` keeps the params file's weight averaging: it starts at
    min(swa_start, epochs), with a one-line notice. A ``swa_start`` set with the override itself is not moved."""
    epochs = values.get("epochs", FIELDS["epochs"].default)
    swa_start = values.get("swa_start", 0)
    if "epochs" in overrides and "swa_start" not in overrides and swa_start > epochs:
        print(f"[hybridlib] epochs {epochs} < swa_start {swa_start}: weight averaging starts at epoch {epochs}.",
              file=sys.stderr)
        return {**values, "swa_start": epochs}
    return values


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                overrides_dir: str | Path | None = None, base: dict[str, Any] | None = None) -> Config:
    """The validated Config of ``base`` (e.g. a checkpoint's values), a params file (paths from the project root)
    and ``overrides`` (paths from ``overrides_dir``, default the cwd), each on top of the one before."""
    values = validate(base or {}, source="checkpoint")
    if path is not None:
        values.update(resolve_paths(validate(read_params_file(path), source=str(path)), project_root()))
    given = validate(overrides or {}, source="overrides")
    values.update(resolve_paths(given, Path(overrides_dir or Path.cwd())))
    return Config(**fit_to_epochs(values, given))


def describe() -> str:
    """All parameters by group: name, type, default and help (for `hybridlib params`)."""
    lines = []
    width = max(map(len, FIELDS)), max(len(_type_name(tp)) for tp in _HINTS.values())
    for group in GROUPS:
        lines.append(f"[{group}]")
        for name in fields_of(group):
            f = FIELDS[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {name:{width[0]}s} {_type_name(_HINTS[name]):{width[1]}s} default {default!r}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
