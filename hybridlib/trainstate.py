"""The training loop's state (:class:`Loop`, :class:`TrainState`) and the files it keeps in the run folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from hybridlib.checkpoints import (
    checkpoint_config,
    checkpoint_size,
    load_checkpoint,
    model_checkpoint,
    save_checkpoint,
)
from hybridlib.config import Config
from hybridlib.data import Data
from hybridlib.errors import CheckpointError, RunError
from hybridlib.files import (
    LAST_FILE,
    LOG_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    TRAIN_INFO_FILE,
    check_free_space,
    remove_stale_temp_files,
    write_json,
)
from hybridlib.model import HybridClassifier
from hybridlib.runs import write_history
from hybridlib.runtime import Dist, dist_info, get_rng_state, peak_rss_mb, precision_name, set_rng_state
from hybridlib.threads import CPUThreads


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch (and last.pt carries across a resume)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    epoch: int = 0  # the last finished epoch

    def record(self, row: dict[str, float]) -> bool:
        """Add an epoch's row; True if its validation accuracy is the best so far."""
        self.history.append(row)
        self.epoch = int(row["epoch"])
        improved = row["val_accuracy"] > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = row["val_accuracy"], self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def stopped_early(self, patience: int) -> bool:
        return patience > 0 and self.bad_epochs >= patience


@dataclass
class Loop:
    """Everything a training step and epoch work with. ``net`` is ``model`` or its DDP wrapper (forward passes
    go through it); ``averaged``: the weight average (``swa_start``); ``run_dir``: None outside a run (benchmarks/bench.py)."""

    cfg: Config
    model: HybridClassifier
    net: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    threads: CPUThreads | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    run_dir: Path | None = None
    averaged: AveragedModel | None = None
    state: TrainState = field(default_factory=TrainState)


def save_epoch(loop: Loop, kept: HybridClassifier, data: Data, improved: bool, rng: Any) -> None:
    """model.pt (``kept``, when ``improved``), last.pt (all a resume needs) and training_log.csv after an epoch.
    Without the space for all three nothing is written: the previous epoch's files stay, to resume from."""
    model, state, cfg = loop.model, loop.state, loop.cfg
    best = model_checkpoint(kept, cfg, data, state.epoch, state.best_metric)
    raw = best if kept is model else model_checkpoint(model, cfg, data, state.epoch, state.best_metric)
    last = dict(raw, optimizer=loop.optimizer.state_dict(),
                scheduler=loop.scheduler.state_dict(), scaler=loop.scaler.state_dict(), rng=rng, history=state.history,
                best_epoch=state.best_epoch, bad_epochs=state.bad_epochs)
    if loop.averaged is not None:
        last["averaged"] = {k: v.detach().cpu() for k, v in loop.averaged.state_dict().items()}
    names = [MODEL_FILE, LAST_FILE, LOG_FILE] if improved else [LAST_FILE, LOG_FILE]
    run_dir = loop.run_dir
    check_free_space([run_dir / n for n in names], checkpoint_size(last) + (checkpoint_size(best) if improved else 0))
    if improved:
        save_checkpoint(best, run_dir / MODEL_FILE)
    save_checkpoint(last, run_dir / LAST_FILE)
    write_history(state.history, run_dir)


def resume_state(loop: Loop, dist: Dist) -> TrainState:
    """Load the run's last.pt into the loop (model, weight average, optimizer, ...) and the RNGs; its TrainState."""
    try:
        saved = load_checkpoint(loop.run_dir / LAST_FILE, map_location=loop.device)
    except CheckpointError as e:
        raise CheckpointError(f"Cannot resume {loop.run_dir}: {e} A resume continues from {LAST_FILE} only; the run's other "
                       f"files are left as they are (its {MODEL_FILE}: the best epoch so far). Start a new run to "
                       f"train again.") from None
    was = checkpoint_config(saved)
    changed = [f"{k} {getattr(loop.cfg, k)!r} ({LAST_FILE}: {getattr(was, k)!r})"
               for k in loop.cfg.differs_from(was, "data", "model")]
    if changed:
        raise RunError(f"{loop.run_dir / PARAMS_FILE} no longer matches what {LAST_FILE} was trained with: "
                       f"{', '.join(changed)}. Put those values back to resume this run, or start a new run with them.")
    loop.model.load_state_dict(saved["model"])
    if loop.averaged is not None and saved.get("averaged"):  # absent in last.pt files of runs without swa_start
        loop.averaged.load_state_dict(saved["averaged"])
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):  # fp16 loss scale (absent in older last.pt files)
        loop.scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]  # a list (one per rank) when saved by N processes; resumable with any N
    set_rng_state(rng[dist.rank % len(rng)] if isinstance(rng, list) else rng)
    state = TrainState(history=saved["history"], best_metric=saved["best_metric"], best_epoch=saved["best_epoch"],
                       bad_epochs=saved["bad_epochs"], epoch=saved["epoch"])
    if dist.is_main:
        remove_stale_temp_files(loop.run_dir)  # left by a write that a kill interrupted
        write_history(state.history, loop.run_dir)  # a kill may have come between last.pt and the log
    return state


def gather_rng_states() -> Any:
    """This process's RNG states, or every rank's (a list) under torch.distributed."""
    state = get_rng_state()
    dist = dist_info()
    if not dist.enabled:
        return state
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, state)
    return out


def write_train_info(loop: Loop, dist: Dist) -> None:
    """How this training ran, for metrics.json (peak memory of the training process)."""
    write_json(loop.run_dir / TRAIN_INFO_FILE, {
        "peak_rss_mb": peak_rss_mb(), "device": str(loop.device), "precision": precision_name(loop.amp_dtype),
        "num_threads": loop.threads.count, "num_processes": dist.world_size})
