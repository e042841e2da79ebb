"""The README's usage examples run as written (```python blocks; ```py blocks need a running server)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)  # the examples write ./my_model
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "my_model" / "model.safetensors").exists()
