"""Scale benchmark: the same run on 25k, 100k and 400k training texts; per stage seconds, peak RSS and the
seconds-per-text ratio against the smallest size.

    python benchmarks/scale.py --work /tmp/scale-bench [--sizes 25000 100000 400000] [--train-sizes 25000]
        [--threads 2] [--imdb ../shared/data/imdb] [--tokenizer ../shared/tokenizers/bert-base-uncased] [--json out.json]

Corpora (made once per size under --work): text i is IMDB train review i % 25,000 with its label; from the
second copy of a review on, a seeded perturbation (3 words dropped, 2 neighbouring words swapped) keeps copies
distinct; the parquet file has row groups of 25,000 rows. The test split is always the fixed IMDB test split (25,000). The run: params/imdb.yaml with one epoch,
max_length 128, swa off, and num_threads pinned (``--threads 0``: the automatic policy, as a default run; pinned threads
crawl beside another busy process) (the defaults otherwise: ppmi, the baseline with its cap).

Every stage runs in a fresh process, as `hybridlib run` gives each notebook its own kernel; its peak RSS is that
process's (imports included). tokenize: prepare_data on an empty datasets cache (parquet -> Arrow -> token ids);
ppmi: init_model's PPMI word vectors (co-occurrences + SVD); train: hybridlib.training.fit (data from the cache,
ppmi, one epoch; "epoch" is its training_log seconds); evaluate: evaluate_run (test and validation predictions,
metrics, the TF-IDF baseline, whose own seconds are the "baseline" row). "run" is the whole run: seconds summed,
peak the largest of its processes. ``--train-sizes`` (default: all) limits training to those sizes (an epoch costs
the same per text at every size): the others evaluate a copy of the largest trained size's run, which costs what
their own model would (same architecture). ``--json``: sizes already in that file are not measured again.
``--stages``: only these stages; ``baseline`` (not in the default) is the classic baseline's fit alone (NB-LR on its
capped sample, scoring validation and test), which evaluate also does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenize", "ppmi", "train", "evaluate")


def make_corpus(imdb: Path, size: int, folder: Path, seed: int = 0) -> None:
    """train.parquet of ``size`` texts: IMDB train reviews (shuffled), then perturbed copies; test.parquet = IMDB test."""
    import pandas as pd

    if (folder / "train.parquet").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    base = pd.read_parquet(imdb / "train.parquet").sample(frac=1.0, random_state=seed)  # sorted by label: shuffle
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(size):
        text, label = base["text"].iat[i % len(base)], int(base["label"].iat[i % len(base)])
        if i >= len(base):
            words = text.split()
            for _ in range(3):
                if len(words) > 4:
                    del words[rng.randrange(len(words))]
            for _ in range(2):
                j = rng.randrange(len(words) - 1)
                words[j], words[j + 1] = words[j + 1], words[j]
            text = " ".join(words)
        texts.append(text)
        labels.append(label)
    # row groups of 25,000 rows, as IMDB's own file: datasets reads a parquet file a whole row group at a time
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(folder / "train.parquet", row_group_size=25_000)
    pd.read_parquet(imdb / "test.parquet").to_parquet(folder / "test.parquet")


def config(a: argparse.Namespace, size: int):
    from hybridlib.config import load_config

    return load_config(ROOT / "params" / "imdb.yaml", {
        "data_dir": str(Path(a.work) / f"data-{size}"), "tokenizer": a.tokenizer, "epochs": 1, "max_length": 128,
        "swa_start": 0, "num_threads": a.threads or None, "run_dir": str(Path(a.work) / f"run-{size}")})


def tree_peak(box: dict) -> None:
    """Keep box["mb"] at the largest RSS summed over this process and its children (the baseline's joblib workers),
    sampled every 0.2 s (shared pages count once per process: an upper bound), and box["pss_mb"] at the largest PSS
    sum (shared pages split between the processes that map them: what the tree really holds; Linux only)."""
    import psutil

    me = psutil.Process()
    while True:
        rss = pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + getattr(info, "pss", 0)
            except psutil.Error:  # a child that just ended
                pass
        box["mb"] = max(box.get("mb", 0), rss / 2**20)
        box["pss_mb"] = max(box.get("pss_mb", 0), pss / 2**20)
        time.sleep(0.2)


def stage(a: argparse.Namespace) -> dict:
    """Run one stage here; its seconds (and sub-figures)."""
    from hybridlib.data import prepare_data
    from hybridlib.runtime import peak_rss_mb

    cfg = config(a, a.size)
    out: dict = {}
    tree: dict = {}
    threading.Thread(target=tree_peak, args=(tree,), daemon=True).start()
    t0 = time.perf_counter()
    if a.stage == "tokenize":
        prepare_data(cfg)
    elif a.stage == "ppmi":
        import torch

        from hybridlib.training import init_model

        data = prepare_data(cfg)
        t0 = time.perf_counter()
        init_model(cfg, data, torch.device("cpu"))
    elif a.stage == "train":
        from hybridlib.files import TRAIN_INFO_FILE, read_json
        from hybridlib.pipeline import prepare_run
        from hybridlib.runs import read_history
        from hybridlib.training import fit

        cfg, run_dir = prepare_run(cfg)
        result = fit(cfg, run_dir, progress=False)
        out["epoch"] = float(sum(r["seconds"] for r in read_history(run_dir)))
        out["val_accuracy"] = result.best_val_accuracy
        out["train_peak_rss_mb"] = read_json(Path(run_dir) / TRAIN_INFO_FILE)["peak_rss_mb"]
    elif a.stage == "evaluate":
        from hybridlib.evaluation import evaluate_run

        data = prepare_data(cfg)
        t0 = time.perf_counter()
        m = evaluate_run(cfg, cfg.run_dir, data, progress=False)["metrics"]
        base = next(iter(m["baselines"].values()))
        out["baseline"], out["test_accuracy"], out["baseline_test_accuracy"] = base["seconds"], m["test_accuracy"], base["test_accuracy"]
    elif a.stage == "baseline":
        from hybridlib.baselines import nblr

        data = prepare_data(cfg)
        t0 = time.perf_counter()
        summary = nblr(data, cfg.seed, n_jobs=a.threads or 2, max_train=cfg.baseline_max_train_samples)[0]
        out.update(num_train=summary["num_train"], test_accuracy=summary["test_accuracy"])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["tree_peak_mb"] = tree.get("mb", 0.0)
    out["tree_pss_mb"] = tree.get("pss_mb", 0.0)
    proc = Path("/proc/self/status")  # Linux: at the end, file-backed pages (memory-mapped Arrow) vs the process's own
    status = dict(line.split(":", 1) for line in proc.read_text().splitlines()) if proc.is_file() else {}
    out.update({k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in status})
    return out


def measure(a: argparse.Namespace, size: int, trained: int | None) -> dict[str, dict]:
    """Every stage of one size, each in a fresh process; without training, ``trained``'s run is evaluated."""
    work = Path(a.work)
    make_corpus(Path(a.imdb), size, work / f"data-{size}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / f"hf-{size}"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    shutil.rmtree(work / f"run-{size}", ignore_errors=True)
    if "tokenize" in a.stages:  # tokenize measures an empty datasets cache, as a first run has
        shutil.rmtree(work / f"hf-{size}", ignore_errors=True)
    train = a.train_sizes is None or size in a.train_sizes
    if not train and "evaluate" in a.stages:
        shutil.copytree(work / f"run-{trained}", work / f"run-{size}", ignore=shutil.ignore_patterns("run.lock"))
    res = {}
    for name in (s for s in a.stages if train or s != "train"):
        cmd = [sys.executable, __file__, "--stage", name, "--size", str(size), "--work", a.work,
               "--threads", str(a.threads), "--tokenizer", a.tokenizer]
        line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[name] = json.loads(line)
        print(f"  {size:>9,} {name:<9} {res[name]['seconds']:8.1f} s  {res[name]['peak_rss_mb']:8,.0f} MiB "
              f"(with children {res[name].get('tree_peak_mb', 0):,.0f})", flush=True)
    return res


def table(results: dict[int, dict[str, dict]]) -> str:
    """Markdown: stage, then per size seconds, peak RSS and the seconds-per-text ratio against the first size."""
    sizes = sorted(results)
    rows = []
    for size in sizes:
        r = results[size]
        rows += [(size, s, r[s]["seconds"], r[s]["peak_rss_mb"]) for s in STAGES if s in r]
        rows += [(size, "epoch", r["train"]["epoch"], r["train"]["train_peak_rss_mb"])] if "train" in r else []
        rows += [(size, "baseline", r["evaluate"]["baseline"], None)] if "evaluate" in r else []
        rows += [(size, "baseline alone", r["baseline"]["seconds"], r["baseline"]["peak_rss_mb"])] if "baseline" in r else []
        if "train" in r:
            rows += [(size, "run", sum(r[s]["seconds"] for s in STAGES), max(r[s]["peak_rss_mb"] for s in STAGES))]
    first = {s: sec / sizes[0] for size, s, sec, _ in rows if size == sizes[0]}
    lines = ["| texts | stage | seconds | peak RSS (GiB) | s/text vs first |", "|---:|---|---:|---:|---:|"]
    for size, s, sec, peak in rows:
        peak_s = f"{peak / 1024:.2f}" if peak else "(in evaluate)"
        ratio = f"{sec / size / first[s]:.2f}" if s in first else ""
        lines.append(f"| {size:,} | {s} | {sec:,.1f} | {peak_s} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder for the corpora, datasets caches and runs")
    p.add_argument("--sizes", type=int, nargs="+", default=[25_000, 100_000, 400_000])
    p.add_argument("--train-sizes", type=int, nargs="*", help="train at these sizes only (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per stage; 0: automatic (hybridlib's policy)")
    p.add_argument("--imdb", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "bert-base-uncased"))
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--stages", nargs="+", choices=[*STAGES, "baseline"], default=list(STAGES),
                   help="measure only these stages; baseline: the classic baseline's fit alone (also inside evaluate)")
    p.add_argument("--stage", choices=[*STAGES, "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        print(json.dumps(stage(a)))
        return
    results = {int(k): v for k, v in json.loads(Path(a.json).read_text()).items()} if a.json and Path(a.json).is_file() else {}
    for size in a.sizes:
        if size not in results:
            trained = max((s for s in results if "train" in results[s]), default=None)
            results[size] = measure(a, size, trained)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
