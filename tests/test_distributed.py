"""Distributed training: 2 CPU processes (gloo) launched by hybridlib.training.fit, as the notebook does.

One real 2-process run (module fixture) is checked against a single-process run of the same global
batch size. Each worker runs through ``traced_worker``, which records (in the worker process) the
training indices its sampler handed out, every file it opened for writing under the run folder and
torch's thread count when training starts and ends. Cost: ~15-35 s on a 2-core machine, almost all
of it the workers' start-up (imports).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hybridlib import distributed, training
from hybridlib.config import load_config
from hybridlib.errors import ConfigError, RunError
from hybridlib.runs import LOG_COLUMNS
from hybridlib.threads import allowed_cpus

TRACE_ENV = "HYBRIDLIB_TEST_TRACE_DIR"

# DDP (2 x 8 texts per step) vs one process (16 texts per step) on the same batches: without dropout
# and length bucketing both see identical global batches, so they differ only by float rounding.
COMPARABLE = {"dropout": 0.0, "embed_dropout": 0.0, "bucket_by_length": False, "epochs": 2, "batch_size": 16,
              "pretrained_embeddings": "ppmi"}  # rank 0 alone computes ppmi: DDP must still match the single run
LOSS_TOL = 1e-4  # absolute, on per-epoch train/val loss (measured: < 1e-6)
ACC_TOL = 1 / 48 + 1e-9  # at most one of the 48 validation texts may flip (measured: none)
WEIGHT_TOL = 1e-3  # max |w_ddp - w_single| of the saved best model (measured: ~1e-6)


def traced_worker(cfg, run_dir, data, progress=True):
    """hybridlib.training.train_worker, recording what this rank read and wrote (runs in the worker)."""
    from hybridlib.batching import LengthBucketSampler

    rank = int(os.environ["RANK"])
    run_root = os.path.abspath(run_dir)
    batches, writes = [], []
    original_iter = LengthBucketSampler.__iter__

    def recording_iter(self):
        for b in original_iter(self):
            if self.shuffle:  # training batches (validation is not shuffled)
                batches.append({"epoch": self.epoch, "rank": self.rank, "world_size": self.world_size, "indices": list(b)})
            yield b

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event == "os.rename":  # also os.replace: record the destination
            path, writing = args[1], True
        elif event in ("os.mkdir", "os.remove"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            if p == run_root or p.startswith(run_root + os.sep):
                writes.append(os.path.relpath(p, run_root))

    threads = {}
    real_train = training.train

    def recording_train(*args, **kwargs):
        threads["start"] = torch.get_num_threads()  # as the process group set it
        out = real_train(*args, **kwargs)
        threads["end"] = torch.get_num_threads()  # as the run's num_threads set it
        return out

    inits = []
    real_init = training.initialise_embedding

    def recording_init(*args, **kwargs):
        inits.append(args[1])
        return real_init(*args, **kwargs)

    LengthBucketSampler.__iter__ = recording_iter
    training.train = recording_train  # train_worker calls it inside the process group
    training.initialise_embedding = recording_init
    sys.addaudithook(audit)
    result = training.train_worker(cfg, run_dir, data, progress)
    record = {
        "rank": rank,
        "batches": batches,
        "writes": writes,
        "cache_files": [f["filename"] for f in data.splits["train"].cache_files],
        "cpus": len(allowed_cpus()),
        "threads": threads,
        "embedding_inits": inits,
    }
    Path(os.environ[TRACE_ENV], f"rank{rank}.json").write_text(json.dumps(record))
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_params):
    """A 2-process run and a 1-process run of the same config and data."""
    from hybridlib.data import prepare_data

    tmp = tmp_path_factory.mktemp("dist")
    cfg2 = load_config(tiny_params, {**COMPARABLE, "num_processes": 2})
    data = prepare_data(cfg2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRACE_ENV, str(tmp))
        mp.setattr(training, "train_worker", traced_worker)
        res2 = training.fit(cfg2, tmp / "ddp", data, progress=False)
    traces = {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)}

    cfg1 = load_config(tiny_params, {**COMPARABLE, "num_processes": 1})
    res1 = training.fit(cfg1, tmp / "single", data, progress=False)  # one process: trains right here
    return {"ddp": res2, "single": res1, "traces": traces, "dir": tmp, "data": data, "cfg": cfg2}


def test_ranks_read_disjoint_shards_covering_the_data(runs):
    t0, t1 = runs["traces"][0], runs["traces"][1]
    assert {(b["rank"], b["world_size"]) for t in (t0, t1) for b in t["batches"]} == {(0, 2), (1, 2)}
    assert {b["rank"] for b in t0["batches"]} == {t0["rank"]}
    n = len(runs["data"].splits["train"])
    for epoch in (1, 2):
        shard = [[i for b in t["batches"] if b["epoch"] == epoch for i in b["indices"]] for t in (t0, t1)]
        assert len(shard[0]) == len(shard[1]) == n // 2  # same number of steps on both ranks
        assert not set(shard[0]) & set(shard[1])
        assert sorted(shard[0] + shard[1]) == list(range(n))
        assert all(len(b["indices"]) == 8 for t in (t0, t1) for b in t["batches"])  # batch_size 16 / 2


def test_rank0_alone_writes_the_artifacts(runs):
    t0, t1 = runs["traces"][0], runs["traces"][1]
    assert t1["writes"] == []
    written = {Path(p).parts[0] for p in t0["writes"] if p != "."}
    assert {"model.pt", "last.pt", "training_log.csv", "tokenizer", "train_info.json"} <= written
    run_dir = runs["dir"] / "ddp"
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"model.pt", "last.pt", "training_log.csv", "tokenizer", "train_info.json"}  # no temp files, no per-rank files
    header = (run_dir / "training_log.csv").read_text().splitlines()[0]
    assert header.split(",") == LOG_COLUMNS
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert isinstance(last["rng"], list) and len(last["rng"]) == 2  # one RNG state per rank, for --resume
    assert not any(k.startswith("module.") for k in last["model"])  # the plain model, not the DDP wrapper


def test_workers_share_the_parents_tokenized_data(runs):
    parent = [f["filename"] for f in runs["data"].splits["train"].cache_files]
    assert parent, "prepare_data should return memory-mapped (cached) splits"
    assert runs["traces"][0]["cache_files"] == runs["traces"][1]["cache_files"] == parent


def test_ppmi_is_computed_by_rank_0_alone(runs):
    """DDP gives every rank rank 0's weights when it wraps the model: the other ranks skip the PPMI vectors."""
    assert runs["cfg"].pretrained_embeddings == "ppmi"
    assert runs["traces"][0]["embedding_inits"] == ["ppmi"] and runs["traces"][1]["embedding_inits"] == []


def test_workers_share_the_cores_then_use_the_runs_num_threads(runs):
    """Joining the process group, each of the 2 CPU workers takes its share of this process's cores (at least 1);
    in training, the run's num_threads (the tiny params pin 1) is what counts. No core count is assumed."""
    assert runs["cfg"].num_threads == 1
    for trace in runs["traces"].values():
        assert trace["threads"]["start"] == max(1, trace["cpus"] // 2)
        assert trace["threads"]["end"] == runs["cfg"].num_threads


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    ddp, single = runs["ddp"], runs["single"]
    assert len(ddp.history) == len(single.history) == 2
    for a, b in zip(ddp.history, single.history, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < LOSS_TOL, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) < LOSS_TOL, (a, b)
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= ACC_TOL, (a, b)
        assert a["lr"] == pytest.approx(b["lr"])  # same number of optimizer steps
    m2 = torch.load(runs["dir"] / "ddp" / "model.pt", weights_only=True)["model"]
    m1 = torch.load(runs["dir"] / "single" / "model.pt", weights_only=True)["model"]
    assert max((m2[k] - m1[k]).abs().max().item() for k in m1) < WEIGHT_TOL


def test_fit_with_one_process_is_train(tiny_params, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", lambda *a, **k: calls.append(a) or "trained")
    monkeypatch.setattr(training, "launch", lambda *a, **k: pytest.fail("must not launch workers"))
    assert training.fit(load_config(tiny_params), tmp_path / "run") == "trained"
    assert len(calls) == 1


def test_bad_settings_fail_before_any_worker_starts(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "launch", lambda *a, **k: pytest.fail("must not launch workers"))
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        training.fit(load_config(tiny_params, {"num_processes": 3, "batch_size": 16}), tmp_path / "a")
    # (an existing run folder is refused before any worker starts too: test_reliability.test_a_run_is_never_overwritten)


def test_backend_is_gloo_on_cpu_and_nccl_on_cuda():
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def test_worker_errors_keep_their_type_and_message():
    class Failure:
        message = {"message": "RunError: Training diverged: the loss became nan", "extraInfo": {}}
        exitcode = 1

    class Failed:
        def get_first_failure(self):
            return 1, Failure()

    err = distributed._worker_error(Failed(), "/tmp/logs")
    assert isinstance(err, RunError) and str(err) == "Training diverged: the loss became nan"
    Failure.message = "ValueError: boom"
    err = distributed._worker_error(Failed(), "/tmp/logs")
    assert isinstance(err, RunError) and "process 1" in str(err) and "/tmp/logs" in str(err)
