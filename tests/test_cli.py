"""`hybridlib ...` as a user runs it: a whole run end to end on tiny generated data; bad input ends with a
non-zero exit code and a one-paragraph message on stderr (never a traceback), before anything is created.

Most cases call ``hybridlib.cli.main`` in this process (what ``python -m hybridlib`` runs); a fresh
``python -m hybridlib`` is started only where the process itself matters: its exit code and stderr, and
the Hugging Face libraries' state when HF_HUB_OFFLINE is unset. Which values, data and runs are refused is
tested in test_config.py, test_data.py and test_reliability.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from hybridlib.cli import main
from hybridlib.tokens import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_data_exploration.ipynb", "02_training.ipynb", "03_evaluation.ipynb", "04_visualization.ipynb",
             "05_prediction.ipynb"]
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m hybridlib ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "hybridlib", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or dict(os.environ),
    )


def cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """``hybridlib ARGS`` through hybridlib.cli.main in this process (stdout/stderr captured)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code != 0, no traceback, a one-paragraph message on stderr holding every needle."""
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    at = res.stderr.rfind("error: ")  # progress bars (datasets) may come before it
    assert at == 0 or (at > 0 and res.stderr[at - 1] in "\r\n"), res.stderr
    err = res.stderr[at:].strip()
    assert "\n" not in err, err  # one paragraph, the last thing printed
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


# ----------------------------------------------------------------------------- a whole run


def test_hybridlib_run_end_to_end(tiny_params, tiny_tokenizer_dir, tmp_path, capsys):
    """`hybridlib run` on the tiny data: the five notebooks executed into the run folder (with their outputs), and
    every artifact they promise, with a model that learnt the task (3 balanced classes: chance is 1/3)."""
    out = tmp_path / "outputs"
    res = cli_here(capsys, "run", tiny_params, "--run-name", "e2e", "--outputs", out,
                   "-p", "epochs", "5", "-p", "baseline", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / "e2e"
    assert f"Run finished: {run}" in res.stdout and "test_accuracy" in res.stdout
    assert re.search(r"baseline and ensemble: nblr [01]\.\d{4}, model\+nblr [01]\.\d{4}", res.stdout), res.stdout

    for name in NOTEBOOKS:
        nb = nbformat.read(run / name, as_version=4)
        assert not nb.metadata.get("papermill", {}).get("exception"), name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count for c in code), f"{name}: a cell did not run"
        outputs = [o for c in code for o in c.outputs]
        assert outputs, f"{name} has no outputs"
        assert not [o for o in outputs if o.output_type == "error"], name
        injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(run.resolve() / "params.yaml") in injected[0].source, name

    params = yaml.safe_load((run / "params.yaml").read_text())
    assert params["epochs"] == 5 and params["baseline"] is True and Path(params["run_dir"]) == run.resolve()
    for name in ("model.pt", "last.pt", "nblr.npz", "train_info.json", "tokenizer/tokenizer_config.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert load_tokenizer(str(run / "tokenizer")).get_vocab() == load_tokenizer(str(tiny_tokenizer_dir)).get_vocab()
    log = (run / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss") and len(log) == 1 + 5
    for name in ("loss_acc_curves.png", "confusion_matrix.png", "token_lengths.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.8, metrics["test_accuracy"]  # measured ~0.9-1.0
    assert metrics["test_macro_f1"] >= 0.75 and metrics["best_epoch"] >= 1 and metrics["epochs_run"] == 5
    assert metrics["label_names"] == ["sports", "business", "science"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_test"] == 80
    assert "nblr" in metrics["baselines"] and "model+nblr" in metrics["ensembles"]
    assert metrics["train_precision"] == metrics["precision"] in ("fp32", "bfloat16")  # one name for one dtype
    report = (run / "classification_report.txt").read_text()
    assert all(name in report for name in metrics["label_names"]) and "accuracy" in report
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args,needles",
    [
        (["{bad}"], ["Unknown parameter 'epoch'", "Did you mean 'epochs'?", "bad.yaml"]),
        (["{missing}"], ["nope.yaml", "does not exist"]),
        (["{params}", "-p", "epochs", "-1"], ["'epochs'", "-1", ">= 1"]),
        (["{params}", "-p", "epoch", "3"], ["Did you mean 'epochs'?"]),
        (["{params}", "-p", "lr", "fast"], ["'lr'", "fast"]),
        (["{params}", "-p", "ema_decay", "0.9"], ["'ema_decay'", "hybridlib 0.1.0"]),
        (["{params}", "-p", "resume", "true"], ["resume is for a run that exists", "--resume"]),
        (["{params}", "-p", "pretrained_embeddings", "{missing}"], ["pretrained_embeddings", "nope.yaml", "'ppmi'"]),
        (["{params}", "--notebooks", "{missing}"], ["nope.yaml lacks the notebooks", "01_data_exploration.ipynb"]),
    ],
    ids=["bad_file", "missing_file", "negative_epochs", "unknown_key", "lr_not_a_number", "retired_option",
         "resume_a_new_run", "missing_embeddings_file", "missing_notebooks"],
)
def test_run_with_bad_params_creates_nothing(tmp_path, tiny_params, capsys, args, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n", encoding="utf-8")
    out = tmp_path / "outputs"
    args = [a.format(bad=bad, missing=tmp_path / "nope.yaml", params=tiny_params) for a in args]
    res = cli_here(capsys, "run", *args, "--outputs", out, "--run-name", "must-not-exist")
    assert res.returncode == 2
    assert_clean_error(res, *needles)
    assert not out.exists(), "a bad parameter created a run folder"


def test_a_run_name_or_device_that_cannot_be_is_refused_before_a_folder_exists(tmp_path, tiny_params, capsys):
    import torch

    out = tmp_path / "outputs"
    for name in ("../escaped", "a/b", ".."):
        res = cli_here(capsys, "run", tiny_params, "--outputs", out, "--run-name", name)
        assert res.returncode == 2
        assert_clean_error(res, f"--run-name {name!r} is a path", "--outputs DIR")
    if not torch.cuda.is_available():
        for args in (["-p", "device", "cuda"], ["-p", "precision", "fp16"]):
            res = cli_here(capsys, "run", tiny_params, "--outputs", out, "--run-name", "x", *args)
            assert res.returncode == 2
            assert_clean_error(res, "CUDA")
    assert not out.exists() and not (tmp_path / "escaped").exists()
    (out / "taken").mkdir(parents=True)  # a taken name is said first, before the data and tokenizer checks
    res = cli_here(capsys, "run", tiny_params, "--outputs", out, "--run-name", "taken", "-p", "device", "cuda:99")
    assert_clean_error(res, "taken already exists")


def test_resume_argument_errors(tmp_path, capsys):
    assert_clean_error(cli_here(capsys, "run", "--resume", tmp_path / "no-such-run"), "no-such-run does not exist")
    run = tmp_path / "run"
    run.mkdir()
    assert_clean_error(cli_here(capsys, "run", "--resume", run), "run is not a hybridlib run (no params.yaml)")
    assert_clean_error(cli_here(capsys, "run", run), f"Params file '{run}' is a folder, not a file")
    (run / "params.yaml").write_text("epochs: 1\n")
    assert_clean_error(cli_here(capsys, "run", "--resume", run, "-p", "epochs", "5"), "--resume takes only the run folder")
    (run / "model.pt").write_bytes(b"x")  # a finished run without last.pt
    assert_clean_error(cli_here(capsys, "run", "--resume", run), "no last.pt", "cannot be resumed")
    assert_clean_error(cli_here(capsys, "run"), "needs a params file")
    assert sorted(p.name for p in run.iterdir()) == ["model.pt", "params.yaml"]


# ----------------------------------------------------------------------------- offline


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


@pytest.mark.parametrize(
    "override,needles",
    [
        (["-p", "dataset", "hybridlib_no_such_dataset", "-p", "data_dir", "null"],
         ["hybridlib_no_such_dataset", "unreachable", "data_dir", "HYBRIDLIB_DATA_DIR"]),
        (["-p", "tokenizer", "bert-base-uncased"], ["bert-base-uncased", "unreachable", "local folder", "HYBRIDLIB_TOKENIZERS_DIR"]),
        (["-p", "tokenizer", "bert-base-uncased", "-p", "dataset", "hybridlib_no_such_dataset", "-p", "data_dir", "null"],
         ["Tokenizer 'bert-base-uncased'", "Dataset 'hybridlib_no_such_dataset'"]),  # both at once
    ],
    ids=["hub_dataset", "hub_tokenizer", "hub_both"],
)
def test_run_offline_hub_names_fail_fast_with_a_local_files_hint(tiny_params, tmp_path, override, needles):
    """`python -m hybridlib run` with HF_HUB_OFFLINE *unset* (a fresh process, so the Hugging Face libraries start
    online): hybridlib itself must notice that the hub is unreachable (an HTTP probe of a few seconds), switch them
    offline and fail with a hint, instead of huggingface_hub's ~50 s of retries, and before a run folder exists;
    the process exits 2 with one paragraph on stderr. HF_ENDPOINT points at a closed local port so the test is
    offline on any machine (without network, DNS fails just as fast)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HYBRIDLIB_TOKENIZERS_DIR",
                        "HYBRIDLIB_DATA_DIR")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "empty_hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "empty_hf_datasets"))
    out = tmp_path / "outputs"
    res = cli("run", tiny_params, *override, "--outputs", out, env=env, timeout=120)
    assert res.returncode == 2
    assert_clean_error(res, *needles)
    assert not out.exists()


# ----------------------------------------------------------------------------- answering fast


HEAVY = ("torch", "datasets", "transformers", "papermill", "sklearn", "matplotlib")


@pytest.mark.parametrize("args", [["--help"], ["params"], ["run", "--help"],
                                  ["run", "params/ag_news.yaml", "-p", "lr", "banana"],
                                  ["run", "params/imdb.yaml", "-p", "data_dir", "no/such/folder"],
                                  ["predict", "--checkpoint", "no/such/run", "--text", "hi"]],
                         ids=["help", "params", "run_help", "bad_value", "missing_data_dir", "missing_checkpoint"])
def test_help_and_refusals_load_no_heavy_library(args):
    """What makes `hybridlib --help` or a typo answer at once: none of the heavy libraries is imported."""
    code = ("import sys\nfrom hybridlib.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-2000:] + res.stderr[-2000:]


def test_a_closed_pipe_ends_quietly():
    """`hybridlib ... | head`: when the reader has gone, the command stops with 141 (as after SIGPIPE), no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "hybridlib", "params"], stdout=write, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    finally:
        os.close(write)
    assert res.returncode == 141 and res.stderr == "", res.stderr
