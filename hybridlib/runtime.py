"""Where and how code runs: device, mixed precision, seeds and RNG state, torch.distributed process info, memory."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.errors import ConfigError

PROGRESS_ENV = "HYBRIDLIB_PROGRESS"  # "text": set by the pipeline for its kernels, whose output reaches a terminal
TEXT_BAR_SECONDS = 10.0  # a text bar's update interval: a few lines per epoch in the terminal and the notebook


def progress_bar(iterable: Any, desc: str, disable: bool = False) -> Any:
    """A tqdm bar over ``iterable`` that disappears when done: JupyterLab's widget, or in a pipeline run
    (``$HYBRIDLIB_PROGRESS=text``) a text bar on stderr, updated every ``TEXT_BAR_SECONDS``, that papermill
    streams to the terminal."""
    if os.environ.get(PROGRESS_ENV) == "text":
        from tqdm.std import tqdm

        # a fixed size: the kernel's stderr is no terminal, and tqdm hides a bar beyond a size it reads as 0 rows
        return tqdm(iterable, desc=desc, disable=disable, leave=False, file=sys.stderr, mininterval=TEXT_BAR_SECONDS,
                    dynamic_ncols=False, ncols=100, nrows=50)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable, leave=False)


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``name`` stands for; a CUDA device gets :func:`configure_cuda`'s TF32 settings."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"Parameter 'device': {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"Parameter 'device': {name!r} was asked for but CUDA is not available; use auto or cpu.")
    if dev.type == "cuda":
        configure_cuda()
    return dev


def configure_cuda(benchmark: bool = False) -> None:
    """CUDA only: TF32 for fp32 matrix products and cuDNN; ``benchmark``: cuDNN picks the fastest algorithm per
    input shape (training: few shapes; not for ``Predictor``, whose batch sizes change from call to call)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if benchmark:
        torch.backends.cudnn.benchmark = True


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    native_bf16 = precision == "auto" and (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16())
    return autocast_dtype(precision, device.type, native_bf16)


CUDA_PAD_MULTIPLE = 64  # batch lengths on CUDA: multiples of this (at most 8 shapes at 512 tokens)
LSTM_PATHS = ("padded", "packed")
LSTM_PATH_ENV = "HYBRIDLIB_LSTM_PATH"  # padded | packed: force one path (measurements, tests)
LSTM_AUTOCAST_ENV = "HYBRIDLIB_LSTM_AUTOCAST"  # 1: the LSTM runs under autocast on CUDA too (measurements)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How metrics.json and train_info.json name an autocast dtype: bfloat16, float16, or fp32 (none)."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"


def lstm_autocast(device_type: str, amp_dtype: torch.dtype | None) -> bool:
    """Does the LSTM run under the model's autocast ``amp_dtype`` on ``device_type``? CPU: yes. CUDA: no, fp32
    (TF32): cuDNN's bf16 LSTM is native only from cuDNN 9.13, autocast's fp16 one re-packs its weights at every
    call; ``HYBRIDLIB_LSTM_AUTOCAST=1`` turns autocast on there."""
    if amp_dtype is None:
        return False
    return device_type != "cuda" or os.environ.get(LSTM_AUTOCAST_ENV, "") == "1"


def autocast_dtype(precision: str, device_type: str, native_bf16: bool) -> torch.dtype | None:
    """The model's autocast dtype for ``precision`` (auto, fp32, bf16, fp16) on ``device_type`` (None: fp32), where
    ``native_bf16`` says whether the device computes in bf16 natively (a pure function: tests call it on CPU)."""
    if precision == "fp32":
        return None
    if device_type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if native_bf16 else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ConfigError("Parameter 'precision': fp16 needs CUDA; on CPU use auto, bf16 or fp32.")
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and native_bf16) else None


def lstm_path(device_type: str) -> str:
    """The BiLSTM implementation for ``device_type`` (:class:`hybridlib.model.BiLSTMBranch`): "packed" on CUDA,
    "padded" elsewhere (oneDNN has no packed path); ``HYBRIDLIB_LSTM_PATH`` picks one on any device."""
    force = os.environ.get(LSTM_PATH_ENV) or None
    if force is not None:
        if force not in LSTM_PATHS:
            raise ConfigError(f"{LSTM_PATH_ENV}={force!r}: use one of {', '.join(LSTM_PATHS)}.")
        return force
    return "packed" if device_type == "cuda" else "padded"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) RNG states as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> Dist:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(
            torch.distributed.get_rank(),
            torch.distributed.get_world_size(),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    return Dist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum plain numbers over all ranks (identity when not distributed)."""
    if not dist_info().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
