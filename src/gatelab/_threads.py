"""Thread counts chosen by the size of the work, within the cores this process may use.

Why: a fit whose per-iteration tensors are small (one data set of 10,000 samples, two
experts) spends its time in many short tensor operations. With two threads each of
them pays a hand-off between threads, and on a busy machine a thread that is not
scheduled holds up the other: measured beside one competing process, such fits ran
2-8x slower with torch's default threads than with one. Large batches (many replicates
or restarts) do gain from threads, and get them.

Policy: the cores a fit may use are ``GATELAB_THREADS`` where set, else the smaller of
the CPUs this process may run on and torch's thread setting (so a study worker given a
share of the cores, or a user who set ``torch.set_num_threads``, is respected).
- Tensor code takes one thread below ``PARALLEL_MIN`` elements in its largest
  per-iteration tensor, else one per ``PARALLEL_MIN``, up to the cores that no other
  runnable thread is using at the start of the fit (``free_cores``).
- The C kernel splits a batch by whole problems and takes up to one thread per problem
  within the cores (``split_threads``): its threads do not wait on each other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["available_cores", "free_cores", "threads_for", "split_threads", "using_threads"]

# Elements per thread (of a (problems x samples x experts) tensor) from which a second
# torch thread pays for its hand-offs on an idle machine; measured on 2 cores.
PARALLEL_MIN = 50_000
# Work split by problem (the C kernel: each thread takes whole problems, no barrier until
# the end) pays for a thread from this many elements in all.
SPLIT_MIN = 20_000

_caller: int | None = None  # torch's thread setting outside gatelab's own thread blocks


def available_cores() -> int:
    """Cores a fit may use: ``GATELAB_THREADS``, else min(CPU affinity, torch threads)."""
    env = os.environ.get("GATELAB_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"GATELAB_THREADS must be a whole number >= 1; got {env!r}. "
                             f"Unset it to let gatelab choose.")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    torch_threads = _caller if _caller is not None else torch.get_num_threads()
    return max(1, min(cpus, torch_threads))


def _others_running() -> int:
    """Runnable threads of other processes now: /proc/stat's count less this process's
    own running threads (its OpenMP workers may still be spinning). 0 where /proc is
    missing."""
    try:
        with open("/proc/stat", "rb") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(b"procs_running"))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                own += f.read().rsplit(b")", 1)[-1].split()[0] == b"R"
    except (OSError, ValueError, IndexError, StopIteration):
        return 0
    return max(0, total - max(own, 1))


def free_cores() -> int:
    """``available_cores()`` less the threads other work is running now (at least 1).
    The fewest of three looks 0.2 ms apart: a thread that is runnable for a moment (a
    kernel worker, a shell) is not load."""
    cores = available_cores()
    if cores == 1:
        return 1
    others = _others_running()
    for _ in range(2):
        if others == 0:
            break
        time.sleep(2e-4)
        others = min(others, _others_running())
    cpus = os.cpu_count() or cores
    return max(1, min(cores, cpus - others))


def threads_for(elements: int) -> int:
    """torch threads for tensor work whose largest per-iteration tensor has ``elements``
    entries: one per ``PARALLEL_MIN`` elements, up to the cores free now. Torch's threads
    meet at a barrier after every operation, so on a busy machine one descheduled thread
    holds up the others: there they cost more than they give (measured: 1.5x slower
    than one thread beside a busy loop, even at 800,000 elements)."""
    want = max(1, elements // PARALLEL_MIN)
    return 1 if want == 1 else min(want, free_cores())


def split_threads(problems: int, elements: int) -> int:
    """Threads for work split by whole problems (the C kernel), ``elements`` in all: up
    to one per problem within ``available_cores()``. Such threads never wait on each
    other before the end, so they help on a busy machine too."""
    if problems < 2 or elements < SPLIT_MIN:
        return 1
    return min(problems, available_cores())


@contextmanager
def using_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's
    setting (which ``available_cores`` keeps reading inside the block)."""
    global _caller
    before = torch.get_num_threads()
    outermost = _caller is None
    if outermost:
        _caller = before
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before:
            torch.set_num_threads(before)
        if outermost:
            _caller = None
