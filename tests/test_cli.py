import subprocess
import sys

import pytest
import torch

import gatelab as gl
import gatelab.cli as cli
from cases import sigmoid_regression_data
from gatelab.demo import ks_uniform, run_demo


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


# --- every listed option works (issue 11, point 3) ------------------------------------------

@pytest.fixture(scope="module")
def two_lines_csv(tmp_path_factory):
    """y = 1 + 2x right of 0 and -1 - x left of it, noise sd 0.3: a top-1 truth."""
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(600, generator=g, dtype=torch.float64) - 2
    y = torch.where(x > 0, 1 + 2 * x, -1 - x) + 0.3 * torch.randn(600, generator=g, dtype=torch.float64)
    path = tmp_path_factory.mktemp("cli") / "lines.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x.tolist(), y.tolist())))
    return path


def _fit_json(capsys, *argv):
    import json
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_top1_finds_both_lines(two_lines_csv, capsys):
    out = _fit_json(capsys, "fit", str(two_lines_csv), "--x", "x", "--y", "y", "--experts", "2",
                    "--gate", "topk", "--top-k", "1")
    assert out["status"] == "converged"
    assert sorted(a[0] for a in out["params"]["a"]) == pytest.approx([-1.0, 2.0], abs=0.15)
    assert out["params"]["var"] == pytest.approx([0.09, 0.09], rel=0.3)


def test_fit_hierarchical_takes_its_groups(two_lines_csv, capsys):
    out = _fit_json(capsys, "fit", str(two_lines_csv), "--x", "x", "--y", "y", "--gate",
                    "hierarchical", "--n-groups", "2", "--n-inner", "2", "--inner", "laplace")
    # four experts for two lines: over-specified, so the status may be anything but stuck
    assert len(out["params"]["var"]) == 4 and out["status"] != "stuck"
    assert "inner.W" in out["params"] and out["status_meaning"].startswith(out["status"])


def test_fit_lsq_fits_a_sigmoid_gate(tmp_path, capsys):
    x, y = sigmoid_regression_data()
    path = tmp_path / "sig.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x[:, 0].tolist(), y.tolist())))
    out = _fit_json(capsys, "fit-lsq", str(path), "--x", "x", "--y", "y", "--experts", "2",
                    "--gate", "sigmoid")
    assert out["status"] == "converged"
    assert out["params"]["nu"] == pytest.approx(0.04, rel=0.25)


@pytest.mark.parametrize("argv, message", [
    (["--experts", "2", "--gate", "topk"], "--gate topk needs --top-k K"),
    (["--gate", "hierarchical"], "--gate hierarchical needs --n-groups G and --n-inner J"),
    (["--experts", "2", "--n-groups", "2"], "--n-groups and --n-inner belong to"),
    (["--gate", "softmax"], "--experts K is required"),
])
def test_fit_options_missing_or_misplaced_say_so(two_lines_csv, capsys, argv, message):
    assert cli.main(["fit", str(two_lines_csv), "--x", "x", "--y", "y", *argv]) == 2
    assert message in capsys.readouterr().err


def test_fit_does_not_offer_a_gate_it_cannot_fit(two_lines_csv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", str(two_lines_csv), "--x", "x", "--y", "y", "--experts", "2",
                  "--gate", "sigmoid"])
    assert exit_info.value.code == 2 and "invalid choice: 'sigmoid'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "fit-lsq" in text and "sigmoid," not in text


def test_schema_lists_every_key_with_its_meaning(capsys):
    assert cli.main(["schema"]) == 0
    out = capsys.readouterr().out
    assert "| `settings[].theory_blocks` | table of numbers | `{}` |" in out
    assert "`_path`" not in out and "]._path" not in out and out.count("\n") > 30
