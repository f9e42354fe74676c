"""The GPT: parameters, the forward pass over whole sequences, and its backward pass.

    x = wte[token] + pos[position]             (pos: learned wpe, fixed sinusoidal, or none;
                                                rope adds nothing here: it turns q and k)
    x = norm(x)                                (emb_norm, microgpt)
    per layer, pre-norm:   x = x + attn(norm(x));   x = x + mlp(norm(x))
               post-norm:  x = norm(x + attn(x));   x = norm(x + mlp(x))
    x = norm(x)                                (final_norm, GPT-2's ln_f)
    logits = x lm_head^T                       (lm_head is wte when tie_embeddings)

attn(x) = concat over heads of causal softmax(q k^T / sqrt(hd)) v, projected by attn_wo; K and
V have n_kv_head heads, each shared by n_head / n_kv_head query heads (grouped-query attention);
qk_norm RMS-normalizes each head of q and k, then rope rotates them by position.
mlp(x) = mlp_fc2 act(mlp_fc1 x), or with mlp="swiglu" mlp_fc2 (silu(mlp_gate x) * mlp_fc1 x).
`backward` walks `forward` in reverse.

Parameters are a dict name -> tensor (a matrix is a list of rows [out][in]; a vector a list).
Names: wte, wpe, lm_head, layer{l}.attn_wq/wk/wv/wo, layer{l}.mlp_fc1/fc2 (and mlp_gate for
SwiGLU); a linear layer's bias is its weight's name + "_b"; a norm's gain and bias are its name +
"_g" / "_b" (emb_norm, layer{l}.attn_norm, layer{l}.mlp_norm, final_norm; with qk_norm the
per-head gains layer{l}.attn_q_norm_g and layer{l}.attn_k_norm_g, shape (hd,)).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from . import ops
from .config import MAX_PARAMS, ConfigError, GPTConfig

# --- parameters --------------------------------------------------------------------------------


def num_params_of(config: GPTConfig) -> int:
    """How many parameters param_shapes(config) describes, by arithmetic alone (no dict of
    n_layer entries): sizes are checked with it before anything is built. It must follow
    param_shapes term for term (tests/test_hostile.py compares them over many configs)."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    norm = C * (2 if config.norm == "layernorm" else 1) if config.norm_affine else 0
    n = V * C  # wte
    n += config.block_size * C if config.pos == "learned" else 0  # wpe
    n += 0 if config.tie_embeddings else V * C  # lm_head
    n += norm if config.emb_norm else 0
    H, kv = config.hidden, config.kv_heads * config.head_dim  # MLP width, K/V width
    n_mlp = 3 if config.mlp == "swiglu" else 2  # matrices (H, C) or (C, H): gate, up, down
    per_layer = 2 * norm + 2 * C * C + 2 * kv * C + n_mlp * H * C  # two norms, Q K V O, MLP
    per_layer += 2 * config.head_dim if config.qk_norm else 0  # the q and k gains
    per_layer += 2 * C + 2 * kv + (n_mlp - 1) * H + C if config.bias else 0  # their biases
    n += L * per_layer
    n += norm if config.final_norm else 0
    return n


def check_size(config: GPTConfig) -> None:
    """Refuse (ConfigError) a model of more than config.MAX_PARAMS parameters (init_params and
    the loaders call it before building anything)."""
    n = num_params_of(config)
    if n > MAX_PARAMS:
        raise ConfigError(f"this model would have {n:,} parameters (n_layer={config.n_layer}, "
                          f"n_embd={config.n_embd}, vocab_size={config.vocab_size}), more than "
                          f"puregpt's limit of {MAX_PARAMS:,} (config.MAX_PARAMS)")


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in initialization order (microgpt's draw order for weights)."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes = {"wte": (V, C)}
    if config.pos == "learned":
        shapes["wpe"] = (config.block_size, C)
    if not config.tie_embeddings:
        shapes["lm_head"] = (V, C)
    norm_params = ["_g"] + (["_b"] if config.norm == "layernorm" else [])

    def add_norm(name):
        if config.norm_affine:
            for suffix in norm_params:
                shapes[name + suffix] = (C,)

    if config.emb_norm:
        add_norm("emb_norm")
    H, kv = config.hidden, config.kv_heads * config.head_dim  # MLP width, K/V width
    attn_rows = {"attn_wq": C, "attn_wk": kv, "attn_wv": kv, "attn_wo": C}
    mlp_rows = {"mlp_gate": H} if config.mlp == "swiglu" else {}
    mlp_rows.update(mlp_fc1=H, mlp_fc2=C)  # gate, up, down (Llama's order)
    for l in range(L):
        p = f"layer{l}."
        add_norm(p + "attn_norm")
        for w, rows in attn_rows.items():
            shapes[p + w] = (rows, C)
        if config.qk_norm:
            shapes[p + "attn_q_norm_g"] = shapes[p + "attn_k_norm_g"] = (config.head_dim,)
        for w, rows in mlp_rows.items():
            shapes[p + w] = (rows, H if w == "mlp_fc2" else C)
        if config.bias:
            for w, rows in {**attn_rows, **mlp_rows}.items():
                shapes[p + w + "_b"] = (rows,)
        add_norm(p + "mlp_norm")
    if config.final_norm:
        add_norm("final_norm")
    return shapes


def init_params(config: GPTConfig, rng: random.Random) -> dict:
    """Matrices ~ N(0, init_std) drawn row by row in param_shapes order; norm gains 1, biases 0.

    With scaled_init, the projections into the residual stream (attn_wo, mlp_fc2) use
    init_std / sqrt(2 n_layer), as GPT-2 does, so the stream's variance does not grow with depth.
    A model beyond config.MAX_PARAMS is refused first (check_size), before anything is drawn.
    """
    check_size(config)
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:
            params[name] = [1.0 if name.endswith("_norm_g") else 0.0] * shape[0]
            continue
        std = config.init_std
        if config.scaled_init and name.endswith(("attn_wo", "mlp_fc2")):
            std /= math.sqrt(2 * config.n_layer)
        params[name] = [[rng.gauss(0, std) for _ in range(shape[1])] for _ in range(shape[0])]
    return params


def zeros_like(params: dict) -> dict:
    return {name: [0.0] * len(t) if not isinstance(t[0], list) else [[0.0] * len(r) for r in t]
            for name, t in params.items()}


def num_params(params: dict) -> int:
    return sum(len(t) * (1 if isinstance(t[0], float) else len(t[0])) for t in params.values())


@lru_cache(maxsize=8)
def _sinusoidal(block_size: int, C: int):
    return tuple(tuple(row) for row in ops.sinusoidal_table(block_size, C))


@lru_cache(maxsize=8)
def rope_table(block_size: int, hd: int, theta: float):
    """cos and sin of every position's angles (block_size, hd/2), made once per shape."""
    return tuple(tuple(tuple(row) for row in t) for t in ops.rope_table(block_size, hd, theta))


def position_table(params: dict, config: GPTConfig):
    """The rows added to token embeddings: learned wpe, the fixed sinusoids, or None (also for
    rope, which turns q and k in attention instead)."""
    if config.pos == "learned":
        return params["wpe"]
    if config.pos == "sinusoidal":
        return _sinusoidal(config.block_size, config.n_embd)
    return None


def lm_head_name(config: GPTConfig) -> str:
    return "wte" if config.tie_embeddings else "lm_head"


def lm_head_weight(params: dict, config: GPTConfig):
    return params[lm_head_name(config)]


def linear_layers(config: GPTConfig) -> list[str]:
    """Every linear layer's name, in the order the backward pass reaches them. A layer is named
    by its weight; Q, K and V, one stacked layer (see _qkv), are named layer{l}.attn_qkv."""
    names = [lm_head_name(config)]
    for l in reversed(range(config.n_layer)):
        p = f"layer{l}."
        names += [p + "mlp_fc2", p + "mlp_fc1"] + ([p + "mlp_gate"] if config.mlp == "swiglu"
                                                   else []) + [p + "attn_wo", p + "attn_qkv"]
    return names


def layer_tensors(name: str) -> list[str]:
    """The parameter names behind a linear layer name (weights; biases are these + "_b")."""
    if name.endswith("attn_qkv"):
        p = name[:-len("attn_qkv")]
        return [p + "attn_wq", p + "attn_wk", p + "attn_wv"]
    return [name]


# --- sub-layers: norm, attention, MLP ----------------------------------------------------------


def norm_forward(X, params, name, config):
    gain, bias = params.get(name + "_g"), params.get(name + "_b")
    if config.norm == "rmsnorm":
        return ops.rmsnorm_forward(X, gain, config.norm_eps)
    return ops.layernorm_forward(X, gain, bias, config.norm_eps)


def norm_backward(dY, cache, grads, name, config):
    if config.norm == "rmsnorm":
        return ops.rmsnorm_backward(dY, cache, grads.get(name + "_g"))
    return ops.layernorm_backward(dY, cache, grads.get(name + "_g"), grads.get(name + "_b"))


def _qkv(tensors, p):
    """Q, K and V's weight matrices (or their gradients) stacked: one (C + 2 kv, C) linear
    layer (kv = n_kv_head * hd; 3C without grouping, as GPT-2 stores them in c_attn). The stacked list holds the original rows, so gradients
    accumulated into it land in each matrix's own buffers."""
    parts = [tensors.get(w) for w in layer_tensors(p + "attn_qkv")]
    return None if parts[0] is None else parts[0] + parts[1] + parts[2]


def _qkv_bias(tensors, p):
    """Q, K and V's biases stacked (a copy: read-only use)."""
    parts = [tensors.get(w + "_b") for w in layer_tensors(p + "attn_qkv")]
    return None if parts[0] is None else parts[0] + parts[1] + parts[2]


def attn_forward(X, params, p, config, lengths, kv=None, positions=None):
    """Causal self-attention over the sequences laid end to end in X (lengths says where;
    positions: each row's position, which rope turns q and k by).

    With kv = [K rows, V rows] (decoding, one sequence), the new keys and values (n_kv_head
    heads, already normalized and rotated by their absolute position) are appended to the cache
    and the queries attend to everything cached so far.
    """
    C, kvd = config.n_embd, config.kv_heads * config.head_dim
    # one product for Q, K and V: three times fewer calls, each row of X prepared once
    QKV, c_qkv = ops.linear_forward(X, _qkv(params, p), _qkv_bias(params, p))  # (N, C + 2kvd)
    Q = [row[:C] for row in QKV]  # (N, C)
    K = [row[C:C + kvd] for row in QKV]  # (N, kvd)
    Vv = [row[C + kvd:] for row in QKV]  # (N, kvd)
    c_rows = {}  # the row-wise steps on q and k: QK-norm, then the rotation
    if config.qk_norm:
        Q, c_rows["q_norm"] = ops.head_rmsnorm_forward(Q, config.n_head, params[p + "attn_q_norm_g"],
                                                       config.norm_eps)
        K, c_rows["k_norm"] = ops.head_rmsnorm_forward(K, config.kv_heads,
                                                       params[p + "attn_k_norm_g"],
                                                       config.norm_eps)
    if config.pos == "rope":
        cos, sin = rope_table(config.block_size, config.head_dim, config.rope_theta)
        Q, c_rows["q_rope"] = ops.rope_forward(Q, positions, config.n_head, cos, sin)
        K, c_rows["k_rope"] = ops.rope_forward(K, positions, config.kv_heads, cos, sin)
    out, c_heads, start = [], [], 0
    if kv is not None:
        kv[0].extend(K)
        kv[1].extend(Vv)
        out, c = ops.attention_forward(Q, kv[0], kv[1], config.n_head, config.kv_heads)
        c_heads.append(c)
    else:
        for T in lengths:  # attention never crosses from one sequence into another
            o, c = ops.attention_forward(Q[start:start + T], K[start:start + T],
                                         Vv[start:start + T], config.n_head, config.kv_heads)
            out += o
            c_heads.append(c)
            start += T
    Y, co = ops.linear_forward(out, params[p + "attn_wo"], params.get(p + "attn_wo_b"))
    return Y, (c_qkv, c_heads, co, c_rows)


def attn_backward(dY, cache, grads, p, defer=None):
    c_qkv, c_heads, co, c_rows = cache
    dout = linear_backward(dY, co, grads, p + "attn_wo", defer)
    dQ, dK, dV, start = [], [], [], 0
    for c in c_heads:
        T = len(c[0])
        dq, dk, dv = ops.attention_backward(dout[start:start + T], c)
        dQ += dq
        dK += dk
        dV += dv
        start += T
    if "q_rope" in c_rows:  # the forward's row-wise steps, in reverse
        dQ = ops.rope_backward(dQ, c_rows["q_rope"])
        dK = ops.rope_backward(dK, c_rows["k_rope"])
    if "q_norm" in c_rows:
        dQ = ops.head_rmsnorm_backward(dQ, c_rows["q_norm"], grads[p + "attn_q_norm_g"])
        dK = ops.head_rmsnorm_backward(dK, c_rows["k_norm"], grads[p + "attn_k_norm_g"])
    dQKV = [q + k + v for q, k, v in zip(dQ, dK, dV)]  # (N, C + 2kvd), as the stacked layer
    return linear_backward(dQKV, c_qkv, grads, p + "attn_qkv", defer)


def linear_param_grads(name, dY, X, grads):
    """Accumulate into grads the weight (and bias) gradients of the linear layer `name`, given
    its output gradient dY (N, out) and its input X (N, in)."""
    if not name.endswith("attn_qkv"):
        ops.linear_param_grads(dY, X, grads[name], grads.get(name + "_b"))
        return
    p = name[:-len("attn_qkv")]
    # stacked bias vectors are copies (floats, not rows), so their gradient gets its own buffer
    dbias = None if p + "attn_wq_b" not in grads else [0.0] * len(dY[0])
    ops.linear_param_grads(dY, X, _qkv(grads, p), dbias)
    if dbias is not None:
        start = 0
        for w in layer_tensors(name):  # Q's C entries, then K's and V's (kv each)
            n = len(grads[w + "_b"])
            ops.add_into(grads[w + "_b"], dbias[start:start + n])
            start += n


def linear_backward(dY, cache, grads, name, defer=None):
    """dX of the linear layer `name` (N, in); its parameter gradients go into grads, or to
    defer[name](dY, X) when the layer is deferred."""
    dX = ops.linear_backward(dY, cache, None)
    if defer is not None and name in defer:
        defer[name](dY, cache[0])
    else:
        linear_param_grads(name, dY, cache[0], grads)
    return dX


def mlp_forward(X, params, p, config):
    """plain: fc2 act(fc1 x);  swiglu: fc2 (act(gate x) * fc1 x), act = silu."""
    H, c1 = ops.linear_forward(X, params[p + "mlp_fc1"], params.get(p + "mlp_fc1_b"))  # (N, H)
    if config.mlp == "swiglu":
        G, cg = ops.linear_forward(X, params[p + "mlp_gate"], params.get(p + "mlp_gate_b"))
        A, ca = ops.gated_forward(G, H, config.activation)
        c1 = (c1, cg)
    else:
        A, ca = ops.ACTIVATIONS[config.activation][0](H)
    Y, c2 = ops.linear_forward(A, params[p + "mlp_fc2"], params.get(p + "mlp_fc2_b"))  # (N, C)
    return Y, (c1, ca, c2)


def mlp_backward(dY, cache, grads, p, config, defer=None):
    c1, ca, c2 = cache
    dA = linear_backward(dY, c2, grads, p + "mlp_fc2", defer)
    if config.mlp == "plain":
        dH = ops.ACTIVATIONS[config.activation][1](dA, ca)
        return linear_backward(dH, c1, grads, p + "mlp_fc1", defer)
    (c1, cg), (dG, dH) = c1, ops.gated_backward(dA, ca)
    dX = linear_backward(dH, c1, grads, p + "mlp_fc1", defer)  # the order of linear_layers
    ops.add_into_rows(dX, linear_backward(dG, cg, grads, p + "mlp_gate", defer))
    return dX


# --- one transformer block ---------------------------------------------------------------------


def block_forward(x, params, l, config, lengths, kv=None, trace=None, positions=None):
    """trace (a dict, or None): receives each sub-block's output ("layer{l}.attn", ".mlp") and
    the residual stream after it ("layer{l}.resid_attn", ".resid_mlp"). positions: each row's
    position (used by rope)."""
    p = f"layer{l}."
    cache = {}
    if config.norm_position == "pre":
        h, cache["attn_norm"] = norm_forward(x, params, p + "attn_norm", config)
        a, cache["attn"] = attn_forward(h, params, p, config, lengths, kv, positions)
        x = ops.add_rows(x, a)
        _trace(trace, p, "attn", a, x)
        h, cache["mlp_norm"] = norm_forward(x, params, p + "mlp_norm", config)
        m, cache["mlp"] = mlp_forward(h, params, p, config)
        x = ops.add_rows(x, m)
        _trace(trace, p, "mlp", m, x)
    else:
        a, cache["attn"] = attn_forward(x, params, p, config, lengths, kv, positions)
        x, cache["attn_norm"] = norm_forward(ops.add_rows(x, a), params, p + "attn_norm", config)
        _trace(trace, p, "attn", a, x)
        m, cache["mlp"] = mlp_forward(x, params, p, config)
        x, cache["mlp_norm"] = norm_forward(ops.add_rows(x, m), params, p + "mlp_norm", config)
        _trace(trace, p, "mlp", m, x)
    return x, cache


def _trace(trace, p, name, out, x):
    if trace is not None:
        trace[p + name], trace[p + "resid_" + name] = out, x


def block_backward(dx, cache, grads, l, config, defer=None):
    """A residual x + f(x) passes its gradient to x unchanged and, through f, adds f's."""
    p = f"layer{l}."
    if config.norm_position == "pre":
        dh = mlp_backward(dx, cache["mlp"], grads, p, config, defer)
        ops.add_into_rows(dx, norm_backward(dh, cache["mlp_norm"], grads, p + "mlp_norm", config))
        dh = attn_backward(dx, cache["attn"], grads, p, defer)
        ops.add_into_rows(dx, norm_backward(dh, cache["attn_norm"], grads, p + "attn_norm",
                                            config))
    else:
        dx = norm_backward(dx, cache["mlp_norm"], grads, p + "mlp_norm", config)
        ops.add_into_rows(dx, mlp_backward(dx, cache["mlp"], grads, p, config, defer))
        dx = norm_backward(dx, cache["attn_norm"], grads, p + "attn_norm", config)
        ops.add_into_rows(dx, attn_backward(dx, cache["attn"], grads, p, defer))
    return dx


# --- the whole model ---------------------------------------------------------------------------


def forward(params: dict, config: GPTConfig, inputs: list[list[int]], kv=None, start_pos=0,
            trace: dict | None = None):
    """Logits for every position of every sequence in `inputs`, and the cache for `backward`.

    inputs: B token sequences of 1..block_size tokens each. Returns logits (N, V), N = total
    tokens, rows in input order. With a KV cache `kv` (from `new_kv_cache`), inputs is one
    sequence continuing at position start_pos (= tokens already in the cache).
    trace: a dict that receives the residual stream (N, C) at each stage, for looking inside:
    "embed" (after the embedding, and emb_norm), per layer the sub-blocks' outputs and the stream
    after them (see block_forward), "final" (what lm_head reads).
    """
    lengths = [len(seq) for seq in inputs]
    tokens = [t for seq in inputs for t in seq]
    positions = [start_pos + i for T in lengths for i in range(T)]
    if not tokens:
        raise ValueError("forward needs at least one token")
    if max(positions) >= config.block_size:
        raise ValueError(f"sequence longer than block_size={config.block_size}")
    for t in tokens:
        if not 0 <= t < config.vocab_size:
            raise ValueError(f"token id {t} outside the vocabulary (size {config.vocab_size})")
    cache = {"lengths": lengths}
    x, cache["emb"] = ops.embedding_forward(tokens, positions, params["wte"],
                                            position_table(params, config))
    if config.emb_norm:
        x, cache["emb_norm"] = norm_forward(x, params, "emb_norm", config)
    if trace is not None:
        trace["embed"] = x
    for l in range(config.n_layer):
        x, cache[f"layer{l}"] = block_forward(x, params, l, config, lengths,
                                              None if kv is None else kv[l], trace, positions)
    if config.final_norm:
        x, cache["final_norm"] = norm_forward(x, params, "final_norm", config)
    if trace is not None:
        trace["final"] = x
    logits, cache["lm_head"] = ops.linear_forward(x, lm_head_weight(params, config))
    return logits, cache


def backward(dlogits, cache, params: dict, grads: dict, config: GPTConfig,
             defer: dict | None = None) -> None:
    """Accumulate into `grads` (same structure as params) the gradient behind dlogits.

    defer: linear layer name -> f(dY, X) for layers whose parameter gradients are computed
    elsewhere (parallel.SplitStep): f receives what they need and grads is left alone.
    """
    dx = linear_backward(dlogits, cache["lm_head"], grads, lm_head_name(config), defer)
    if config.final_norm:
        dx = norm_backward(dx, cache["final_norm"], grads, "final_norm", config)
    for l in reversed(range(config.n_layer)):
        dx = block_backward(dx, cache[f"layer{l}"], grads, l, config, defer)
    if config.emb_norm:
        dx = norm_backward(dx, cache["emb_norm"], grads, "emb_norm", config)
    ops.embedding_backward(dx, cache["emb"], grads["wte"], grads.get("wpe"))


def loss_and_grads(params, config, inputs, targets, grads=None, dloss=1.0):
    """Forward, mean cross-entropy over all target positions (targets -1 ignored), backward.

    Gradients are accumulated into `grads` (fresh zeros when None); returns (loss, grads, n)
    where n counts the positions with a target.
    """
    logits, cache = forward(params, config, inputs)
    flat_targets = [y for seq in targets for y in seq]
    loss, lcache = ops.cross_entropy_forward(logits, flat_targets)
    if grads is None:
        grads = zeros_like(params)
    backward(ops.cross_entropy_backward(dloss, lcache), cache, params, grads, config)
    return loss, grads, lcache[2]


def evaluate_loss(params, config, inputs, targets) -> tuple[float, int]:
    """Mean cross-entropy without a backward pass; returns (loss, number of target positions)."""
    logits, _ = forward(params, config, inputs)
    loss, lcache = ops.cross_entropy_forward(logits, [y for seq in targets for y in seq])
    return loss, lcache[2]


def attention_weights(cache: dict, l: int) -> list:
    """The attention weights of layer l from forward's cache: per sequence, per head, the
    (T, T) matrix whose row i is query i's softmax over keys 0..i (zeros past the mask)."""
    return [c[4] for c in cache[f"layer{l}"]["attn"][1]]


def new_kv_cache(config: GPTConfig) -> list:
    """Per layer [keys, values]: the rows (n_kv_head * hd) of every position decoded so far,
    keys as attention reads them (after QK-norm and the rotation of their position)."""
    return [[[], []] for _ in range(config.n_layer)]
