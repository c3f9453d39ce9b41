"""How fast are training, inference, prediction and tokenization for one params file? One process, one run.

    hybridlib bench params/imdb.yaml -p data_dir ../shared/data/imdb -p tokenizer ../shared/tokenizers/bert-base-uncased
    hybridlib bench params/imdb.yaml ... --json          # the same figures as one JSON object

What is measured (``run_benchmark`` returns it all as a dict, ``format_report`` prints it):

- **tokenization**: the whole train split tokenized into a fresh, temporary datasets cache (cold), then
  ``prepare_data`` called again (cached: it must reuse the tokenized files, which is checked);
- **training**: the project's path (``make_loader`` batches: length buckets, per-batch padding; autocast
  per ``resolve_precision``; ``training.make_optimizer`` and ``training.train_step``, the body of
  ``training.train``) against a naive reference on the same samples: the same model and initial
  weights, fp32, every batch padded to ``max_length``, no buckets. Steps of the two alternate, so a
  change in machine load hits both alike; a few warm-up steps each are not timed;
- **inference**: texts/s through ``evaluation.evaluate_split`` (the path of validation and test), and
  ``Predictor.predict`` latency for one text at a time (tokenization included), on the model trained
  above and saved to a temporary run folder;
- **memory**: peak resident memory of the process (and CUDA's peak allocation on a GPU).

Timings wait for the GPU (``torch.cuda.synchronize``) on CUDA. Nothing is written outside a
temporary folder.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlib.config import Config, load_config

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
    from hybridlib.runtime import cpu_supports_bf16

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
    return info


# ----------------------------------------------------------------------------- tokenization


def _cache_files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.arrow")}


def bench_tokenization(cfg: Config, tokenizer, cache_dir: Path | None, progress: bool = False):
    """(Data, figures): tokenize the train split cold into ``cache_dir`` (None: the usual cache, so only
    the cached figures are meaningful), then time a second, cached ``prepare_data``."""
    import datasets

    from hybridlib.data import encode_labels, load_raw, prepare_data, tokenize

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
        from hybridlib.training import lr_lambda, make_optimizer

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

    def step(self, timed: bool) -> bool:
        """One training step, as in training.train (loss.item() included); False when out of batches."""
        from hybridlib.training import train_step

        _sync(self.device)
        t0 = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            return False
        t1 = time.perf_counter()
        loss, logits, y = train_step(
            self.model, self.model, batch, self.optimizer, self.scheduler, self.scaler, self.cfg, self.device, self.amp_dtype
        )
        loss_value = loss.item()
        (logits.argmax(1) == y).sum().item()  # train() counts correct predictions each step
        _sync(self.device)
        t2 = time.perf_counter()
        if timed:
            self.seconds += t2 - t0
            self.data_seconds += t1 - t0
            self.steps += 1
            self.samples += int(y.numel())
            self.tokens += int(batch["attention_mask"].sum())
            self.padded_tokens += int(batch["input_ids"].numel())
            self.loss_sum += loss_value
        return True

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


def bench_training(cfg: Config, data, device, amp_dtype, steps: int, warmup: int, max_seconds: float,
                   progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(trained project model, figures): ``warmup`` + ``steps`` steps of each path on the same samples."""
    from hybridlib.data import make_loader
    from hybridlib.model import build_model
    from hybridlib.runtime import set_seed

    train_ds = data.splits["train"]
    n = min(len(train_ds), (warmup + steps) * cfg.batch_size)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(train_ds), size=n, replace=False))
    subset = train_ds.select(rows.tolist())
    loaders = {
        PROJECT: make_loader(subset, cfg, data.pad_id, train=True, epoch=1),
        NAIVE: make_loader(subset, cfg, data.pad_id, train=True, epoch=1, bucket=False, pad_to=cfg.max_length),
    }
    set_seed(cfg.seed)
    model = build_model(cfg, data.vocab_size, len(data.label_names), data.pad_id, data).to(device)
    naive_model = copy.deepcopy(model)  # same initial weights
    for m in naive_model.modules():  # a deep copy breaks cuDNN's single weight block: re-flatten it
        if isinstance(m, torch.nn.RNNBase):
            m.flatten_parameters()
    first = next(iter(loaders[PROJECT]))
    invariance = padding_invariance(model, first, data.pad_id, cfg.max_length, device)
    paths = {
        PROJECT: _Path(PROJECT, model.train(), loaders[PROJECT], cfg, device, amp_dtype),
        NAIVE: _Path(NAIVE, naive_model.train(), loaders[NAIVE], cfg, device, None),
    }
    _say(progress, f"training: {warmup} warm-up + up to {steps} timed steps per path, batch {cfg.batch_size}, "
                   f"{n:,} samples ...")
    set_seed(cfg.seed)
    start, complete = time.perf_counter(), True
    for i in range(warmup + steps):
        timed = i >= warmup
        done = [p.step(timed) for p in (paths[PROJECT], paths[NAIVE])]  # alternate: load changes hit both
        if not all(done):
            break
        if timed and i + 1 < warmup + steps and time.perf_counter() - start > max_seconds:
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
    }


# ----------------------------------------------------------------------------- inference


def bench_inference(model, cfg: Config, data, device, amp_dtype, n_texts: int, predict_n: int, run_dir: Path,
                    progress: bool = False) -> dict[str, Any]:
    """Batch texts/s through the evaluation path, and Predictor.predict latency on single texts."""
    from hybridlib.checkpoint import save_checkpoint
    from hybridlib.evaluation import evaluate_split
    from hybridlib.prediction import Predictor
    from hybridlib.training import model_checkpoint

    test = data.splits["test"]
    ds = test.select(range(min(n_texts, len(test))))
    tokens = int(np.asarray(ds["length"]).sum())
    model.eval()
    evaluate_split(model, ds.select(range(min(len(ds), cfg.eval_batch_size))), cfg, data.pad_id, device, amp_dtype,
                   progress=False)  # warm-up
    _say(progress, f"inference: {len(ds):,} texts through the evaluation path, batch {cfg.eval_batch_size} ...")
    _sync(device)
    t0 = time.perf_counter()
    evaluate_split(model, ds, cfg, data.pad_id, device, amp_dtype, progress=False)
    _sync(device)
    eval_s = time.perf_counter() - t0

    save_checkpoint(model_checkpoint(model, cfg, data, epoch=1, best_metric=0.0), run_dir / "model.pt")
    data.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    predictor = Predictor.from_run(run_dir, device=str(device))
    texts = list(test.select(range(min(max(predict_n, 1), len(test))))["text"])
    _say(progress, f"Predictor.predict: {len(texts)} single texts ...")
    for t in texts[:3]:
        predictor.predict(t)  # warm-up
    latencies = []
    for t in texts:
        t0 = time.perf_counter()
        predictor.predict(t)
        latencies.append(time.perf_counter() - t0)
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
                  cold: bool = True, progress: bool = False) -> dict[str, Any]:
    """Measure everything for the params file (+ overrides); returns a dict of plain numbers and strings."""
    import datasets

    from hybridlib.data import load_tokenizer
    from hybridlib.errors import DataError
    from hybridlib.runtime import apply_num_threads, peak_rss_mb, resolve_device, resolve_precision

    cfg = load_config(params, overrides)
    apply_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    result: dict[str, Any] = {
        "params": str(params) if params else None,
        "dataset": cfg.dataset,
        "max_length": cfg.max_length,
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
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


def format_report(r: dict[str, Any]) -> str:
    """The benchmark as a plain-text table."""
    m, tk, tr, inf = r["machine"], r["tokenization"], r["training"], r["inference"]
    p, n = tr[PROJECT], tr[NAIVE]
    load = f"{m['load_average_start']:.1f} -> {m['load_average_end']:.1f}" if m.get("load_average_start") is not None else "n/a"
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"hybridlib bench: {r['dataset']}, max_length {r['max_length']}, batch {tr['batch_size']}, precision {r['precision']}",
        f"{m['device']} ({where}), {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"native CPU bf16: {'yes' if m['cpu_native_bf16'] else 'no'}, load average {load}",
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
