"""How long the command line takes to answer: --help, `hybridlib params`, and refusals of a bad parameter or path.

    python benchmarks/startup.py                  # this checkout, 5 runs per command: median and max wall seconds
    python benchmarks/startup.py --ref ../old     # the same commands against another checkout (its hybridlib/),
                                                  # alternating runs, with the ratio of the medians

Then the slowest imports of `import hybridlib.cli` (python -X importtime), cumulative milliseconds.
Every command's exit code is checked: --help and params must exit 0, refusals 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [  # (arguments, expected exit code)
    (["--help"], 0),
    (["params"], 0),
    (["run", "--help"], 0),
    (["run", "params/ag_news.yaml", "-p", "lr", "banana"], 2),
    (["run", "params/imdb.yaml", "-p", "data_dir", "no/such/folder"], 2),
    (["predict", "--checkpoint", "outputs/no-such-run", "--text", "hi"], 2),
]


def wall(args: list[str], tree: Path) -> tuple[float, int]:
    """(seconds, exit code) of `python -m hybridlib ARGS` run in ``tree`` (its hybridlib/ is the one imported)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "hybridlib", *args], cwd=tree, env=env,
                          capture_output=True).returncode
    seconds = time.perf_counter() - t0
    return seconds, code


def import_times(tree: Path, top: int = 8) -> list[tuple[float, str]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hybridlib.cli"], cwd=tree, env=env,
                         capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines()[1:]:  # "import time: self [us] | cumulative | imported package"
        _, cumulative, name = line.split("|")
        if len(name) - len(name.lstrip()) <= 3:  # imported by hybridlib.cli or one level below
            rows.append((int(cumulative) / 1000, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ref", type=Path, help="another checkout to compare with (its folder holding hybridlib/)")
    a = ap.parse_args()
    trees = {"this": ROOT} | ({"ref": a.ref.resolve()} if a.ref else {})
    print("| command | " + " | ".join(f"{k} median (max) s" for k in trees) + (" | ratio |" if a.ref else " |"))
    print("|---" * (len(trees) + 1 + bool(a.ref)) + "|")
    for args, expected in COMMANDS:
        times: dict[str, list[float]] = {k: [] for k in trees}
        for _ in range(a.runs):
            for k, tree in trees.items():
                seconds, code = wall(args, tree)
                if code != expected:
                    sys.exit(f"hybridlib {' '.join(args)} ({k}) exited {code}, expected {expected}")
                times[k].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[k]:.2f} ({max(times[k]):.2f})" for k in trees]
        ratio = [f"{med['this'] / med['ref']:.2f}"] if a.ref else []
        print(f"| `hybridlib {' '.join(args)}` | " + " | ".join(cells + ratio) + " |")
    for k, tree in trees.items():
        print(f"\nslowest imports of `import hybridlib.cli` ({k}), cumulative ms:")
        for ms, name in import_times(tree):
            print(f"  {ms:8.1f}  {name}")


if __name__ == "__main__":
    main()
