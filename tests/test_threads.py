"""The thread policy (gatelab._threads) and the one-OpenMP-runtime rule."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from gatelab import _threads
from gatelab.fit import _fused
from gatelab.studies.runner import pool_shape


def test_small_work_runs_on_one_thread_and_large_work_on_the_free_cores(monkeypatch):
    monkeypatch.setenv("GATELAB_THREADS", "4")
    monkeypatch.setattr(_threads, "_others_running", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert _threads.threads_for(_threads.PARALLEL_MIN - 1) == 1
    assert _threads.threads_for(2 * _threads.PARALLEL_MIN) == 2
    assert _threads.threads_for(100 * _threads.PARALLEL_MIN) == 4
    # Two other runnable threads leave two of the four cores.
    monkeypatch.setattr(_threads, "_others_running", lambda: 2)
    assert _threads.threads_for(100 * _threads.PARALLEL_MIN) == 2
    monkeypatch.setattr(_threads, "_others_running", lambda: 9)
    assert _threads.threads_for(100 * _threads.PARALLEL_MIN) == 1


def test_work_split_by_problem_uses_the_cores_whatever_the_load(monkeypatch):
    monkeypatch.setenv("GATELAB_THREADS", "4")
    monkeypatch.setattr(_threads, "_others_running", lambda: 9)
    assert _threads.split_threads(1, 10 ** 9) == 1          # one problem: one thread
    assert _threads.split_threads(40, _threads.SPLIT_MIN - 1) == 1
    assert _threads.split_threads(3, 10 ** 6) == 3
    assert _threads.split_threads(40, 10 ** 6) == 4


def test_available_cores_respects_torch_and_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.delenv("GATELAB_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _threads.available_cores() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("GATELAB_THREADS", "two")
    with pytest.raises(ValueError, match="GATELAB_THREADS must be a whole number"):
        _threads.available_cores()


def test_using_threads_restores_the_callers_setting_and_keeps_its_cores_visible(monkeypatch):
    monkeypatch.delenv("GATELAB_THREADS", raising=False)
    before = torch.get_num_threads()
    cores = _threads.available_cores()
    with _threads.using_threads(1):
        assert torch.get_num_threads() == 1
        assert _threads.available_cores() == cores   # the caller's, not the block's
        with _threads.using_threads(1):
            pass
        assert _threads.available_cores() == cores
    assert torch.get_num_threads() == before


def test_another_runnable_process_is_seen_as_load():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = max(_threads._others_running() for _ in range(20))
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 1


def test_a_study_pool_never_has_more_threads_than_cores():
    for cores in range(1, 9):
        for workers in range(1, 12):
            w, t = pool_shape(workers, cores)
            assert 1 <= w <= workers and t >= 1 and w * t <= cores


@pytest.mark.skipif(_fused.load() is None, reason="no C compiler: no fused kernel")
def test_the_c_kernel_shares_torchs_openmp_runtime():
    code = ("import gatelab.fit._fused as f\n"
            "maps = lambda: sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l})\n"
            "before = maps()\nassert f.load() is not None\nprint(before == maps(), before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True ['") and "torch" in out.stdout, out.stdout


def test_importing_gatelab_first_shortens_openmp_waits():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    show = "import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    first = subprocess.run([sys.executable, "-c", f"import gatelab; {show}"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    late = subprocess.run([sys.executable, "-c", f"import torch, gatelab; {show}"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    own = subprocess.run([sys.executable, "-c", f"import gatelab; {show}"],
                         env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert (first, late, own) == ("10000", "None", "5")
