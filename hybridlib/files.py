"""The files of a run folder (docs/architecture.md, "The run folder"): their names, and writing them atomically
(temp file, fsync, rename), with one clear RunError for a full disk. The names live here because a disk-full
message tells a run folder (one with ``params.yaml``) from any other.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hybridlib.errors import RunError

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
NBLR_FILE = "nblr.npz"
TFIDF_FILE = "tfidf_logreg.npz"  # the baseline of runs made before NB-LR
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = "run.lock"

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's words for a short write: "[enforce fail at inline_container.cc] unexpected pos", or
# "PytorchStreamWriter failed writing"
_TORCH_SHORT_WRITE = ("inline_container", "PytorchStreamWriter")


def atomic_write(path: str | Path, write: Callable[[str], None], size: int | None = None) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: a crash never leaves a half-written file, a full disk
    raises :func:`disk_full_message`'s RunError and leaves ``path`` as it was. ``size``: checked against the free space first."""
    path = Path(path)
    with refused_as_run_error(path.parent, f"write {path.name} in"):
        path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space([path], size or 0)
    tmp = None
    try:
        with refused_as_run_error(path.parent, f"write {path.name} in"):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
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


# what the file system says when it refuses a path (not a full disk: that has its own message)
_REFUSALS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EEXIST: "a file of that name is in the way", errno.EISDIR: "it is a folder"}
_CANNOT_MAKE = "a folder on the path does not exist and cannot be made there"  # ENOENT from mkdir(parents=True)


@contextmanager
def refused_as_run_error(path: str | Path, doing: str, creating: bool = False) -> Iterator[None]:
    """Turn the file system's refusal (read-only, no permission, a file where a folder should be; ``creating``: a
    folder that cannot be made there) while ``doing`` ``path`` into a RunError that names the path, the reason and
    the fix."""
    try:
        yield
    except OSError as e:
        reason = _REFUSALS.get(e.errno) or (_CANNOT_MAKE if creating and e.errno == errno.ENOENT else None)
        if reason is None:
            raise
        raise RunError(f"Cannot {doing} {path}: {reason} ({e.strerror}: {e.filename or path}). "
                       f"Use a folder you can write to (e.g. --outputs DIR or $HYBRIDLIB_OUTPUTS for runs), or fix "
                       f"its permissions; nothing was left behind.") from None


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), len(data))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))


# how to get a damaged run file back (RUN: the run folder)
REPAIRS = {
    METRICS_FILE: "re-run its evaluation: `hybridlib run --resume RUN` (nothing is retrained)",
    TRAIN_INFO_FILE: "re-run its training's last step: `hybridlib run --resume RUN` (nothing is retrained)",
    LOG_FILE: "`hybridlib run --resume RUN` writes it again from last.pt (nothing is retrained)",
}


def damaged(path: Path, problem: str) -> RunError:
    """The error for a run file that cannot be read: which file, what is wrong with it, how to get it back."""
    fix = REPAIRS.get(path.name, "restore it from a copy, or start a new run").replace("RUN", str(path.parent))
    return RunError(f"{path} is damaged ({problem}); {fix}.")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a file cut short or edited into something else raises :func:`damaged`."""
    path = Path(path)
    with refused_as_run_error(path, "read"):
        text = path.read_bytes()
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise damaged(path, f"a JSON {type(obj).__name__}, not an object")
    return obj


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files of atomic writes that a killed process left in ``folder``; return them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def is_disk_full(e: BaseException) -> bool:
    """True for the errors of a full disk or quota: ENOSPC/EDQUOT, and torch.save's short write."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_SHORT_WRITE)


def reports_disk_full(kind: str, message: str) -> bool:
    """:func:`is_disk_full` for an error known only by its class name and message (one a notebook raised)."""
    if kind == "OSError":
        return any(os.strerror(code) in message for code in _DISK_FULL_ERRNOS)
    return kind == "RuntimeError" and any(s in message for s in _TORCH_SHORT_WRITE)


@contextmanager
def disk_full_errors(path: str | Path, need: int = 0) -> Iterator[None]:
    """Within the block, a full disk while writing ``path`` raises the RunError of :func:`disk_full_message`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise RunError(disk_full_message([Path(path)], need, at_least=True)) from None


def check_free_space(paths: list[Path], need: int) -> None:
    """Refuse (RunError) to write ``paths`` (of one folder) when they need more than the space free there."""
    if need > free_bytes(paths[0].parent):
        raise RunError(disk_full_message(paths, need))


def free_bytes(folder: str | Path) -> int:
    """Bytes free for this user on the file system holding ``folder``."""
    return shutil.disk_usage(folder).free


def disk_full_message(paths: list[Path], need: int, at_least: bool = False) -> str:
    """What failed for lack of space (folder, space needed and free), that nothing was lost, and what to do."""
    folder = paths[0].parent
    run = next((d for d in (folder, folder.parent) if (d / PARAMS_FILE).is_file()), None)
    needs = f"{'at least' if at_least else 'about'} {format_bytes(need)}" if need else "more space"
    names = ", ".join(p.name for p in paths)
    return (f"Not enough disk space to write {names} in {folder}: {'they need' if len(paths) > 1 else 'it needs'} "
            f"{needs}, and {format_bytes(free_bytes(folder))} is free. {disk_full_advice(run)}")


def disk_full_advice(run: Path | None) -> str:
    """The end of every disk-full message: nothing was lost, and how to go on (resume ``run``, if in one)."""
    then = (f"Free some space, then continue the run with: hybridlib run --resume {run}" if run
            else "Free some space, then try again.")
    return f"The files already there are intact. {then}"


def format_bytes(n: float) -> str:
    """``n`` bytes for people: "512 bytes", "1.9 MiB"."""
    units, i = ("bytes", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{int(n)} bytes" if i == 0 else f"{n:.1f} {units[i]}"
