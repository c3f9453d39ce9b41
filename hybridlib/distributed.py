"""Several training processes on one machine or many, with torch.distributed: the process group, the
backend (NCCL on CUDA, gloo on CPU), the checks that a config can be split over N processes, and an
in-process launcher (torchrun's engine) that runs a function in N workers.

The training loop itself (:func:`hybridlib.training.train`) is the same for 1 and N processes; see
:func:`hybridlib.training.fit` and ``torchrun ... -m hybridlib train`` (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from hybridlib.config import Config
from hybridlib.errors import ConfigError, RunError, error_classes
from hybridlib.runtime import dist_info, resolve_device
from hybridlib.threads import allowed_cpus


def backend_for(device: str = "auto") -> str:
    """The torch.distributed backend for the ``device`` parameter: nccl on CUDA, gloo on CPU."""
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def check_world(cfg: Config, world_size: int, local_world_size: int | None = None) -> None:
    """Refuse settings that cannot be split over ``world_size`` processes (before any is started)."""
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"Parameter 'batch_size' ({cfg.batch_size}) is the global batch size and must be a multiple of the "
            f"number of processes ({world_size}); each process takes batch_size / {world_size} texts a step."
        )
    if backend_for(cfg.device) == "nccl":
        have = torch.cuda.device_count()
        if (local_world_size or world_size) > have:
            raise ConfigError(
                f"{local_world_size or world_size} processes on this machine need as many GPUs, but it has {have}. "
                f"Set num_processes (or torchrun's --nproc-per-node) to at most {have}, or train on CPU (device cpu)."
            )


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend)
    # CPU workers share the machine's cores (torchrun sets 1 thread each; the elastic API sets none)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info().world_size))
    if backend == "gloo":
        torch.set_num_threads(max(1, len(allowed_cpus()) // local_world))
    yield dist_info()
    torch.distributed.destroy_process_group()  # not on errors: the launcher stops the other ranks


def launch(fn: Callable, args: tuple, nprocs: int, echo: bool = True) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` processes on this machine under torch.distributed's elastic
    launcher (torchrun's engine: rendezvous, RANK/WORLD_SIZE/MASTER_* set, failures stop all ranks).

    Returns {rank: return value}. Worker output goes to log files; with ``echo`` rank 0's stdout is
    copied here. A worker's exception is raised here (hybridlib errors keep their type and message).
    """
    log_dir = tempfile.mkdtemp(prefix="hybridlib-workers-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"hybridlib-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone`
        max_restarts=0,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(
            log_dir=log_dir, redirects=Std.ALL, tee=Std.OUT if echo else Std.NONE, local_ranks_filter={0}
        ),
        log_line_prefix_template="[rank ${rank}] ",
    )
    # the launcher installs its own SIGINT/SIGTERM handlers; give the caller (a notebook kernel) its own back
    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        out = elastic_launch(config, fn)(*args)
    except ChildFailedError as e:
        error = _worker_error(e, log_dir)
        if log_dir not in str(error):  # a hybridlib error says it all; otherwise the logs are kept
            shutil.rmtree(log_dir, ignore_errors=True)
        raise error from None
    finally:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)
    shutil.rmtree(log_dir, ignore_errors=True)
    return out


def _worker_error(e, log_dir: str) -> Exception:
    """The first failed worker's exception, re-created from its error file (a generic RunError if unknown)."""
    rank, failure = e.get_first_failure()
    msg = failure.message
    if isinstance(msg, dict):
        msg = msg.get("message", "")
    name, _, text = str(msg).partition(": ")
    errors = error_classes()
    if name in errors and text:
        return errors[name](text)
    return RunError(
        f"Training process {rank} failed ({msg or f'exit code {failure.exitcode}'}). "
        f"Every worker's stdout/stderr is kept in {log_dir}."
    )
