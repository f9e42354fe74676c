"""The examples in docs/api.md run, in order, as one script, and print what the page says."""

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_api_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_api"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"docs/api.md block {i + 1} failed: {e!r}\n{block}") from e
    lines = out.getvalue().splitlines()
    # the outputs the page states in its comments
    assert lines[0] == "60 32 27"
    assert lines[1] == "40 40"
    assert lines[2].startswith("60 [") and "last.safetensors" in lines[2]
    assert "not in the vocabulary" in out.getvalue()
    assert "'Z'" in out.getvalue() and "'ë'" in out.getvalue()
