"""`python -m hybridlib ...` as a user runs it: bad input ends with exit code != 0 and a one-paragraph
message on stderr (never a traceback), and nothing is created or overwritten on the way.

The `run` cases fail before any notebook starts, so they cost a fraction of a second each; the
`evaluate` cases import torch/datasets (a few seconds each) and use the session's tiny run.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import fixtures
import pytest
from tiny_run import tiny_run

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridlib", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env or dict(os.environ),
    )


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


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- item 1: bad params


BAD_PARAMS = {
    "unknown_key": ("epoch: 3\n", ["Unknown parameter 'epoch'", "Did you mean 'epochs'?", "bad.yaml"]),
    "lr_not_a_number": ('lr: "fast"\n', ["'lr'", "'fast'", "expected a number", "bad.yaml"]),
    "negative_epochs": ("epochs: -1\n", ["'epochs'", "-1", ">= 1", "bad.yaml"]),
    "max_length_0": ("max_length: 0\n", ["'max_length'", ">= 2"]),
    "unknown_branch": ("branches: [cnn, gru]\n", ["'branches'", "'gru'", "cnn, lstm"]),
    "bad_device": ("device: gpu\n", ["'device'", "'gpu'", "cuda"]),
    "duplicate_label_names": ("label_names: [a, b, a]\n", ["'label_names'", "more than once"]),
    "yaml_does_not_parse": ("epochs: 3\nbranches: [cnn, lstm\n", ["bad.yaml", "not valid YAML", "line"]),
    "not_a_mapping": ("- epochs\n- 3\n", ["bad.yaml", "mapping"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_run_with_bad_params_file(tmp_path, case):
    text, needles = BAD_PARAMS[case]
    params = tmp_path / "bad.yaml"
    params.write_text(text, encoding="utf-8")
    out = tmp_path / "outputs"
    res = cli("run", params, "--outputs", out, "--run-name", "must-not-exist")
    assert_clean_error(res, *needles)
    assert not out.exists(), "a bad parameter created a run folder"


def test_run_with_missing_params_file(tmp_path):
    out = tmp_path / "outputs"
    res = cli("run", tmp_path / "nope.yaml", "--outputs", out)
    assert_clean_error(res, "nope.yaml", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize(
    "key,value,needles",
    [("epochs", "-1", ["'epochs'", "-1"]), ("epoch", "3", ["Did you mean 'epochs'?"]), ("lr", "fast", ["'lr'", "fast"])],
)
def test_run_with_bad_p_override(tmp_path, tiny_params, key, value, needles):
    out = tmp_path / "outputs"
    res = cli("run", tiny_params, "-p", key, value, "--outputs", out)
    assert_clean_error(res, *needles)
    assert not out.exists()


# ----------------------------------------------------------------------------- item 6: never overwrite


def test_run_refuses_an_existing_run_name(tmp_path, tiny_params):
    out = tmp_path / "outputs"
    old = out / "mine"
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(os.urandom(64))
    (old / "params.yaml").write_text("epochs: 1\n")
    (out / "other").mkdir()
    (out / "other" / "metrics.json").write_text("{}")
    before = tree(out)
    res = cli("run", tiny_params, "--run-name", "mine", "--outputs", out)
    assert_clean_error(res, "already exists", "--run-name")
    assert tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["mine", "other"]


def test_resume_argument_errors(tmp_path, tiny_params):
    assert_clean_error(cli("run", "--resume", tmp_path / "no-such-run"), "no-such-run", "not a hybridlib run")
    run = tmp_path / "run"
    run.mkdir()
    (run / "params.yaml").write_text("epochs: 1\n")
    assert_clean_error(cli("run", "--resume", run, "-p", "epochs", "5"), "--resume takes only the run folder")
    (run / "model.pt").write_bytes(b"x")  # a finished run without last.pt
    assert_clean_error(cli("run", "--resume", run), "no last.pt", "cannot be resumed")
    assert_clean_error(cli("run"), "needs a params file")


# ----------------------------------------------------------------------------- items 3 and 7: evaluate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


def test_evaluate_with_a_mismatching_tokenizer(run_dir, tmp_path):
    other = fixtures.make_tiny_tokenizer(tmp_path / "other_tok", vocab_size=300)
    res = cli("evaluate", "--checkpoint", run_dir / "model.pt", "-p", "tokenizer", other)
    assert_clean_error(res, "vocabulary", "tokenizer")


@pytest.mark.parametrize(
    "override,needles",
    [
        (["-p", "dataset", "hybridlib_no_such_dataset", "-p", "data_dir", "null"],
         ["hybridlib_no_such_dataset", "unreachable", "data_dir", "HYBRIDLIB_DATA_DIR"]),
        (["-p", "tokenizer", "bert-base-uncased"], ["bert-base-uncased", "unreachable", "local folder", "HYBRIDLIB_TOKENIZERS_DIR"]),
    ],
    ids=["hub_dataset", "hub_tokenizer"],
)
def test_run_offline_hub_names_fail_fast_with_a_local_files_hint(tiny_params, tmp_path, override, needles):
    """HF_HUB_OFFLINE is *unset*: hybridlib itself must notice that the hub is unreachable (a 3 s TCP probe)
    and fail with a hint, instead of huggingface_hub's ~50 s of retries, and before a run folder exists.
    HF_ENDPOINT points at a closed local port so the test is offline on any machine (without network,
    DNS fails just as fast)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HYBRIDLIB_TOKENIZERS_DIR",
                        "HYBRIDLIB_DATA_DIR")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "empty_hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "empty_hf_datasets"))
    out = tmp_path / "outputs"
    res = cli("run", tiny_params, *override, "--outputs", out, env=env, timeout=120)
    assert_clean_error(res, *needles)
    assert not out.exists()
