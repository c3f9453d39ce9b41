"""Training on several processes (GPUs or CPU processes, one machine or many) with torch.distributed.

There is one training loop, :func:`hybridlib.training.train`; under an initialised process group it
wraps the model in DDP, reads a disjoint shard of every epoch's batches, sums metrics over ranks and
writes files from rank 0 only. This module starts that process group, two ways:

* :func:`fit` (the training notebook, and so ``hybridlib run -p num_processes N``): trains in this
  process when ``num_processes == 1``, else launches ``num_processes`` workers on this machine with
  ``torch.distributed``'s elastic launcher (what ``torchrun`` runs), each calling ``train``. The data
  is tokenized once, here, and handed to the workers: the splits are memory-mapped Arrow files, so a
  worker receives their paths, not their rows.
* ``python -m hybridlib.distributed PARAMS.yaml`` under ``torchrun`` (several machines)::

      torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
          --rdzv-id RUN_ID -m hybridlib.distributed params/ag_news.yaml --run-name ag_news-8gpu

  Rank 0 creates the run folder (or reuses the one a run's own params.yaml names) and writes the
  artifacts; local rank 0 of each machine tokenizes first, so the others read the datasets cache.

The backend is NCCL when training on CUDA, gloo on CPU. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridlib.config import Config
from hybridlib.data import Data, prepare_data
from hybridlib.errors import ConfigError, HybridlibError, RunError
from hybridlib.runtime import dist_info, resolve_device
from hybridlib.training import TrainResult, check_run_dir, train


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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        torch.set_num_threads(max(1, _cpu_count() // local_world))
    yield dist_info()
    torch.distributed.destroy_process_group()  # not on errors: the launcher stops the other ranks


def train_worker(cfg: Config, run_dir: str, data: Data, progress: bool = True) -> TrainResult | None:
    """One worker of :func:`fit`: join the process group and run the training loop (rank 0's result)."""
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach the launcher (and notebook) as they come
    with process_group(cfg.device) as dist:
        result = train(cfg, run_dir, data, progress=progress and dist.is_main)
    return result if dist.is_main else None


def fit(cfg: Config, run_dir: str | Path, data: Data | None = None, progress: bool = True) -> TrainResult:
    """Train like :func:`hybridlib.training.train`, on ``cfg.num_processes`` processes of this machine.

    One process: ``train`` runs here. Several: ``data`` (prepared here if not given, so tokenization
    happens once) is handed to ``num_processes`` workers started by torch.distributed's elastic
    launcher, one per GPU on CUDA (NCCL) or CPU processes (gloo). Rank 0 writes the same artifacts
    as a single-process run and its result is returned; rank 0's epoch lines are echoed here.
    Works from a notebook kernel: the worker is an importable function.
    """
    n = cfg.num_processes
    if n == 1 or dist_info().enabled:  # already inside a process group (torchrun): just train
        return train(cfg, run_dir, data, progress)
    check_world(cfg, n)
    check_run_dir(Path(run_dir), cfg.resume)  # fail here, not in rank 0 of n
    data = data if data is not None else prepare_data(cfg)  # tokenized once, here
    results = launch(train_worker, (cfg, str(run_dir), data, progress), n, echo=progress)
    return results[0]


def launch(fn: Callable, args: tuple, nprocs: int, echo: bool = True) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` processes on this machine under torch.distributed's elastic
    launcher (torchrun's engine: rendezvous, RANK/WORLD_SIZE/MASTER_* set, failures stop all ranks).

    Returns {rank: return value}. Worker output goes to log files; with ``echo`` rank 0's stdout is
    copied here. A worker's exception is raised here (hybridlib errors keep their type and message).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

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
    errors, todo = {}, [HybridlibError]
    while todo:
        c = todo.pop()
        errors[c.__name__] = c
        todo.extend(c.__subclasses__())
    if name in errors and text:
        return errors[name](text)
    return RunError(
        f"Training process {rank} failed ({msg or f'exit code {failure.exitcode}'}). "
        f"Every worker's stdout/stderr is kept in {log_dir}."
    )


# ----------------------------------------------------------------------------- torchrun entry point


def prepare_data_once(cfg: Config) -> Data:
    """prepare_data on every rank, tokenizing once per machine: local rank 0 first, then the others
    read the datasets cache (one cache per machine; with a shared HF_DATASETS_CACHE, rank 0 first)."""
    dist = dist_info()
    turn = 0 if dist.rank == 0 else 1 if dist.local_rank == 0 else 2
    data = None
    for t in range(3):
        if t == turn:
            data = prepare_data(cfg)
        torch.distributed.barrier()
    return data


def _setup_run(a: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Config, Path]:
    """Rank 0: the run's Config and folder, new (params.yaml written) or an existing run's."""
    from hybridlib.config import load_config
    from hybridlib.pipeline import prepare_run

    params = Path(a.params)
    given = load_config(params, overrides)
    if given.run_dir and (Path(given.run_dir) / "params.yaml").is_file():  # e.g. outputs/RUN/params.yaml
        run_dir = Path(given.run_dir).resolve()
        cfg = given
        cfg.run_dir = str(run_dir)
    else:
        cfg, run_dir = prepare_run(params, overrides, a.run_name, a.outputs)
    check_run_dir(run_dir, cfg.resume)
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    from hybridlib.cli import _add_p, _overrides

    p = argparse.ArgumentParser(
        prog="python -m hybridlib.distributed",
        description="Train under torchrun (one process per GPU, any number of machines). Without torchrun: "
        "train on num_processes processes of this machine. Evaluate afterwards with `hybridlib run --resume RUN`.",
    )
    p.add_argument("params", help="Params YAML: a template (params/ag_news.yaml) or a run's own outputs/RUN/params.yaml.")
    p.add_argument("--run-name", help="Name of the new run folder (default: <dataset>-<timestamp>).")
    p.add_argument("--outputs", help="Folder for runs (default: $HYBRIDLIB_OUTPUTS or ./outputs).")
    _add_p(p)
    a = p.parse_args(argv)
    overrides = _overrides(a.parameter)
    try:
        if "RANK" not in os.environ:  # plain `python -m`: this machine, cfg.num_processes processes
            cfg, run_dir = _setup_run(a, overrides)
            result = fit(cfg, run_dir)
        else:
            result, run_dir = _torchrun_main(a, overrides)
    except HybridlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"Training finished: {run_dir} (best val_accuracy {result.best_val_accuracy:.4f} at epoch "
              f"{result.best_epoch}). Evaluate and plot it with: hybridlib run --resume {run_dir}")
    return 0


def _torchrun_main(a: argparse.Namespace, overrides: dict[str, Any]) -> tuple[TrainResult | None, Path]:
    from hybridlib.config import load_config

    device = load_config(a.params, overrides).device
    with process_group(device) as dist:
        box: list[Any] = [None]
        if dist.is_main:
            try:
                cfg, run_dir = _setup_run(a, overrides)
                box[0] = (cfg, str(run_dir))
            except HybridlibError as e:
                box[0] = e
        torch.distributed.broadcast_object_list(box, src=0)  # every rank: the same config and folder
        if isinstance(box[0], Exception):
            raise box[0]
        cfg, run_dir = box[0]
        check_world(cfg, dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
        data = prepare_data_once(cfg)
        result = train(cfg, run_dir, data, progress=dist.is_main)
    return (result if dist.is_main else None), Path(run_dir)


if __name__ == "__main__":
    sys.exit(main())
