"""All parameters of a run, typed and documented in one dataclass.

A params file (YAML) sets any subset of the fields of :class:`Config`; the rest keep
their defaults. ``load_config`` validates every key and value and raises
:class:`ConfigError` with a message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hybridlib.errors import ConfigError


def _f(default: Any, help: str, **constraints: Any) -> Any:
    """A dataclass field with help text and optional constraints (min, max, choices)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


BRANCHES = ("cnn", "lstm")


@dataclass
class Config:
    """Everything a run needs. Field help texts are the reference documentation."""

    # --- data ---
    dataset: str = _f("ag_news", "Hugging Face hub dataset name (e.g. ag_news, imdb), or a name for local data.")
    data_dir: Optional[str] = _f(
        None,
        "Folder with local splits (<split>.parquet/.csv/.jsonl). Overrides the hub. "
        "If unset, $HYBRIDLIB_DATA_DIR/<dataset> is used when it exists.",
    )
    train_split: str = _f("train", "Name of the training split.")
    test_split: str = _f("test", "Name of the test split (final numbers are reported on it).")
    text_column: str = _f("text", "Column holding the text.")
    label_column: str = _f("label", "Column holding the label (ints or strings).")
    label_names: Optional[list[str]] = _f(
        None,
        "Class names in label-id order. Default: the dataset's ClassLabel names, else the sorted distinct labels.",
        unique=True,
    )
    val_size: float = _f(0.1, "Fraction of train held out (stratified) for validation.", min=0.0, max=0.9, exclusive_min=True)
    max_train_samples: Optional[int] = _f(None, "Use at most this many training texts (quick runs).", min=1)
    max_eval_samples: Optional[int] = _f(None, "Use at most this many validation and test texts (quick runs).", min=1)

    # --- tokenizer ---
    tokenizer: str = _f("bert-base-uncased", "Hub id or local folder of a fast tokenizer (only its ids are used).")
    max_length: int = _f(256, "Truncate texts to this many tokens (special tokens included).", min=2)
    truncation: Literal["head", "head_tail"] = _f(
        "head", "How to cut long texts: keep the head, or the head and the tail (first 1/4, last 3/4 of the budget)."
    )

    # --- model ---
    branches: list[str] = _f(["cnn", "lstm"], "Which branches to use: any of cnn, lstm.", choices=BRANCHES, unique=True)
    embed_dim: int = _f(128, "Size of the learned token embedding.", min=1)
    embed_dropout: float = _f(0.1, "Word dropout: probability of zeroing a whole token embedding during training.", min=0.0, max=1.0, exclusive_max=True)
    lstm_hidden: int = _f(128, "Hidden size of each LSTM direction.", min=1)
    lstm_layers: int = _f(1, "Number of stacked BiLSTM layers (1 or 2).", min=1, max=2)
    lstm_pooling: Literal["max", "mean", "both"] = _f("max", "How the BiLSTM outputs are pooled over time.")
    cnn_kernel_sizes: list[int] = _f([3, 4, 5], "Kernel widths of the CNN branch.", min=1)
    cnn_filters: int = _f(100, "Filters per kernel width.", min=1)
    mlp_hidden: int = _f(128, "Hidden size of the MLP classifier (0: a single linear layer).", min=0)
    branch_norm: bool = _f(
        False, "LayerNorm each branch's pooled features before concatenating them: the BiLSTM's lie in (-1, 1), "
        "the CNN's ReLU maxima are unbounded, so without it one branch can drown out the other.")
    branch_aux_loss: float = _f(
        0.0, "Weight of per-branch auxiliary losses: each branch also gets its own linear classifier on its pooled "
        "features, trained beside the joint head (loss = CE(joint) + w * mean CE(branch)), so the branch that "
        "learns faster cannot leave the other undertrained. 0 = off; ignored with one branch. Prediction uses "
        "the joint head only.", min=0.0)
    dropout: float = _f(0.5, "Dropout before (and inside) the MLP classifier.", min=0.0, max=1.0, exclusive_max=True)
    pretrained_embeddings: Optional[str] = _f(
        None,
        "Initialise the embedding from pretrained vectors of the same vocabulary: 'minilm' (all-MiniLM-L6-v2's "
        "input embeddings, extra [pretrained]), 'ppmi' (co-occurrence vectors of the run's own training split: "
        "no outside data), or a .pt/.npy/.safetensors matrix (vocab x dim; PCA to embed_dim).",
    )

    freeze_embeddings: bool = _f(False, "Keep the (pretrained) embedding fixed during training.")
    unseen_embeddings: Literal["random", "zero"] = _f(
        "random",
        "Embedding rows of tokens that never occur in the training split, so never get a gradient: 'random' "
        "keeps their initialisation (noise wherever such a token appears at prediction), 'zero' makes them "
        "add nothing, as word dropout does in training.",
    )

    # --- training ---
    epochs: int = _f(5, "Maximum number of epochs.", min=1)
    batch_size: int = _f(64, "Training batch size (global, across processes).", min=1)
    eval_batch_size: int = _f(256, "Batch size for validation, test and prediction.", min=1)
    lr: float = _f(2e-3, "Peak learning rate of AdamW.", min=0.0, exclusive_min=True)
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0)
    lr_schedule: Literal["linear", "cosine", "constant"] = _f("linear", "Learning-rate decay after warm-up.")
    warmup_ratio: float = _f(0.05, "Fraction of all steps used for linear warm-up.", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "Clip the gradient norm to this (0: no clipping).", min=0.0)
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss.", min=0.0, max=1.0, exclusive_max=True)
    adversarial_eps: float = _f(
        0.0, "Adversarial training (Miyato, Dai & Goodfellow 2017): each step also trains on the word embeddings "
        "moved by this L2 norm per text along the loss gradient, the direction that hurts most. Regularises "
        "like data augmentation; a second forward and backward pass per step (measured 1.4x the training time on AG "
        "News 5k, 1.8x on IMDB; 0: off).", min=0.0)
    ema_decay: float = _f(
        0.0, "Keep an exponential moving average of the weights with this decay per step (e.g. 0.99) and validate "
        "and save the average instead of the raw weights (0: off).", min=0.0, max=1.0, exclusive_max=True)
    patience: int = _f(2, "Stop after this many epochs without a better validation accuracy (0: never).", min=0)
    seed: int = _f(42, "Seed for the split, shuffling and initialisation.", min=0)

    # --- speed ---
    device: str = _f("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.", pattern=r"auto|cpu|cuda(:\d+)?|mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "auto: bf16 autocast on CPUs that support it, AMP (bf16/fp16) on CUDA; fp32 to turn it off."
    )
    bucket_by_length: bool = _f(True, "Batch texts of similar length together (less padding, faster).")
    num_workers: int = _f(0, "DataLoader worker processes.", min=0)
    num_threads: Optional[int] = _f(
        None, "CPU threads for torch in training and evaluation (default: one per core). Use 1 on a shared "
        "machine: busy cores slow torch's default threads ~10x.", min=1)
    num_processes: int = _f(1, "Training processes (DDP via torchrun; gloo on CPU, NCCL on CUDA).", min=1)

    # --- run ---
    run_dir: Optional[str] = _f(None, "Where the run's artifacts go. Default: a new outputs/<dataset>-<timestamp>.")
    resume: bool = _f(False, "Continue an interrupted run from run_dir/last.pt.")
    baseline: bool = _f(True, "Also fit the TF-IDF + logistic regression baseline on the same split.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# pretrained_embeddings values that name a source, not a file (see hybridlib.embeddings)
NAMED_EMBEDDINGS = ("minilm", "ppmi")
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


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


def validate(values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Check keys and coerce values; return a clean dict of the given keys."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
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


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a dict, with clear errors for missing files and bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Params file '{path}' does not exist. Pass an existing YAML file, e.g. params/ag_news.yaml or params/imdb.yaml."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from a params file (optional) and overrides (optional)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(validate(read_params_file(path), source=str(path)))
    if overrides:
        values.update(validate(overrides, source="overrides"))
    return Config(**values)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from a checkpoint or metrics dict (keys validated the same way)."""
    return Config(**validate(values, source="checkpoint"))


def describe() -> str:
    """A table of all parameters with type, default and help (for `hybridlib params`)."""
    lines = []
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"{name:22s} {_type_name(_HINTS[name]):34s} default {default!r}\n    {f.metadata['help']}")
    return "\n".join(lines)
