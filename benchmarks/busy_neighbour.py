"""Training speed with and without a busy neighbour (issue #19): the default thread policy against 1 and 2 threads.

Whole runs (the issue's table; each run is ``hybridlib run`` through the notebooks, epoch seconds from its
training_log.csv):

    .venv/bin/python benchmarks/busy_neighbour.py --json outputs/busy_neighbour.json

    {quiet, one busy neighbour} x {default, num_threads 1, num_threads 2}: a markdown table on stdout, every
    figure in the JSON. "default" sets no num_threads (and drops OMP_NUM_THREADS from the runs' environment), so
    it measures whatever the project does by default.

Micro-measurements of training steps (no data needed; for choosing the policy's interval and thresholds):

    .venv/bin/python benchmarks/busy_neighbour.py --micro [--seconds 20]     # {quiet, busy} x {auto, 1, 2}
    .venv/bin/python benchmarks/busy_neighbour.py --appear [--interval 1.0]  # auto; a neighbour comes and goes
    .venv/bin/python benchmarks/busy_neighbour.py --tokenize                 # the Rust tokenizer's thread pool

The neighbour is ``python -c "while True: pass"`` (:func:`busy_neighbour`), started before and stopped after
each measurement. The machine should be otherwise idle: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_ARGS = ["-p", "max_train_samples", "1500", "-p", "max_eval_samples", "200", "-p", "max_length", "256",
            "-p", "epochs", "1", "-p", "baseline", "false"]
POLICIES = {"default": None, "num_threads 1": 1, "num_threads 2": 2}
_SPIN = """import os, sys
{pin}ppid = os.getppid()
sys.stdout.write("r"); sys.stdout.flush()
while os.getppid() == ppid:  # a pure Python busy loop; ends by itself if its parent dies
    for _ in range(1000000):
        pass
"""


@contextlib.contextmanager
def busy_neighbour(cpu: int | None = None, python: str | None = None) -> Iterator[subprocess.Popen]:
    """Run another process that keeps one core busy (``while True: pass``) while the block runs.

    ``cpu``: pin it to that CPU (None: the scheduler places it). It is running when the block starts, and
    killed and reaped when the block ends, whether it returns or raises. Yields the ``Popen``.
    """
    pin = f"os.sched_setaffinity(0, {{{int(cpu)}}})\n" if cpu is not None else ""
    proc = subprocess.Popen([python or sys.executable, "-c", _SPIN.format(pin=pin)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if proc.stdout.read(1) != b"r":  # started and spinning (or it failed: say so)
            raise RuntimeError(f"busy_neighbour: the spinning process exited at once (code {proc.wait()})")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def load() -> dict:
    return {"load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


class ThirdParty:
    """Cores kept busy by processes that are neither this one nor its (waited-for) children, over a block:
    the machine's other users, who make a measurement noisy."""

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        wall = end[0] - self.start[0]
        self.cores = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / wall if wall > 0 else 0.0
        return False

    @staticmethod
    def _read():
        import resource

        from hybridlib.threads import allowed_cpus, cpu_busy_seconds

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.monotonic(), cpu_busy_seconds(allowed_cpus()) or 0.0,
                time.process_time() + ru.ru_utime + ru.ru_stime)


MAX_WAIT = [300.0]  # --max-wait


def wait_quiet(level: float = 0.15, window: float = 3.0, max_wait: float | None = None) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``level`` cores for ``window`` s; the seconds waited."""
    t0 = said = time.monotonic()
    max_wait = MAX_WAIT[0] if max_wait is None else max_wait
    while time.monotonic() - t0 < max_wait:
        with ThirdParty() as tp:
            time.sleep(window)
        if tp.cores < level:
            break
        if time.monotonic() - said > 30 or said == t0:
            said = time.monotonic()
            print(f"[busy_neighbour] waiting for a quiet machine (others use {tp.cores:.2f} cores) ...",
                  file=sys.stderr, flush=True)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- whole runs


def whole_run(params: str, extra: list[str], num_threads: int | None, busy: bool, outputs: Path, name: str) -> dict:
    cli = str(Path(sys.executable).parent / "hybridlib")
    cmd = [cli, "run", params, *RUN_ARGS, *extra, "--run-name", name, "--outputs", str(outputs)]
    if num_threads is not None:
        cmd += ["-p", "num_threads", str(num_threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    decisions = outputs / f"{name}.threads.jsonl"  # the automatic policy's decisions (hybridlib.threads.LOG_ENV)
    env["HYBRIDLIB_THREADS_LOG"] = str(decisions)
    waited = wait_quiet()
    before = load()
    t0 = time.perf_counter()
    with ThirdParty() as tp:
        with busy_neighbour() if busy else _nothing():
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(outputs / name / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    info_file = outputs / name / "train_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {"epoch_seconds": [float(r["seconds"]) for r in rows], "run_seconds": wall,
            "num_threads_at_end": info.get("num_threads"), "load_before": before["load_average"],
            "load_after": load()["load_average"], "val_accuracy": [float(r["val_accuracy"]) for r in rows],
            "third_party_cores": tp.cores, "waited_for_quiet_s": waited, "decisions": _decisions(decisions)}


def _decisions(path: Path) -> dict:
    """How the automatic policy decided during a run: decisions per thread count, and the seconds spent at each."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seconds: dict[str, float] = {}
    for a, b in zip(rows, rows[1:]):
        if a["pid"] == b["pid"]:
            seconds[str(a["threads"])] = seconds.get(str(a["threads"]), 0.0) + b["time"] - a["time"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["threads"])] = counts.get(str(r["threads"]), 0) + 1
    return {"decisions": len(rows), "per_thread_count": counts, "seconds_at": seconds,
            "first": rows[:3], "changes": [r for a, r in zip(rows, rows[1:]) if a["threads"] != r["threads"]][:50]}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def table(params: str, extra: list[str], outputs: Path, repeats: int, cells: set[str] | None = None) -> dict:
    results: dict = {}
    for cond in ("quiet", "busy"):
        for label, n in POLICIES.items():
            if cells and f"{cond}:{label.replace(' ', '')}" not in cells:
                continue
            for r in range(repeats):
                name = f"{cond}-{label.replace(' ', '')}-{r}"
                print(f"[busy_neighbour] {name} ...", file=sys.stderr, flush=True)
                res = whole_run(params, extra, n, cond == "busy", outputs, name)
                print(f"[busy_neighbour]   epoch {res['epoch_seconds'][0]:.1f} s (threads at the end "
                      f"{res['num_threads_at_end']}; others used {res['third_party_cores']:.2f} cores meanwhile)",
                      file=sys.stderr, flush=True)
                results.setdefault(cond, {}).setdefault(label, []).append(res)
    return results


def markdown(results: dict) -> str:
    def epoch(cond, label):
        runs = results.get(cond, {}).get(label)
        return min(r["epoch_seconds"][0] for r in runs) if runs else None

    def cell(v):
        return f"{v:.1f} s" if v is not None else "-"

    lines = ["| | default | num_threads 1 | num_threads 2 | default / better of 1 and 2 | others' cores meanwhile |",
             "|---|---|---|---|---|---|"]
    for cond, title in (("quiet", "quiet"), ("busy", "one busy neighbour")):
        cells = [epoch(cond, label) for label in POLICIES]
        pinned = [c for c in cells[1:] if c is not None]
        ratio = f"{cells[0] / min(pinned):.2f}x" if cells[0] is not None and pinned else "-"
        third = [f"{r['third_party_cores']:.2f}" for label in POLICIES for r in results.get(cond, {}).get(label, [])]
        lines.append(f"| {title} | " + " | ".join(cell(c) for c in cells) + f" | {ratio} | {' / '.join(third)} |")
    d, two = epoch("quiet", "default"), epoch("quiet", "num_threads 2")
    if d is not None and two is not None:
        lines.append(f"\nquiet: default / num_threads 2 = {d / two:.2f}x")
    lines.append("(seconds per epoch, training + validation, best of the repeats; the last column: cores that processes "
                 "other than the run and its neighbour used meanwhile, per run)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- micro-measurements


def _trainer(params: str | None, batch: int, length: int):
    """A closure doing one training step of the hybrid model (fwd + bwd + AdamW) on a fixed random batch."""
    import torch
    import torch.nn.functional as F

    from hybridlib.config import Config, load_config
    from hybridlib.model import HybridClassifier
    from hybridlib.runtime import autocast, resolve_precision

    cfg = load_config(params, {"max_length": length}) if params else Config(max_length=length)
    torch.manual_seed(0)
    model = HybridClassifier(cfg, 30522, 2, 0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 30522, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    y = torch.randint(0, 2, (batch,))
    device = torch.device("cpu")
    amp = resolve_precision(cfg.precision, device)

    def step() -> None:
        with autocast(device, amp):
            logits = model(ids, mask)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    return step, f"batch {batch}, {length} tokens, precision {amp or 'fp32'}"


def _timed(step, threads, seconds: float, max_steps: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        threads.update()
        step()
    counts, times = [], []
    t0 = time.perf_counter()
    while (time.perf_counter() - t0 < seconds or len(times) < 2) and len(times) < max_steps:
        s = time.perf_counter()
        counts.append(threads.update())
        step()
        times.append(time.perf_counter() - s)
    return {"steps": len(times), "seconds": sum(times), "steps_per_s": len(times) / sum(times),
            "threads": sorted(set(counts)), "threads_last": counts[-1], "others_busy_last": threads.others}


def micro(args) -> dict:
    from hybridlib.threads import CPUThreads

    step, what = _trainer(args.params, args.batch, args.length)
    out: dict = {"what": what, "seconds_each": args.seconds, **load()}
    for cond in ("quiet", "busy"):
        for label, n in (("auto", None), ("1", 1), ("2", 2)):
            waited = wait_quiet()
            with ThirdParty() as tp, busy_neighbour() if cond == "busy" else _nothing():
                threads = CPUThreads(n, interval=args.interval)
                r = _timed(step, threads, args.seconds, args.max_steps)
            r.update(samples_per_s=r["steps_per_s"] * args.batch, third_party_cores=tp.cores, waited_for_quiet_s=waited)
            out.setdefault(cond, {})[label] = r
            print(f"[micro] {cond:5s} {label:4s}: {r['samples_per_s']:6.1f} samples/s, {r['steps']} steps, "
                  f"threads {r['threads']}, estimate {r['others_busy_last']:.2f}, third party {tp.cores:.2f}",
                  file=sys.stderr, flush=True)
    return out


def appear(args) -> dict:
    """Auto policy; quiet for ``seconds``, then a neighbour for ``seconds``, then quiet again: per-step log."""
    from hybridlib.threads import CPUThreads

    step, what = _trainer(args.params, args.batch, args.length)
    waited = wait_quiet()
    threads = CPUThreads(None, interval=args.interval)
    for _ in range(2):
        threads.update()
        step()
    log, t0, events = [], time.perf_counter(), {}

    def run_for(seconds: float, phase: str) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            s = time.perf_counter()
            n = threads.update()
            step()
            log.append({"t": s - t0, "phase": phase, "threads": n, "step_s": time.perf_counter() - s,
                        "others": round(threads.others, 3)})

    with ThirdParty() as tp:
        run_for(args.seconds, "quiet")
        events["neighbour_start"] = time.perf_counter() - t0
        with busy_neighbour():
            run_for(args.seconds, "busy")
        events["neighbour_stop"] = time.perf_counter() - t0
        run_for(args.seconds, "quiet again")
    events.update(third_party_cores=tp.cores, waited_for_quiet_s=waited)
    phases = {}
    for phase in ("quiet", "busy", "quiet again"):
        rows = [r for r in log if r["phase"] == phase]
        phases[phase] = {"samples_per_s": len(rows) * args.batch / sum(r["step_s"] for r in rows),
                         "threads": [r["threads"] for r in rows]}
    busy_rows = [r for r in log if r["phase"] == "busy"]
    down = next((r["t"] + r["step_s"] for r in busy_rows if r["threads"] < threads.limit), None)
    again = [r for r in log if r["phase"] == "quiet again"]
    up = next((r["t"] for r in again if r["threads"] == threads.limit), None)
    res = {"what": what, "interval": args.interval, **events, "phases": phases,
           "seconds_to_fewer_threads": None if down is None else down - events["neighbour_start"],
           "seconds_to_all_threads_again": None if up is None else up - events["neighbour_stop"], "log": log, **load()}
    for phase, p in phases.items():
        print(f"[appear] {phase:12s}: {p['samples_per_s']:6.1f} samples/s, threads {p['threads']}", file=sys.stderr)
    print(f"[appear] interval {args.interval}: fewer threads {res['seconds_to_fewer_threads']} s after the neighbour "
          f"started; all threads again {res['seconds_to_all_threads_again']} s after it stopped; third party "
          f"{tp.cores:.2f} cores", file=sys.stderr)
    return res


_TOKENIZE = """
import sys, time
import pyarrow.parquet as pq
from hybridlib.tokens import encode_texts, load_tokenizer
tok = load_tokenizer(sys.argv[2])
texts = pq.read_table(sys.argv[1], columns=["text"]).column("text").to_pylist()[: int(sys.argv[3])]
encode_texts(tok, texts[:200], 256, "head_tail")  # warm-up (and the thread pool started)
t0 = time.perf_counter()
for i in range(0, len(texts), 1000):  # as hybridlib.data.tokenize: batches of 1000 texts
    encode_texts(tok, texts[i : i + 1000], 256, "head_tail")
print(len(texts) / (time.perf_counter() - t0))
"""


def tokenize(args) -> dict:
    """Texts/s of the Rust tokenizer (its own thread pool) quiet and beside a neighbour, with 1 and 2 pool threads."""
    out: dict = {"texts": args.texts}
    for cond in ("quiet", "busy"):
        for label, n in (("default", None), ("1", 1), ("2", 2)):
            env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
            env["TOKENIZERS_PARALLELISM"] = "true"
            if n:
                env["RAYON_NUM_THREADS"] = str(n)
            waited = wait_quiet()
            with ThirdParty() as tp, busy_neighbour() if cond == "busy" else _nothing():
                proc = subprocess.run([sys.executable, "-c", _TOKENIZE, str(Path(args.data_dir) / "train.parquet"),
                                       args.tokenizer, str(args.texts)], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            rate = float(proc.stdout.split()[-1])
            out.setdefault(cond, {})[label] = {"texts_per_s": rate, "third_party_cores": tp.cores,
                                               "waited_for_quiet_s": waited}
            print(f"[tokenize] {cond:5s} {label:7s}: {rate:8.0f} texts/s, third party {tp.cores:.2f}", file=sys.stderr,
                  flush=True)
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/imdb.yaml")
    ap.add_argument("--data-dir", default="../shared/data/imdb")
    ap.add_argument("--tokenizer", default="../shared/tokenizers/bert-base-uncased")
    ap.add_argument("--outputs", help="Folder for the runs (default: a temporary folder, removed at the end).")
    ap.add_argument("--repeats", type=int, default=1, help="Whole runs per cell (the table shows the fastest).")
    ap.add_argument("--json", help="Write every figure here.")
    ap.add_argument("--cells", help="Only these cells, e.g. quiet:default,busy:num_threads1 (default: all six).")
    ap.add_argument("--micro", action="store_true", help="Training steps {quiet, busy} x {auto, 1, 2} instead.")
    ap.add_argument("--appear", action="store_true", help="Auto policy while a neighbour comes and goes.")
    ap.add_argument("--tokenize", action="store_true", help="Tokenization {quiet, busy} x {default, 1, 2} threads.")
    ap.add_argument("--texts", type=int, default=5000, help="Tokenize: texts of the train split.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Micro: seconds per measurement (or phase).")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--max-wait", type=float, default=300.0,
                    help="Before each measurement, wait at most this long for other processes to quieten down.")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--interval", type=float, default=None, help="Micro: CPUThreads interval (default: its own).")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    MAX_WAIT[0] = args.max_wait
    if args.interval is None:
        from hybridlib.threads import DEFAULT_INTERVAL

        args.interval = DEFAULT_INTERVAL
    if args.micro or args.appear or args.tokenize:
        result = micro(args) if args.micro else appear(args) if args.appear else tokenize(args)
    else:
        extra = ["-p", "data_dir", args.data_dir, "-p", "tokenizer", args.tokenizer]
        with tempfile.TemporaryDirectory(prefix="busy-neighbour-") as tmp:
            outputs = Path(args.outputs) if args.outputs else Path(tmp)
            result = {"params": args.params, "args": RUN_ARGS + extra, "start": load(),
                      "runs": table(args.params, extra, outputs, args.repeats,
                                    set(args.cells.split(",")) if args.cells else None)}
        result["end"] = load()
        print(markdown(result["runs"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
