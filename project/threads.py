"""How many threads torch computes with: one per core that other programs leave free.

torch starts one thread per core. Each of its parallel operations waits for its slowest thread, so when another
program holds a core, the thread that shares it stalls every operation: on a 2-core machine with one core busy,
two threads train and sample several times slower than one (benchmarks/README.md, "Threads"). Every command that
computes (fit, validate, test, predict, generate, serve, evaluate) therefore calls `configure_threads` once at
start: it measures how many cores other programs kept busy since this module was imported (the command's own
start-up, a second or more) and gives torch the cores left, at least one.

An explicit choice always wins: `OMP_NUM_THREADS=N python -m project ...` (torch's own setting) is left as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.2  # the shortest measurement: at 100 ticks a second, 20 ticks per core


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU time of the whole machine and of this process at one moment, in seconds."""

    wall: float
    machine_busy: float | None  # None where /proc/stat does not exist (not Linux)
    own: float

    @classmethod
    def now(cls) -> CpuSample:
        return cls(time.monotonic(), machine_busy_seconds(), time.process_time())


def machine_busy_seconds() -> float | None:
    """CPU seconds the machine spent busy since boot, all cores together (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: idle and iowait are free time; steal (a hypervisor
    # running someone else) is not
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


STARTED = CpuSample.now()  # when the command started, near enough: the first measurement runs from here


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(since: CpuSample = STARTED) -> float:
    """Cores that other programs kept busy between `since` and now (this process's own CPU time excluded).

    Sleeps first if less than MIN_INTERVAL_S has passed. Without /proc/stat, the 1-minute load average stands in
    (it counts this process too, so it errs towards fewer threads).
    """
    waited = time.monotonic() - since.wall
    if waited < MIN_INTERVAL_S:
        time.sleep(MIN_INTERVAL_S - waited)
    now = CpuSample.now()
    if now.machine_busy is None or since.machine_busy is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    others = (now.machine_busy - since.machine_busy) - (now.own - since.own)
    return max(0.0, others / (now.wall - since.wall))


def threads_for(cores: int, busy: float, most: int) -> int:
    """Threads that leave the cores other programs use to them: `cores - round(busy)`, between 1 and `most`."""
    return max(1, min(most, cores - round(busy)))


@functools.cache
def torch_default_threads() -> int:
    """torch's own thread count (one per core it found), read before this module ever changes it."""
    import torch

    return torch.get_num_threads()


def configure_threads(since: CpuSample = STARTED) -> int:
    """Give torch one thread per core that other programs leave free (measured since `since`); returns the count.

    With OMP_NUM_THREADS set, torch's thread count is left as that variable chose it.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    most = torch_default_threads()
    busy = busy_cores(since)
    threads = threads_for(usable_cores(), busy, most)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if threads != most:
        log.info("torch threads: %d of %d (other programs keep %.1f cores busy; OMP_NUM_THREADS=N chooses)",
                 threads, most, busy)
    return threads
