"""How fast are training, inference, prediction and tokenization for one params file? One process, one run.

    python benchmarks/bench.py params/imdb.yaml -p data_dir ../shared/data/imdb \
        -p tokenizer ../shared/tokenizers/bert-base-uncased
    python benchmarks/bench.py params/imdb.yaml ... --json          # the same figures as one JSON object

``run_benchmark`` measures (how much: :class:`BenchOptions`) and returns a dict; ``main`` prints it.
What each part times is in docs/performance.md: training (the project's ``train_step`` against a naive
reference on the same samples, their steps alternating), inference (the evaluation path and
``Predictor.predict``), tokenization (cold and cached) and memory. On CUDA timings wait for the GPU;
nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from hybridlib.batching import make_loader
from hybridlib.checkpoints import model_checkpoint, save_checkpoint
from hybridlib.cli import add_overrides, config_from_args
from hybridlib.config import Config
from hybridlib.data import prepare_data, tokenize
from hybridlib.errors import DataError, HybridlibError
from hybridlib.evaluation import evaluate_split
from hybridlib.files import MODEL_FILE
from hybridlib.prediction import Predictor
from hybridlib.rawdata import encode_labels, load_raw
from hybridlib.runtime import (
    CUDA_PAD_MULTIPLE,
    LSTM_AUTOCAST_ENV,
    LSTM_PATH_ENV,
    cpu_supports_bf16,
    dist_info,
    lstm_autocast,
    lstm_path,
        peak_rss_mb,
    resolve_precision,
    set_seed,
)
from hybridlib.threads import CPUThreads
from hybridlib.tokens import load_tokenizer
from hybridlib.training import SYNC_EVERY, RunningSums, init_model, make_optimization, train_step, training_device
from hybridlib.trainstate import Loop

NAIVE = "naive"
PROJECT = "hybridlib"


@dataclass
class BenchOptions:
    """How much the benchmark measures (its command-line options)."""

    steps: int = 20  # timed training steps per path
    warmup: int = 3  # untimed training steps per path before them
    max_seconds: float = 120.0  # stop the timed training steps after this long
    eval_texts: int = 1024  # test texts for the batch inference figure
    predict_n: int = 50  # single texts timed through Predictor.predict
    cold: bool = True  # tokenize into a fresh datasets cache first (False: the usual cache only)
    progress: bool = False  # say on stderr what is being measured


@dataclass
class Bench:
    """What every measurement runs on: the run's settings and data, the device and its autocast dtype."""

    cfg: Config
    opts: BenchOptions
    device: torch.device
    amp_dtype: torch.dtype | None
    data: Any = None  # hybridlib.data.Data, once tokenized


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def precision_names(amp_dtype: torch.dtype | None, device_type: str) -> dict[str, str]:
    """{"precision": ..., "lstm_precision": ...} of ``amp_dtype`` for the report, e.g. bf16 and "fp32 (TF32)"."""
    name = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    lstm = name[amp_dtype if lstm_autocast(device_type, amp_dtype) else torch.float32]
    if lstm == "fp32" and device_type == "cuda":
        lstm = "fp32 (TF32)" if torch.backends.cudnn.allow_tf32 else "fp32"
    return {"precision": name[amp_dtype], "lstm_precision": lstm}


def cuda_settings() -> dict[str, Any]:
    """The CUDA math settings in force, or {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {"cudnn_version": torch.backends.cudnn.version(), "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}


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
    """One side of the training comparison: a training loop (model, optimizer, ...), its batches and counters."""

    def __init__(self, b: Bench, model, loader, amp_dtype):
        self.device, self.batches = b.device, iter(loader)
        optimization = make_optimization(model, b.cfg, len(loader), amp_dtype)
        self.loop = Loop(b.cfg, model, model, b.device, amp_dtype, None, *optimization)
        self.seconds = self.data_seconds = 0.0
        self.steps = self.samples = self.tokens = self.padded_tokens = 0
        self.loss_sum = 0.0

    def step(self, timed: bool, n: int = 1) -> bool:
        """``n`` training steps as in training.train, their losses and accuracies read once after them (as
        train_epoch does: after each step on CPU, every SYNC_EVERY steps on CUDA); False when out of batches
        (the steps taken before that still count)."""
        _sync(self.device)
        t0 = time.perf_counter()
        data_s, batches, running = 0.0, [], RunningSums()
        for _ in range(n):
            t = time.perf_counter()
            batch = next(self.batches, None)
            if batch is None:
                break
            data_s += time.perf_counter() - t
            loss, logits, y = train_step(self.loop, batch)
            running.add(len(batches), loss, (logits.argmax(1) == y).sum(), y.numel())
            batches.append(batch)
        running.read()
        _sync(self.device)
        if timed and batches:
            self.seconds += time.perf_counter() - t0
            self.data_seconds += data_s
            self.steps += len(batches)
            self.loss_sum += running.sums[0]
            self.samples += int(running.sums[2])
            self.tokens += sum(int(b["attention_mask"].sum()) for b in batches)
            self.padded_tokens += sum(int(b["input_ids"].numel()) for b in batches)
        return len(batches) == n

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
            "mean_loss": self.loss_sum / max(self.samples, 1),
        }


def bench_training(b: Bench) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(trained project model, figures): ``warmup`` + ``steps`` steps of each path on the same samples."""
    cfg, data, device, steps, warmup = b.cfg, b.data, b.device, b.opts.steps, b.opts.warmup
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
    paths = {
        PROJECT: _Path(b, model.train(), loaders[PROJECT], b.amp_dtype),
        NAIVE: _Path(b, naive_model.train(), loaders[NAIVE], None),
    }
    _say(b.opts.progress, f"training: {warmup} warm-up + up to {steps} timed steps per path, "
                          f"batch {cfg.batch_size}, {n:,} samples ...")
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
        if timed and i < warmup + steps and time.perf_counter() - start > b.opts.max_seconds:
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
        "naive_lstm_path": "padded" if naive_model.lstm is not None else None,
        "num_threads": threads.count,
    }


# ----------------------------------------------------------------------------- inference


def bench_inference(b: Bench, model, run_dir: Path) -> dict[str, Any]:
    """Batch texts/s through the evaluation path, and Predictor.predict latency on single texts (``model`` is
    saved to ``run_dir`` for the latter)."""
    cfg, data, device, progress = b.cfg, b.data, b.device, b.opts.progress
    test = data.splits["test"]
    ds = test.select(range(min(b.opts.eval_texts, len(test))))
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
    texts = list(test.select(range(min(max(b.opts.predict_n, 1), len(test))))["text"])
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


def run_benchmark(cfg: Config, params: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Measure everything for ``cfg`` (read from the params file ``params``, named in the result); returns a dict of
    plain numbers and strings. ``options``: the fields of :class:`BenchOptions`."""
    opts = BenchOptions(**options)
    device = training_device(cfg, dist_info())
    CPUThreads(cfg.num_threads, device)
    b = Bench(cfg, opts, device, resolve_precision(cfg.precision, device))
    uses_lstm = "lstm" in cfg.branches
    result: dict[str, Any] = {
        "params": str(params) if params else None,
        "dataset": cfg.dataset,
        "max_length": cfg.max_length,
        "precision": str(b.amp_dtype).replace("torch.", "") if b.amp_dtype else "fp32",
        "lstm_path": lstm_path(device.type) if uses_lstm else None,
        "lstm_precision": precision_names(b.amp_dtype, device.type)["lstm_precision"] if uses_lstm else None,
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
                b.data, result["tokenization"] = bench_tokenization(
                    cfg, tok, Path(tmp) / "datasets" if opts.cold else None, opts.progress
                )
            except DataError as e:
                if not opts.cold:
                    raise
                # e.g. a hub dataset offline: only the usual cache has it
                _say(opts.progress, f"cold tokenization impossible here ({e}); measuring the cached path only")
                b.data, result["tokenization"] = bench_tokenization(cfg, tok, None, opts.progress)
            model, result["training"] = bench_training(b)
            run_dir = Path(tmp) / "run"
            run_dir.mkdir()
            result["inference"] = bench_inference(b, model, run_dir)
    finally:
        if bars:
            datasets.enable_progress_bars()
    result["memory"] = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["memory"]["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def bench_report(r: dict[str, Any]) -> str:
    """The figures of :func:`run_benchmark` as a plain-text table."""
    m, tk, tr, inf = r["machine"], r["tokenization"], r["training"], r["inference"]
    p, n = tr["hybridlib"], tr["naive"]
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
        f"  speedup {tr['speedup']:.2f}x (computed tokens per sample: naive/hybridlib = {tr['padded_token_ratio']:.2f}x)",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure training (vs a naive reference), inference and tokenization speed.")
    p.add_argument("params", help="Params YAML, e.g. params/imdb.yaml.")
    p.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    p.add_argument("--steps", type=int, default=20, help="Timed training steps per path (default 20).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed warm-up steps per path (default 3).")
    p.add_argument("--max-seconds", type=float, default=120.0, help="Stop the timed training steps after this long.")
    p.add_argument("--eval-texts", type=int, default=1024, help="Test texts for the batch inference figure.")
    p.add_argument("--predict-n", type=int, default=50, help="Single texts timed through Predictor.predict.")
    p.add_argument("--no-cold", action="store_true", help="Skip the cold tokenization (use the usual datasets cache).")
    add_overrides(p)
    a = p.parse_args(argv)
    try:
        result = run_benchmark(
            config_from_args(a), a.params, steps=a.steps, warmup=a.warmup, max_seconds=a.max_seconds,
            eval_texts=a.eval_texts, predict_n=a.predict_n, cold=not a.no_cold, progress=not a.json,
        )
    except HybridlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if a.json else bench_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
