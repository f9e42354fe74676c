"""notebooks/walkthrough.ipynb: stored without outputs, importing only the standard library,
puregpt and IPython, and executing top to bottom (nbclient + ipykernel, test-only dependencies)
with this checkout's puregpt and without an error. Its cells assert their own numbers (the
forward pass equals model.forward, the backward equals finite differences); this test checks
what they print and display.

The kernel starts in notebooks/, as Jupyter starts it; PYTHONPATH names the checkout, so
`import puregpt` finds this checkout's package and not another installed copy (the notebook
also puts its checkout first on sys.path, for readers who run it without installing).
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.oracle

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def code_cells(nb):
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def test_stored_without_outputs():
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))
    cells = code_cells(raw)
    assert len(cells) >= 10
    for i, cell in enumerate(cells):
        assert cell["outputs"] == [], f"code cell {i} has stored outputs"
        assert cell["execution_count"] is None, f"code cell {i} has an execution count"
    assert raw["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in raw["metadata"]


def test_imports_nothing_beyond_jupyter():
    """Standard library, puregpt, and IPython (which Jupyter brings)."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | {"puregpt", "IPython"}
    for cell in code_cells(nb):
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), names


def test_runs_top_to_bottom(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    start = time.time()
    # raises CellExecutionError, naming the cell, on the first error
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    print(f"walkthrough.ipynb ran in {time.time() - start:.0f} s")  # (the target: < 3 min)
    outputs = [o for cell in code_cells(nb) for o in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")

    assert f"from {ROOT / 'puregpt'}" in text  # this checkout's package
    assert "'emma' -> [26, 4, 12, 12, 0, 26]" in text  # characters to ids
    assert "logits = x lm_head^T" in text and "(5, 27)" in text  # shapes through the forward
    assert "largest difference from model.forward" in text
    assert "log V = 3.2958" in text  # the loss, next to its uniform baseline
    assert "code vs finite differences" in text
    svgs = [o["data"]["image/svg+xml"] for o in outputs
            if o["output_type"] == "display_data" and "image/svg+xml" in o.get("data", {})]
    assert len(svgs) == 1 and "<svg" in svgs[0] and 'id="curve-train"' in svgs[0]
    assert 'id="curve-validation"' in svgs[0]
    first, last = _losses(text)
    assert first > 3.0 and last < 2.6, (first, last)  # 300 steps learned something
    for label in ("T = 0.5", "T = 1.5", "top-k 3", "top-p 0.5"):
        assert label in text
    # the x-ray: the trained model's own numbers, and its page inline
    assert "layer 0, head 0 attention" in text and "the likeliest next tokens" in text
    assert "largest gradients of one step on this name" in text
    pages = [o["data"]["text/html"] for o in outputs
             if o.get("data", {}).get("text/html", "").startswith("<iframe srcdoc=")]
    assert len(pages) == 1 and "puregpt-data" in pages[0]  # the page's inlined JSON
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == before  # it wrote no files
    assert all(not c["outputs"] for c in code_cells(json.loads(NOTEBOOK.read_text())))  # clean


def _losses(text: str) -> tuple[float, float]:
    """The first and last training loss the training cell prints ('loss A -> B')."""
    line = next(ln for ln in text.splitlines() if ln.startswith("300 steps in"))
    a, b = line.split("training loss ")[1].split(",")[0].split(" -> ")
    return float(a), float(b)
