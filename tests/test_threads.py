"""hybridlib.threads: the automatic CPU thread policy (decided on a fake clock, no timing checks); and the busy
neighbour that benchmarks/busy_neighbour.py measures it beside."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import fixtures
import psutil
import pytest
import torch

from hybridlib import threads as th
from hybridlib.errors import ConfigError
from hybridlib.threads import CPUThreads, choose_threads, cpu_busy_seconds


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("allowed, busy, expected", [
    (2, 0.0, 2), (2, 0.05, 2), (2, 1.0, 1), (2, 0.95, 1), (2, 2.0, 1), (2, 5.0, 1),
    (4, 0.0, 4), (4, 1.0, 3), (4, 2.0, 2), (4, 3.9, 1), (1, 0.0, 1), (1, 1.0, 1), (16, 1.0, 15),
])
def test_threads_are_the_cores_not_busy_with_others(allowed, busy, expected):
    for current in (None, 1, allowed):
        assert choose_threads(allowed, busy, current) == expected


def test_one_busy_neighbour_on_two_cores_means_one_thread_however_it_is_shared():
    # with 2 threads of ours the neighbour gets less than a core: still enough to give way
    assert choose_threads(2, 0.5, current=2) == 1
    assert choose_threads(2, 0.45, current=2) == 1


def test_hysteresis_keeps_the_count_between_the_thresholds():
    for busy in (0.25, 0.3, 0.35):  # neither clearly busy nor clearly free
        assert choose_threads(2, busy, current=1) == 1
        assert choose_threads(2, busy, current=2) == 2
        assert choose_threads(4, 1 + busy, current=2) == 2
        assert choose_threads(4, 1 + busy, current=3) == 3
    assert choose_threads(2, 0.5, current=2) == 1  # clearly busy: down
    assert choose_threads(2, 0.1, current=1) == 2  # clearly free: up
    # a sequence of estimates around the boundary does not flap
    counts, n = [], 2
    for busy in (0.1, 0.3, 0.25, 0.38, 0.22, 0.3, 0.5, 0.3, 0.25, 0.38, 0.21, 0.1):
        n = choose_threads(2, busy, current=n)
        counts.append(n)
    assert counts == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 2]


def test_limit_caps_and_current_above_the_cores_comes_down():
    assert choose_threads(8, 0.0, current=None, limit=4) == 4  # e.g. physical cores of 8 logical CPUs
    assert choose_threads(8, 5.0, current=4, limit=4) == 3
    assert choose_threads(2, 0.0, current=8) == 2  # torch's count above the allowed cores
    assert choose_threads(4, 0.3, current=16, limit=4) == 4
    assert choose_threads(2, float("nan"), current=None) == 2
    assert choose_threads(2, -1.0, current=1) == 2


def test_busy_seconds_from_proc_stat_text():
    stat = textwrap.dedent("""\
        cpu  400 0 200 1000 10 0 0 0 0 0
        cpu0 100 5 50 500 10 2 3 4 0 0
        cpu1 300 0 150 500 0 0 0 0 0 0
        cpu10 1000 0 0 0 0 0 0 0 0 0
        intr 12345
    """)
    tick = th.clock_tick()
    assert cpu_busy_seconds([0], stat) == pytest.approx((100 + 5 + 50 + 2 + 3 + 4) / tick)  # idle, iowait out
    assert cpu_busy_seconds([1], stat) == pytest.approx(450 / tick)
    assert cpu_busy_seconds([0, 1], stat) == pytest.approx((164 + 450) / tick)
    assert cpu_busy_seconds([1, 10], stat) == pytest.approx(1450 / tick)  # cpu1 is not cpu10
    assert cpu_busy_seconds([7], stat) is None


def test_others_busy_is_all_busy_time_minus_our_own():
    def sample(wall, busy, own):
        s = th.Sample.__new__(th.Sample)
        s.wall, s.busy, s.own = wall, busy, own
        return s

    a = sample(10.0, 100.0, 5.0)
    assert sample(12.0, 104.0, 7.0).others_busy(a) == pytest.approx(1.0)  # 2 s: 4 busy-s, 2 ours
    assert sample(12.0, 104.0, 9.0).others_busy(a) == pytest.approx(0.0)  # ours only
    assert sample(12.0, 104.2, 9.5).others_busy(a) == 0.0  # clock granularity: never negative
    assert sample(12.0, None, 9.0).others_busy(a) == 0.0


def test_thread_limit_follows_omp_num_threads_and_quota(monkeypatch):
    monkeypatch.setattr(th, "physical_cores", lambda cpus: len(cpus))
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert th.thread_limit([0, 1, 2, 3]) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.thread_limit([0, 1, 2, 3]) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "nonsense")
    assert th.thread_limit([0, 1, 2, 3]) == 4
    monkeypatch.setattr(th, "cgroup_cpu_limit", lambda: 2)
    assert th.thread_limit([0, 1, 2, 3]) == 2


def test_allowed_cpus_is_the_affinity():
    cpus = th.allowed_cpus()
    assert cpus and set(cpus) == set(os.sched_getaffinity(0))
    assert 1 <= th.physical_cores(cpus) <= len(cpus)


# ----------------------------------------------------------------------------- CPUThreads


class FakeClock:
    """time.monotonic/process_time/sleep and /proc/stat's busy seconds, driven by the test."""

    def __init__(self):
        self.wall = self.own = self.busy = self.wait = 0.0
        self.slept = self.others = 0.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.own

    def sleep(self, s):  # we wait; the others go on
        self.slept += s
        self.wall += s
        self.busy += self.others * s

    def run(self, seconds, ours, others, waiting=0.0):
        """``seconds`` pass with this process using ``ours`` cores and the others ``others`` cores, our threads
        waiting for a CPU ``waiting`` cores' worth of the time."""
        self.others = others
        self.wait += waiting * seconds
        self.wall += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(th, "time", c)
    monkeypatch.setattr(th, "cpu_busy_seconds", lambda cpus, stat=None: c.busy)
    monkeypatch.setattr(th, "own_wait_seconds", lambda: c.wait)
    monkeypatch.setattr(th, "_LATEST", {})  # the process-wide measurement starts on the fake clock
    monkeypatch.setattr(th, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(th, "thread_limit", lambda cpus: 2)
    return c


def test_explicit_num_threads_is_set_once_and_never_changed(clock):
    t = CPUThreads(2, interval=0.5)
    assert torch.get_num_threads() == 2 and t.count == 2 and not t.auto
    for _ in range(20):
        clock.run(1.0, ours=1.0, others=1.0)  # a busy neighbour would make the automatic policy use 1
        assert t.update() == 2
    assert torch.get_num_threads() == 2 and t.decisions == 0
    torch.set_num_threads(1)  # other code changed it (e.g. a short Predictor call): the next batch has 2 again
    assert t.update() == 2 and torch.get_num_threads() == 2
    t = CPUThreads(1)
    for _ in range(5):
        clock.run(1.0, ours=1.0, others=0.0)
        assert t.update() == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_num_threads_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError):
        CPUThreads(bad)


def test_automatic_policy_follows_the_neighbour(clock):
    torch.set_num_threads(2)
    t = CPUThreads(None, interval=1.0)
    assert t.auto
    clock.run(0.01, ours=1.0, others=1.0)  # the first update() comes soon: it measures a short while first
    assert t.update() == 1 and torch.get_num_threads() == 1
    assert clock.slept == pytest.approx(th.FIRST_SAMPLE - 0.01)
    assert t.others == pytest.approx(1.0, abs=0.1)
    clock.run(th.RECHECK, ours=1.0, others=1.0)  # a second look soon after the first
    assert t.update() == 1
    clock.run(0.5, ours=1.0, others=0.0)
    assert t.update() == 1  # not yet: between decisions update() only returns the count
    clock.run(0.6, ours=1.0, others=0.0)  # the neighbour left: more threads after UP_AFTER decisions in a row
    assert th.UP_AFTER >= 2  # not at the first quiet decision: a load that comes and goes must not flap
    for _ in range(th.UP_AFTER - 1):
        assert t.update() == 1
        clock.run(1.0, ours=1.0, others=0.0)
    assert t.update() == 2 and torch.get_num_threads() == 2
    clock.run(1.0, ours=1.3, others=0.7)  # it came back (sharing the cores with our two threads): fewer at once
    assert t.update() == 1 and torch.get_num_threads() == 1
    clock.run(1.0, ours=1.0, others=0.3)  # a little activity: stays
    assert t.update() == 1
    for _ in range(th.UP_AFTER - 1):  # quiet, then busy again before UP_AFTER decisions: no rise
        clock.run(1.0, ours=1.0, others=0.0)
        assert t.update() == 1
    clock.run(1.0, ours=1.0, others=0.9)
    assert t.update() == 1
    clock.run(1.0, ours=1.0, others=0.0)
    assert t.update() == 1  # the count of quiet decisions started again
    assert clock.slept == pytest.approx(th.FIRST_SAMPLE - 0.01)  # only the first decision waited


def test_after_a_long_gap_the_next_decision_comes_soon(clock):
    t = CPUThreads(interval=1.0)
    clock.run(1.0, ours=1.0, others=0.0)
    assert t.update() == 2 and clock.slept == 0
    clock.run(th.RECHECK, ours=1.0, others=0.0)
    t.update()
    clock.run(60.0, ours=0.1, others=0.0)  # e.g. between two Predictor calls; then a neighbour arrives
    assert t.update() == 2  # the 60 s average cannot tell yet, and update() never waits for it
    clock.run(th.RECHECK, ours=1.7, others=0.3, waiting=0.6)  # the first batches at 2 threads, well before 1 s
    assert t.update() == 1
    assert clock.slept == 0


def test_our_threads_waiting_for_a_cpu_also_means_fewer_threads(clock):
    t = CPUThreads(interval=1.0)
    clock.run(1.0, ours=1.0, others=0.0, waiting=0.9)  # before the first decision (e.g. data preparation): ignored
    assert t.update() == 2
    clock.run(th.RECHECK, ours=1.7, others=0.1, waiting=0.1)
    assert t.update() == 2
    clock.run(1.0, ours=1.7, others=0.3, waiting=0.6)  # the neighbour's share looks small, our threads wait
    assert t.update() == 1 and t.waiting == pytest.approx(0.6)
    for _ in range(th.UP_AFTER):
        clock.run(1.0, ours=1.0, others=0.05, waiting=0.0)
        t.update()
    assert t.count == 2


def test_a_load_that_comes_and_goes_makes_rises_slower(clock):
    t = CPUThreads(interval=1.0)
    clock.run(1.0, ours=1.0, others=1.0)
    assert t.update() == 1

    def quiet_decisions_until_two():
        for k in range(1, 200):
            clock.run(1.0, ours=1.0, others=0.0)
            if t.update() == 2:
                return k

    waits = []
    for _ in range(6):  # each rise is undone at once: the next one waits twice as long, up to UP_AFTER_MAX
        waits.append(quiet_decisions_until_two())
        clock.run(1.0, ours=1.7, others=0.8)
        assert t.update() == 1
    assert waits == [min(th.UP_AFTER * 2**i, th.UP_AFTER_MAX) for i in range(6)]
    assert quiet_decisions_until_two() == th.UP_AFTER_MAX
    for _ in range(th.SETTLED + 1):  # a rise that holds: back to UP_AFTER
        clock.run(1.0, ours=2.0, others=0.0)
        assert t.update() == 2
    clock.run(1.0, ours=1.7, others=0.8)
    assert t.update() == 1
    assert quiet_decisions_until_two() == th.UP_AFTER


def test_a_new_policy_object_continues_from_the_latest_measurement(clock):
    torch.set_num_threads(2)
    first = CPUThreads()
    clock.run(2.0, ours=1.0, others=1.0)
    assert first.update() == 1 and clock.slept == 0
    # e.g. evaluate_split right after training: it decides at once, without waiting
    torch.set_num_threads(2)
    second = CPUThreads()
    clock.run(0.01, ours=1.0, others=1.0)
    assert second.update() == 1 and clock.slept == 0 and torch.get_num_threads() == 1
    # later, one that measures from the latest decision of any of them
    clock.run(5.0, ours=1.0, others=0.0)
    third = CPUThreads()
    clock.run(0.01, ours=1.0, others=0.0)
    assert third.update() == 2 and clock.slept == 0
    assert third.others == pytest.approx(0.0, abs=0.01)


def test_quiet_start_uses_every_core_and_a_late_first_update_does_not_wait(clock):
    torch.set_num_threads(1)
    t = CPUThreads()
    clock.run(3.0, ours=1.0, others=0.0)
    assert t.update() == 2 and torch.get_num_threads() == 2 and clock.slept == 0


def test_someone_else_changing_torch_threads_is_corrected_at_the_next_update(clock):
    t = CPUThreads(interval=1.0)
    clock.run(1.0, ours=1.0, others=0.0)
    assert t.update() == 2
    torch.set_num_threads(1)
    clock.run(0.1, ours=1.0, others=0.0)  # between decisions
    assert t.update() == 2 and torch.get_num_threads() == 2 and t.decisions == 1
    torch.set_num_threads(1)
    clock.run(1.0, ours=1.0, others=0.0)  # at a decision
    assert t.update() == 2 and torch.get_num_threads() == 2 and t.decisions == 2


@pytest.mark.parametrize("case", ["cuda", "distributed", "no_proc_stat"])
def test_no_automatic_choice_where_it_does_not_apply(clock, monkeypatch, case):
    torch.set_num_threads(2)
    device = "cpu"
    if case == "cuda":
        device = "cuda"  # torch.device("cuda") needs no GPU
    elif case == "distributed":
        monkeypatch.setattr(th, "_distributed", lambda: True)
    else:  # e.g. macOS or Windows: no /proc/stat
        monkeypatch.setattr(th, "cpu_busy_seconds", lambda cpus, stat=None: None)
    t = CPUThreads(None, device=device)
    assert not t.auto and t.kept
    for _ in range(3):
        clock.run(2.0, ours=1.0, others=1.0)
        assert t.update() == 2
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # kept means kept: whatever is set
    assert t.update() == 1 and t.count == 1 and torch.get_num_threads() == 1


def test_joining_a_process_group_later_stops_the_automatic_choice(clock, monkeypatch):
    torch.set_num_threads(2)
    t = CPUThreads()
    monkeypatch.setattr(th, "_distributed", lambda: True)
    clock.run(2.0, ours=1.0, others=1.0)
    assert t.update() == 2 and not t.auto and torch.get_num_threads() == 2


def test_real_clock_smoke():
    t = CPUThreads(None, interval=0.0)
    for _ in range(3):
        n = t.update()
        assert 1 <= n <= max(th.thread_limit(th.allowed_cpus()), 1) and n == torch.get_num_threads()
    assert t.count == n and "CPUThreads" in repr(t)


# ----------------------------------------------------------------------------- busy_neighbour

busy_neighbour = fixtures.load_benchmark("busy_neighbour").busy_neighbour


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_busy_neighbour_runs_during_the_block_and_is_gone_after():
    with busy_neighbour() as proc:
        pid = proc.pid
        assert proc.poll() is None and not _gone(pid)
        assert "while" in " ".join(psutil.Process(pid).cmdline())
    assert proc.returncode is not None and _gone(pid)


def test_busy_neighbour_is_stopped_when_the_block_raises():
    with pytest.raises(KeyError):
        with busy_neighbour() as proc:
            pid = proc.pid
            assert not _gone(pid)
            raise KeyError("boom")
    assert proc.returncode is not None and _gone(pid)


def test_busy_neighbour_pinned_to_one_cpu():
    cpu = th.allowed_cpus()[-1]
    with busy_neighbour(cpu=cpu) as proc:
        assert os.sched_getaffinity(proc.pid) == {cpu}
    assert _gone(proc.pid)


def test_busy_neighbour_ends_by_itself_when_its_parent_is_killed():
    code = (f"import os, signal, sys; sys.path.insert(0, {str(fixtures.BENCHMARKS)!r}); from busy_neighbour import busy_neighbour\n"
            "with busy_neighbour() as p:\n    print(p.pid, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = _gone(pid)
    if not gone:
        os.kill(pid, 9)
    assert gone
