"""What a command-line start pays for: no module that the work does not need."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from gatelab._checks import broadcast_shapes

HEAVY = ("sklearn", "scipy", "sympy", "matplotlib", "ray", "transformers")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    return set(out) & set(HEAVY)


def test_importing_the_cli_loads_no_heavy_module():
    assert _loaded_after("import gatelab.cli") == set()


def test_a_command_line_fit_loads_no_heavy_module(tmp_path):
    x = torch.rand(300, dtype=torch.float64)
    y = torch.where(x > 0.5, 2 * x, -x) + 0.1 * torch.randn(300, dtype=torch.float64)
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x.tolist(), y.tolist())))
    code = ("import gatelab.cli, contextlib, io\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert gatelab.cli.main(['fit', {str(path)!r}, '--x', 'x', '--y', 'y', "
            f"'--experts', '2', '--json']) == 0")
    assert _loaded_after(code) == set()


def test_fit_json_times_are_the_fit_the_read_and_the_whole_process(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{i / 200},{(i % 7) / 3 + i / 100}\n" for i in range(200)))
    out = subprocess.run([sys.executable, "-m", "gatelab.cli", "fit", str(path), "--x", "x",
                          "--y", "y", "--experts", "2", "--json"], capture_output=True,
                         text=True, check=True).stdout
    res = json.loads(out)
    assert 0 < res["seconds"] and 0 < res["seconds_read"]
    # The whole process includes the imports, so it is longer than the fit and the read.
    assert res["seconds_since_start"] > res["seconds"] + res["seconds_read"]


SHAPES = [(), (1,), (3,), (2, 1), (1, 3), (2, 3), (4, 1, 1), (4, 2, 3), (5,), (0,), (2, 0)]


@pytest.mark.parametrize("a, b", list(itertools.product(SHAPES, repeat=2)), ids=str)
def test_broadcast_shapes_agrees_with_torch(a, b):
    try:
        expected = torch.broadcast_shapes(a, b)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            broadcast_shapes(a, b)
        return
    assert broadcast_shapes(a, b) == expected
    assert broadcast_shapes(a, b, (1,)) == torch.broadcast_shapes(a, b, (1,))
