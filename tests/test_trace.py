"""model.forward's trace: the residual stream it records is the one the logits come from."""

import random

from conftest import perturbed_params, random_batch, tiny_config
from puregpt import model, ops


def test_trace_records_the_residual_stream(combo):
    cfg = tiny_config(combo)
    params = perturbed_params(cfg)
    inputs, _ = random_batch(cfg, random.Random(1), [5, 3])
    trace = {}
    logits, cache = model.forward(params, cfg, inputs, trace=trace)
    assert logits == model.forward(params, cfg, inputs)[0]  # tracing changes nothing
    # what lm_head reads gives the logits
    assert ops.matmul(trace["final"], model.lm_head_weight(params, cfg)) == logits
    x = trace["embed"]
    for l in range(cfg.n_layer):
        p = f"layer{l}."
        for part in ("attn", "mlp"):
            out, after = trace[p + part], trace[p + "resid_" + part]
            if cfg.norm_position == "pre":  # x + f(norm(x)): the sub-block's output is added
                assert after == ops.add_rows(x, out)
            else:  # norm(x + f(x))
                assert after == model.norm_forward(ops.add_rows(x, out), params,
                                                   p + part + "_norm", cfg)[0]
            x = after
    weights = model.attention_weights(cache, 0)
    assert len(weights) == 2 and len(weights[0]) == cfg.n_head
    assert all(abs(sum(row) - 1) < 1e-12 for seq in weights for head in seq for row in head)
