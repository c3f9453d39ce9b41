"""Run safety, tried as a user would (issue #20): one writer per run, Ctrl-C, a full disk, labels as pandas
writes them, and text files that are not UTF-8.

The full disk is simulated (no small file system is mounted: CI may not allow it); docs/troubleshooting.md
describes the same on a real 6 MB tmpfs.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fixtures
import pandas as pd
import psutil
import pytest
import torch
from papermill.exceptions import PapermillExecutionError
from tiny_run import train_until_epoch

from hybridlib import files, pipeline, runs, training
from hybridlib.checkpoints import load_checkpoint
from hybridlib.config import load_config
from hybridlib.data import prepare_data
from hybridlib.errors import ConfigError, DataError, RunError
from hybridlib.evaluation import evaluate_run
from hybridlib.files import LOCK_FILE, atomic_write
from hybridlib.runlock import LOCK_ENV, run_lock

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3
# the CLI Ctrl-C test: enough epochs that a loaded machine's slow second-writer check still ends mid-training
CLI_EPOCHS = 8


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    """training_log.csv without the wall-clock column."""
    with open(Path(run_dir) / "training_log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob(".*.tmp"))


@pytest.fixture(scope="module")
def data(tiny_params):
    return prepare_data(load_config(tiny_params))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_params, data) -> Path:
    """An uninterrupted EPOCHS-epoch run, trained and evaluated (what an interrupted one must end up as)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(tiny_params, {"epochs": EPOCHS, "run_dir": str(run_dir)})
    runs.start_run(cfg)
    training.train(cfg, run_dir, data, progress=False)
    evaluate_run(cfg, run_dir, data, progress=False)
    return run_dir


def new_run(tmp_path: Path, tiny_params: Path, name: str = "run", **overrides) -> tuple:
    """(Config, run folder) of a new run with params.yaml written, as the pipeline creates one."""
    cfg = load_config(tiny_params, {"epochs": EPOCHS, "run_dir": str(tmp_path / name), **overrides})
    return cfg, runs.start_run(cfg)


def resume_cfg(run_dir: Path):
    return load_config(run_dir / "params.yaml", {"resume": True})


def assert_same_as(run_dir: Path, reference: Path) -> None:
    """The same log and weights as the uninterrupted reference run (CPU: bit for bit)."""
    assert log_rows(run_dir) == log_rows(reference)
    for name in ("model.pt", "last.pt"):
        mine, ref = load_checkpoint(run_dir / name), load_checkpoint(reference / name)
        assert mine["epoch"] == ref["epoch"]
        for k in ref["model"]:
            assert torch.equal(mine["model"][k], ref["model"][k]), (name, k)
    assert not temp_files(run_dir)


# ----------------------------------------------------------------------------- 1: one writer per run

HOLDER = textwrap.dedent("""
    import sys, time
    from hybridlib.runlock import run_lock

    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder():
    """Start a process that holds a run's lock (as a training would): ``holder(run_dir) -> Popen``."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def assert_names_the_holder(message: str, proc: subprocess.Popen, run_dir: Path) -> None:
    assert f"Run {run_dir} is being written by another process: pid {proc.pid} on {socket.gethostname()}" in message
    assert "since " in message and " ago" in message and "-c" in message  # when, and its command line
    assert f"kill {proc.pid}" in message and f"hybridlib run --resume {run_dir}" in message


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny_params, data, holder):
    """While one process writes a run, training, evaluating or resuming it elsewhere is refused, and nothing
    in the run changes."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    proc = holder(run_dir)
    before = {p.name: sha256(p) for p in run_dir.iterdir() if p.is_file()}

    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, data, progress=False)
    assert_names_the_holder(str(e.value), proc, run_dir)
    with pytest.raises(RunError) as e:
        pipeline.resume(run_dir, progress=False)
    assert_names_the_holder(str(e.value), proc, run_dir)
    with pytest.raises(RunError) as e:
        evaluate_run(cfg, run_dir, data, progress=False)
    assert_names_the_holder(str(e.value), proc, run_dir)

    assert {p.name: sha256(p) for p in run_dir.iterdir() if p.is_file()} == before  # run.lock included
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid
    assert LOCK_ENV not in os.environ


def test_a_lock_left_by_a_killed_process_is_taken_over_by_resume(tmp_path, tiny_params, data, reference, holder,
                                                                capfd):
    """kill -9 of the writer leaves run.lock behind; resuming takes it over (the dead pid holds no OS lock),
    finishes the run exactly like the uninterrupted one, and removes run.lock."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    train_until_epoch(cfg, run_dir, data, 1)
    proc = holder(run_dir)
    proc.kill()
    proc.wait(timeout=30)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind

    training.train(resume_cfg(run_dir), run_dir, data, progress=False)
    err = capfd.readouterr().err
    assert f"was left by pid {proc.pid}" in err and "no longer running; taking the run over" in err
    assert not (run_dir / LOCK_FILE).exists()
    assert_same_as(run_dir, reference)


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path, tiny_params, data):
    """A process on another machine (shared file system) cannot be checked from here: refuse, say what to delete."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    record = {"pid": 4242, "host": "gpu-node-7", "started": time.time() - 3600, "command": "hybridlib run x.yaml"}
    (run_dir / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, data, progress=False)
    msg = str(e.value)
    assert "pid 4242 on gpu-node-7" in msg and "1 h 0 min ago" in msg and "hybridlib run x.yaml" in msg
    assert f"delete {run_dir / LOCK_FILE}" in msg and f"hybridlib run --resume {run_dir}" in msg
    assert not (run_dir / "model.pt").exists()


def test_the_holder_and_its_children_may_write_and_the_lock_goes_on_errors(tmp_path, tiny_params, data):
    """Re-entrant for the holder (the pipeline's kernels and DDP workers inherit $HYBRIDLIB_RUN_LOCK); released,
    and the environment restored, when the block raises."""
    cfg, run_dir = new_run(tmp_path, tiny_params, epochs=1)
    with run_lock(run_dir):
        token = os.environ[LOCK_ENV]
        training.train(cfg, run_dir, data, progress=False)  # nested: allowed
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from hybridlib.runlock import run_lock\n"
             "with run_lock(sys.argv[1]): print('child wrote')", str(run_dir)],
            capture_output=True, text=True, timeout=120)
        assert child.stdout.strip() == "child wrote", child.stderr
        assert json.loads((run_dir / LOCK_FILE).read_text())["token"] == token  # still ours
    assert not (run_dir / LOCK_FILE).exists() and LOCK_ENV not in os.environ

    with pytest.raises(KeyboardInterrupt), run_lock(run_dir):
        raise KeyboardInterrupt
    assert not (run_dir / LOCK_FILE).exists() and LOCK_ENV not in os.environ


# ----------------------------------------------------------------------------- 1 + 2: the command line, Ctrl-C

STUB = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "id": "p", "metadata": {"tags": ["parameters"]}, "outputs": [],
         "source": ["params_file = None\n", "run_dir = None\n"]},
        {"cell_type": "code", "execution_count": None, "id": "c", "metadata": {}, "outputs": [],
         "source": ["print('stub', run_dir)\n"]},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def notebooks_with_real_training(folder: Path) -> Path:
    """The real 02_training.ipynb and one-cell stand-ins for the others (a shorter test of the same pipeline)."""
    folder.mkdir()
    for name in pipeline.NOTEBOOKS:
        if name == "02_training.ipynb":
            (folder / name).write_bytes((ROOT / "notebooks" / name).read_bytes())
        else:
            (folder / name).write_text(json.dumps(STUB))
    return folder


def hybridlib_cli(*args) -> list[str]:
    return [sys.executable, "-m", "hybridlib", *map(str, args)]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"hybridlib run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_cli_second_writer_refused_then_ctrl_c_then_resume(tmp_path):
    """`hybridlib run` as a user runs it: a second `--resume` of the same run while it trains is refused naming
    the first; Ctrl-C (SIGINT) in the middle of epoch 2 stops the kernel and prints one line with the last finished
    epoch and the resume command, exit 130, no traceback, no kernel left; `--resume` then finishes the run."""
    data_dir = fixtures.make_tiny_dataset(tmp_path / "data", n_train=4000)  # epochs long enough to interrupt
    tok_dir = fixtures.make_tiny_tokenizer(tmp_path / "tokenizer")
    params = fixtures.write_tiny_params(tmp_path / "p.yaml", data_dir, tok_dir, epochs=CLI_EPOCHS)
    notebooks = notebooks_with_real_training(tmp_path / "notebooks")
    run_dir = (tmp_path / "outputs" / "r").resolve()
    args = ["run", params, "--outputs", tmp_path / "outputs", "--run-name", "r", "--notebooks", notebooks]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(hybridlib_cli(*args), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / LOCK_FILE).is_file(), first, "the run was locked")
        second = subprocess.run(hybridlib_cli("run", "--resume", run_dir, "--notebooks", notebooks),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"is being written by another process: pid {first.pid} on {socket.gethostname()}" in second.stderr

        wait_for(lambda: len(log_rows(run_dir)) >= 1 if (run_dir / "training_log.csv").is_file() else False,
                 first, "epoch 1 was saved")
        kernels = psutil.Process(first.pid).children(recursive=True)
        assert kernels, "no kernel process under hybridlib run"
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = log.read_text()
    assert first.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "ZMQError" not in out, out[-3000:]
    last_line = out.strip().splitlines()[-1]
    finished = len(log_rows(run_dir))
    assert finished < CLI_EPOCHS, "training finished before Ctrl-C: the test needs slower epochs"
    assert last_line == (f"Interrupted in 02_training.ipynb: {run_dir} has finished epoch {finished} (saved in "
                         f"last.pt); resume with: hybridlib run --resume {run_dir}"), out[-3000:]
    _, alive = psutil.wait_procs(kernels, timeout=10)
    assert not alive, f"processes left running: {alive}"
    assert not (run_dir / LOCK_FILE).exists()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == finished

    resumed = subprocess.run(hybridlib_cli("run", "--resume", run_dir, "--notebooks", notebooks),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Run finished: {run_dir}" in resumed.stdout
    assert [r["epoch"] for r in log_rows(run_dir)] == [str(e) for e in range(1, CLI_EPOCHS + 1)]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == CLI_EPOCHS


def test_interrupted_message_before_the_first_epoch(tmp_path, tiny_params):
    _, run_dir = new_run(tmp_path, tiny_params)
    assert pipeline.interrupted_message(run_dir, "01_data_exploration.ipynb") == (
        f"Interrupted in 01_data_exploration.ipynb: {run_dir} has no finished epoch yet; start its training again "
        f"with: hybridlib run --resume {run_dir}")


# ----------------------------------------------------------------------------- 3: a full disk


def disk_full_at_last_pt(monkeypatch, epoch: int, error: BaseException) -> None:
    """torch.save writes part of last.pt of ``epoch`` and then fails like a full disk (and so on after it)."""
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last.pt."):
            seen.append(f)
        if len(seen) >= epoch:
            Path(f).write_bytes(b"\0" * 1000)
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2026688 vs 2026580")


@pytest.mark.parametrize("error", [SHORT_WRITE, OSError(errno.ENOSPC, "No space left on device")],
                         ids=["torch_short_write", "ENOSPC"])
def test_disk_full_while_writing_a_checkpoint_then_resume(tmp_path, tiny_params, data, reference, monkeypatch, error):
    """The disk fills while last.pt of epoch 2 is written: a RunError naming the folder, the space needed and
    free; last.pt and the log of epoch 1 intact, no temp file left; once there is space, resume finishes the run
    exactly like the uninterrupted one."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    disk_full_at_last_pt(monkeypatch, epoch=2, error=error)
    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, data, progress=False)
    msg = str(e.value)
    assert re.match(rf"Not enough disk space to write last\.pt in {re.escape(str(run_dir))}: it needs about "
                    rf"[\d.]+ (KiB|MiB), and [\d.]+ (bytes|KiB|MiB|GiB|TiB) is free\. The files already there are "
                    rf"intact\. ", msg), msg
    assert msg.endswith(f"Free some space, then continue the run with: hybridlib run --resume {run_dir}")
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in log_rows(run_dir)] == ["1"]
    assert not temp_files(run_dir) and not (run_dir / LOCK_FILE).exists()

    monkeypatch.undo()  # space freed
    training.train(resume_cfg(run_dir), run_dir, data, progress=False)
    assert_same_as(run_dir, reference)


def test_disk_too_full_for_an_epoch_writes_none_of_its_files(tmp_path, tiny_params, data, reference, monkeypatch):
    """Checked before writing: without room for model.pt + last.pt + the log, none of them is replaced."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    real_free = files.free_bytes
    monkeypatch.setattr(files, "free_bytes",
                        lambda folder: 50_000 if (run_dir / "last.pt").exists() else real_free(folder))
    before = {}
    real_save_epoch = training.save_epoch

    def save_epoch(*args, **kwargs):
        before.update({n: sha256(run_dir / n) for n in ("model.pt", "last.pt", "training_log.csv")
                       if (run_dir / n).exists()})
        return real_save_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "save_epoch", save_epoch)
    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, data, progress=False)
    msg = str(e.value)
    assert f"last.pt, training_log.csv in {run_dir}: they need about" in msg  # and model.pt if epoch 2 improved
    assert "and 48.8 KiB is free" in msg and f"hybridlib run --resume {run_dir}" in msg
    assert {n: sha256(run_dir / n) for n in before} == before and len(before) == 3
    monkeypatch.undo()
    training.train(resume_cfg(run_dir), run_dir, data, progress=False)
    assert_same_as(run_dir, reference)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, code):
    target = tmp_path / "notes.txt"
    target.write_text("the previous version")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"x" * 3000)
        raise OSError(code, os.strerror(code))

    with pytest.raises(RunError, match=rf"Not enough disk space to write notes\.txt in {re.escape(str(tmp_path))}: it "
                                       r"needs at least 2\.9 KiB, and .* is free\. .*Free some space, then try again\."):
        atomic_write(target, write)
    assert target.read_text() == "the previous version" and not temp_files(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path, mask):
    """mkstemp makes 0600: the written file gets what open() would give under the umask in force now."""
    before = os.umask(mask)
    try:
        assert files.current_umask() == mask and os.umask(mask) == mask  # read without changing it
        files.write_text(tmp_path / "notes.txt", "text")
        (tmp_path / "plain.txt").write_text("text")
    finally:
        os.umask(before)
    assert (tmp_path / "notes.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_evaluation_on_a_full_disk_keeps_the_previous_metrics(tmp_path, reference, data, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = sha256(run_dir / "metrics.json")
    monkeypatch.setattr(files, "free_bytes", lambda folder: 100)
    cfg = load_config(run_dir / "params.yaml", {"run_dir": str(run_dir)})
    with pytest.raises(RunError, match=rf"Not enough disk space to write metrics\.json in {re.escape(str(run_dir))}: "
                                       rf"it needs about .* and 100 bytes is free.*hybridlib run --resume"):
        evaluate_run(cfg, run_dir, data, progress=False)
    assert sha256(run_dir / "metrics.json") == before and not (run_dir / LOCK_FILE).exists()


def test_pipeline_notebook_write_on_a_full_disk(tmp_path, tiny_params, monkeypatch):
    """papermill's writes of the executed notebook go through the same atomic write: a clear RunError, the
    previous copy intact, the kernel shut down."""
    cfg, run_dir = new_run(tmp_path, tiny_params)
    notebooks = tmp_path / "nb"
    notebooks.mkdir()
    (notebooks / "stub.ipynb").write_text(json.dumps(STUB))
    (run_dir / "stub.ipynb").write_text("the previous copy")
    monkeypatch.setattr(files, "free_bytes", lambda folder: 10)
    monkeypatch.setattr(pipeline, "NOTEBOOKS", ["stub.ipynb"])
    with pytest.raises(RunError, match=rf"Not enough disk space to write stub\.ipynb in {re.escape(str(run_dir))}: "
                                       rf"it needs about .* and 10 bytes is free.*hybridlib run --resume"):
        pipeline.execute(run_dir, notebooks, progress=False)
    assert (run_dir / "stub.ipynb").read_text() == "the previous copy" and not temp_files(run_dir)
    assert not [p for p in psutil.Process().children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_inside_a_notebook_is_named(tmp_path, code):
    """A write of a notebook's own (not through hybridlib) that hits ENOSPC or the quota: the same advice, no
    traceback; another OSError is reported as the failure it is."""
    evalue = f"[Errno {code}] {os.strerror(code)}"
    e = PapermillExecutionError(3, 1, "plt.savefig(...)", "OSError", evalue, [])
    msg = str(pipeline.notebook_error(e, "04_visualization.ipynb", tmp_path))
    assert msg.startswith(f"04_visualization.ipynb stopped: the disk holding {tmp_path} is full ([Errno {code}]")
    assert "is free now" in msg and f"hybridlib run --resume {tmp_path}" in msg
    other = PapermillExecutionError(3, 1, "open(...)", "OSError", "[Errno 13] Permission denied", [])
    assert "failed with OSError" in str(pipeline.notebook_error(other, "04_visualization.ipynb", tmp_path))


def test_a_run_that_stopped_before_training_says_how_to_start_again(tmp_path):
    """A data error in 01 (fixed with a parameter): the folder holds nothing trained, and the message says so, with
    how to reuse its name; once an epoch is saved, the advice is --resume's, not this."""
    e = PapermillExecutionError(1, 1, "prepare_data(cfg)", "DataError", "Column 'body' not found", [])
    msg = str(pipeline.notebook_error(e, "01_data_exploration.ipynb", tmp_path))
    assert msg.startswith("01_data_exploration.ipynb stopped: Column 'body' not found (executed notebook:")
    assert f"Nothing was trained in {tmp_path} yet" in msg and "remove that folder" in msg
    (tmp_path / "last.pt").write_bytes(b"x")
    assert "Nothing was trained" not in str(pipeline.notebook_error(e, "03_evaluation.ipynb", tmp_path))


# ----------------------------------------------------------------------------- 4: labels as pandas writes them


def write_float_labels(folder: Path, fmt: str, odd: float | None = None) -> Path:
    """The tiny data with labels 0.0/1.0/2.0 (an int column that once held a missing value, saved by pandas)."""
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 240, 0), ("test", 80, 1)):
        texts, labels = fixtures.make_texts(n, seed=seed)
        df = pd.DataFrame({"text": texts, "label": pd.Series(labels, dtype="float64")})
        if odd is not None:
            df.loc[7, "label"] = odd
        if fmt == "csv":
            df.to_csv(folder / f"{split}.csv", index=False)
        else:
            df.to_parquet(folder / f"{split}.parquet", index=False)
    return folder


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_integral_float_labels_are_class_ids(tmp_path, tiny_tokenizer_dir, fmt):
    folder = write_float_labels(tmp_path / "data", fmt)
    if fmt == "csv":
        assert ",1.0\n" in (folder / "train.csv").read_text()
    label_of = dict(zip(*fixtures.make_texts(240, seed=0), strict=True))
    for names in (list(fixtures.LABEL_NAMES), None):  # with label_names, and without (ids 0..K-1)
        cfg = load_config(None, fixtures.tiny_params(folder, tiny_tokenizer_dir, label_names=names))
        d = prepare_data(cfg)
        assert d.label_names == (names or ["0", "1", "2"])
        train = d.splits["train"]
        assert all(label_of[t] == y for t, y in zip(train["text"], train["label"], strict=True))


def test_non_integral_float_labels_are_refused_naming_them(tmp_path, tiny_tokenizer_dir):
    folder = write_float_labels(tmp_path / "data", "csv", odd=1.5)
    cfg = load_config(None, fixtures.tiny_params(folder, tiny_tokenizer_dir))
    with pytest.raises(DataError, match=r"Labels \[1\.5\] are not class ids: float labels must be whole numbers"):
        prepare_data(cfg)


# ----------------------------------------------------------------------------- 5: text files that are not UTF-8


def write_latin1(folder: Path, fmt: str) -> Path:
    """The tiny data as Latin-1 csv/jsonl, with 'é' (byte 0xe9) in the 6th training row."""
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 240, 0), ("test", 80, 1)):
        texts, labels = fixtures.make_texts(n, seed=seed)
        if split == "train":
            texts[5] = "Café owners and the stock market " + texts[5]
        df = pd.DataFrame({"text": texts, "label": labels})
        if fmt == "csv":
            df.to_csv(folder / f"{split}.csv", index=False, encoding="latin-1")
        else:
            lines = [json.dumps(r, ensure_ascii=False) for r in df.to_dict(orient="records")]
            (folder / f"{split}.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


@pytest.mark.parametrize("fmt,line", [("csv", 7), ("jsonl", 6)])  # csv: the header is line 1
def test_a_file_that_is_not_utf8_is_named_with_its_line_and_the_fix(tmp_path, tiny_tokenizer_dir, fmt, line):
    folder = write_latin1(tmp_path / "data", fmt)
    cfg = load_config(None, fixtures.tiny_params(folder, tiny_tokenizer_dir))
    with pytest.raises(DataError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{folder / ('train.' + fmt)} is not valid utf-8 text: line {line}, byte ")
    assert "0xe9" in msg and "Caf" in msg
    assert "Re-encode the file as UTF-8" in msg and "-p encoding latin-1" in msg

    cfg = load_config(None, fixtures.tiny_params(folder, tiny_tokenizer_dir, encoding="latin-1"))
    texts = prepare_data(cfg).splits
    assert any(t.startswith("Café owners") for s in texts.values() for t in s["text"])


def test_an_unknown_encoding_is_a_config_error(tmp_path, tiny_tokenizer_dir):
    folder = write_latin1(tmp_path / "data", "csv")
    cfg = load_config(None, fixtures.tiny_params(folder, tiny_tokenizer_dir, encoding="latin-9x"))
    with pytest.raises(ConfigError, match="'latin-9x' is not a text encoding Python knows"):
        prepare_data(cfg)
