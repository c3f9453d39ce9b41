"""Shared pytest fixtures: tiny synthetic data, a tiny WordPiece tokenizer and a tiny params file.

Everything runs offline and writes only under temporary folders: the Hugging Face caches are
pointed at a per-session temp folder before ``datasets``/``transformers`` are imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # make `import fixtures` work from any rootdir / invocation
    sys.path.insert(0, str(TESTS_DIR))

# ----------------------------------------------------------------------------- environment
# Set at import time: conftest.py is imported before any test module, so before datasets /
# transformers / huggingface_hub read these variables into their config modules.
_HF_TMP = Path(tempfile.mkdtemp(prefix="hybridlib-tests-hf-"))
os.environ["HF_HOME"] = str(_HF_TMP / "hf_home")
os.environ["HF_DATASETS_CACHE"] = str(_HF_TMP / "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Tiny models run fastest on one thread, and a busy 2-core machine makes torch's thread pool spin.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("HYBRIDLIB_DATA_DIR", None)  # never pick up a developer's local data folder
atexit.register(shutil.rmtree, _HF_TMP, ignore_errors=True)

import fixtures  # noqa: E402  (after the environment is set)
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The notebooks (`pytest --nbmake notebooks`) get their tiny data from the root conftest.py.


@pytest.fixture(scope="session")
def hf_cache_dir() -> Path:
    """The session's private Hugging Face cache root."""
    return _HF_TMP


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train.parquet + test.parquet (240 + 80 rows, int labels 0..2)."""
    return fixtures.make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small lowercase WordPiece vocabulary trained on the tiny texts (loads with AutoTokenizer)."""
    texts, _ = fixtures.make_texts(600, seed=12345)
    return fixtures.make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), texts)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded once per session through hybridlib.tokens.load_tokenizer."""
    from hybridlib.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory, tiny_data_dir, tiny_tokenizer_dir) -> Path:
    """Path to a params YAML for a tiny, fast run on the tiny data."""
    return fixtures.write_tiny_params(
        tmp_path_factory.mktemp("tiny_params") / "tiny.yaml", tiny_data_dir, tiny_tokenizer_dir
    )


@pytest.fixture
def tiny_cfg(tiny_params):
    """A fresh Config loaded from the tiny params file (tests may modify it freely)."""
    from hybridlib.config import load_config

    return load_config(tiny_params)
