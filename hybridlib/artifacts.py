"""The run folder: what is in it, and reading and writing each piece.

``outputs/<run_name>/`` holds ``params.yaml`` (the run's resolved params), the executed notebooks,
``tokenizer/``, ``model.pt`` (best epoch), ``last.pt`` (every epoch, for resume), ``training_log.csv``,
``train_info.json``, ``metrics.json``, ``classification_report.txt``, the figures and ``tfidf_logreg.npz``;
``run.lock`` while a process writes it (:func:`run_lock`: one writer per run).

Every file is written atomically (temp file, fsync, rename); a full disk raises a RunError that names the folder,
the space needed and the space free, and leaves the previous files intact (:func:`atomic_write`).

Checkpoints are plain dicts of tensors and plain types, written atomically and loaded with
``torch.load(..., weights_only=True)``: a file that would need to run code to unpickle is refused.
``model.pt``: ``format_version``, ``model`` (state dict), ``config`` (the data and model groups of the
Config: what rebuilds the model and its tokenization), ``label_names``, ``tokenizer``, ``epoch``,
``best_metric``. ``last.pt`` adds ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``history``,
``best_epoch`` and ``bad_epochs``.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hybridlib.config import Config, load_config, project_root, save_config
from hybridlib.errors import CheckpointError, RunError
from hybridlib.model import HybridClassifier, build_model

PARAMS_FILE = "params.yaml"
MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"
LOG_FILE = "training_log.csv"
TRAIN_INFO_FILE = "train_info.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "classification_report.txt"
CURVES_FILE = "loss_acc_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
LENGTHS_FILE = "token_lengths.png"
TFIDF_FILE = "tfidf_logreg.npz"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = "run.lock"
LOCK_ENV = "HYBRIDLIB_RUN_LOCK"  # the token of the run lock held by this process or its parent

FORMAT_VERSION = 2  # 1: "config" held every Config field; 2: the data and model groups only
LOG_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
_UMASK = os.umask(0)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- writing files safely


def atomic_write(path: str | Path, write: Callable[[str], None], size: int | None = None) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: a crash never leaves a half-written file.

    A full disk raises a RunError naming the folder, the space needed and free (:func:`disk_full_message`), and
    ``path`` keeps its previous content. ``size`` (bytes, if known) is checked against the free space first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space([path], size or 0)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)  # before the message measures the free space
        raise RunError(disk_full_message([path], size or written, at_least=not size)) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def check_free_space(paths: list[Path], need: int) -> None:
    """Refuse (RunError) to write ``paths`` (of one folder) when they need more than the space free there."""
    if need > free_bytes(paths[0].parent):
        raise RunError(disk_full_message(paths, need))


def is_disk_full(e: BaseException) -> bool:
    """True for the errors of a full disk or quota: ENOSPC/EDQUOT, and torch.save's short write, which it reports
    as "[enforce fail at inline_container.cc] unexpected pos" or "PytorchStreamWriter failed writing"."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("inline_container", "PytorchStreamWriter"))


@contextmanager
def disk_full_errors(path: str | Path, need: int = 0) -> Iterator[None]:
    """Within the block, a full disk while writing ``path`` raises the RunError of :func:`disk_full_message`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise RunError(disk_full_message([Path(path)], need, at_least=True)) from None


def free_bytes(folder: str | Path) -> int:
    """Bytes free for this user on the file system holding ``folder``."""
    return shutil.disk_usage(folder).free


def disk_full_message(paths: list[Path], need: int, at_least: bool = False) -> str:
    """What failed for lack of space (folder, space needed and free), that nothing was lost, and what to do."""
    folder = paths[0].parent
    run = next((d for d in (folder, folder.parent) if (d / PARAMS_FILE).is_file()), None)
    then = (f"Free some space, then continue the run with: hybridlib run --resume {run}" if run
            else "Free some space, then try again.")
    needs = f"{'at least' if at_least else 'about'} {format_bytes(need)}" if need else "more space"
    names = ", ".join(p.name for p in paths)
    return (f"Not enough disk space to write {names} in {folder}: {'they need' if len(paths) > 1 else 'it needs'} "
            f"{needs}, and {format_bytes(free_bytes(folder))} is free. The files already there are intact. {then}")


def format_bytes(n: float) -> str:
    """``n`` bytes for people: "512 bytes", "1.9 MiB"."""
    units, i = ("bytes", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{int(n)} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), len(data))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files of atomic writes that a killed process left in ``folder``; return them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- checkpoints


def model_checkpoint(model: torch.nn.Module, cfg: Config, data, epoch: int, best_metric: float) -> dict[str, Any]:
    """The plain dict saved as model.pt (``data``: a hybridlib.data.Data)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.group("data", "model"),
        "label_names": list(data.label_names),
        "tokenizer": {"name": cfg.tokenizer, "fingerprint": data.tokenizer_id, "vocab_size": data.vocab_size,
                      "pad_id": data.pad_id},
        "epoch": epoch,
        "best_metric": best_metric,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), checkpoint_size(ckpt))


def checkpoint_size(obj: Any) -> int:
    """About the bytes ``torch.save`` writes for ``obj``: each tensor storage once, a zip record per storage,
    and a margin for the pickled rest (history, RNG states)."""
    storages: dict[tuple[str, int], int] = {}
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            storages[(str(x.device), s.data_ptr())] = s.nbytes()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return sum(storages.values()) + 256 * len(storages) + 256 * 1024


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); clear errors for missing, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist. Pass the model.pt of a finished run (outputs/RUN/model.pt).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load '{path}': it contains objects other than tensors and plain types, which could run "
            f"code when loaded (weights_only=True rejected it: {str(e).splitlines()[0]}). Only load checkpoints "
            f"written by hybridlib from sources you trust."
        ) from None
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"'{path}' is not a hybridlib checkpoint (expected a dict with 'model' and 'config'). "
            f"Use the model.pt written by `hybridlib run`."
        )
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> Config:
    """The Config a checkpoint was trained with (fields it does not store: their defaults). Works for
    format 1 (every field; retired options at their "off" value are dropped, switched on are refused)."""
    return load_config(base=ckpt["config"])


def check_compatible(ckpt: dict[str, Any], vocab_size: int | None = None, num_classes: int | None = None) -> None:
    """Refuse a checkpoint whose vocabulary size or label count differs from what is in use."""
    want_vocab = ckpt["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab_size != want_vocab:
        raise CheckpointError(
            f"The checkpoint was trained with a vocabulary of {want_vocab} tokens, but the tokenizer in use has "
            f"{vocab_size}. Use the tokenizer it was trained with ({ckpt['tokenizer']['name']})."
        )
    have = len(ckpt["label_names"])
    if num_classes is not None and num_classes != have:
        raise CheckpointError(
            f"The checkpoint predicts {have} classes ({ckpt['label_names']}), but the data/params in use have "
            f"{num_classes}. Evaluate it on the dataset it was trained for, or set label_names to match."
        )


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> HybridClassifier:
    """The checkpoint's model with its weights, in eval mode on ``device``."""
    model = build_model(checkpoint_config(ckpt), ckpt["tokenizer"]["vocab_size"], len(ckpt["label_names"]),
                        ckpt["tokenizer"]["pad_id"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", vocab_size: int | None = None,
               num_classes: int | None = None) -> tuple[HybridClassifier, dict[str, Any]]:
    """(model in eval mode on ``device``, checkpoint dict); refuses mismatched vocab/classes."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_compatible(ckpt, vocab_size, num_classes)
    return model_from_checkpoint(ckpt, device), ckpt


# ----------------------------------------------------------------------------- history and metrics


def write_history(history: list[dict[str, float]], run_dir: str | Path) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    w.writeheader()
    w.writerows(history)
    write_text(Path(run_dir) / LOG_FILE, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """training_log.csv as a list of rows ([] when the run has not finished an epoch)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {METRICS_FILE}: it is not a finished, evaluated run.")
    return read_json(path)


# ----------------------------------------------------------------------------- run folders


def outputs_root() -> Path:
    """Where runs go: $HYBRIDLIB_OUTPUTS, else <project>/outputs."""
    return Path(os.environ.get("HYBRIDLIB_OUTPUTS") or project_root() / "outputs")


def default_run_name(cfg: Config, root: Path | None = None) -> str:
    """<dataset>-<timestamp>, with -2, -3, ... when ``root`` already holds a run of that name (same second)."""
    name = f"{cfg.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = root is not None and (root / name).exists()
    suffix = 2
    while taken and (root / f"{name}-{suffix}").exists():
        suffix += 1
    return f"{name}-{suffix}" if taken else name


def create_run_dir(path: Path) -> Path:
    """Create a new, empty run folder; refuse one that exists (runs are never overwritten)."""
    if path.exists():
        raise RunError(
            f"Run folder {path} already exists; hybridlib never overwrites a run. Pick another --run-name, "
            f"or continue that run with `hybridlib run --resume {path}`."
        )
    path.mkdir(parents=True)
    return path


def start_run(cfg: Config) -> Path:
    """The run folder for training: ``cfg.run_dir``, or a new outputs/<dataset>-<timestamp>. Writes params.yaml
    (if absent) and sets ``cfg.run_dir``."""
    run = Path(cfg.run_dir) if cfg.run_dir else create_run_dir(outputs_root() / default_run_name(cfg, outputs_root()))
    run.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run.resolve())
    if not (run / PARAMS_FILE).exists():
        save_config(cfg, run / PARAMS_FILE)
    return run


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Never train over a finished or interrupted run unless asked to resume it."""
    if resume:
        if not (run_dir / LAST_FILE).is_file():
            raise RunError(
                f"Cannot resume: {run_dir / LAST_FILE} does not exist (the run never finished an epoch). "
                f"Start a new run instead."
            )
        return
    for name in (MODEL_FILE, LAST_FILE):
        if (run_dir / name).exists():
            raise RunError(
                f"{run_dir} already holds a trained model ({name}); hybridlib never overwrites a run. "
                f"Choose a new run_dir (or --run-name), or continue it with resume=True / `hybridlib run --resume {run_dir}`."
            )


# ----------------------------------------------------------------------------- one writer per run


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` while writing the run (the pipeline, ``train``, ``evaluate_run``).

    Another process that would write the run is refused with a RunError naming the holder (pid, host, since
    when, command). The lock is an OS lock (``flock``) on that file, so a holder that died (kill -9, power loss)
    holds nothing and the next writer takes the file over; a record left by a process on another host is
    refused, since its liveness cannot be checked from here. Re-entrant for this process and its children (the
    pipeline's notebook kernels, DDP workers), which find the holder's token in ``$HYBRIDLIB_RUN_LOCK``.
    """
    path = Path(run_dir) / LOCK_FILE
    token = os.environ.get(LOCK_ENV)
    if token and (read_lock(path) or {}).get("token") == token:
        yield  # held by this process or the one that started it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, token = _acquire_lock(path)
    outer = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = token
    try:
        yield
    finally:
        if outer is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = outer
        _release_lock(path, fd)


def read_lock(path: str | Path) -> dict[str, Any] | None:
    """The holder record in a run.lock (pid, host, started, command, token); None if absent or unreadable."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _acquire_lock(path: Path) -> tuple[int, str]:
    """flock ``path`` and write this process's record into it; (open fd, token). Refuses a live holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = _flock(fd)
            previous = read_lock(path)
            if locked is False:
                raise RunError(lock_held_message(path, previous or _wait_for_record(path)))
            if not _same_file(fd, path):  # its holder removed it while we opened it: lock the new one
                os.close(fd)
                continue
            if previous and previous.get("host") != socket.gethostname():
                raise RunError(lock_elsewhere_message(path, previous))
            if previous and locked is None and _alive(previous.get("pid")):  # no flock here: trust the pid
                raise RunError(lock_held_message(path, previous))
            token = uuid.uuid4().hex
            _write_lock_record(fd, path, token)
            if previous:
                print(f"[hybridlib] {path} was left by pid {previous.get('pid')} ({_since(previous)}), which is no "
                      f"longer running; taking the run over.", file=sys.stderr, flush=True)
            return fd, token
        except BaseException:
            os.close(fd)
            raise


def _flock(fd: int) -> bool | None:
    """Try to lock ``fd``: True, False (another process holds it) or None (the file system has no locks)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_record(path: Path, seconds: float = 1.0) -> dict[str, Any] | None:
    """The record of a holder that has just taken the lock (it writes the record right after)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = read_lock(path)
        if record:
            return record
        time.sleep(0.05)
    return None


def _write_lock_record(fd: int, path: Path, token: str) -> None:
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = "a Jupyter kernel" if "ipykernel" in argv0 else " ".join([argv0, *sys.argv[1:]])[:300]
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command,
              "token": token}
    data = json.dumps(record).encode("utf-8")
    with disk_full_errors(path, len(data)):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)


def _release_lock(path: Path, fd: int) -> None:
    try:
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


def _since(record: dict[str, Any]) -> str:
    started = record.get("started")
    if not isinstance(started, (int, float)):
        return f"on {record.get('host', '?')}"
    seconds = max(0, int(time.time() - started))
    minutes = seconds // 60
    ago = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min" if minutes else f"{seconds} s"
    return (f"on {record.get('host', '?')}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}, "
            f"{ago} ago")


def lock_held_message(path: Path, record: dict[str, Any] | None) -> str:
    run = path.parent
    if not record:
        who, stop = f"another process (it holds {path})", "stop it"
    else:
        who = f"another process: pid {record.get('pid')} {_since(record)} ({record.get('command', '?')})"
        stop = f"stop it (kill {record.get('pid')})"
    return (f"Run {run} is being written by {who}. Two writers would interleave its checkpoints and training log. "
            f"Wait for it to finish, or {stop} and then continue the run with: hybridlib run --resume {run}")


def lock_elsewhere_message(path: Path, record: dict[str, Any]) -> str:
    run = path.parent
    return (f"Run {run} is locked by pid {record.get('pid')} {_since(record)} ({record.get('command', '?')}); "
            f"from {socket.gethostname()} hybridlib cannot tell whether that process is still running. If it is, "
            f"wait for it to finish. If you are sure it is not (it was killed, or its machine restarted), delete "
            f"{path} and continue the run with: hybridlib run --resume {run}")


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """Finished runs (with model.pt) under ``root``, newest first, with dataset and test accuracy."""
    root = root or outputs_root()
    runs = []
    for d in root.iterdir() if root.is_dir() else []:
        if (d / MODEL_FILE).is_file():
            info = {"run_dir": d, "name": d.name, "mtime": (d / MODEL_FILE).stat().st_mtime,
                    "dataset": None, "test_accuracy": None}
            if (d / METRICS_FILE).is_file():
                m = read_json(d / METRICS_FILE)
                info.update(dataset=m.get("dataset"), test_accuracy=m.get("test_accuracy"))
            runs.append(info)
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)


def latest_run(root: Path | None = None) -> Path:
    runs = list_runs(root)
    if not runs:
        raise RunError(
            f"No finished run under {root or outputs_root()}. Train one first (02_training or `hybridlib run`)."
        )
    return runs[0]["run_dir"]
