import subprocess
import sys

import gatelab as gl
import gatelab.cli as cli
from gatelab.demo import ks_uniform, run_demo

import torch


def test_gates_lists_every_gate(capsys):
    assert cli.main(["gates"]) == 0
    out = capsys.readouterr().out
    for name in ("softmax", "perturbed_cosine", "quadratic_monomial", "input_free"):
        assert f"\n{name} " in "\n" + out


def test_demo_rows_pass_their_own_check(capsys):
    rows = run_demo(n=2000, replicates=3, seed=1)
    assert len(rows) == 1 + len(gl.GATES) and "NO" not in capsys.readouterr().out


def test_ks_distance_detects_a_non_uniform_sample():
    u = torch.rand(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ks_uniform(u) < 1.95 / 5000 ** 0.5 < ks_uniform(u.square())


def test_bad_arguments_exit_2_with_a_message():
    res = subprocess.run([sys.executable, "-m", "gatelab.cli", "demo", "--n", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "'n' parameter must be an int" in res.stderr
