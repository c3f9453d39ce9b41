"""Notebook tests (`pytest --nbmake notebooks`): run every numbered notebook, in order, on tiny
generated data and a tiny WordPiece vocabulary (no network, no ../shared). The notebooks read
their inputs from the environment variables set here, which their kernels inherit."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def pytest_configure(config) -> None:
    if not config.getoption("nbmake", default=False):
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures

    work = Path(tempfile.mkdtemp(prefix="hybridlib-notebooks-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    fixtures.make_tiny_dataset(work / "data" / "tiny")
    texts, _ = fixtures.make_texts(600, seed=12345)
    fixtures.make_tiny_tokenizer(work / "tokenizers" / "tiny-wordpiece", texts)
    os.environ.update(
        HYBRIDLIB_PARAMS=str(ROOT / "params" / "tiny.yaml"),
        HYBRIDLIB_DATA_DIR=str(work / "data"),
        HYBRIDLIB_TOKENIZERS_DIR=str(work / "tokenizers"),
        HYBRIDLIB_OUTPUTS=str(work / "outputs"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    # keep the private caches tests/conftest.py set up (if loaded), else make our own
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))
