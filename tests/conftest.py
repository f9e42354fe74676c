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

# Every architecture switch of the GPT-2-era block that changes the math:
# 3 * 2 * 2 * 3 * 2 * 2 = 144 combinations.
AXES = {
    "pos": ("learned", "sinusoidal", "none"),
    "norm": CHOICES["norm"],
    "norm_position": CHOICES["norm_position"],
    "activation": ("relu", "gelu", "gelu_tanh"),
    "bias": (False, True),
    "tie_embeddings": (False, True),
}
COMBOS = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]
# The modern block's values (issue 15) on a subset of their own, 2 * 2 * 2 * 2 * 2 = 32
# combinations: RoPE (and learned positions, so SwiGLU and SiLU meet a non-rotary model too),
# the SwiGLU MLP or the plain one with SiLU, against every norm, norm position and bias setting.
MODERN_AXES = {
    "pos": ("rope", "learned"),
    "mlp": ("plain", "swiglu"),
    "norm": CHOICES["norm"],
    "norm_position": CHOICES["norm_position"],
    "bias": (False, True),
}
MODERN = [dict(zip(MODERN_AXES, values), activation="silu")
          for values in itertools.product(*MODERN_AXES.values())]
for _combo in MODERN:
    _combo["tie_embeddings"] = _combo["pos"] == "learned" and not _combo["bias"] or \
        _combo["pos"] == "rope" and _combo["bias"]  # half of each position kind tied
COMBOS += MODERN


def _ride_along(combos, names, seed):
    """Each of the four pairings of two boolean-like settings on exactly a quarter of the
    combinations, spread by a fixed shuffle so that no pairing sticks to one value of another
    axis."""
    pairs = [(a, b) for a in (False, True) for b in (False, True)] * (len(combos) // 4)
    random.Random(seed).shuffle(pairs)
    for combo, (a, b) in zip(combos, pairs):
        combo.update({names[0]: a, names[1]: b})


# emb_norm and final_norm ride along over all combinations; grouped K/V (one K/V head for
# the two query heads: multi-query attention) and QK-norm ride along over all of them too.
_ride_along(COMBOS[:144], ("emb_norm", "final_norm"), 0)  # the same spread as before
_ride_along(MODERN, ("emb_norm", "final_norm"), 2)
_ride_along(COMBOS, ("n_kv_head", "qk_norm"), 1)
for _combo in COMBOS:
    _combo["n_kv_head"] = 1 if _combo["n_kv_head"] else None


def combo_id(combo: dict) -> str:
    flags = [name for name in ("bias", "tie_embeddings", "emb_norm", "final_norm", "qk_norm")
             if combo[name]]
    if combo.get("mlp", "plain") != "plain":
        flags.append(combo["mlp"])
    if combo["n_kv_head"]:
        flags.append(f"kv{combo['n_kv_head']}")
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
