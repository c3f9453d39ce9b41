"""How many CPU threads torch should use: at most one per physical core this process may use, minus the cores
other processes keep busy (with more threads than free cores, each parallel region waits for the thread that
shares a core). The policy and its measurements: docs/performance.md, "Threads on a busy machine".
``HYBRIDLIB_THREADS_LOG``: a file to which every automatic decision is appended.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import time
from pathlib import Path

import torch

from hybridlib.errors import ConfigError

DEFAULT_INTERVAL = 1.0  # seconds between decisions
FIRST_SAMPLE = 0.15  # seconds: the shortest first measurement (update() waits for the rest of it once)
STALE = 10.0  # seconds: after a longer gap without update() calls the next decision comes soon (RECHECK)
RECHECK = 0.3  # seconds: the next decision after the first one and after a gap
LOG_ENV = "HYBRIDLIB_THREADS_LOG"  # a file: each automatic decision is appended to it as a JSON line (diagnostics)
UP_AFTER = 3  # decisions in a row that allow more threads before there are more (fewer: at once) ...
UP_AFTER_MAX = 48  # ... doubled, up to this, each time a rise had to be undone within SETTLED decisions
SETTLED = 10
BUSY_DOWN = 0.4  # a core others use at least this much (in cores) is taken: fewer threads
BUSY_UP = 0.2  # ... and only below this much is it free again: more threads (between the two: no change)


# ----------------------------------------------------------------------------- the decision (pure)


def choose_threads(allowed: int, others_busy: float, current: int | None = None, limit: int | None = None,
                   down: float = BUSY_DOWN, up: float = BUSY_UP) -> int:
    """Threads to use on ``allowed`` cores when others keep ``others_busy`` cores busy, at most ``limit``;
    ``current`` (the count in force) is kept between the ``down`` and ``up`` thresholds, so it does not flap."""
    allowed = max(1, int(allowed))
    limit = allowed if limit is None else max(1, min(int(limit), allowed))
    busy = max(0.0, float(others_busy)) if math.isfinite(others_busy) else 0.0

    def fit(threshold: float) -> int:  # threads beside the cores counted as taken at this threshold
        taken = math.floor(busy + 1.0 - threshold)
        return max(1, min(limit, allowed - taken))

    low, high = fit(up), fit(down)  # low <= high
    if current is None:
        return high
    return min(max(int(current), low), high)


# ----------------------------------------------------------------------------- what this process may use


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int]) -> int:
    """How many physical cores ``cpus`` span (SMT siblings count once; len(cpus) where unknown)."""
    seen = set()
    for c in cpus:
        try:
            seen.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(seen))


def cgroup_cpu_limit() -> int | None:
    """Cores allowed by a cgroup v2 CPU quota (``cpu.max``), rounded up; None when unlimited or unknown."""
    paths = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                paths.append(Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "cpu.max")
    except OSError:
        pass
    paths.append(Path("/sys/fs/cgroup/cpu.max"))
    for p in paths:
        try:
            quota, period = p.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max":
            return None
        try:
            return max(1, math.ceil(int(quota) / int(period)))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` when set to a positive integer (torch's own default follows it)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def thread_limit(cpus: list[int]) -> int:
    """The most threads the automatic policy uses: physical cores of ``cpus``, capped by quota and OMP_NUM_THREADS."""
    n = physical_cores(cpus)
    for cap in (cgroup_cpu_limit(), env_threads()):
        if cap:
            n = min(n, cap)
    return max(1, n)


# ----------------------------------------------------------------------------- measuring the others


@functools.cache
def clock_tick() -> float:
    """Ticks per second of /proc/stat's counters."""
    return float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 100.0


def cpu_busy_seconds(cpus: list[int], stat: str | None = None) -> float | None:
    """Busy seconds (all processes, steal included) of ``cpus`` since boot, from /proc/stat; None where unreadable."""
    try:
        text = Path("/proc/stat").read_text() if stat is None else stat
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    ticks, found = 0, 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        fields = line.split()
        if fields[0] not in want:
            continue
        v = [int(x) for x in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        found += 1
    return ticks / clock_tick() if found else None


def own_wait_seconds() -> float | None:
    """Seconds this process's threads spent runnable but waiting for a CPU, from /proc/self/task/*/schedstat."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])  # on-CPU ns, run-queue wait ns, time slices
            found = True
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9 if found else None


class Sample:
    """A reading of the clocks: wall time, busy time of the allowed CPUs, this process's CPU time and wait time."""

    __slots__ = ("wall", "busy", "own", "wait")

    def __init__(self, cpus: list[int]):
        self.wall = time.monotonic()
        self.busy = cpu_busy_seconds(cpus)
        self.own = time.process_time()
        self.wait = own_wait_seconds()

    def others_busy(self, before: Sample) -> float:
        """Cores (a float) that other processes kept busy between ``before`` and this sample."""
        wall = self.wall - before.wall
        if wall <= 0 or self.busy is None or before.busy is None:
            return 0.0
        return max(0.0, (self.busy - before.busy) - (self.own - before.own)) / wall

    def waiting(self, before: Sample) -> float:
        """Cores' worth of this process's threads waiting for a CPU between ``before`` and this sample."""
        wall = self.wall - before.wall
        if wall <= 0 or self.wait is None or before.wait is None:
            return 0.0
        return max(0.0, self.wait - before.wait) / wall


# ----------------------------------------------------------------------------- the policy


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# per set of allowed CPUs: the latest measurement and the count decided with it, where a new CPUThreads starts
_LATEST: dict[tuple[int, ...], tuple[Sample, int | None]] = {}


def _latest(cpus: list[int]) -> tuple[Sample, int | None]:
    key = tuple(cpus)
    if key not in _LATEST:
        _LATEST[key] = (Sample(cpus), None)
    return _LATEST[key]


class CPUThreads:
    """torch's CPU thread count: ``num_threads`` exactly (bit-for-bit reproducible), or None: automatic on CPU
    (torch's count elsewhere), re-decided at most every ``interval`` seconds by ``update()``, called per batch."""

    def __init__(self, num_threads: int | None = None, device: torch.device | str = "cpu",
                 interval: float = DEFAULT_INTERVAL):
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral)
                                        or num_threads < 1):
            raise ConfigError(f"num_threads must be a positive integer or None (automatic), not {num_threads!r}.")
        num_threads = None if num_threads is None else int(num_threads)
        self.num_threads, self.interval = num_threads, float(interval)
        self.device = torch.device(device)
        self.cpus = allowed_cpus()
        self.limit = thread_limit(self.cpus)
        self.others = self.waiting = 0.0  # the last estimates: cores busy with others, cores' worth of our waiting
        self.decisions = 0
        self._up = 0  # decisions in a row that allowed more threads than in force
        self._up_after, self._rose = UP_AFTER, None  # decisions needed for a rise; the decision of the last rise
        self._last: Sample | None = None
        if num_threads:
            torch.set_num_threads(num_threads)
            self.auto = False
        else:
            self.auto = self.device.type == "cpu" and not _distributed() and cpu_busy_seconds(self.cpus) is not None
            if self.auto:
                self._last = _latest(self.cpus)[0]
        self._count = torch.get_num_threads()
        self._next = 0.0  # the first update() decides (after a measurement of at least FIRST_SAMPLE seconds)

    @property
    def kept(self) -> bool:
        """True where nothing is chosen: torch's count stays whatever it is (CUDA, torch.distributed, no /proc)."""
        return not self.auto and not self.num_threads

    @property
    def count(self) -> int:
        """The thread count in force."""
        return torch.get_num_threads() if self.kept else self._count

    def update(self) -> int:
        """Re-decide when ``interval`` seconds have passed; in between re-apply the count if other code changed it."""
        if self.kept:
            return torch.get_num_threads()
        if self.auto and time.monotonic() >= self._next:
            return self._decide()
        if torch.get_num_threads() != self._count:
            torch.set_num_threads(self._count)
        return self._count

    def _decide(self) -> int:
        if _distributed():  # joined a process group after construction: keep what is set
            self.auto = False
            return torch.get_num_threads()
        last = self._last
        if self.decisions == 0:
            last, count = _latest(self.cpus)  # perhaps newer than at construction
            age = time.monotonic() - last.wall
            if age < FIRST_SAMPLE and count is not None:  # another CPUThreads decided just now: the same
                return self._adopt(count, last)
            if age < FIRST_SAMPLE:  # too short a measurement says nothing
                time.sleep(FIRST_SAMPLE - age)
        age = time.monotonic() - last.wall
        # the first decision, or one after a long gap: an average over a while in which we did other things (or
        # nothing); it may miss a neighbour that just arrived, so the next decision comes soon
        fresh = self.decisions == 0 or age > max(STALE, 4 * self.interval)
        now = Sample(self.cpus)
        self.others, self.waiting = now.others_busy(last), now.waiting(last)
        # our threads' waiting says how many cores they cannot have, but only while they ran at the count in force
        busy = self.others if fresh else max(self.others, self.waiting)
        n = choose_threads(len(self.cpus), busy, self._count if self.decisions else None, self.limit)
        # more threads only once the cores stayed free a while: a wrong rise costs steps many times slower, a late
        # one a little; fewer threads at once
        self._up = self._up + 1 if self.decisions and n > self._count else 0
        if 0 < self._up < self._up_after:
            n = self._count
        if self._rose is not None:  # on a machine whose load comes and goes, wait longer before rising again
            if n < self._count and self.decisions - self._rose <= SETTLED:
                self._up_after, self._rose = min(2 * self._up_after, UP_AFTER_MAX), None
            elif self.decisions - self._rose > SETTLED:
                self._up_after, self._rose = UP_AFTER, None
        if self.decisions and n > self._count:
            self._rose = self.decisions
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self._prev_wall = last.wall
        self._count, self._last = n, now
        _LATEST[tuple(self.cpus)] = (now, n)
        self._next = now.wall + (min(RECHECK, self.interval) if fresh else self.interval)
        self.decisions += 1
        if os.environ.get(LOG_ENV):
            self._log(os.environ[LOG_ENV], now, fresh)
        return n

    def _adopt(self, n: int, sample: Sample) -> int:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self._count, self._last, self._prev_wall = n, sample, sample.wall
        self._next = time.monotonic() + min(RECHECK, self.interval)
        self.decisions += 1
        return n

    def _log(self, path: str, now: Sample, fresh: bool) -> None:
        row = {"time": time.time(), "pid": os.getpid(), "threads": self._count, "others": round(self.others, 3),
               "waiting": round(self.waiting, 3), "fresh": fresh, "window_s": round(now.wall - self._prev_wall, 3)}
        try:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError:
            pass

    def __repr__(self) -> str:
        mode = "auto" if self.auto else ("fixed" if self.num_threads else "kept")
        return f"CPUThreads({self.count} threads, {mode}, {len(self.cpus)} cpus, limit {self.limit})"
