"""A notebook's kernel dies mid-run (killed for memory, or a crash in a native library): `hybridlib run` ends
with one message naming the notebook, the cause, what uses memory and the resume command, and the run resumes."""

from __future__ import annotations

import re
import signal
import subprocess

import fixtures
import psutil
from test_run_safety import CLI_EPOCHS, hybridlib_cli, log_rows, notebooks_with_real_training, wait_for

from hybridlib.checkpoints import load_checkpoint
from hybridlib.files import LOCK_FILE


def test_a_killed_kernel_is_named_with_its_cause_and_the_run_resumes(tmp_path):
    data_dir = fixtures.make_tiny_dataset(tmp_path / "data", n_train=4000)  # epochs long enough to kill one
    tok_dir = fixtures.make_tiny_tokenizer(tmp_path / "tokenizer")
    params = fixtures.write_tiny_params(tmp_path / "p.yaml", data_dir, tok_dir, epochs=CLI_EPOCHS)
    notebooks = notebooks_with_real_training(tmp_path / "notebooks")
    run_dir = (tmp_path / "outputs" / "r").resolve()
    args = ["run", params, "--outputs", tmp_path / "outputs", "--run-name", "r", "--notebooks", notebooks]
    run = subprocess.Popen(hybridlib_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "training_log.csv").is_file() and len(log_rows(run_dir)) >= 1, run,
                 "epoch 1 was saved")
        kernels = [p for p in psutil.Process(run.pid).children(recursive=True)
                   if "ipykernel_launcher" in " ".join(p.cmdline())]
        assert kernels, "no kernel process under hybridlib run"
        for k in kernels:
            k.send_signal(signal.SIGKILL)  # what the out-of-memory killer does
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 2, err[-3000:]
    # hybridlib's own code raises no traceback (a kernel's shutdown may log ipykernel's own zmq race on a busy machine)
    assert not re.search(r'File "[^"]*[/\\]hybridlib[/\\][a-z_]+\.py"', err), err[-3000:]
    message = err.strip().splitlines()[-1]
    finished = len(log_rows(run_dir))
    assert finished < CLI_EPOCHS, "training finished before the kill: the test needs slower epochs"
    for needle in ("error: The kernel running 02_training.ipynb died: it was killed (SIGKILL)", "out-of-memory",
                   "eval_batch_size", f"has finished epoch {finished}", f"hybridlib run --resume {run_dir}"):
        assert needle in message, f"{needle!r} not in {message}"
    assert not (run_dir / LOCK_FILE).exists()

    resumed = subprocess.run(hybridlib_cli("run", "--resume", run_dir, "--notebooks", notebooks),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in log_rows(run_dir)] == [str(e) for e in range(1, CLI_EPOCHS + 1)]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == CLI_EPOCHS
