"""The training loop: AdamW, warm-up + decay schedule, gradient clipping, optional adversarial training,
early stopping on validation accuracy, atomic checkpoints each epoch, and resume.

One code path for 1 and N processes: under torch.distributed the model is wrapped in DDP, each rank
reads a disjoint shard of every epoch's batches, metrics are summed over ranks, and only rank 0 writes
files. :func:`fit` starts N processes on this machine (or just calls :func:`train` for one).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from hybridlib.artifacts import (
    LAST_FILE,
    LOG_FILE,
    MODEL_FILE,
    TOKENIZER_DIR,
    TRAIN_INFO_FILE,
    check_free_space,
    check_run_dir,
    checkpoint_size,
    disk_full_errors,
    load_checkpoint,
    model_checkpoint,
    remove_stale_temp_files,
    run_lock,
    save_checkpoint,
    write_history,
    write_json,
)
from hybridlib.batching import make_loader, predict_logits
from hybridlib.config import Config
from hybridlib.data import Data, prepare_data
from hybridlib.distributed import check_world, launch, process_group
from hybridlib.embeddings import initialise_embedding
from hybridlib.errors import RunError
from hybridlib.model import HybridClassifier, build_model, count_parameters
from hybridlib.runtime import (
    Dist,
    all_reduce_sum,
    autocast,
    configure_cuda,
    dist_info,
    get_rng_state,
    peak_rss_mb,
    resolve_device,
    resolve_precision,
    set_rng_state,
    set_seed,
)
from hybridlib.threads import CPUThreads


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    train_seconds: float
    num_parameters: int
    stopped_early: bool


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


def train(cfg: Config, run_dir: str | Path, data: Data | None = None, progress: bool = True) -> TrainResult:
    """Train on ``data`` (prepared from ``cfg`` if not given); write model.pt, last.pt and the log to ``run_dir``.
    Rank 0 holds the run's lock meanwhile: another process that would write the run is refused."""
    dist = dist_info()
    with run_lock(run_dir) if dist.is_main else nullcontext():
        return _train(cfg, Path(run_dir), data, progress, dist)


def _train(cfg: Config, run_dir: Path, data: Data | None, progress: bool, dist: Dist) -> TrainResult:
    if dist.is_main:
        check_run_dir(run_dir, cfg.resume)
        run_dir.mkdir(parents=True, exist_ok=True)
    device = training_device(cfg, dist)
    threads = CPUThreads(cfg.num_threads, device)
    amp_dtype = resolve_precision(cfg.precision, device)
    data = data or prepare_data(cfg)
    if dist.is_main:  # the run keeps its tokenizer, so it can predict offline later
        with disk_full_errors(run_dir / TOKENIZER_DIR):
            data.tokenizer.save_pretrained(str(run_dir / TOKENIZER_DIR))

    model = init_model(cfg, data, device, pretrained=not cfg.resume)  # resuming: weights come from last.pt
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None) if dist.enabled else model
    steps_per_epoch = len(make_loader(data.splits["train"], cfg, data.pad_id, device, epoch=0, dist=dist))
    optimizer, scheduler, scaler = make_optimization(model, cfg, steps_per_epoch * cfg.epochs, amp_dtype)
    averaged = AveragedModel(model) if cfg.swa_start else None
    if cfg.resume:
        state = resume_state(run_dir, model, optimizer, scheduler, scaler, device, dist, averaged)
    else:
        state = TrainState()
        set_seed(cfg.seed + dist.rank)

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.stopped_early(cfg.patience):
            break
        t0 = time.perf_counter()
        loader = make_loader(data.splits["train"], cfg, data.pad_id, device, epoch=epoch, dist=dist)
        bar = tqdm(loader, desc=f"Epoch {epoch}/{cfg.epochs}", disable=not (progress and dist.is_main), leave=False)
        train_loss, train_acc = train_epoch(net, model, bar, optimizer, scheduler, scaler, cfg, device, amp_dtype,
                                            threads, state, run_dir)
        kept = weights_to_keep(model, averaged, epoch, cfg)
        val_loss, val_acc = validate(kept, data.splits["validation"], cfg, data.pad_id, device, amp_dtype, threads)
        if not math.isfinite(val_loss):  # never let non-finite weights become model.pt / last.pt
            raise RunError(diverged_message(f"the validation loss became {val_loss}", epoch, "end", run_dir, state, cfg))
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        improved = state.record(row)
        rng = gather_rng_states()  # every rank takes part
        if dist.is_main:
            save_epoch(run_dir, model, kept, averaged, cfg, data, state, improved, optimizer, scheduler, scaler, rng)
            if progress:
                print(epoch_line(row, improved))

    if dist.is_main:
        write_train_info(run_dir, device, amp_dtype, threads, dist)
    return TrainResult(history=state.history, best_epoch=state.best_epoch, best_val_accuracy=state.best_metric,
                       train_seconds=sum(r["seconds"] for r in state.history),
                       num_parameters=count_parameters(model), stopped_early=state.stopped_early(cfg.patience))


# ----------------------------------------------------------------------------- set-up


def training_device(cfg: Config, dist: Dist) -> torch.device:
    """The device of ``cfg``; under torch.distributed on CUDA, this rank's GPU. On CUDA, TF32 and cuDNN's algorithm
    search are turned on (:func:`hybridlib.runtime.configure_cuda`)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        configure_cuda(benchmark=True)
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
    return device


def init_model(cfg: Config, data: Data, device: torch.device, pretrained: bool = True) -> HybridClassifier:
    """The model of ``cfg``, with the same initial weights on every rank; ``pretrained``: initialise the
    embedding as ``pretrained_embeddings`` says (skipped when the weights will come from a checkpoint)."""
    set_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size, len(data.label_names), data.pad_id)
    if pretrained and cfg.pretrained_embeddings:
        initialise_embedding(model.embedding, cfg.pretrained_embeddings, data.splits["train"]["input_ids"],
                             skip=data.tokenizer.all_special_ids, seed=cfg.seed,
                             svd_device=device if device.type == "cuda" else None)  # the CPU keeps scikit-learn's
    model.embedding.weight.requires_grad_(not cfg.freeze_embeddings)
    return model.to(device)


def weights_to_keep(model: HybridClassifier, averaged: AveragedModel | None, epoch: int,
                    cfg: Config) -> HybridClassifier:
    """The model this epoch validates and may keep: ``model``, or from ``cfg.swa_start`` on the running average of
    its weights at the end of each epoch since then (``averaged`` is updated here)."""
    if averaged is None or epoch < cfg.swa_start:
        return model
    averaged.update_parameters(model)
    return averaged.module


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then linear/cosine decay or constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return f


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over all the model's parameters (fused: one kernel for all tensors). A frozen embedding never gets a
    gradient, so AdamW leaves it alone; it stays in the list so that last.pt holds the same parameter group with
    and without freeze_embeddings, as the last.pt files of hybridlib 0.1.0 do (they resume)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_optimization(model: torch.nn.Module, cfg: Config, total_steps: int, amp_dtype):
    """(optimizer, lr scheduler, fp16 gradient scaler) for ``total_steps`` steps."""
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_schedule, total_steps, int(cfg.warmup_ratio * total_steps)))
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


# ----------------------------------------------------------------------------- one epoch


def step_losses(net, ids, mask, y, cfg: Config, device, amp_dtype, host_lengths=None):
    """(joint-head loss, loss to optimise, logits) of one forward pass; the second adds ``branch_aux_loss``.
    ``host_lengths``: the texts' lengths on the CPU (CUDA: spares the packed LSTM a wait for the GPU)."""
    extra = {} if host_lengths is None else {"host_lengths": host_lengths}
    with autocast(device, amp_dtype):
        logits, aux = net(ids, mask, with_aux=True, **extra)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    total = loss
    if aux:  # branch_aux_loss: each branch's own classifier learns too
        aux_loss = sum(F.cross_entropy(a.float(), y, label_smoothing=cfg.label_smoothing) for a in aux.values())
        total = loss + cfg.branch_aux_loss * aux_loss / len(aux)
    return loss, total, logits


@contextmanager
def embedding_tap(embedding: torch.nn.Module, add: torch.Tensor | None = None):
    """Within the block, the embedding's output keeps its gradient (``tap.output.grad`` after backward), or,
    with ``add``, has ``add`` added to it (adversarial training)."""
    tap = SimpleNamespace(output=None)

    def hook(module, inputs, out):
        if add is not None:
            return out + add
        if not out.requires_grad:  # freeze_embeddings: still need the gradient with respect to the vectors
            out = out.detach().requires_grad_()
        out.retain_grad()
        tap.output = out
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield tap
    finally:
        handle.remove()


def adversarial_perturbation(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """eps * g / ||g|| per text (over its tokens and dimensions): the worst-case direction to first order."""
    g = grad.float()
    g = g / g.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)  # as Miyato et al., against underflow
    return (eps * g / g.norm(dim=(1, 2), keepdim=True).clamp_min(1e-12)).to(grad.dtype).detach()


def train_step(net, model, batch, optimizer, scheduler, scaler, cfg: Config, device, amp_dtype):
    """One optimisation step on ``batch`` (``hybridlib.bench`` times this too).

    ``net`` is ``model`` or its DDP wrapper. Returns (joint-head loss, logits, labels). On CPU, when the loss is not
    finite nothing is updated and the caller decides what to do. On CUDA that check would wait for the GPU at every
    step, so the step goes on (the weights may become non-finite) and :func:`train_epoch`'s check, every
    ``SYNC_EVERY`` steps, stops the run before anything is saved.
    """
    cuda = device.type == "cuda"
    host_lengths = batch["attention_mask"].sum(dim=1) if cuda else None
    ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    y = batch["labels"].to(device, non_blocking=True)
    adversarial = cfg.adversarial_eps > 0
    with embedding_tap(model.embedding) if adversarial else nullcontext() as tap:
        loss, total, logits = step_losses(net, ids, mask, y, cfg, device, amp_dtype, host_lengths)
    if not cuda and not torch.isfinite(total):
        return total, logits, y
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if adversarial:  # a second pass on the perturbed embeddings; its gradients add to the first's
        r = adversarial_perturbation(tap.output.grad, cfg.adversarial_eps)
        with embedding_tap(model.embedding, add=r):
            _, adv_total, _ = step_losses(net, ids, mask, y, cfg, device, amp_dtype, host_lengths)
        scaler.scale(adv_total).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss, logits, y


SYNC_EVERY = 20  # CUDA: steps between reads of the running loss and accuracy (and of the non-finite check)


class RunningSums:
    """An epoch's loss and accuracy sums. Each step's values stay on the device until :meth:`read`, which reads all
    pending ones at once (on CUDA a read waits for the GPU) and adds them up on the host in step order, so the sums
    are exactly those of reading after every step."""

    def __init__(self) -> None:
        self.sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, int, int]] = []  # (step, loss, correct, n, weight)

    def add(self, step: int, loss: torch.Tensor, correct: torch.Tensor, n: int, summed: bool = False) -> None:
        """One step's mean ``loss`` (``summed``: the batch's summed loss), correct predictions and batch size."""
        self._pending.append((step, loss.detach(), correct, n, 1 if summed else n))

    def read(self) -> tuple[int, float] | None:
        """Add the pending steps' values; (step, loss) of the first non-finite loss among them, else None."""
        if not self._pending:
            return None
        losses = torch.stack([p[1].to(torch.float64) for p in self._pending])
        corrects = torch.stack([p[2].to(torch.float64) for p in self._pending])
        values = torch.stack([losses, corrects]).tolist()  # one read of the device
        bad = None
        for (step, _, _, n, weight), loss, correct in zip(self._pending, *values):
            if bad is None and not math.isfinite(loss):
                bad = (step, loss)
            self.sums[0] += loss * weight  # exact for weight 1
            self.sums[1] += correct
            self.sums[2] += n
        self._pending.clear()
        return bad


def train_epoch(net, model, batches, optimizer, scheduler, scaler, cfg: Config, device, amp_dtype,
                threads: CPUThreads, state: TrainState, run_dir: Path) -> tuple[float, float]:
    """One pass over ``batches`` (a tqdm bar over the loader); (mean loss, accuracy) over all ranks.

    The loss and accuracy are read after every step on CPU, every ``SYNC_EVERY`` steps on CUDA (a read waits for
    the GPU); a non-finite loss stops the run at that read, naming the step it came from."""
    net.train()
    every = SYNC_EVERY if device.type == "cuda" else 1
    running = RunningSums()
    for step, batch in enumerate(batches, 1):
        threads.update()
        loss, logits, y = train_step(net, model, batch, optimizer, scheduler, scaler, cfg, device, amp_dtype)
        running.add(step, loss, (logits.argmax(1) == y).sum(), y.numel())
        if step % every == 0:
            check_finite(running.read(), state, run_dir, cfg)
        sums = running.sums
        if step % 20 == 0 and hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}")
    check_finite(running.read(), state, run_dir, cfg)
    loss_sum, correct, n = all_reduce_sum(running.sums, device)
    return loss_sum / n, correct / n


def check_finite(bad: tuple[int, float] | None, state: TrainState, run_dir: Path, cfg: Config) -> None:
    if bad is not None:
        raise RunError(diverged_message(f"the loss became {bad[1]}", state.epoch + 1, bad[0], run_dir, state, cfg))


@torch.no_grad()
def validate(model, ds, cfg: Config, pad_id: int, device, amp_dtype, threads: CPUThreads | None = None) -> tuple[float, float]:
    """Validation loss and accuracy, summed over this rank's shard and all-reduced (read from the device once)."""
    running = RunningSums()
    loader = make_loader(ds, cfg, pad_id, device, dist=dist_info())
    for i, (logits, batch) in enumerate(predict_logits(model, loader, device, amp_dtype, threads)):
        y = batch["labels"].to(device, non_blocking=True)
        running.add(i, F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(), y.numel(),
                    summed=True)
    running.read()  # a non-finite validation loss is the caller's to judge
    loss_sum, correct, n = all_reduce_sum(running.sums, device)
    return loss_sum / n, correct / n


# ----------------------------------------------------------------------------- checkpoints, resume, logging


def save_epoch(run_dir: Path, model, kept, averaged: AveragedModel | None, cfg: Config, data: Data,
               state: TrainState, improved: bool, optimizer, scheduler, scaler, rng) -> None:
    """model.pt (``kept``'s weights, when ``improved``), last.pt (``model``'s, and the weight average's) and
    training_log.csv after an epoch (rank 0). Without the space for all three nothing is written: a full disk
    leaves the previous epoch's files, from which the run resumes."""
    best = model_checkpoint(kept, cfg, data, state.epoch, state.best_metric)
    raw = best if kept is model else model_checkpoint(model, cfg, data, state.epoch, state.best_metric)
    last = dict(raw, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rng, history=state.history,
                best_epoch=state.best_epoch, bad_epochs=state.bad_epochs)
    if averaged is not None:
        last["averaged"] = {k: v.detach().cpu() for k, v in averaged.state_dict().items()}
    names = [MODEL_FILE, LAST_FILE, LOG_FILE] if improved else [LAST_FILE, LOG_FILE]
    check_free_space([run_dir / n for n in names], checkpoint_size(last) + (checkpoint_size(best) if improved else 0))
    if improved:
        save_checkpoint(best, run_dir / MODEL_FILE)
    save_checkpoint(last, run_dir / LAST_FILE)
    write_history(state.history, run_dir)


def resume_state(run_dir: Path, model, optimizer, scheduler, scaler, device, dist: Dist,
                 averaged: AveragedModel | None = None) -> TrainState:
    """Load last.pt into the model, weight average, optimizer, scheduler, scaler and RNGs; the loop's state as it
    was saved."""
    saved = load_checkpoint(run_dir / LAST_FILE, map_location=device)
    model.load_state_dict(saved["model"])
    if averaged is not None and saved.get("averaged"):  # absent in last.pt files of runs without swa_start
        averaged.load_state_dict(saved["averaged"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):  # fp16 loss scale (absent in older last.pt files)
        scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]  # a list (one per rank) when saved by N processes; resumable with any N
    set_rng_state(rng[dist.rank % len(rng)] if isinstance(rng, list) else rng)
    state = TrainState(history=saved["history"], best_metric=saved["best_metric"], best_epoch=saved["best_epoch"],
                       bad_epochs=saved["bad_epochs"], epoch=saved["epoch"])
    if dist.is_main:
        remove_stale_temp_files(run_dir)  # left by a write that a kill interrupted
        write_history(state.history, run_dir)  # a kill may have come between last.pt and the log
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


def write_train_info(run_dir: Path, device, amp_dtype, threads: CPUThreads, dist: Dist) -> None:
    """How this training ran, for metrics.json (peak memory of the training process)."""
    write_json(run_dir / TRAIN_INFO_FILE, {
        "peak_rss_mb": peak_rss_mb(), "device": str(device), "precision": str(amp_dtype or "fp32"),
        "num_threads": threads.count, "num_processes": dist.world_size})


def epoch_line(row: dict[str, float], improved: bool) -> str:
    return (f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} train_acc {row['train_accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} ({row['seconds']:.1f}s)"
            + (" *" if improved else ""))


def diverged_message(what: str, epoch: int, step, run_dir: Path, state: TrainState, cfg: Config) -> str:
    kept = (f"The best checkpoint so far is kept ({run_dir / MODEL_FILE}, epoch {state.best_epoch})."
            if state.best_epoch else "No checkpoint was saved (it diverged before the first epoch ended).")
    return (f"Training diverged: {what} at epoch {epoch}, step {step}. {kept} "
            f"Start a new run with a lower lr (now {cfg.lr}), grad_clip > 0 (now {cfg.grad_clip}), or precision fp32, "
            f"or check the data.")


# ----------------------------------------------------------------------------- 1..N processes


def train_worker(cfg: Config, run_dir: str, data: Data, progress: bool = True) -> TrainResult | None:
    """One worker of :func:`fit`: join the process group and run the training loop (rank 0's result)."""
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach the launcher (and notebook) as they come
    with process_group(cfg.device) as dist:
        result = train(cfg, run_dir, data, progress=progress and dist.is_main)
    return result if dist.is_main else None


def fit(cfg: Config, run_dir: str | Path, data: Data | None = None, progress: bool = True) -> TrainResult:
    """Train like :func:`train`, on ``cfg.num_processes`` processes of this machine.

    One process: ``train`` runs here. Several: ``data`` (prepared here if not given, so tokenization
    happens once) is handed to ``num_processes`` workers started by torch.distributed's elastic
    launcher, one per GPU on CUDA (NCCL) or CPU processes (gloo). Rank 0 writes the same artifacts
    as a single-process run and its result is returned; rank 0's epoch lines are echoed here.
    """
    n = cfg.num_processes
    if n == 1 or dist_info().enabled:  # already inside a process group (torchrun): just train
        return train(cfg, run_dir, data, progress)
    check_world(cfg, n)
    with run_lock(run_dir):  # held here for the workers (they inherit its token)
        check_run_dir(Path(run_dir), cfg.resume)  # fail here, not in rank 0 of n
        data = data if data is not None else prepare_data(cfg)
        return launch(train_worker, (cfg, str(run_dir), data, progress), n, echo=progress)[0]
