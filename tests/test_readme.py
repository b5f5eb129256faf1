"""The README's library example runs as written."""
from __future__ import annotations

import re

from hfrun.config import CONFIG_DIR


def test_library_example_runs_and_fits(capsys):
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    section = readme.split("## HF as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["stats"]["loss"] < 1e-3
    assert "after 30 updates" in capsys.readouterr().out
