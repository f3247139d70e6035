"""The README's Python examples run as written (CUDA tensors swapped for CPU, lengths cut)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index].replace('device="cuda"', 'device="cpu"').replace("16384", "256")
    exec(compile(code, f"README.md[python block {index}]", "exec"), {})


def test_readme_names_the_test_command():
    text = open(README).read()
    assert "make test" in text and "make demo" in text
