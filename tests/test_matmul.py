"""ops.matmul, the product every layer uses, against exact dot products (math.fsum of the exact
products' float values), on each way of computing products this Python has (ops.PRODUCTS:
math.dist everywhere, math.sumprod and the two mixed from 3.12) and each branch of the dist one:
plain sums for tiny products, B used as is when its rows have similar lengths (weights), and unit
rows otherwise; with row scales from 1e-8 to 1e8 and all-zero rows. Its error must stay that of
a plain float sum: ~1e-16 |a||b|."""

import math
import random

import pytest

from puregpt import ops

TOL = 4e-15  # relative to |a||b|; a plain sum of k <= 70 products is within ~k eps / 2 of it


def exact(a, b):
    return math.fsum(x * y for x, y in zip(a, b))


def rows(rng, n, k, scale):
    return [[rng.gauss(0, 1) * scale(rng) for _ in range(k)] for _ in range(n)]


SHAPES = {
    "tiny (plain sums)": (3, 4, 5),
    "one row (decoding)": (1, 40, 16),
    "few by many": (7, 64, 16),
    "many by few": (64, 7, 16),
    "long rows": (5, 16, 70),
}
SCALES = {
    "weights": lambda rng: 0.08,  # B's rows of similar lengths: A rescaled, B as it is
    "similar": lambda rng: rng.uniform(0.5, 2.0),
    "any": lambda rng: 10 ** rng.uniform(-8, 8),  # B's rows of any lengths: unit rows
}


@pytest.fixture(params=sorted(ops.PRODUCTS))
def path(request):
    """Each product path in turn, the engine's own restored afterwards."""
    chosen = ops.PRODUCT_PATH
    ops.use_products(request.param)
    yield request.param
    ops.use_products(chosen)


@pytest.mark.parametrize("b_scale", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_is_as_accurate_as_a_plain_sum(shape, b_scale, path):
    rng = random.Random(7)
    n, m, k = SHAPES[shape]
    for _ in range(20):
        A = rows(rng, n, k, SCALES["any"])
        B = rows(rng, m, k, SCALES[b_scale])
        if n > 2:
            A[1] = [0.0] * k  # a zero row gives exact zeros
        C = ops.matmul(A, B)
        assert len(C) == n and all(len(r) == m for r in C)
        for a, row in zip(A, C):
            for b, c in zip(B, row):
                norm = math.hypot(*a) * math.hypot(*b)
                assert abs(c - exact(a, b)) <= TOL * norm, (c, exact(a, b), norm)
        if n > 2:
            assert C[1] == [0.0] * m


@pytest.mark.parametrize("b_scale", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_into_acc_adds_the_same_products_in_place(shape, b_scale, path):
    """matmul(A, B, acc), a gradient's dW += ...: acc's own row lists, each entry its old value
    plus the product matmul(A, B) gives, to one rounding of the sum (the same products, added
    inside the product's loop)."""
    rng = random.Random(11)
    n, m, k = SHAPES[shape]
    A, B = rows(rng, n, k, SCALES["any"]), rows(rng, m, k, SCALES[b_scale])
    acc = rows(rng, n, m, SCALES["similar"])
    before, row_objects = [list(r) for r in acc], list(acc)
    assert ops.matmul(A, B, acc) is acc and all(r is o for r, o in zip(acc, row_objects))
    for new, old, prod in zip(acc, before, ops.matmul(A, B)):
        assert new == [o + p for o, p in zip(old, prod)]


def test_dots_and_matvec(path):
    rng = random.Random(3)
    a, B = rows(rng, 1, 9, SCALES["any"])[0], rows(rng, 6, 9, SCALES["similar"])
    for got in (ops.dots(a, B), ops.matvec(B, a)):
        for b, c in zip(B, got):
            assert abs(c - exact(a, b)) <= TOL * math.hypot(*a) * math.hypot(*b)


def test_each_python_takes_its_measured_path():
    """dist before 3.12; from 3.12 dist for many rows, sumprod for few (see ops.PRODUCTS)."""
    import sys
    expected = "dist" if sys.version_info < (3, 12) else "dist+sumprod"
    assert ops.PRODUCT_PATH == expected and (ops.matmul, ops.dots) == ops.PRODUCTS[expected]
    assert set(ops.PRODUCTS) == ({"dist"} if sys.version_info < (3, 12)
                                 else {"dist", "sumprod", "dist+sumprod"})


def test_use_products_switches_every_caller_and_refuses_unknown_paths(path):
    rng = random.Random(5)
    W, X = rows(rng, 12, 16, SCALES["weights"]), rows(rng, 9, 16, SCALES["any"])
    Y, _ = ops.linear_forward(X, W)  # ops' own callers see the switch
    assert Y == ops.PRODUCTS[path][0](X, W)
    with pytest.raises(ValueError, match="no product path 'numpy' on this Python; available"):
        ops.use_products("numpy")
