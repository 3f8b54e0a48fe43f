"""Every ```python block of README.md runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.transformers
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, unpatch_after):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2
