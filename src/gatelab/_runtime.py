"""Process-level settings that make large-tensor CPU loops fast, and fair to other work.

``short_openmp_waits``: torch's OpenMP threads spin after each parallel operation, waiting
for the next one, for GNU OpenMP's default 300,000 rounds (milliseconds) before they
sleep. Beside other work those spins take the cores that the work needs (measured: a
batched fit 1.6x slower beside a busy loop). ``GOMP_SPINCOUNT=10000`` keeps the spin that
bridges consecutive operations (idle speed unchanged within noise) and lets waiting
threads sleep soon after. OpenMP reads it once, when torch is first imported, so it is set
on importing gatelab, and only where torch is not loaded yet and the user has set neither
``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY``.

Each EM iteration allocates temporaries of (replicates x experts x samples) doubles,
several MB each. glibc serves such blocks with fresh mmap pages and returns them on free,
so every iteration pays page faults for every temporary: about half the time of a
batched E-step here. ``keep_freed_memory`` raises glibc's mmap and trim thresholds so
freed blocks are reused instead. The cost: memory freed by the process is kept for reuse
rather than returned to the OS. It runs once, on the first fit; set GATELAB_MALLOPT=0 to
leave the allocator alone. A no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (restoring its state after).
    Importing torch creates about a million objects, and the collector walks the growing
    heap again and again while it does: paused, ``import gatelab`` takes about 0.1 s less
    (of 0.9 s), which a command-line fit notices."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def short_openmp_waits() -> bool:
    """Set ``GOMP_SPINCOUNT=10000`` for the torch about to be loaded; True if it was set."""
    if "torch" in sys.modules or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        return False
    os.environ["GOMP_SPINCOUNT"] = "10000"
    return True


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep and reuse freed large blocks; True if the settings took effect."""
    global _done
    if _done or os.environ.get("GATELAB_MALLOPT", "1") == "0":
        return _done
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)
