"""The public Python API: signatures, errors, and agreement with the engine underneath."""

import inspect
import math
import random
import typing

import pytest

import puregpt
from puregpt import model as gpt
from puregpt.config import ConfigError


def test_public_functions_have_type_hints():
    for name in ("train", "load", "save", "generate", "stream", "score", "evaluate"):
        fn = getattr(puregpt, name)
        hints = typing.get_type_hints(fn)
        assert "return" in hints, name
        for param in inspect.signature(fn).parameters.values():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                assert param.name in hints, f"{name}({param.name}) has no type hint"


def test_train_stays_the_function_after_the_module_is_used():
    # importing puregpt.train (the module) must not replace puregpt.train (the function)
    from puregpt.train import train as module_train  # noqa: F401
    assert callable(puregpt.train) and inspect.isfunction(puregpt.train)


def test_unknown_and_mistyped_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        puregpt.train(steps=1, n_embed=32)
    with pytest.raises(ConfigError, match="n_embd must be int"):
        puregpt.train(steps=1, n_embd="32")
    with pytest.raises(ConfigError, match="pos must be one of"):
        puregpt.train(steps=1, pos="rotary")


def test_score_equals_a_manual_log_softmax_sum():
    model = puregpt.train(steps=30, seed=3, val_fraction=0.0)
    s = puregpt.score(model, "emma")
    ids = model.tokenizer.encode_doc("emma")
    logits, _ = gpt.forward(model.params, model.config, [ids[:-1]])
    manual = 0.0
    for z, y in zip(logits, ids[1:]):
        m = max(z)
        manual += z[y] - m - math.log(sum(math.exp(v - m) for v in z))
    assert abs(s.logprob - manual) < 1e-12
    assert s.tokens == 5 and abs(s.loss + manual / 5) < 1e-12
    assert abs(s.perplexity - math.exp(s.loss)) < 1e-12


def test_generate_is_reproducible_and_matches_stream():
    model = puregpt.train(steps=30, seed=3, val_fraction=0.0)
    a = puregpt.generate(model, "a", seed=11, top_k=5)
    assert a == puregpt.generate(model, "a", seed=11, top_k=5)
    assert a == "".join(puregpt.stream(model, "a", seed=11, top_k=5))
    assert set(a) <= set(model.tokenizer.chars)
    with pytest.raises(ValueError, match="temperature"):
        puregpt.generate(model, temperature=0)


def test_api_training_equals_the_engine_loop():
    """puregpt.train with the microgpt preset is the microgpt algorithm, step for step."""
    losses = []
    puregpt.train(preset="microgpt", steps=5, callback=lambda i: losses.append(i["loss"]))
    from puregpt import optim
    from puregpt.config import TrainConfig
    from puregpt.data import bundled_names_path
    rng = random.Random(42)
    docs = [ln.strip() for ln in open(bundled_names_path()) if ln.strip()]
    rng.shuffle(docs)
    tok = puregpt.tokenizer.CharTokenizer(sorted(set("".join(docs))))
    config = puregpt.GPTConfig(vocab_size=tok.vocab_size)
    params = gpt.init_params(config, rng)
    state, tc = optim.new_state(params), TrainConfig(steps=5)
    for s in range(5):
        ids = tok.encode_doc(docs[s])
        n = min(config.block_size, len(ids) - 1)
        loss, grads, _ = gpt.loss_and_grads(params, config, [ids[:n]], [ids[1:n + 1]])
        optim.adamw_step(params, grads, state, optim.lr_at(s, tc), 0.85, 0.99, 1e-8)
        assert loss == losses[s]


def test_resume_through_the_api_refuses_model_changes(tmp_path):
    run = str(tmp_path / "run")
    puregpt.train(out=run, steps=4, val_fraction=0.0, callback=lambda i: i["step"] < 2)
    with pytest.raises(ConfigError, match="cannot change the model"):
        puregpt.train(out=run, resume=True, n_embd=32)
    assert puregpt.train(out=run, resume=True).step == 4
