"""Runs end to end: create the run folder, then execute the numbered notebooks into it with papermill (``run``,
``resume``), holding the run's lock; Ctrl-C stops the kernel and says how to resume. Or train only (``train_only``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import papermill as pm
import torch
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError
from papermill.iorw import LocalHandler, papermill_io

from hybridlib.config import Config
from hybridlib.data import Data, preflight, prepare_data
from hybridlib.distributed import check_world, process_group
from hybridlib.errors import HybridlibError, RunError, error_classes
from hybridlib.files import (
    LAST_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    disk_full_advice,
    format_bytes,
    free_bytes,
    reports_disk_full,
    write_text,
)
from hybridlib.locations import project_root
from hybridlib.runlock import child_env, run_lock
from hybridlib.runs import (
    check_new_run_dir,
    check_run_dir,
    create_run_dir,
    default_run_name,
    outputs_root,
    read_history,
)
from hybridlib.runtime import PROGRESS_ENV, dist_info
from hybridlib.training import TrainResult, fit, train

NOTEBOOKS = [
    "01_data_exploration.ipynb",
    "02_training.ipynb",
    "03_evaluation.ipynb",
    "04_visualization.ipynb",
    "05_prediction.ipynb",
]
TRAINING = NOTEBOOKS[1]


def prepare_run(cfg: Config, run_name: str | None = None, outputs: str | Path | None = None) -> tuple[Config, Path]:
    """Check that the data and tokenizer of ``cfg`` (from :func:`hybridlib.config.load_config`) can be found,
    create the run folder and write its resolved params.yaml (nothing else)."""
    if cfg.resume:
        raise RunError("resume is for a run that exists: `hybridlib run --resume outputs/RUN` (no params file).")
    if run_name is not None and (Path(run_name).name != run_name or run_name in (".", "..")):
        raise RunError(f"--run-name {run_name!r} is a path; give a folder name (runs go under --outputs DIR).")
    root = Path(outputs) if outputs else outputs_root()
    run_dir = (Path(cfg.run_dir) if cfg.run_dir else root / (run_name or default_run_name(cfg, root))).resolve()
    check_new_run_dir(run_dir)  # a taken name: said at once, before the slower checks
    preflight(cfg)  # a missing dataset/tokenizer fails here, before a run folder exists
    run_dir = create_run_dir(run_dir)
    cfg.run_dir = str(run_dir)
    try:
        write_text(run_dir / PARAMS_FILE, cfg.to_yaml())
    except HybridlibError:
        shutil.rmtree(run_dir, ignore_errors=True)  # the folder made just now: an empty one would block a new try
        raise
    return cfg, run_dir


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where the run stands and how to continue it."""


def execute(run_dir: Path, notebooks_dir: Path | None = None, resume: bool = False, progress: bool = True) -> None:
    """Run each notebook with ``params_file=<run>/params.yaml`` (and 02_training with ``resume``, the only one
    that declares it), saving the executed copy in the run. With
    ``progress``, what the cells print (the epoch lines, text progress bars) is streamed to this terminal.
    Ctrl-C: the kernel is interrupted and shut down, then :class:`Interrupted` is raised."""
    sources = notebook_paths(notebooks_dir)
    _write_notebooks_atomically(run_dir)
    with _CtrlC() as ctrl_c, child_env({PROGRESS_ENV: "text"} if progress else {}):
        for i, (name, src) in enumerate(zip(NOTEBOOKS, sources), 1):
            print(f"[hybridlib] {i}/{len(NOTEBOOKS)} {name} -> {run_dir / name}", file=sys.stderr, flush=True)
            try:
                pm.execute_notebook(
                    str(src),
                    str(run_dir / name),
                    parameters={"params_file": str(run_dir / PARAMS_FILE), "run_dir": str(run_dir),
                                **({"resume": True} if resume and name == TRAINING else {})},
                    cwd=str(src.parent),
                    progress_bar=False,
                    stdout_file=sys.stdout if progress else None,
                    stderr_file=sys.stderr if progress else None,
                    kernel_name="python3",
                    kernel_manager_class=_KernelManager,
                    on_cell_execute=ctrl_c.before_cell,
                )
            except (Exception, KeyboardInterrupt) as e:
                if ctrl_c.pressed or isinstance(e, KeyboardInterrupt) or getattr(e, "ename", "") == "KeyboardInterrupt":
                    raise Interrupted(interrupted_message(run_dir, name)) from None
                if isinstance(e, PapermillExecutionError):
                    raise notebook_error(e, name, run_dir) from None
                if isinstance(e, DeadKernelError):
                    raise RunError(dead_kernel_message(run_dir, name, _KernelManager.latest)) from None
                raise
            finally:
                _KernelManager.latest = None


def notebook_paths(notebooks_dir: Path | None = None) -> list[Path]:
    """The numbered notebooks a run executes (from ``notebooks_dir``, default the project's); refuses missing ones."""
    nb_dir = Path(notebooks_dir or project_root() / "notebooks")
    missing = [name for name in NOTEBOOKS if not (nb_dir / name).is_file()]
    if missing:
        raise RunError(f"{nb_dir} lacks the notebooks {missing}; run from the project folder or pass --notebooks DIR.")
    return [nb_dir / name for name in NOTEBOOKS]


def notebook_error(e: PapermillExecutionError, name: str, run_dir: Path) -> RunError:
    """The RunError for a notebook that stopped with an exception (a hybridlib error: its own message)."""
    kind = e.ename
    if kind in error_classes():
        fresh = "" if (run_dir / LAST_FILE).exists() else (
            f" Nothing was trained in {run_dir} yet: fix the cause and start the run again (remove that folder "
            f"to use its name again).")
        return RunError(f"{name} stopped: {e.evalue} (executed notebook: {run_dir / name}).{fresh}")
    if reports_disk_full(kind, e.evalue):
        return RunError(
            f"{name} stopped: the disk holding {run_dir} is full ({e.evalue}); {format_bytes(free_bytes(run_dir))} "
            f"is free now. {disk_full_advice(run_dir)}")
    return RunError(
        f"{name} failed with {kind}: {e.evalue}. The executed notebook with the full traceback is "
        f"{run_dir / name}; fix the cause and continue with `hybridlib run --resume {run_dir}`."
    )


def where_it_stands(run_dir: Path) -> str:
    """Where a stopped run stands (its last finished epoch) and the command that continues it."""
    history = read_history(run_dir) if (run_dir / LAST_FILE).is_file() else []
    if history:
        stands = f"has finished epoch {int(history[-1]['epoch'])} (saved in {LAST_FILE}); resume with"
    else:
        stands = "has no finished epoch yet; start its training again with"
    return f"{run_dir} {stands}: hybridlib run --resume {run_dir}"


def interrupted_message(run_dir: Path, name: str) -> str:
    return f"Interrupted in {name}: {where_it_stands(run_dir)}"


def dead_kernel_message(run_dir: Path, name: str, km: _KernelManager | None) -> str:
    """What a user needs when a notebook's kernel died: the likely cause, what uses memory, how to continue."""
    code = km.popen.poll() if km is not None and km.popen is not None else None
    cause = {-signal.SIGKILL: "it was killed (SIGKILL): on Linux almost always by the out-of-memory killer "
                              "(`dmesg` or `journalctl -k` says 'Out of memory: Killed process')",
             -signal.SIGSEGV: "it crashed (segmentation fault) in a native library"}.get(
        code, f"it exited with code {code}" if code is not None else "the system most likely ran out of memory")
    return (f"The kernel running {name} died: {cause}. Memory grows with batch_size and max_length (training), "
            f"eval_batch_size (validation, test, prediction) and the number of training texts (PPMI vectors, the "
            f"baseline): lower eval_batch_size in {run_dir / PARAMS_FILE} (it does not change results), or start a "
            f"new run with a smaller batch_size, max_length or max_train_samples. {where_it_stands(run_dir)}")


_KERNEL_IDS = itertools.count()


class _KernelManager(AsyncKernelManager):
    """papermill's kernel manager, remembered so that Ctrl-C can interrupt the kernel it started. The kernel
    talks to us over local IPC sockets (files in Jupyter's runtime folder) instead of unencrypted TCP ports."""

    latest: ClassVar[AsyncKernelManager | None] = None

    popen: Any = None  # the kernel's process, kept after it ends for its exit code

    def __init__(self, **kwargs: Any) -> None:
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the sockets' path prefix: absolute (the kernel runs in notebooks/) and unique (runs side by side)
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", str(runtime / f"hybridlib-{os.getpid()}-{next(_KERNEL_IDS)}"))
        super().__init__(**kwargs)
        _KernelManager.latest = self

    async def start_kernel(self, **kwargs: Any) -> None:
        await super().start_kernel(**kwargs)
        self.popen = getattr(self.provisioner, "process", None)

    async def _async_interrupt_kernel(self) -> None:
        """jupyter_client interrupts every kernel it shuts down; ours are idle then (Ctrl-C interrupts them through
        :class:`_CtrlC`), and the signal only makes an idle kernel log "KeyboardInterrupt caught in kernel"."""
        if not self.shutting_down:
            await super()._async_interrupt_kernel()


class _CtrlC:
    """SIGINT while the notebooks run. The first Ctrl-C interrupts the kernel (in a session of its own, the terminal's
    Ctrl-C does not reach it), so its cell stops cleanly; between cells, without a kernel or at a second Ctrl-C:
    KeyboardInterrupt here (nbclient then shuts the kernel down)."""

    def __init__(self) -> None:
        self.pressed = 0
        self.saved: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.saved = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            signal.signal(signal.SIGINT, self.saved)

    def handle(self, signum: int, frame: Any) -> None:
        self.pressed += 1
        km = _KernelManager.latest
        pid = getattr(km.provisioner, "pid", None) if km is not None and km.has_kernel else None
        if self.pressed > 1 or pid is None:
            raise KeyboardInterrupt
        try:
            os.killpg(pid, signal.SIGINT)  # the kernel leads its own process group (with any DDP workers)
        except OSError:
            raise KeyboardInterrupt from None

    def before_cell(self, **_: Any) -> None:
        """nbclient's on_cell_execute hook: no cell starts after a Ctrl-C."""
        if self.pressed:
            raise KeyboardInterrupt


class _NotebookWriter(LocalHandler):
    """papermill's local file handler, writing the executed notebooks atomically: a full disk raises the RunError
    of :func:`hybridlib.files.atomic_write` and leaves the previous copy intact."""

    def write(self, buf: str, path: str) -> None:
        write_text(path, buf)


_ATOMIC_PREFIXES: set[str] = set()


def _write_notebooks_atomically(run_dir: Path) -> None:
    """Make papermill write notebooks under ``run_dir`` with :class:`_NotebookWriter` (its handlers match by prefix)."""
    prefix = f"{run_dir}{os.sep}"
    if prefix not in _ATOMIC_PREFIXES:
        papermill_io.register(prefix, _NotebookWriter())
        _ATOMIC_PREFIXES.add(prefix)


def run(cfg: Config, run_name: str | None = None, outputs: str | Path | None = None, notebooks_dir: Path | None = None,
        progress: bool = True) -> Path:
    """Create ``outputs/<run_name>/`` for ``cfg`` and execute the notebooks into it."""
    notebook_paths(notebooks_dir)  # before the run folder exists
    cfg, run_dir = prepare_run(cfg, run_name, outputs)
    with run_lock(run_dir):
        execute(run_dir, notebooks_dir=notebooks_dir, progress=progress)
    return run_dir


def resume(run_dir: str | Path, notebooks_dir=None, progress=True) -> Path:
    """Continue an interrupted run from its last.pt and re-execute its notebooks."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / PARAMS_FILE).is_file():
        what = "is not a hybridlib run (no params.yaml)" if run_dir.is_dir() else "does not exist"
        raise RunError(f"{run_dir} {what}; pass a run folder under outputs/.")
    with run_lock(run_dir):  # before looking at its files: another process may be writing them
        resuming = (run_dir / LAST_FILE).is_file()
        if not resuming and (run_dir / MODEL_FILE).is_file():
            raise RunError(f"{run_dir} has a {MODEL_FILE} but no {LAST_FILE}; it cannot be resumed.")
        execute(run_dir, notebooks_dir=notebooks_dir, resume=resuming, progress=progress)
    return run_dir


def train_only(cfg: Config, run_name: str | None = None, outputs: str | Path | None = None
               ) -> tuple[TrainResult | None, Path]:
    """Train (no notebooks) a new run, or the run whose params.yaml is given; under torchrun (RANK set) as one
    rank of the job, else on ``num_processes`` processes of this machine. Returns (rank 0's result, run folder)."""
    if "RANK" not in os.environ:
        cfg, run_dir = _train_setup(cfg, run_name, outputs)
        return fit(cfg, run_dir), run_dir
    with process_group(cfg.device) as dist:
        box: list[Any] = [None]
        if dist.is_main:
            try:
                box[0] = _train_setup(cfg, run_name, outputs)
            except HybridlibError as e:
                box[0] = e
        torch.distributed.broadcast_object_list(box, src=0)  # every rank: the same config and folder
        if isinstance(box[0], Exception):
            raise box[0]
        cfg, run_dir = box[0]
        check_world(cfg, dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
        result = train(cfg, run_dir, prepare_data_once(cfg), progress=dist.is_main)
    return (result if dist.is_main else None), Path(run_dir)


def _train_setup(given: Config, run_name: str | None, outputs: str | Path | None) -> tuple[Config, Path]:
    """Rank 0: the run's Config and folder, new (params.yaml written) or an existing run's."""
    if given.run_dir and (Path(given.run_dir) / PARAMS_FILE).is_file():  # e.g. outputs/RUN/params.yaml
        given.run_dir = str(Path(given.run_dir).resolve())
        cfg, run_dir = given, Path(given.run_dir)
    else:
        cfg, run_dir = prepare_run(given, run_name, outputs)
    check_run_dir(run_dir, cfg.resume)
    return cfg, run_dir


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
