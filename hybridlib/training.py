"""The training loop (AdamW, warm-up + decay, gradient clipping, adversarial training, weight averaging, early
stopping, a checkpoint per epoch, resume), one code path for 1 and N processes: docs/architecture.md, "Training".
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from hybridlib.batching import make_loader, predict_logits
from hybridlib.config import Config
from hybridlib.data import Data, prepare_data
from hybridlib.distributed import check_world, launch, process_group
from hybridlib.embeddings import initialise_embedding
from hybridlib.errors import RunError
from hybridlib.files import MODEL_FILE, TOKENIZER_DIR, TRAIN_INFO_FILE, disk_full_errors
from hybridlib.model import HybridClassifier, build_model, count_parameters
from hybridlib.runlock import run_lock
from hybridlib.runs import check_run_dir
from hybridlib.runtime import (
    Dist,
    all_reduce_sum,
    autocast,
    configure_cuda,
    dist_info,
    progress_bar,
    resolve_device,
    resolve_precision,
    set_seed,
)
from hybridlib.threads import CPUThreads
from hybridlib.trainstate import Loop, gather_rng_states, resume_state, save_epoch, write_train_info


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    train_seconds: float
    num_parameters: int
    stopped_early: bool


def train(cfg: Config, run_dir: str | Path, data: Data | None = None, progress: bool = True) -> TrainResult:
    """Train on ``data`` (prepared from ``cfg`` if not given); write model.pt, last.pt and the log to ``run_dir``.
    Rank 0 holds the run's lock meanwhile: another process that would write the run is refused."""
    dist = dist_info()
    with run_lock(run_dir) if dist.is_main else nullcontext():
        return _train(cfg, Path(run_dir), data, progress, dist)


def _train(cfg: Config, run_dir: Path, data: Data | None, progress: bool, dist: Dist) -> TrainResult:
    loop, data = start(cfg, run_dir, data, dist)
    state = loop.state
    resumed_at = state.epoch
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.stopped_early(cfg.patience):
            break
        t0 = time.perf_counter()
        loader = make_loader(data.splits["train"], cfg, data.pad_id, loop.device, epoch=epoch, dist=dist)
        bar = progress_bar(loader, f"Epoch {epoch}/{cfg.epochs}", disable=not (progress and dist.is_main))
        train_loss, train_acc = train_epoch(loop, bar)
        kept = weights_to_keep(loop, epoch)
        val_loss, val_acc = validate(kept, data.splits["validation"], cfg, data.pad_id, loop.threads)
        if not math.isfinite(val_loss):  # never let non-finite weights become model.pt / last.pt
            raise RunError(diverged_message(loop, f"the validation loss became {val_loss}", epoch, "end"))
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": loop.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        improved = state.record(row)
        rng = gather_rng_states()  # every rank takes part
        if dist.is_main:
            save_epoch(loop, kept, data, improved, rng)
            if progress:
                print(epoch_line(row, improved))

    if dist.is_main and (state.epoch > resumed_at or not (run_dir / TRAIN_INFO_FILE).is_file()):
        write_train_info(loop, dist)  # a resume that trained nothing keeps the record of the process that did
    return TrainResult(history=state.history, best_epoch=state.best_epoch, best_val_accuracy=state.best_metric,
                       train_seconds=sum(r["seconds"] for r in state.history),
                       num_parameters=count_parameters(loop.model), stopped_early=state.stopped_early(cfg.patience))


# ----------------------------------------------------------------------------- set-up


def start(cfg: Config, run_dir: Path, data: Data | None, dist: Dist) -> tuple[Loop, Data]:
    """The run folder, device, threads, data, model and optimisation of a new run, or of a resumed one as
    its last.pt left them; seeds set for the first epoch."""
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

    # resuming: weights come from last.pt; under DDP, from rank 0 (DDP broadcasts them), so ppmi runs once per run
    model = init_model(cfg, data, device, pretrained=not cfg.resume and dist.is_main)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None) if dist.enabled else model
    steps_per_epoch = len(make_loader(data.splits["train"], cfg, data.pad_id, device, epoch=0, dist=dist))
    optimizer, scheduler, scaler = make_optimization(model, cfg, steps_per_epoch * cfg.epochs, amp_dtype)
    loop = Loop(cfg, model, net, device, amp_dtype, threads, optimizer, scheduler, scaler, run_dir,
                averaged=AveragedModel(model) if cfg.swa_start else None)
    if cfg.resume:
        loop.state = resume_state(loop, dist)
    else:
        set_seed(cfg.seed + dist.rank)
    return loop, data


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
        batches = data.splits["train"].select_columns(["input_ids"]).with_format("numpy").iter(1000)  # not all at once
        initialise_embedding(model.embedding, cfg.pretrained_embeddings, (x for b in batches for x in b["input_ids"]),
                             skip=data.tokenizer.all_special_ids, seed=cfg.seed,
                             svd_device=device if device.type == "cuda" else None)  # the CPU keeps scikit-learn's
    return model.to(device)


def weights_to_keep(loop: Loop, epoch: int) -> HybridClassifier:
    """The model this epoch validates and may keep: ``loop.model``, or from ``cfg.swa_start`` on the running
    average of its weights at the end of each epoch since then (``loop.averaged`` is updated here)."""
    if loop.averaged is None or epoch < loop.cfg.swa_start:
        return loop.model
    loop.averaged.update_parameters(loop.model)
    return loop.averaged.module


def lr_lambda(total_steps: int, warmup_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then linear decay to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress)

    return f


def make_optimization(model: torch.nn.Module, cfg: Config, total_steps: int, amp_dtype):
    """(optimizer, lr scheduler, fp16 gradient scaler) for ``total_steps`` steps: AdamW over all the model's
    parameters in one group (fused: one kernel for all tensors)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


# ----------------------------------------------------------------------------- one epoch


def step_losses(loop: Loop, ids, mask, y, host_lengths=None):
    """(joint-head loss, loss to optimise, logits) of one forward pass; the second adds ``branch_aux_loss``.
    ``host_lengths``: the texts' lengths on the CPU (CUDA: spares the packed LSTM a wait for the GPU)."""
    with autocast(loop.device, loop.amp_dtype):
        logits, aux = loop.net(ids, mask, with_aux=True, host_lengths=host_lengths)
    loss = F.cross_entropy(logits.float(), y)
    total = loss
    if aux:  # branch_aux_loss: each branch's own classifier learns too
        aux_loss = sum(F.cross_entropy(a.float(), y) for a in aux.values())
        total = loss + loop.cfg.branch_aux_loss * aux_loss / len(aux)
    return loss, total, logits


@contextmanager
def embedding_tap(embedding: torch.nn.Module, add: torch.Tensor | None = None):
    """Within the block, the embedding's output keeps its gradient (``tap.output.grad`` after backward), or,
    with ``add``, has ``add`` added to it (adversarial training)."""
    tap = SimpleNamespace(output=None)

    def hook(module, inputs, out):
        if add is not None:
            return out + add
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


def train_step(loop: Loop, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step; (joint-head loss, logits, labels). A non-finite loss: on CPU nothing is updated; on
    CUDA (where the check would wait for the GPU) the step goes on and :func:`train_epoch`'s check stops the run."""
    cfg, device, scaler = loop.cfg, loop.device, loop.scaler
    cuda = device.type == "cuda"
    host_lengths = batch["attention_mask"].sum(dim=1) if cuda else None
    ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    y = batch["labels"].to(device, non_blocking=True)
    adversarial = cfg.adversarial_eps > 0
    with embedding_tap(loop.model.embedding) if adversarial else nullcontext() as tap:
        loss, total, logits = step_losses(loop, ids, mask, y, host_lengths)
    if not cuda and not torch.isfinite(total):
        return total, logits, y
    loop.optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if adversarial:  # a second pass on the perturbed embeddings; its gradients add to the first's
        r = adversarial_perturbation(tap.output.grad, cfg.adversarial_eps)
        with embedding_tap(loop.model.embedding, add=r):
            _, adv_total, _ = step_losses(loop, ids, mask, y, host_lengths)
        scaler.scale(adv_total).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip)
    scaler.step(loop.optimizer)
    scaler.update()
    loop.scheduler.step()
    return loss, logits, y


SYNC_EVERY = 20  # CUDA: steps between reads of the running loss and accuracy (and of the non-finite check)


class RunningSums:
    """An epoch's loss and accuracy sums: the steps' values stay on the device until :meth:`read` reads them at once
    and adds them up in step order (the same sums as reading after every step)."""

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


def train_epoch(loop: Loop, batches) -> tuple[float, float]:
    """One pass over ``batches``; (mean loss, accuracy) over all ranks. Read after every step on CPU, every
    ``SYNC_EVERY`` steps on CUDA (a read waits for the GPU); a non-finite loss stops the run, naming its step."""
    loop.net.train()
    every = SYNC_EVERY if loop.device.type == "cuda" else 1
    running = RunningSums()
    for step, batch in enumerate(batches, 1):
        loop.threads.update()
        loss, logits, y = train_step(loop, batch)
        running.add(step, loss, (logits.argmax(1) == y).sum(), y.numel())
        if step % every == 0:
            check_finite(loop, running.read())
        sums = running.sums
        if step % 20 == 0 and hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}", refresh=False)
    check_finite(loop, running.read())
    loss_sum, correct, n = all_reduce_sum(running.sums, loop.device)
    return loss_sum / n, correct / n


def check_finite(loop: Loop, bad: tuple[int, float] | None) -> None:
    if bad is not None:
        raise RunError(diverged_message(loop, f"the loss became {bad[1]}", loop.state.epoch + 1, bad[0]))


@torch.no_grad()
def validate(model, ds, cfg: Config, pad_id: int, threads: CPUThreads | None = None) -> tuple[float, float]:
    """Validation loss and accuracy on the model's device with ``cfg.precision``, summed over this rank's shard and
    all-reduced (read from the device once)."""
    device = next(model.parameters()).device
    amp_dtype = resolve_precision(cfg.precision, device)
    running = RunningSums()
    loader = make_loader(ds, cfg, pad_id, device, dist=dist_info())
    for i, (logits, batch) in enumerate(predict_logits(model, loader, device, amp_dtype, threads)):
        y = batch["labels"].to(device, non_blocking=True)
        running.add(i, F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(), y.numel(),
                    summed=True)
    running.read()  # a non-finite validation loss is the caller's to judge
    loss_sum, correct, n = all_reduce_sum(running.sums, device)
    return loss_sum / n, correct / n


def epoch_line(row: dict[str, float], improved: bool) -> str:
    return (f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} train_acc {row['train_accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} ({row['seconds']:.1f}s)"
            + (" *" if improved else ""))


def diverged_message(loop: Loop, what: str, epoch: int, step) -> str:
    state, cfg = loop.state, loop.cfg
    kept = (f"The best checkpoint so far is kept ({loop.run_dir / MODEL_FILE}, epoch {state.best_epoch})."
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
    """Train like :func:`train`, on ``cfg.num_processes`` processes of this machine (docs/distributed.md): ``data``
    is prepared here once for all workers; rank 0's result is returned and its epoch lines echoed."""
    n = cfg.num_processes
    if n == 1 or dist_info().enabled:  # already inside a process group (torchrun): just train
        return train(cfg, run_dir, data, progress)
    check_world(cfg, n)
    with run_lock(run_dir):  # held here for the workers (they inherit its token)
        check_run_dir(Path(run_dir), cfg.resume)  # fail here, not in rank 0 of n
        data = data if data is not None else prepare_data(cfg)
        return launch(train_worker, (cfg, str(run_dir), data, progress), n, echo=progress)[0]
