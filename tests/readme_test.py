"""The README's library example runs as written."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_library_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # the example saves moe.keras in the working directory
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    history = namespace["history"]
    assert {
        "moe_cv_importance", "moe_cv_load", "moe_max_mean_load",
        "moe_zero_expert_fraction", "moe_dropped_fraction",
    } <= set(history.history)
    routing = namespace["routing"]
    assert tuple(routing.expert_indices.shape) == (2, 10, 4)
    assert (tmp_path / "moe.keras").exists()
