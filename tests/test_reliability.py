"""Reliability and safety: bad input gives a clear message, interrupted runs resume exactly, runs and
checkpoints are never lost, overwritten or unsafe to load, and numerical trouble stops cleanly.

Companion of test_cli.py (the same promises through ``python -m hybridlib``). Items refer to the
issue "Reliability and safety"; bad params are tested in test_config.py, bad data in test_data.py,
checkpoints of the previous version in test_old_runs.py, and none of them again here.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from hybridlib import training, trainstate
from hybridlib.batching import make_loader
from hybridlib.checkpoints import load_checkpoint
from hybridlib.cli import main
from hybridlib.config import Config, load_config
from hybridlib.data import prepare_data
from hybridlib.errors import CheckpointError, ConfigError, DataError, HybridlibError, RunError
from hybridlib.pipeline import prepare_run
from hybridlib.runs import create_run_dir
from hybridlib.runtime import get_rng_state, set_rng_state

ROOT = Path(__file__).resolve().parent.parent
HYBRIDLIB_DIR = ROOT / "hybridlib"
EPOCHS = 3


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    """training_log.csv without the wall-clock column (the only one allowed to differ between runs)."""
    with open(Path(run_dir) / "training_log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def write_parquet(folder: Path, split: str, columns: dict, schema=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), folder / f"{split}.parquet")


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def reference(outputs, tiny_params):
    """An uninterrupted 3-epoch run created like `hybridlib run` does (prepare_run), trained and evaluated."""
    from hybridlib.evaluation import evaluate_run

    cfg, run_dir = prepare_run(load_config(tiny_params, {"epochs": EPOCHS}), run_name="reference", outputs=outputs)
    data = prepare_data(cfg)
    result = training.train(cfg, run_dir, data, progress=False)
    metrics = evaluate_run(cfg, run_dir, data, progress=False)["metrics"]
    return {"cfg": cfg, "dir": run_dir, "data": data, "result": result, "metrics": metrics}


def test_reference_run_is_a_real_run(reference):
    """The reference run is a real one: several epochs, a best epoch, finite numbers (the base of the tests below)."""
    assert len(reference["result"].history) == EPOCHS
    assert all(math.isfinite(float(v)) for row in log_rows(reference["dir"]) for v in row.values())
    assert reference["metrics"]["test_accuracy"] > 0.5


def test_num_threads_is_applied_to_evaluation_too(reference, tmp_path, monkeypatch):
    """`-p num_threads N` sets torch's CPU threads for the evaluation notebook (evaluate_run), not only for
    training; evaluate_checkpoint applies only a -p num_threads, not the training machine's stored value."""
    from hybridlib.evaluation import evaluate_checkpoint, evaluate_run

    run_dir = tmp_path / "copy"
    shutil.copytree(reference["dir"], run_dir)
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    evaluate_run(dataclasses.replace(reference["cfg"], num_threads=3, baseline=False), run_dir, reference["data"],
                 progress=False)
    assert calls[:1] == [3]
    calls.clear()
    evaluate_checkpoint(run_dir / "model.pt", overrides={"num_threads": 5}, progress=False)
    assert calls[:1] == [5]
    ckpt = load_checkpoint(run_dir / "model.pt")
    # a format-1 model.pt (hybridlib 0.1.0) stored every param: as if trained with -p num_threads 7 elsewhere
    ckpt.update(format_version=1, config={**reference["cfg"].to_dict(), "num_threads": 7})
    torch.save(ckpt, run_dir / "model.pt")
    calls.clear()
    evaluate_checkpoint(run_dir / "model.pt", progress=False)
    assert 7 not in calls


# ----------------------------------------------------------------------------- item 1: params


def test_notebook_bad_parameter_is_a_config_error_in_one_paragraph(tiny_params, tmp_path, monkeypatch):
    """02_training run by papermill with epochs=-1 injected: the cell fails with ConfigError, and IPython shows
    our one-line message (``_render_traceback_``) instead of a traceback. Nothing is created."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    monkeypatch.setenv("HYBRIDLIB_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(PapermillExecutionError) as e:
        pm.execute_notebook(
            str(ROOT / "notebooks" / "02_training.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"params_file": str(tiny_params), "epochs": -1},
            kernel_name="python3", progress_bar=False, cwd=str(ROOT / "notebooks"),
        )
    err = e.value
    assert err.ename == "ConfigError"
    assert "'epochs'" in err.evalue and "-1" in err.evalue and ">= 1" in err.evalue
    shown = "\n".join(err.traceback)
    assert "Traceback" not in shown and "File " not in shown
    assert len(err.traceback) == 1 and "\n" not in err.traceback[0]
    assert err.traceback[0].startswith("ConfigError: Parameter 'epochs'")
    assert not (tmp_path / "outputs").exists()


def test_ipython_shows_hybridlib_errors_as_one_paragraph():
    """In IPython (as in Jupyter) a HybridlibError prints as one line; an ordinary error keeps its traceback."""
    code = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        sh = InteractiveShell.instance()
        sh.run_cell("from hybridlib.errors import ConfigError\\nraise ConfigError(\\"Parameter 'epochs': got -1. Fix it.\\")")
        print("=====")
        sh.run_cell("1/0")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    ours, plain = out.split("=====")
    assert ours.strip() == "ConfigError: Parameter 'epochs': got -1. Fix it."
    assert "Traceback" in plain or "ZeroDivisionError" in plain  # the control: a normal error is not shortened
    assert HybridlibError("x")._render_traceback_() == ["HybridlibError: x"]
    assert ConfigError("a b")._render_traceback_() == ["ConfigError: a b"]


def test_prepare_run_reads_yaml_1e_3_as_a_number(tmp_path, tiny_data_dir, tiny_tokenizer_dir):
    """PyYAML reads `lr: 1e-3` as a string; the run's resolved params.yaml must hold the number 0.001."""
    params = fixtures.write_tiny_params(tmp_path / "p.yaml", tiny_data_dir, tiny_tokenizer_dir)
    params.write_text(params.read_text().replace("lr: 0.01", "lr: 1e-3"))
    assert "lr: 1e-3" in params.read_text()
    cfg, run_dir = prepare_run(load_config(params), run_name="sci", outputs=tmp_path / "out")
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)
    assert load_config(run_dir / "params.yaml").lr == 0.001


# ----------------------------------------------------------------------------- item 2: data


def test_data_errors_are_clean_through_evaluate_checkpoint(reference, tmp_path):
    """Pointing a trained model at broken data: a DataError, never a crash inside datasets/torch."""
    from hybridlib.evaluation import evaluate_checkpoint

    ckpt = reference["dir"] / "model.pt"
    with pytest.raises(DataError, match="does_not_exist"):
        evaluate_checkpoint(ckpt, overrides={"data_dir": str(tmp_path / "does_not_exist")}, progress=False)
    folder = fixtures.make_tiny_dataset(tmp_path / "d", n_train=30, n_test=10)
    with pytest.raises(DataError, match=r"'body'.*\['text', 'label'\]"):
        evaluate_checkpoint(ckpt, overrides={"data_dir": str(folder), "text_column": "body"}, progress=False)


# ----------------------------------------------------------------------------- item 3: offline


@pytest.fixture
def local_http():
    """start(status) → the URL of a local HTTP server answering every request with ``status``."""
    import http.server
    import threading

    servers = []

    def start(status: int) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_hub_probe_without_offline_mode(monkeypatch, local_http):
    """With HF_HUB_OFFLINE unset, the hub counts as reachable only if HF_ENDPOINT answers HTTP within the timeout:
    a closed port, a server that accepts the connection but never answers (a middlebox), or a 5xx (a proxy that
    cannot reach the hub) is offline; any other HTTP answer is online."""
    from hybridlib.hub import hub_reachable

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for status, online in ((200, True), (404, True), (503, False)):
        monkeypatch.setenv("HF_ENDPOINT", local_http(status))
        assert hub_reachable(timeout=3) is online, status
    with socket.socket() as silent:  # accepts connections (backlog) but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=0.5) is False
    assert hub_reachable(timeout=3) is False  # closed now: refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", local_http(200))  # never contacted in offline mode
    assert hub_reachable(timeout=3) is False


# ----------------------------------------------------------------------------- item 4: kill -9 and resume

CHILD = textwrap.dedent('''
    """Train a run until a chosen moment, announce it in MARKER, then hang (the test kills it with SIGKILL)."""
    import io, os, sys, time
    from pathlib import Path

    import torch
    import hybridlib.training as T
    from hybridlib.config import load_config

    run_dir, marker, mode = sys.argv[1:4]

    def announce_and_hang(what):
        Path(marker).write_text(what)
        time.sleep(600)

    if mode == "mid_epoch":  # after 5 optimizer steps of epoch 2 (epoch 1 is saved, epoch 2 is half done)
        real_bar = T.progress_bar

        class Hang:
            def __init__(self, it, desc="", **kw):
                self.bar, self.desc = real_bar(it, desc, **kw), desc

            def __iter__(self):
                for i, batch in enumerate(self.bar):
                    if self.desc.startswith("Epoch 2/") and i == 5:
                        announce_and_hang("mid-epoch 2")
                    yield batch

            def set_postfix(self, **kw):
                pass

        T.progress_bar = Hang
    else:  # mid_write: the 3rd checkpoint write (in epoch 2) stops half-way through the file
        real_save, calls = torch.save, []

        def save(obj, f, *args, **kwargs):
            calls.append(f)
            if len(calls) == 3:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                announce_and_hang(f"half of {f}")
            return real_save(obj, f, *args, **kwargs)

        torch.save = save

    cfg = load_config(Path(run_dir) / "params.yaml")  # as notebooks/02_training does
    T.train(cfg, run_dir, progress=False)
    Path(marker).write_text("finished without being killed")
''')


def interrupted_run(tmp_path: Path, outputs: Path, tiny_params: Path, name: str, mode: str) -> Path:
    """A pipeline run folder whose training was SIGKILLed at ``mode``; checks what the kill left behind."""
    _, run_dir = prepare_run(load_config(tiny_params, {"epochs": EPOCHS}), run_name=name, outputs=outputs)
    script, marker, log = tmp_path / "child.py", tmp_path / "marker", tmp_path / "child.log"
    script.write_text(CHILD)
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker), mode], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), f"the child never reached {mode}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)  # the marker is written just before the child hangs
            assert child.poll() is None, marker.read_text()
            before = {n: sha256(run_dir / n) for n in ("model.pt", "last.pt")}
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    # what the kill left: the checkpoints of epoch 1, byte for byte, loading fine; a log of epoch 1
    assert {n: sha256(run_dir / n) for n in ("model.pt", "last.pt")} == before
    best, last = load_checkpoint(run_dir / "model.pt"), load_checkpoint(run_dir / "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 1
    assert_same_weights(best["model"], last["model"])  # epoch 1 is always the best so far
    assert [r["epoch"] for r in log_rows(run_dir)] == ["1"]
    stale = sorted(p.name for p in run_dir.glob(".*.tmp"))
    assert bool(stale) == (mode == "mid_write"), stale  # the half-written file never replaced a checkpoint
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: dict) -> None:
    """Exactly what the uninterrupted run gave (CPU): every logged number, the weights, the test metrics."""
    from hybridlib.evaluation import evaluate_run

    assert log_rows(run_dir) == log_rows(reference["dir"])
    for name in ("model.pt", "last.pt"):
        mine, ref = load_checkpoint(run_dir / name), load_checkpoint(reference["dir"] / name)
        assert (mine["epoch"], mine["best_metric"]) == (ref["epoch"], ref["best_metric"])
        assert_same_weights(mine["model"], ref["model"])
    metrics = evaluate_run(reference["cfg"], run_dir, reference["data"], progress=False)["metrics"]
    for key in ("test_accuracy", "test_macro_f1", "confusion_matrix", "best_val_accuracy", "best_epoch"):
        assert metrics[key] == reference["metrics"][key], key
    assert not list(run_dir.glob(".*.tmp"))


def test_kill_during_a_checkpoint_write_then_resume(tmp_path, outputs, tiny_params, reference):
    """SIGKILL half-way through writing a checkpoint of epoch 2: model.pt and last.pt are untouched (atomic
    writes); train(resume=True) removes the stale temp file and finishes exactly like the uninterrupted run."""
    run_dir = interrupted_run(tmp_path, outputs, tiny_params, "killed-mid-write", "mid_write")
    cfg = load_config(run_dir / "params.yaml", {"resume": True})
    training.train(cfg, run_dir, reference["data"], progress=False)
    assert_same_as_reference(run_dir, reference)


def test_kill_mid_epoch_then_hybridlib_resume(tmp_path, outputs, tiny_params, reference, monkeypatch, caplog):
    """SIGKILL in the middle of epoch 2, then the pipeline's resume (`hybridlib run --resume RUN`): it reruns
    02_training with resume=True and ends with the same log, weights and test metrics as the uninterrupted run.
    (Only 02 is executed, to keep the test short; `hybridlib run --resume` runs all five the same way.)"""
    from hybridlib import pipeline

    run_dir = interrupted_run(tmp_path, outputs, tiny_params, "killed-mid-epoch", "mid_epoch")
    monkeypatch.setattr(pipeline, "NOTEBOOKS", ["02_training.ipynb"])
    assert pipeline.resume(run_dir, progress=False) == run_dir
    assert (run_dir / "02_training.ipynb").is_file()
    assert_same_as_reference(run_dir, reference)
    assert "Passed unknown parameter" not in caplog.text  # 02 declares resume


def test_resume_rewrites_a_log_that_missed_the_last_epoch(reference, tmp_path):
    """A kill between writing last.pt and training_log.csv of the final epoch: resuming restores the log."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    rows = (run_dir / "training_log.csv").read_text().splitlines()
    (run_dir / "training_log.csv").write_text("\n".join(rows[:-1]) + "\n")
    cfg = load_config(run_dir / "params.yaml", {"resume": True, "run_dir": str(run_dir)})
    result = training.train(cfg, run_dir, reference["data"], progress=False)
    assert len(result.history) == EPOCHS
    assert log_rows(run_dir) == log_rows(reference["dir"])
    assert sha256(run_dir / "model.pt") == sha256(reference["dir"] / "model.pt")  # nothing retrained


def test_a_resume_that_trains_nothing_keeps_the_training_record(reference, tmp_path):
    """train_info.json (peak memory, threads, processes of the training) is the record of the process that trained:
    resuming a finished run trains nothing and leaves it as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    info = {**json.loads((run_dir / "train_info.json").read_text()), "peak_rss_mb": 123456.0, "num_threads": 99}
    (run_dir / "train_info.json").write_text(json.dumps(info))
    cfg = load_config(run_dir / "params.yaml", {"resume": True, "run_dir": str(run_dir)})
    training.train(cfg, run_dir, reference["data"], progress=False)
    assert json.loads((run_dir / "train_info.json").read_text()) == info


def test_a_damaged_last_pt_says_the_run_cannot_be_resumed(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    cfg = load_config(run_dir / "params.yaml", {"resume": True, "run_dir": str(run_dir)})
    with pytest.raises(CheckpointError) as e:
        training.train(cfg, run_dir, reference["data"], progress=False)
    assert str(e.value).startswith(f"Cannot resume {run_dir}: '{run_dir / 'last.pt'}' is not a whole PyTorch checkpoint")
    assert "Start a new run" in str(e.value)
    assert sha256(run_dir / "model.pt") == sha256(reference["dir"] / "model.pt")


def test_resume_refuses_params_edited_since_last_pt(reference, tmp_path):
    """A run's params.yaml edited after its last.pt (here a wider embedding): refused by name, not a state-dict error."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    (run_dir / "params.yaml").write_text(yaml.safe_dump({**params, "embed_dim": params["embed_dim"] + 8}))
    cfg = load_config(run_dir / "params.yaml", {"resume": True, "run_dir": str(run_dir)})
    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, reference["data"], progress=False)
    assert f"embed_dim {params['embed_dim'] + 8} (last.pt: {params['embed_dim']})" in str(e.value)
    assert "Put those values back" in str(e.value)
    assert sha256(run_dir / "last.pt") == sha256(reference["dir"] / "last.pt")


# ----------------------------------------------------------------------------- item 5: determinism


def test_same_params_and_seed_give_identical_results_on_cpu(reference, outputs):
    from hybridlib.evaluation import evaluate_run

    cfg, run_dir = prepare_run(load_config(reference["dir"] / "params.yaml", {"run_dir": None}), run_name="again", outputs=outputs)
    training.train(cfg, run_dir, reference["data"], progress=False)
    metrics = evaluate_run(cfg, run_dir, reference["data"], progress=False)["metrics"]
    assert log_rows(run_dir) == log_rows(reference["dir"])
    assert_same_weights(load_checkpoint(run_dir / "model.pt")["model"], load_checkpoint(reference["dir"] / "model.pt")["model"])
    for key in ("test_accuracy", "test_macro_f1", "per_class", "confusion_matrix", "best_val_accuracy", "best_epoch"):
        assert metrics[key] == reference["metrics"][key], key


# ----------------------------------------------------------------------------- item 6: runs never overwritten


OVERWRITES = {
    # how: (call(env) -> raises or returns an exit code, what the message must say)
    "train_finished_run": (lambda e: training.train(e["cfg"], e["finished"], e["data"], progress=False),
                           ["never overwrites", "model.pt", "resume"]),
    "train_over_model_pt": (lambda e: training.train(e["cfg"], e["only_model_pt"], e["data"], progress=False),
                            ["model.pt", "never overwrites"]),
    "train_over_last_pt": (lambda e: training.train(e["cfg"], e["only_last_pt"], e["data"], progress=False),
                           ["last.pt", "never overwrites"]),
    "fit_2_processes": (lambda e: training.fit(dataclasses.replace(e["cfg"], num_processes=2), e["finished"], e["data"]),
                        ["never overwrites"]),
    "prepare_run_name": (lambda e: prepare_run(load_config(e["params"], {"epochs": 1}), run_name="finished", outputs=e["out"]),
                         ["already exists", "--run-name"]),
    "prepare_run_dir": (lambda e: prepare_run(load_config(e["params"], {"run_dir": str(e["finished"])}), outputs=e["out"]),
                        ["already exists"]),
    "create_run_dir": (lambda e: create_run_dir(e["finished"]), ["already exists"]),
    "cli_run": (lambda e: main(["run", str(e["params"]), "--run-name", "finished", "--outputs", str(e["out"])]),
                ["already exists", "--run-name"]),
    "cli_train": (lambda e: main(["train", str(e["finished"] / "params.yaml")]), ["never overwrites"]),
}


@pytest.mark.parametrize("how", list(OVERWRITES))
def test_a_run_is_never_overwritten(how, reference, tmp_path, tiny_params, capsys, monkeypatch):
    """Whatever the way in (training, 1 or N processes, a new run's name or folder, the CLI), an existing run folder
    is refused with a message saying how to proceed, and no file of it or of any other run changes."""
    out = tmp_path / "outputs"
    finished = out / "finished"
    shutil.copytree(reference["dir"], finished)
    cfg = load_config(finished / "params.yaml", {"run_dir": str(finished)})
    (finished / "params.yaml").write_text(cfg.to_yaml())  # the copy's own folder, as `hybridlib train RUN/params.yaml` reads it
    (out / "other").mkdir()
    (out / "other" / "metrics.json").write_text('{"test_accuracy": 0.9}')

    env = {"cfg": cfg, "finished": finished, "data": reference["data"], "params": tiny_params, "out": out}
    for name in ("model.pt", "last.pt"):  # interrupted runs: only a checkpoint (any bytes)
        run = env[f"only_{name.replace('.', '_')}"] = out / f"only-{name}"
        run.mkdir()
        (run / name).write_bytes(os.urandom(256))
    monkeypatch.setattr(training, "launch", lambda *a, **k: pytest.fail("started workers"))
    call, needles = OVERWRITES[how]
    before = tree(out)
    capsys.readouterr()
    if how.startswith("cli_"):
        assert call(env) == 2
        msg = capsys.readouterr().err
        assert msg.startswith("error: ") and msg.count("\n") == 1, msg
    else:
        with pytest.raises(RunError) as e:
            call(env)
        msg = str(e.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert tree(out) == before


# ----------------------------------------------------------------------------- item 7: safe checkpoints


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in sorted(HYBRIDLIB_DIR.glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:  # the full argument list, across lines
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe
    for path in sorted(HYBRIDLIB_DIR.glob("*.py")):  # nothing else unpickles files
        assert not re.search(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False", path.read_text()), path


PLAIN = (torch.Tensor, str, int, float, bool, type(None))


def assert_plain(obj, where="ckpt") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(obj, PLAIN), f"{where} is a {type(obj).__name__}"


def test_checkpoints_hold_only_tensors_and_plain_types(reference):
    for name in ("model.pt", "last.pt"):
        assert_plain(torch.load(reference["dir"] / name, map_location="cpu", weights_only=True), name)
    last = load_checkpoint(reference["dir"] / "last.pt")  # everything a resume needs
    assert {"optimizer", "scheduler", "rng", "history", "epoch", "best_epoch", "bad_epochs", "scaler"} <= set(last)
    assert {"torch", "numpy", "python"} <= set(last["rng"])


class _Payload:
    """Unpickling this creates ``marker`` (it stands in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_is_refused_by_every_entry_point(reference, tmp_path, capsys):
    """A real model.pt / last.pt plus an object whose unpickling would run code: every way of loading it refuses
    it with a message, and the code never runs."""
    from hybridlib.checkpoints import load_model
    from hybridlib.evaluation import evaluate_checkpoint
    from hybridlib.prediction import Predictor

    marker = tmp_path / "pwned.txt"
    run = tmp_path / "evil-run"
    shutil.copytree(reference["dir"], run)
    for name in ("model.pt", "last.pt"):
        good = load_checkpoint(reference["dir"] / name)
        torch.save({**good, "payload": _Payload(str(marker))}, run / name)  # a real checkpoint plus a payload
    resume = load_config(run / "params.yaml", {"resume": True, "run_dir": str(run)})
    calls = {
        "model.pt": [
            lambda: load_checkpoint(run / "model.pt"),
            lambda: load_model(run / "model.pt"),
            lambda: Predictor.from_checkpoint(run / "model.pt"),
            lambda: Predictor.from_run(run),
            lambda: evaluate_checkpoint(run / "model.pt", progress=False),
        ],
        "last.pt": [lambda: training.train(resume, run, reference["data"], progress=False)],
    }
    for name, entry_points in calls.items():
        for call in entry_points:
            with pytest.raises(CheckpointError) as e:
                call()
            assert "Refused" in str(e.value) and name in str(e.value)
            assert not marker.exists(), "loading the checkpoint ran code"
    for args in (["predict", "--checkpoint", str(run), "--text", "x"], ["evaluate", "--checkpoint", str(run / "model.pt")]):
        capsys.readouterr()
        assert main(args) == 2
        assert "Refused" in capsys.readouterr().err and not marker.exists()

    # the control: the payload is live (an unsafe load does run it), so the refusals above mean something
    torch.load(run / "model.pt", weights_only=False)["payload"].close()
    assert marker.exists()


def _save_as_if_on_gpu(obj, path: Path) -> None:
    """torch.save with every storage tagged 'cuda:0', as a checkpoint written on a GPU machine is."""
    import torch.serialization as ts

    real = ts.location_tag
    ts.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        ts.location_tag = real


def test_checkpoint_saved_on_gpu_loads_on_cpu(reference, tmp_path):
    """Simulated (no GPU here): the file's tensors are tagged cuda:0 like a GPU-trained model.pt/last.pt.
    hybridlib always loads with map_location (cpu by default), so it loads and predicts on a CPU machine;
    a GPU last.pt also carries CUDA RNG states, which a CPU resume ignores."""
    from hybridlib.prediction import Predictor

    run = tmp_path / "gpu-run"
    run.mkdir()
    for name in ("model.pt", "last.pt"):
        ckpt = load_checkpoint(reference["dir"] / name)
        if name == "last.pt":
            ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
        _save_as_if_on_gpu(ckpt, run / name)
    assert b"cuda:0" in (run / "model.pt").read_bytes()
    if not torch.cuda.is_available():  # the control: without map_location the file would not load here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run / "model.pt", weights_only=True)
    ckpt = load_checkpoint(run / "model.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert_same_weights(ckpt["model"], load_checkpoint(reference["dir"] / "model.pt")["model"])
    predictor = Predictor.from_checkpoint(run / "model.pt", tokenizer=str(reference["dir"] / "tokenizer"))
    assert predictor.predict("the football team won the match")[0]["label"] in predictor.label_names
    last = load_checkpoint(run / "last.pt")
    saved = get_rng_state()
    try:
        set_rng_state(last["rng"])  # ignores the CUDA states when CUDA is absent
    finally:
        set_rng_state(saved)
    assert load_checkpoint(run / "last.pt")["optimizer"]["state"]


def test_mismatching_tokenizer_or_labels_are_refused(reference, tmp_path, capsys):
    from hybridlib.evaluation import evaluate_checkpoint
    from hybridlib.prediction import Predictor

    path = reference["dir"] / "model.pt"
    vocab = load_checkpoint(path)["tokenizer"]["vocab_size"]
    other = fixtures.make_tiny_tokenizer(tmp_path / "other_tok", vocab_size=300)
    with pytest.raises(CheckpointError) as e:
        Predictor.from_checkpoint(path, tokenizer=str(other))
    assert "vocabulary" in str(e.value) and str(vocab) in str(e.value)
    with pytest.raises(CheckpointError, match="vocabulary"):
        evaluate_checkpoint(path, overrides={"tokenizer": str(other)}, progress=False)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(path), "-p", "tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocabulary" in err and "tokenizer" in err

    two = tmp_path / "two_classes"  # a dataset with 2 classes for a 3-class model
    texts, labels = fixtures.make_texts(40, seed=5)
    for split in ("train", "test"):
        write_parquet(two, split, {"text": texts, "label": [y % 2 for y in labels]})
    with pytest.raises(CheckpointError) as e:
        evaluate_checkpoint(path, overrides={"data_dir": str(two), "label_names": None}, progress=False)
    assert "3 classes" in str(e.value) and "2" in str(e.value) and "label_names" in str(e.value)
    # another dataset: the run's class names are not carried over to it, so its 2 classes are refused too
    with pytest.raises(CheckpointError, match="3 classes"):
        evaluate_checkpoint(path, overrides={"dataset": "two_classes", "data_dir": str(two)}, progress=False)


def test_evaluate_checkpoint_scores_the_runs_own_split(reference, monkeypatch, capsys):
    """model.pt holds no seed; `hybridlib evaluate` takes it from the run's params.yaml, so --split validation is
    the validation split the run held out (another seed's would hold texts the model trained on)."""
    from hybridlib import evaluation

    seen = []
    monkeypatch.setattr(evaluation, "prepare_data", lambda cfg, tok: seen.append(cfg) or prepare_data(cfg, tok))
    assert reference["cfg"].seed != Config().seed
    m = evaluation.evaluate_checkpoint(reference["dir"] / "model.pt", "validation", progress=False)["metrics"]
    assert seen[0].seed == reference["cfg"].seed
    assert m["accuracy"] == pytest.approx(reference["result"].best_val_accuracy)
    # the run folder itself is taken too, and a sample says so
    assert main(["evaluate", "--checkpoint", str(reference["dir"]), "-p", "max_eval_samples", "10"]) == 0
    assert "(10 texts; a sample: max_eval_samples 10, -p max_eval_samples null for all)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- item 9: NaN / inf loss


def loss_becomes(monkeypatch, value: float, at: int) -> None:
    """Training step number ``at`` (counted over the whole run) computes a loss of ``value``."""
    real, steps = training.step_losses, []

    def step_losses(*args, **kwargs):
        loss, total, logits = real(*args, **kwargs)
        steps.append(1)
        return (loss * value, total * value, logits) if len(steps) == at else (loss, total, logits)

    monkeypatch.setattr(training, "step_losses", step_losses)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_best(reference, tmp_path, monkeypatch, value):
    data = reference["data"]
    cfg = load_config(reference["dir"] / "params.yaml", {"run_dir": None})
    steps = len(make_loader(data.splits["train"], cfg, data.pad_id, epoch=0))
    loss_becomes(monkeypatch, value, at=steps + 3)  # epoch 2, step 3
    run_dir = tmp_path / "diverged"
    hashes = {}
    real_save = trainstate.save_checkpoint
    monkeypatch.setattr(trainstate, "save_checkpoint", lambda c, p: (real_save(c, p), hashes.__setitem__(Path(p).name, sha256(p))))
    with pytest.raises(RunError) as e:
        training.train(cfg, run_dir, data, progress=False)
    msg = str(e.value)
    assert "epoch 2, step 3" in msg and ("nan" in msg or "inf" in msg)
    assert "model.pt" in msg and "epoch 1" in msg and "lr" in msg
    assert sha256(run_dir / "model.pt") == hashes["model.pt"]  # as written at the end of epoch 1
    best = load_checkpoint(run_dir / "model.pt")
    assert best["epoch"] == 1 and all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in log_rows(run_dir)] == ["1"]


def test_non_finite_weights_never_become_the_best_checkpoint(reference, tmp_path, monkeypatch):
    """Weights that turn NaN in an epoch's last step show up as a NaN validation loss: stop before saving."""
    data = reference["data"]
    cfg = load_config(reference["dir"] / "params.yaml", {"run_dir": None})
    real_validate = training.validate
    epochs = []

    def validate(*args, **kwargs):
        epochs.append(1)
        loss, acc = real_validate(*args, **kwargs)
        return (float("nan"), 1.0) if len(epochs) == 2 else (loss, acc)

    monkeypatch.setattr(training, "validate", validate)
    run_dir = tmp_path / "nan-weights"
    with pytest.raises(RunError, match=r"validation loss became nan at epoch 2"):
        training.train(cfg, run_dir, data, progress=False)
    assert load_checkpoint(run_dir / "model.pt")["epoch"] == 1
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1


def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(reference, tmp_path, monkeypatch):
    data = reference["data"]
    cfg = load_config(reference["dir"] / "params.yaml", {"run_dir": None})
    loss_becomes(monkeypatch, float("nan"), at=1)
    with pytest.raises(RunError, match="epoch 1, step 1.*No checkpoint was saved"):
        training.train(cfg, tmp_path / "r", data, progress=False)
    assert not (tmp_path / "r" / "model.pt").exists()
