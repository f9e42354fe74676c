"""Shared helpers of the numerical tests (gradcheck, torch parity, KV cache): the architecture
combinations, tiny configs with perturbed weights, and random variable-length batches; and the
finished training run that the CLI and training tests copy.

Any test taking an argument named `combo` runs once per combination (see pytest_generate_tests)
unless it parametrizes `combo` itself (with a subset).
"""

from __future__ import annotations

import itertools
import random
import shutil

import pytest

from puregpt import model
from puregpt.config import CHOICES, GPTConfig

# Every architecture switch that changes the math: 3 * 2 * 2 * 3 * 2 * 2 = 144 combinations.
AXES = {
    "pos": CHOICES["pos"],
    "norm": CHOICES["norm"],
    "norm_position": CHOICES["norm_position"],
    "activation": CHOICES["activation"],
    "bias": (False, True),
    "tie_embeddings": (False, True),
}
COMBOS = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]
# emb_norm and final_norm ride along: each of their four pairings on exactly a quarter of the
# combinations, spread by a fixed shuffle so that no pairing sticks to one value of another axis.
_PAIRS = [(e, f) for e in (False, True) for f in (False, True)] * (len(COMBOS) // 4)
random.Random(0).shuffle(_PAIRS)
for _combo, (_e, _f) in zip(COMBOS, _PAIRS):
    _combo.update(emb_norm=_e, final_norm=_f)


def combo_id(combo: dict) -> str:
    flags = [name for name in ("bias", "tie_embeddings", "emb_norm", "final_norm") if combo[name]]
    return "-".join([combo["pos"], combo["norm"], combo["norm_position"], combo["activation"],
                     *flags])


def pytest_generate_tests(metafunc):
    explicit = any("combo" in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))
    if "combo" in metafunc.fixturenames and not explicit:
        metafunc.parametrize("combo", COMBOS, ids=combo_id)


# Tiny but complete: 2 layers (so blocks feed blocks), 2 heads, head_dim 4. init_std 0.4 (not
# 0.02) so that every term, including the second-order ones of the norms, visibly moves the loss.
TINY = dict(vocab_size=7, block_size=8, n_layer=2, n_embd=8, n_head=2, init_std=0.4,
            norm_affine=True)


def tiny_config(combo: dict, **overrides) -> GPTConfig:
    return GPTConfig(**{**TINY, **combo, **overrides})


def perturbed_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """init_params, then norm gains moved off 1 and all biases off 0: at their initial values
    a wrong gain or bias gradient could hide (x * 1, x + 0)."""
    rng = random.Random(seed)
    params = model.init_params(cfg, rng)
    for name, t in params.items():
        if not isinstance(t[0], list):
            if name.endswith("_g"):
                params[name] = [1.0 + rng.uniform(-0.5, 0.5) for _ in t]
            else:
                params[name] = [rng.gauss(0.0, 0.3) for _ in t]
    return params


def random_batch(cfg: GPTConfig, rng: random.Random, lengths, ignore_frac: float = 0.0):
    """Sequences of the given lengths with random tokens and random targets; a fraction of the
    targets set to -1 (ignored), always keeping at least one real target."""
    inputs = [[rng.randrange(cfg.vocab_size) for _ in range(T)] for T in lengths]
    targets = [[rng.randrange(cfg.vocab_size) if rng.random() >= ignore_frac else -1
                for _ in range(T)] for T in lengths]
    if all(y < 0 for seq in targets for y in seq):
        targets[0][0] = 0
    return inputs, targets


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-step CLI run on 200 names (evaluations at steps 3 and 6), made once per
    module; tests that change it take `run_copy`."""
    from helpers_train import TINY_RUN, names_file, run_cli
    base = tmp_path_factory.mktemp("base")
    data = names_file(base, 200)
    proc = run_cli("train", "--data", data, "--out", base / "run", *TINY_RUN, "--steps", 6,
                   "--eval-every", 3, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return base / "run", data


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run, data = finished_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data


# --- the core suite, for Pythons without the oracles (CI's oldest and newest, .ci/run) ---------
#
# With PUREGPT_TEST_CORE=1 (and -m "not oracle"), test modules that import a missing oracle at
# their top (torch, safetensors, numpy, ...) are left out of collection, named in the header;
# without it, nothing changes: a missing oracle fails the suite, it is never skipped.

def _missing_top_level_imports(path, seen=None) -> list[str]:
    """The modules a test file imports at its top (or through the test helpers it imports)
    that are not installed."""
    import ast
    import importlib.util
    seen = set() if seen is None else seen
    seen.add(path)
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    missing = set()
    for name in names - {"puregpt"}:
        local = path.parent / f"{name}.py"
        if local.exists():
            missing |= set() if local in seen else set(_missing_top_level_imports(local, seen))
        elif importlib.util.find_spec(name) is None:
            missing.add(name)
    return sorted(missing)


_LEFT_OUT = {}


def pytest_ignore_collect(collection_path, config):
    import os
    if os.environ.get("PUREGPT_TEST_CORE") != "1" or collection_path.suffix != ".py" \
            or not collection_path.name.startswith("test_"):
        return None
    missing = _missing_top_level_imports(collection_path)
    if missing:
        _LEFT_OUT[collection_path.name] = missing
        return True
    return None


def pytest_report_collectionfinish(config, start_path, startdir=None, items=()):
    if _LEFT_OUT:
        return ["PUREGPT_TEST_CORE=1: left out (their oracles are not installed): " + ", ".join(
            f"{name} ({', '.join(missing)})" for name, missing in sorted(_LEFT_OUT.items()))]
    return None
