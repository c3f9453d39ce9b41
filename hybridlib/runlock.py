"""One writer per run: an OS lock (``flock``, so a holder that died holds nothing) on ``run.lock`` in the run
folder, which also records the holder (pid, host, since when, command) for the message that refuses a second."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hybridlib.errors import RunError
from hybridlib.files import LOCK_FILE, disk_full_errors, refused_as_run_error

LOCK_ENV = "HYBRIDLIB_RUN_LOCK"  # the token of the run lock held by this process or its parent


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` while writing the run (the pipeline, ``train``, ``evaluate_run``). A record left
    on another host is refused (its liveness cannot be checked from here). Re-entrant for this process and its
    children (notebook kernels, DDP workers), which find the holder's token in ``$HYBRIDLIB_RUN_LOCK``."""
    path = Path(run_dir) / LOCK_FILE
    token = os.environ.get(LOCK_ENV)
    if token and (read_lock(path) or {}).get("token") == token:
        yield  # held by this process or the one that started it
        return
    with refused_as_run_error(path.parent, f"write {LOCK_FILE} in"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, token = _acquire_lock(path)
    try:
        with child_env({LOCK_ENV: token}):
            yield
    finally:
        _release_lock(path, fd)


@contextmanager
def child_env(values: dict[str, str]) -> Iterator[None]:
    """Environment variables for the processes started within the block (they inherit this process's)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
