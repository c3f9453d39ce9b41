"""How fast are training, inference, prediction and tokenization for one params file? One process, one run.

    hybridlib bench params/imdb.yaml -p data_dir ../shared/data/imdb -p tokenizer ../shared/tokenizers/bert-base-uncased
    hybridlib bench params/imdb.yaml ... --json          # the same figures as one JSON object

What is measured (``run_benchmark`` returns it all as a dict, ``format_report`` prints it):

- **tokenization**: the whole train split tokenized into a fresh, temporary datasets cache (cold), then
  ``prepare_data`` called again (cached: it must reuse the tokenized files, which is checked);
- **training**: the project's path (``make_loader`` batches: length buckets, per-batch padding; autocast
  per ``resolve_precision``; ``training.make_optimizer`` and ``training.train_step``, the body of
  ``training.train``) against a naive reference on the same samples: the same model and initial
  weights, fp32, every batch padded to ``max_length``, no buckets, the "padded" LSTM path (two
  one-directional LSTMs) on every device. Steps of the two alternate, so a change in machine load hits
  both alike (on CUDA in blocks of ``training.SYNC_EVERY`` steps, read once each, as ``train_epoch`` reads
  the loss there); a few warm-up steps each are not timed. The report names the LSTM path and precision
  of each (``lstm_path``, ``lstm_precision``) and, on CUDA, cuDNN's version and the TF32 settings;
- **inference**: texts/s through ``evaluation.evaluate_split`` (the path of validation and test), and
  ``Predictor.predict`` latency for one text at a time (tokenization included), on the model trained
  above and saved to a temporary run folder;
- **memory**: peak resident memory of the process (and CUDA's peak allocation on a GPU).

Timings wait for the GPU (``torch.cuda.synchronize``) on CUDA. Nothing is written outside a
temporary folder.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from hybridlib.artifacts import MODEL_FILE, model_checkpoint, save_checkpoint
from hybridlib.batching import make_loader
from hybridlib.config import Config, load_config
from hybridlib.data import prepare_data, tokenize
from hybridlib.errors import DataError
from hybridlib.evaluation import evaluate_split
from hybridlib.prediction import Predictor
from hybridlib.rawdata import encode_labels, load_raw
from hybridlib.runtime import (
    CUDA_PAD_MULTIPLE,
    LSTM_AUTOCAST_ENV,
    LSTM_PATH_ENV,
    PrecisionPolicy,
    configure_cuda,
    cpu_supports_bf16,
    cuda_settings,
    lstm_autocast,
    lstm_path,
    peak_rss_mb,
    resolve_device,
    resolve_precision,
    set_seed,
)
from hybridlib.threads import CPUThreads, allowed_cpus, busy_neighbour, physical_cores
from hybridlib.tokens import load_tokenizer
from hybridlib.training import SYNC_EVERY, init_model, lr_lambda, make_optimizer, train_step

NAIVE = "naive"
PROJECT = "hybridlib"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, load, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_runtime"] = torch.version.cuda
        info.update(cuda_settings())
    return info


# ----------------------------------------------------------------------------- tokenization


def _cache_files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.arrow")}


def bench_tokenization(cfg: Config, tokenizer, cache_dir: Path | None, progress: bool = False):
    """(Data, figures): tokenize the train split cold into ``cache_dir`` (None: the usual cache, so only
    the cached figures are meaningful), then time a second, cached ``prepare_data``."""
    before = datasets.config.HF_DATASETS_CACHE
    if cache_dir is not None:
        datasets.config.HF_DATASETS_CACHE = Path(cache_dir)  # read by load_dataset at call time
    try:
        t0 = time.perf_counter()
        raw, _ = encode_labels(load_raw(cfg), cfg)
        load_s = time.perf_counter() - t0
        _say(progress, f"tokenizing the train split ({len(raw['train']):,} texts){' cold' if cache_dir else ''} ...")
        c0, t0 = time.process_time(), time.perf_counter()
        train = tokenize(datasets.DatasetDict({"train": raw["train"]}), tokenizer, cfg)["train"]
        tok_s, tok_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        prepare_data(cfg, tokenizer)  # tokenizes the test split; train comes from the files just written
        first_s = time.perf_counter() - t0
        files = _cache_files(Path(cache_dir)) if cache_dir is not None else set()
        t0 = time.perf_counter()
        data = prepare_data(cfg, tokenizer)  # as a second notebook of the same run does
        cached_s = time.perf_counter() - t0
        new_files = sorted(_cache_files(Path(cache_dir)) - files) if cache_dir is not None else []
    finally:
        datasets.config.HF_DATASETS_CACHE = before
    train_files = {f["filename"] for f in train.cache_files}
    reused = bool(train_files) and train_files <= {f["filename"] for f in data.splits["train"].cache_files}
    lengths = np.asarray(train["full_length"], dtype=np.int64)
    return data, {
        "cold": cache_dir is not None,
        "train_texts": len(train),
        "train_tokens": int(lengths.sum()),  # every token of every text (truncation comes after)
        "train_tokenize_s": tok_s,
        "train_tokenize_cpu_s": tok_cpu,
        "train_texts_per_s": len(train) / tok_s,
        "train_tokens_per_s": float(lengths.sum()) / tok_s,
        "load_s": load_s,
        "prepare_first_s": first_s,
        "prepare_cold_total_s": load_s + tok_s + first_s,
        "prepare_cached_s": cached_s,
        "cache_reused": reused and not new_files,
        "new_cache_files_when_cached": len(new_files),
    }


# ----------------------------------------------------------------------------- training


class _Path:
    """One side of the training comparison: a model, its optimizer, its batches and its counters."""

    def __init__(self, name: str, model, loader, cfg: Config, device, amp_dtype):
        self.name, self.model, self.cfg, self.device, self.amp_dtype = name, model, cfg, device, amp_dtype
        self.batches = iter(loader)
        self.optimizer = make_optimizer(model, cfg)
        total = len(loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_schedule, total, int(cfg.warmup_ratio * total))
        )
        self.scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
        self.seconds = self.data_seconds = 0.0
        self.steps = self.samples = self.tokens = self.padded_tokens = 0
        self.loss_sum = 0.0

    def step(self, timed: bool, n: int = 1) -> bool:
        """``n`` training steps as in training.train, their losses and accuracies read once after them (as
        train_epoch does: after each step on CPU, every SYNC_EVERY steps on CUDA); False when out of batches
        (the steps taken before that still count)."""
        _sync(self.device)
        t0 = time.perf_counter()
        data_s, batches, losses, corrects, more = 0.0, [], [], [], True
        for _ in range(n):
            t = time.perf_counter()
            try:
                batch = next(self.batches)
            except StopIteration:
                more = False
                break
            data_s += time.perf_counter() - t
            loss, logits, y = train_step(
                self.model, self.model, batch, self.optimizer, self.scheduler, self.scaler, self.cfg, self.device,
                self.amp_dtype
            )
            losses.append(loss.detach().double())
            corrects.append((logits.argmax(1) == y).sum().double())  # train() counts correct predictions
            batches.append(batch)
        values = torch.stack([torch.stack(losses), torch.stack(corrects)]).tolist() if batches else [[], []]
        _sync(self.device)
        t2 = time.perf_counter()
        if timed and batches:
            self.seconds += t2 - t0
            self.data_seconds += data_s
            self.steps += len(batches)
            for b, loss_value in zip(batches, values[0]):
                self.samples += int(b["labels"].numel())
                self.tokens += int(b["attention_mask"].sum())
                self.padded_tokens += int(b["input_ids"].numel())
                self.loss_sum += loss_value
        return more

    def figures(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-12)
        return {
            "steps": self.steps,
            "samples": self.samples,
            "seconds": self.seconds,
            "data_seconds": self.data_seconds,
            "samples_per_s": self.samples / s,
            "tokens_per_s": self.tokens / s,  # real tokens (padding not counted)
            "padded_tokens_per_s": self.padded_tokens / s,  # what the model computed on
            "padding_fraction": 1.0 - self.tokens / max(self.padded_tokens, 1),
            "mean_loss": self.loss_sum / max(self.steps, 1),
        }


def padding_invariance(model, batch, pad_id: int, max_length: int, device) -> float:
    """Largest |logit difference| for the same texts padded per batch and padded to ``max_length``
    (eval mode): 0 up to float rounding, because padding never reaches the pooled features."""
    ids = batch["input_ids"]
    wide = torch.full((ids.size(0), max_length), pad_id, dtype=ids.dtype)
    wide[:, : ids.size(1)] = ids[:, :max_length]
    mask = batch["attention_mask"]
    wide_mask = torch.zeros_like(wide, dtype=torch.bool)
    wide_mask[:, : mask.size(1)] = mask[:, :max_length]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        a = model(ids.to(device), mask.to(device)).float()
        b = model(wide.to(device), wide_mask.to(device)).float()
    model.train(was_training)
    return float((a - b).abs().max())


def lstm_path_agreement(model, batch, device) -> float | None:
    """Largest |difference| of the LSTM branch's pooled features between the "padded" and "packed" paths on
    ``batch`` (eval mode, fp32): 0 up to float rounding, since both compute the same function (None: no LSTM)."""
    if model.lstm is None:
        return None
    was_training, path = model.training, model.lstm.path
    model.eval()
    out = {}
    try:
        with torch.no_grad():  # not inference_mode: switching paths re-packs the weights on CUDA
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            for p in ("padded", "packed"):
                model.lstm.path = p
                out[p] = model.branch_features(ids, mask)["lstm"].float()
    finally:
        model.lstm.path = path
        model.train(was_training)
    finite = torch.isfinite(out["padded"])
    return float((out["padded"][finite] - out["packed"][finite]).abs().max()) if finite.any() else 0.0


def bench_training(cfg: Config, data, device, amp_dtype, steps: int, warmup: int, max_seconds: float,
                   progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(trained project model, figures): ``warmup`` + ``steps`` steps of each path on the same samples."""
    train_ds = data.splits["train"]
    n = min(len(train_ds), (warmup + steps) * cfg.batch_size)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(train_ds), size=n, replace=False))
    subset = train_ds.select(rows.tolist())
    loaders = {
        PROJECT: make_loader(subset, cfg, data.pad_id, epoch=1),
        NAIVE: make_loader(subset, dataclasses.replace(cfg, bucket_by_length=False), data.pad_id, epoch=1),
    }
    loaders[NAIVE].collate_fn.pad_to = cfg.max_length  # every batch padded to max_length
    model = init_model(cfg, data, device)
    naive_model = copy.deepcopy(model)  # same initial weights
    if naive_model.lstm is not None:
        naive_model.lstm.path = "padded"  # the reference keeps the two one-directional LSTMs on every device
    for m in naive_model.modules():  # a deep copy breaks cuDNN's single weight block: re-flatten it
        if isinstance(m, torch.nn.RNNBase):
            m.flatten_parameters()
    first = next(iter(loaders[PROJECT]))
    invariance = padding_invariance(model, first, data.pad_id, cfg.max_length, device)
    agreement = lstm_path_agreement(model, first, device)
    paths = {
        PROJECT: _Path(PROJECT, model.train(), loaders[PROJECT], cfg, device, amp_dtype),
        NAIVE: _Path(NAIVE, naive_model.train(), loaders[NAIVE], cfg, device, None),
    }
    _say(progress, f"training: {warmup} warm-up + up to {steps} timed steps per path, batch {cfg.batch_size}, "
                   f"{n:,} samples ...")
    set_seed(cfg.seed)
    threads = CPUThreads(cfg.num_threads, device)  # the project's thread policy, for both paths
    start, complete = time.perf_counter(), True
    block = SYNC_EVERY if device.type == "cuda" else 1  # steps between reads of the loss, as in train_epoch
    i = 0
    while i < warmup + steps:
        timed = i >= warmup
        k = min(block, (warmup + steps if timed else warmup) - i)
        threads.update()
        done = [p.step(timed, k) for p in (paths[PROJECT], paths[NAIVE])]  # alternate: load changes hit both
        i += k
        if not all(done):
            break
        if timed and i < warmup + steps and time.perf_counter() - start > max_seconds:
            complete = False
            break
    project, naive = paths[PROJECT].figures(), paths[NAIVE].figures()
    ratio = project["samples_per_s"] / naive["samples_per_s"] if naive["samples_per_s"] else 0.0
    # the model's work is about proportional to the tokens it computes on, padding included
    bound = (naive["padded_tokens_per_s"] / naive["samples_per_s"]) / (
        project["padded_tokens_per_s"] / project["samples_per_s"]
    ) if project["samples_per_s"] and naive["samples_per_s"] else 0.0
    return model, {
        "batch_size": cfg.batch_size,
        "warmup_steps": warmup,
        "samples_in_subset": n,
        "complete": complete,  # False: stopped by max_seconds, the paths' timed samples differ
        PROJECT: project,
        NAIVE: naive,
        "speedup": ratio,
        "padded_token_ratio": bound,
        "padding_invariance_max_abs_diff": invariance,
        "lstm_paths_max_abs_diff": agreement,  # padded vs packed LSTM features, first batch, fp32, this device
        "naive_lstm_path": "padded" if naive_model.lstm is not None else None,
        "num_threads": threads.count,
    }


def bench_busy(model, cfg: Config, data, device, amp_dtype, steps: int, warmup: int, max_seconds: float,
               progress: bool = False) -> dict[str, Any]:
    """The project's training step, quiet and beside a busy neighbour (a ``while True: pass`` process started and
    stopped here), with the automatic thread policy and with 1 and all cores' threads pinned. Each measurement
    trains a copy of ``model`` on the same samples; torch's thread count is restored afterwards."""
    if device.type != "cpu":
        return {"skipped": f"on {device.type}: the thread policy is for CPU runs"}
    train_ds = data.splits["train"]
    n = min(len(train_ds), (warmup + steps) * cfg.batch_size)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(train_ds), size=n, replace=False))
    subset = train_ds.select(rows.tolist())
    cores = physical_cores(allowed_cpus())
    policies = {"auto": None, **{str(k): k for k in sorted({1, cores})}}
    out: dict[str, Any] = {"steps": steps, "warmup_steps": warmup, "cores": cores}
    before = torch.get_num_threads()
    _say(progress, f"training beside a busy neighbour: {{quiet, busy}} x {{{', '.join(policies)}}} threads, "
                   f"{warmup} + {steps} steps each ...")
    try:
        for cond in ("quiet", "busy"):
            with busy_neighbour() if cond == "busy" else contextlib.nullcontext():
                for label, num in policies.items():
                    copy_ = copy.deepcopy(model)
                    for m in copy_.modules():
                        if isinstance(m, torch.nn.RNNBase):
                            m.flatten_parameters()
                    path = _Path(PROJECT, copy_.train(), make_loader(subset, cfg, data.pad_id, epoch=1),
                                 cfg, device, amp_dtype)
                    threads = CPUThreads(num, device)
                    start = time.perf_counter()
                    for i in range(warmup + steps):
                        threads.update()
                        if not path.step(i >= warmup):
                            break
                        if i >= warmup and time.perf_counter() - start > max_seconds:
                            break
                    f = path.figures()
                    out.setdefault(cond, {})[label] = {"samples_per_s": f["samples_per_s"], "steps": f["steps"],
                                                       "threads": threads.count}
    finally:
        torch.set_num_threads(before)
    for cond in ("quiet", "busy"):
        pinned = [v["samples_per_s"] for k, v in out[cond].items() if k != "auto"]
        out[f"{cond}_auto_vs_best_pinned"] = out[cond]["auto"]["samples_per_s"] / max(max(pinned), 1e-12)
    return out


# ----------------------------------------------------------------------------- inference


def bench_inference(model, cfg: Config, data, device, amp_dtype, n_texts: int, predict_n: int, run_dir: Path,
                    progress: bool = False) -> dict[str, Any]:
    """Batch texts/s through the evaluation path, and Predictor.predict latency on single texts."""
    test = data.splits["test"]
    ds = test.select(range(min(n_texts, len(test))))
    tokens = int(np.asarray(ds["length"]).sum())
    model.eval()
    evaluate_split(model, ds.select(range(min(len(ds), cfg.eval_batch_size))), cfg, data.pad_id,
                   progress=False)  # warm-up
    _say(progress, f"inference: {len(ds):,} texts through the evaluation path, batch {cfg.eval_batch_size} ...")
    _sync(device)
    t0 = time.perf_counter()
    evaluate_split(model, ds, cfg, data.pad_id, progress=False)
    _sync(device)
    eval_s = time.perf_counter() - t0

    save_checkpoint(model_checkpoint(model, cfg, data, epoch=1, best_metric=0.0), run_dir / MODEL_FILE)
    data.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    predictor = Predictor.from_run(run_dir, device=str(device))
    texts = list(test.select(range(min(max(predict_n, 1), len(test))))["text"])
    _say(progress, f"Predictor.predict: {len(texts)} single texts ...")
    # as in a process of its own (notebook 05, hybridlib predict): no cuDNN algorithm search, which training
    # turned on here; each text has its own length, and searching for every new one would cost more than it saves
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        for t in texts[:3]:
            predictor.predict(t)  # warm-up
        latencies = []
        for t in texts:
            t0 = time.perf_counter()
            predictor.predict(t)
            latencies.append(time.perf_counter() - t0)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    lat_ms = 1000 * np.asarray(latencies)
    n_tokens = [len(x) for x in predictor.encode(texts)]
    return {
        "eval_batch_size": cfg.eval_batch_size,
        "eval_texts": len(ds),
        "eval_seconds": eval_s,
        "eval_texts_per_s": len(ds) / eval_s,
        "eval_tokens_per_s": tokens / eval_s,
        "predict_texts": len(texts),
        "predict_mean_tokens": float(np.mean(n_tokens)),
        "predict_p50_ms": float(np.percentile(lat_ms, 50)),
        "predict_p95_ms": float(np.percentile(lat_ms, 95)),
    }


# ----------------------------------------------------------------------------- all of it


def run_benchmark(params: str | Path | None = None, overrides: dict[str, Any] | None = None, *, steps: int = 20,
                  warmup: int = 3, max_seconds: float = 120.0, eval_texts: int = 1024, predict_n: int = 50,
                  cold: bool = True, progress: bool = False, busy: bool = True, busy_steps: int = 5
                  ) -> dict[str, Any]:
    """Measure everything for the params file (+ overrides); returns a dict of plain numbers and strings.

    ``busy``: also the training step beside a busy neighbour (``min(steps, busy_steps)`` timed steps per case)."""
    cfg = load_config(params, overrides)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        configure_cuda(benchmark=True)  # as training.training_device does
    CPUThreads(cfg.num_threads, device)
    amp_dtype = resolve_precision(cfg.precision, device)
    uses_lstm = "lstm" in cfg.branches
    result: dict[str, Any] = {
        "params": str(params) if params else None,
        "dataset": cfg.dataset,
        "max_length": cfg.max_length,
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "lstm_path": lstm_path(device.type) if uses_lstm else None,
        "lstm_precision": PrecisionPolicy(amp_dtype, lstm_autocast(device.type, amp_dtype)).describe(device.type)[
            "lstm_precision"] if uses_lstm else None,
        "pad_multiple": CUDA_PAD_MULTIPLE if device.type == "cuda" else 1,
        "overrides_env": {k: os.environ[k] for k in (LSTM_PATH_ENV, LSTM_AUTOCAST_ENV) if os.environ.get(k)},
        "machine": machine_info(device),
    }
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="hybridlib-bench-") as tmp:
            tok = load_tokenizer(cfg.tokenizer)
            try:
                data, result["tokenization"] = bench_tokenization(
                    cfg, tok, Path(tmp) / "datasets" if cold else None, progress
                )
            except DataError as e:
                if not cold:
                    raise
                # e.g. a hub dataset offline: only the usual cache has it
                _say(progress, f"cold tokenization impossible here ({e}); measuring the cached path only")
                data, result["tokenization"] = bench_tokenization(cfg, tok, None, progress)
            model, result["training"] = bench_training(cfg, data, device, amp_dtype, steps, warmup, max_seconds, progress)
            if busy:
                result["training"]["busy_neighbour"] = bench_busy(
                    model, cfg, data, device, amp_dtype, min(steps, busy_steps), min(warmup, 2), max_seconds / 6, progress
                )
            run_dir = Path(tmp) / "run"
            run_dir.mkdir()
            result["inference"] = bench_inference(model, cfg, data, device, amp_dtype, eval_texts, predict_n, run_dir,
                                                  progress)
    finally:
        if bars:
            datasets.enable_progress_bars()
    result["memory"] = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["memory"]["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def _busy_line(b: dict[str, Any] | None) -> list[str]:
    if not b or "skipped" in b:
        return [f"  busy neighbour: skipped ({b['skipped']})"] if b else []

    def cell(cond: str) -> str:
        a = b[cond]["auto"]
        pinned = ", ".join(f"{k} thread{'s' if k != '1' else ''} {v['samples_per_s']:.1f}"
                           for k, v in b[cond].items() if k != "auto")
        return f"{cond}: auto {a['samples_per_s']:.1f} ({a['threads']} thr.), {pinned}"

    return [f"  samples/s beside a busy neighbour ({b['steps']} steps each): {cell('quiet')}; {cell('busy')}"]


def format_report(r: dict[str, Any]) -> str:
    """The benchmark as a plain-text table."""
    m, tk, tr, inf = r["machine"], r["tokenization"], r["training"], r["inference"]
    p, n = tr[PROJECT], tr[NAIVE]
    load = f"{m['load_average_start']:.1f} -> {m['load_average_end']:.1f}" if m.get("load_average_start") is not None else "n/a"
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"hybridlib bench: {r['dataset']}, max_length {r['max_length']}, batch {tr['batch_size']}, precision {r['precision']}"
        + (f", LSTM {r['lstm_path']} in {r['lstm_precision']}" if r.get("lstm_path") else ""),
        f"{m['device']} ({where}), {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"native CPU bf16: {'yes' if m['cpu_native_bf16'] else 'no'}, load average {load}",
        *([f"cuDNN {m.get('cudnn_version')}, TF32 matmul {m.get('matmul_tf32')} / cuDNN {m.get('cudnn_tf32')}, "
           f"cudnn.benchmark {m.get('cudnn_benchmark')}, batch lengths padded to multiples of {r.get('pad_multiple')}"]
          if "cudnn_version" in m else []),
        "",
        f"training ({p['steps']} timed steps per path after {tr['warmup_steps']} warm-up; "
        + (f"same {tr['samples_in_subset']:,} samples)" if tr["complete"] else "stopped by --max-seconds: the paths timed different samples)"),
        f"  {'path':58s}{'samples/s':>11s}{'tokens/s':>11s}{'padding':>9s}",
        f"  {'naive: fp32, every batch padded to max_length, no buckets':58s}{n['samples_per_s']:11.1f}"
        f"{n['tokens_per_s']:11,.0f}{n['padding_fraction']:9.0%}",
        f"  {'hybridlib: length buckets, per-batch padding, ' + r['precision']:58s}{p['samples_per_s']:11.1f}"
        f"{p['tokens_per_s']:11,.0f}{p['padding_fraction']:9.0%}",
        f"  speedup {tr['speedup']:.2f}x (computed tokens per sample: naive/hybridlib = {tr['padded_token_ratio']:.2f}x); "
        f"padding invariance: max |logit diff| {tr['padding_invariance_max_abs_diff']:.1e}",
        *_busy_line(tr.get("busy_neighbour")),
        "",
        "inference",
        f"  evaluation path, batch {inf['eval_batch_size']}: {inf['eval_texts_per_s']:,.0f} texts/s, "
        f"{inf['eval_tokens_per_s']:,.0f} tokens/s ({inf['eval_texts']:,} texts)",
        f"  Predictor.predict, one text (tokenization included, {inf['predict_mean_tokens']:.0f} tokens on average): "
        f"p50 {inf['predict_p50_ms']:.1f} ms, p95 {inf['predict_p95_ms']:.1f} ms ({inf['predict_texts']} texts)",
        "",
        f"tokenization (train split, {tk['train_texts']:,} texts, {tk['train_tokens']:,} tokens)",
    ]
    if tk["cold"]:
        lines.append(
            f"  cold (fresh datasets cache): {tk['train_tokenize_s']:.1f} s ({tk['train_tokenize_cpu_s']:.1f} CPU-s), "
            f"{tk['train_texts_per_s']:,.0f} texts/s, {tk['train_tokens_per_s']:,.0f} tokens/s; whole prepare_data "
            f"cold (both splits): {tk['prepare_cold_total_s']:.1f} s"
        )
    lines.append(
        f"  cached (second prepare_data, whole pipeline): {tk['prepare_cached_s']:.2f} s; tokenized files reused: "
        f"{'yes' if tk['cache_reused'] else 'NO'}"
    )
    mem = f"peak RSS {r['memory']['peak_rss_mb']:,.0f} MiB"
    if "cuda_peak_allocated_mb" in r["memory"]:
        mem += f", CUDA peak allocated {r['memory']['cuda_peak_allocated_mb']:,.0f} MiB"
    lines += ["", f"memory: {mem}"]
    return "\n".join(lines)
