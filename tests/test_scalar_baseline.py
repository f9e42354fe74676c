"""Tests for the scalar-autograd speed baseline in benchmarks/scalar_baseline.py."""

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _load_module():
    path = REPO / "benchmarks" / "scalar_baseline.py"
    spec = importlib.util.spec_from_file_location("scalar_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sb = _load_module()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data directory absent")
def test_reference_losses_first_three_steps():
    docs = sb.load_docs(SHARED_DATA / "names.txt")
    lines = []
    # The reference values are the first steps of a 1000-step run (the lr decay
    # depends on the schedule length, so step 3 differs in a 3-step run).
    result = sb.train(docs, steps=3, seed=42, log=lines.append, total_steps=1000)
    assert [f"{x:.4f}" for x in result["losses"]] == ["3.3660", "3.4243", "3.1778"]
    assert lines[0] == "step    1 / 1000 | loss 3.3660"
    assert len(lines) == 3
    assert result["tokens"] > 0 and result["seconds"] > 0


def _expr(a, b, c, d):
    """Scalar expression touching every operator; works on Values and floats alike."""
    relu = (lambda t: t.relu()) if isinstance(a, sb.Value) else (lambda t: max(0.0, t))
    exp = (lambda t: t.exp()) if isinstance(a, sb.Value) else math.exp
    log = (lambda t: t.log()) if isinstance(a, sb.Value) else math.log
    y = a * b + c ** 2 - d / a               # mul, add, pow, sub, truediv
    y = y + exp(b - c) * log(a * a + d)      # exp, log
    y = y + relu(a + b) + relu(-c) * 3.0     # relu (both branches), neg, rmul
    y = 2.0 - y / (1.5 + b ** 2)             # rsub, truediv by Value
    y = y + 1.0 / (c + 4.0) + (-d) ** 3      # rtruediv, radd, neg, integer pow
    return y * y + (a * 0.5) ** -0.5         # negative fractional pow


def test_value_gradients_match_finite_differences():
    point = [1.3, -0.7, 0.4, 0.9]
    xs = [sb.Value(p) for p in point]
    out = _expr(*xs)
    assert math.isclose(out.data, _expr(*point), rel_tol=1e-12)
    out.backward()

    h = 1e-6
    for i in range(len(point)):
        plus = list(point)
        minus = list(point)
        plus[i] += h
        minus[i] -= h
        numeric = (_expr(*plus) - _expr(*minus)) / (2 * h)
        analytic = xs[i].grad
        rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-12)
        assert rel < 1e-6, (i, analytic, numeric, rel)


def test_backward_accumulates_through_shared_nodes():
    a = sb.Value(3.0)
    y = a * a + a  # dy/da = 2a + 1
    y.backward()
    assert y.data == 12.0
    assert a.grad == 7.0
