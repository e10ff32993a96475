"""Every ```python block of README.md runs as written, so that the README cannot drift from the API.

The blocks run in order, each in a fresh namespace, in a temporary working directory where
``path/to/LTX-Video`` is a tiny LTX pipeline saved with diffusers' ``save_pretrained`` (bf16, random weights):
the paths the README names resolve there.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from hq_diffusion.models import tiny_pipeline

    d = tmp_path_factory.mktemp("readme")
    tiny_pipeline("ltx", 0, dtype=torch.bfloat16).save_pretrained(d / "path" / "to" / "LTX-Video")
    return d


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
