import subprocess
import sys

import pytest

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


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("x,y\n0.1,1.0\n0.2,2.0\n", encoding="utf-8-sig")   # starts with EF BB BF
    x, y = cli._read_csv(str(path), ["x"], "y")
    assert x.tolist() == [[0.1], [0.2]] and y.tolist() == [1.0, 2.0]


def test_a_binary_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    with pytest.raises(cli.UsageError, match=r"picture\.png is not a CSV text file"):
        cli._read_csv(str(path), ["x"], "y")


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_workers_must_be_a_positive_whole_number(workers, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "no-such-study.toml", "--workers", workers])
    assert exit_info.value.code == 2
    assert "--workers: must be a whole number >= 1" in capsys.readouterr().err
