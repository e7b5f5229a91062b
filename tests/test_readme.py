"""The README's examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {})


def test_the_readme_schema_is_the_generated_one():
    from gatelab.studies.spec import schema
    text = README.read_text()
    start, end = "<!-- schema:start -->\n", "\n<!-- schema:end -->"
    documented = text[text.index(start) + len(start):text.index(end)]
    assert documented == schema(), "README's schema is stale: paste `gatelab schema` into it"
