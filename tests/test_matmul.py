"""ops.matmul, the product every layer uses, against exact dot products (math.fsum of the exact
products' float values), on each of its paths: plain sums for tiny products, B used as is when
its rows have similar lengths (weights), and unit rows otherwise; with row scales from 1e-8 to
1e8 and all-zero rows. Its error must stay that of a plain float sum: ~1e-16 |a||b|."""

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


@pytest.mark.parametrize("b_scale", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_is_as_accurate_as_a_plain_sum(shape, b_scale):
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


def test_dots_and_matvec():
    rng = random.Random(3)
    a, B = rows(rng, 1, 9, SCALES["any"])[0], rows(rng, 6, 9, SCALES["similar"])
    for got in (ops.dots(a, B), ops.matvec(B, a)):
        for b, c in zip(B, got):
            assert abs(c - exact(a, b)) <= TOL * math.hypot(*a) * math.hypot(*b)
