"""The x-ray of a model on one text: its real attention, probabilities, residual stream and
gradients, as one JSON-able dict, and the self-contained page that draws it (explain.html).

Every number comes from the engine's own functions on this text: one `model.forward` (its
attention caches and its residual-stream trace), the cross-entropy and one `model.backward` (the
gradients), `optim.adamw_step` on a copy of the weights (the update a training step on this text
would make), and the token embeddings projected by PCA. Nothing is recomputed another way, so
the page shows what training and sampling use. Keys of the dict (see docs/api.md):

    tokens       the sequence shown: id, text, log-probability and surprisal (-log p, nats) of
                 each token given the ones before it (None for the first: nothing predicts it)
    inputs, targets  the positions fed to the model (T of them) and the token each predicts
                 (-1: none, the last position of a stream-mode prompt)
    attention    [layer][head][query i] -> the weights of keys 0..i (the causal triangle)
    logits, top  per position the logits over the vocabulary (the page reshapes them with
                 temperature / top-k / top-p as sample.shape_probs does) and the 10 likeliest
                 next tokens [id, probability]
    residual     norms of the residual stream per stage and position, and of each sub-block's
                 contribution
    train_step   one training step on this text: per parameter tensor the gradient norm and the
                 update-to-weight ratio under the run's optimizer settings
    ops          "walk the math": the forward and backward ops in order, with shapes, a few
                 values and the functions that compute them (ops.py, model.py, gpt.py)
    pca          the token embeddings (wte) on their two principal axes
"""

from __future__ import annotations

import json
import math
import os
import random

from . import model, ops, optim, sample
from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import TrainConfig

FORMAT = "puregpt-explain"
VERSION = 1
TOP = 10  # next-token bars per position
VALUES = 4  # numbers shown per op in "walk the math"
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explain.html")
DATA_MARK = "__PUREGPT_DATA__"  # where render_page puts the JSON in the template
LIVE_MARK = "__PUREGPT_LIVE__"


def _norm(values) -> float:
    """L2 norm of a vector or (Frobenius) of a matrix."""
    rows = values if values and isinstance(values[0], (list, tuple)) else [values]
    return math.sqrt(sum(x * x for row in rows for x in row))


def _copy(tensor):
    return [list(r) for r in tensor] if isinstance(tensor[0], list) else list(tensor)


def _few(row) -> list[float]:
    return [float(x) for x in list(row)[:VALUES]]


def _sequence(tokenizer, text: str, block_size: int, docs_mode: bool):
    """(inputs, targets, dropped): what the model reads and the token each position predicts.

    Docs mode wraps the text in BOS as training does (inputs BOS + text, targets text + BOS);
    stream mode reads the text as a prompt: every token is an input, the last predicts nothing
    (-1). Beyond block_size, the last block is kept, as sampling's sliding context does;
    `dropped` counts the tokens cut from the front."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError("the text to explain is empty: give at least one character")
    if docs_mode:
        ids = tokenizer.encode_doc(text)  # raises, naming characters outside the vocabulary
        inputs, targets = ids[:-1], ids[1:]
    else:
        ids = tokenizer.encode(text)
        inputs, targets = ids, ids[1:] + [-1]
    dropped = max(0, len(inputs) - block_size)
    return inputs[dropped:], targets[dropped:], dropped


def _log_softmax_at(z, y) -> float:
    """log softmax(z)[y], computed as sample.score_ids computes it."""
    m = max(z)
    return z[y] - m - math.log(sum(math.exp(zi - m) for zi in z))


def explain(params: dict, config, tokenizer, text: str, train_config: TrainConfig | None = None,
            docs_mode: bool = True, optimizer: dict | None = None, step: int = 0) -> dict:
    """The x-ray of `text` under the model (params, config, tokenizer): see the module's
    docstring for the keys. optimizer: the run's AdamW state ({"step", "m", "v"}, as in a
    checkpoint; None: fresh moments); step: the run's step, which sets the learning rate of the
    training step shown. The model is never changed."""
    inputs, targets, dropped = _sequence(tokenizer, text, config.block_size, docs_mode)
    T, L = len(inputs), config.n_layer
    trace = {}
    logits, cache = model.forward(params, config, [inputs], trace=trace)
    attention = [[[row[:i + 1] for i, row in enumerate(head)]  # the triangle: keys 0..i
                  for head in model.attention_weights(cache, l)[0]] for l in range(L)]

    shown = inputs + ([targets[-1]] if targets[-1] >= 0 else [])
    logprobs = [None] + [_log_softmax_at(z, y) for z, y in zip(logits, targets) if y >= 0]
    vocab = [tokenizer.token_str(i) for i in range(config.vocab_size)]
    tokens = [{"id": t, "text": vocab[t], "logprob": lp, "surprisal": None if lp is None else -lp}
              for t, lp in zip(shown, logprobs)]

    probs = [ops.softmax(z) for z in logits]
    top = [[[i, p[i]] for i in sorted(range(len(p)), key=lambda i: -p[i])[:TOP]] for p in probs]
    n_targets = sum(y >= 0 for y in targets)
    grads = dlogits = loss = None
    if n_targets:
        loss, lcache = ops.cross_entropy_forward(logits, targets)
        dlogits = ops.cross_entropy_backward(1.0, lcache)
        grads = model.zeros_like(params)
        model.backward(dlogits, cache, params, grads, config)

    notes = []
    if dropped:
        notes.append(f"the text is {dropped + T} tokens long, more than block_size "
                     f"({config.block_size}): only its last {T} tokens are shown, at positions "
                     f"0..{T - 1}, as sampling slides its context")
    if not docs_mode:
        notes.append("stream mode: the text is a prompt; its last position predicts the "
                     "token that would come next")
    data = {
        "format": FORMAT, "version": VERSION, "text": text,
        "mode": "docs" if docs_mode else "stream",
        "model": {**config.to_dict(), "params": model.num_params(params), "step": step,
                  "tokenizer": tokenizer.kind, "head_dim": config.head_dim},
        "vocab": vocab, "bos": tokenizer.bos,
        "truncated": {"total_tokens": dropped + T, "dropped": dropped} if dropped else None,
        "notes": notes,
        "tokens": tokens, "inputs": inputs, "targets": targets,
        "loss": loss, "logprob": None if loss is None else sum(logprobs[1:]),
        "attention": attention,
        "logits": logits, "top": top,
        "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "top_p_tolerance": sample.TOP_P_TOLERANCE},
        "residual": _residual(params, config, inputs, trace),
        "train_step": _train_step(params, grads, train_config, optimizer, step, loss),
        "ops": _walk(params, config, inputs, cache, trace, logits, loss, dlogits, grads),
        "pca": pca_embeddings(params["wte"], vocab),
    }
    return data


def explain_model(ckpt, text: str) -> dict:
    """explain() of a loaded model (a checkpoint.Checkpoint): its run's mode, optimizer
    settings and state."""
    return explain(ckpt.params, ckpt.config, ckpt.tokenizer, text, ckpt.train_config,
                   ckpt.trainer.get("mode", "docs") == "docs", ckpt.optimizer, ckpt.step)


def explain_checkpoint(path: str, text: str) -> dict:
    """explain() of the model in a checkpoint file or a run directory (its best checkpoint)."""
    return explain_model(load_checkpoint(resolve_checkpoint(os.fspath(path))), text)


# --- the residual stream -----------------------------------------------------------------------


def _residual(params, config, inputs, trace) -> dict:
    """Per stage (the stream after the embedding, each sub-block, the final norm), the norm of x
    at every position; per sub-block, the norm of what it adds (pre-norm) or of its output
    before the norm (post-norm)."""
    emb, _ = ops.embedding_forward(inputs, list(range(len(inputs))), params["wte"],
                                   model.position_table(params, config))
    stages = [("embedding", emb)]
    if config.emb_norm:
        stages.append(("emb_norm", trace["embed"]))
    contributions = {}
    for l in range(config.n_layer):
        for part in ("attn", "mlp"):
            name = f"layer{l}.{part}"
            stages.append((name, trace[f"layer{l}.resid_{part}"]))
            contributions[name] = [_norm(r) for r in trace[name]]
    if config.final_norm:
        stages.append(("final_norm", trace["final"]))
    return {"stages": [name for name, _ in stages],
            "norms": [[_norm(r) for r in x] for _, x in stages],
            "contributions": contributions}


# --- one training step on this text ------------------------------------------------------------


def _train_step(params, grads, tc: TrainConfig | None, optimizer: dict | None, step: int,
                loss) -> dict:
    """Gradient norms, and the AdamW update the run's settings would make, on copies."""
    if grads is None:
        return {"skipped": "a one-token prompt predicts nothing that has a target: no loss, no "
                           "gradient"}
    settings = "the run's"
    if tc is None:
        tc, settings = TrainConfig(), "TrainConfig's defaults (the model has no training recipe)"
    # the learning rate of the run's next step, or of its last one when it has finished (a
    # linear schedule ends at 0, which would show no update at all)
    at = min(step, tc.steps - 1)
    lr = optim.lr_at(at, tc)
    grad_norms = {name: _norm(g) for name, g in grads.items()}  # model.backward's, unclipped
    global_norm = optim.grad_norm(grads)
    grads = {name: _copy(g) for name, g in grads.items()}  # clipping scales them in place
    if tc.grad_clip > 0:
        optim.clip_grads(grads, tc.grad_clip)
    if optimizer is not None and set(optimizer["m"]) == set(params):
        state = {"step": optimizer["step"], "m": {n: list(m) for n, m in optimizer["m"].items()},
                 "v": {n: list(v) for n, v in optimizer["v"].items()}}
        moments = f"the saved AdamW moments (optimizer step {optimizer['step']})"
    else:
        state, moments = optim.new_state(params), "fresh AdamW moments (none saved)"
    new = {name: _copy(t) for name, t in params.items()}
    optim.adamw_step(new, grads, state, lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay)
    tensors = []
    for name, w in params.items():
        w_norm = _norm(w)
        rows_w, rows_new = (w, new[name]) if isinstance(w[0], list) else ([w], [new[name]])
        update = math.sqrt(sum((b - a) ** 2 for ra, rb in zip(rows_w, rows_new)
                               for a, b in zip(ra, rb)))
        tensors.append({"name": name, "shape": _shape(w), "grad_norm": grad_norms[name],
                        "weight_norm": w_norm, "update_norm": update,
                        "ratio": update / w_norm if w_norm else None,
                        "weight_decay": tc.weight_decay if optim.decays(name, w) else 0.0})
    return {"loss": loss, "lr": lr, "lr_step": at, "settings": settings, "moments": moments,
            "beta1": tc.beta1, "beta2": tc.beta2, "eps": tc.eps,
            "weight_decay": tc.weight_decay, "grad_clip": tc.grad_clip,
            "global_grad_norm": global_norm, "tensors": tensors}


# --- walk the math -----------------------------------------------------------------------------

# gpt.py's function for each op; the others (gelu, silu, the gated MLP, rope, QK-norm, ...)
# have none: gpt.py is microgpt, without those switches
GPT_COUNTERPART = {
    "embedding_forward": "forward", "embedding_backward": "backward",
    "rmsnorm_forward": "rmsnorm", "rmsnorm_backward": "rmsnorm_backward",
    "linear_forward": "linear", "linear_backward": "linear_backward",
    "attention_forward": "attention", "attention_backward": "attention_backward",
    "relu_forward": "relu", "relu_backward": "relu_backward",
    "add_rows": "add", "add_into_rows": "add",
    "cross_entropy_forward": "cross_entropy", "cross_entropy_backward": "cross_entropy_backward",
}


def _shape(t) -> list[int]:
    return [len(t), len(t[0])] if t and isinstance(t[0], (list, tuple)) else [len(t)]


def _where(module, name: str) -> dict:
    """The file, function and first line of a function of the engine."""
    code = getattr(module, name).__code__
    return {"file": f"puregpt/{module.__name__.rsplit('.', 1)[-1]}.py", "function": name,
            "line": code.co_firstlineno}


def _op(phase, what, op, in_model, inputs, output, values):
    short = op.rsplit("_", 1)[0] if op.endswith(("_forward", "_backward")) else op
    return {"phase": phase, "what": what, "op": short, "ops": _where(ops, op),
            "model": _where(model, in_model), "gpt": GPT_COUNTERPART.get(op),
            "inputs": inputs, "output": output, "values": _few(values)}


def _walk(params, config, inputs, cache, trace, logits, loss, dlogits, grads) -> list[dict]:
    """The ops of one forward and one backward pass over this input, in the order model.py runs
    them, each with its input and output shapes and the first few numbers of its output at the
    last position (forward) or of the gradient it adds into a parameter (backward: its first
    row). Each forward op is collected with its backward; the backward pass runs them in
    reverse."""
    T, C, V = len(inputs), config.n_embd, config.vocab_size
    norm, act = config.norm, config.activation
    fwd, bwd = [], []

    def grad_values(name):
        g = grads.get(name) if grads is not None else None
        return [] if g is None else (g[0] if isinstance(g[0], list) else g)

    def pair(what, op, in_model, back_model, inputs_, output, values, grad_of=None,
             back_op=None):
        """An op's forward and its backward (which maps the output's gradient to its input's)."""
        fwd.append(_op("forward", what, op + "_forward" if back_op is None else op, in_model,
                       inputs_, output, values))
        bwd.append(_op("backward", what, op + "_backward" if back_op is None else back_op,
                       back_model, [output], inputs_[0], grad_values(grad_of)))

    def norm_pair(name, x):
        pair(name, norm, "norm_forward", "norm_backward", [[T, C]], [T, C], x, name + "_g")

    def linear(name, what, n_in, n_out, x, in_model):
        pair(what, "linear", in_model, "linear_backward", [[T, n_in], [n_out, n_in]], [T, n_out],
             x, name)

    def residual(what, x):
        pair(what, "add_rows", "block_forward", "block_backward", [[T, C], [T, C]], [T, C], x,
             back_op="add_into_rows")

    emb, _ = ops.embedding_forward(inputs, list(range(T)), params["wte"],
                                   model.position_table(params, config))
    pair("token (+ position) embedding", "embedding", "forward", "backward",
         [[T], [V, C]] + ([[config.block_size, C]] if config.pos in ("learned", "sinusoidal")
                          else []), [T, C],
         emb[-1], "wte")
    bwd[-1]["output"] = [V, C]  # the gradient lands in wte's rows
    if config.emb_norm:
        norm_pair("emb_norm", trace["embed"][-1])
    x = trace["embed"][-1]  # the residual stream at the last position, before each sub-block
    kvd, Hd = config.kv_heads * config.head_dim, config.hidden  # K/V width, MLP width
    for l in range(config.n_layer):
        p = f"layer{l}."
        c = cache[f"layer{l}"]
        c_qkv, c_heads, c_o = c["attn"][:3]
        c1, c_act, c2 = c["mlp"]
        Q = c_heads[0][0]  # the queries as attention reads them (after QK-norm and rope)
        pre = config.norm_position == "pre"
        if pre:
            norm_pair(p + "attn_norm", c_qkv[0][-1])
        bias = [x for w in model.layer_tensors(p + "attn_qkv")
                for x in params.get(w + "_b", [])] or None
        qkv, _ = ops.linear_forward(c_qkv[0][-1:], c_qkv[1], bias)  # its last row, for show
        linear(p + "attn_wq", p + "attn_qkv (Q, K, V stacked)", C, C + 2 * kvd, qkv[0],
               "attn_forward")
        row_ops = ([("attn q, k: QK-norm per head", "head_rmsnorm", p + "attn_q_norm_g")]
                   if config.qk_norm else []) + \
            ([("attn q, k: rotary positions", "rope", None)] if config.pos == "rope" else [])
        for i, (what, op, gain) in enumerate(row_ops):
            pair(p + what, op, "attn_forward", "attn_backward", [[T, C], [T, kvd]], [T, C],
                 Q[-1] if i + 1 == len(row_ops) else [], gain)
        pair(p + "attention", "attention", "attn_forward", "attn_backward",
             [[T, C], [T, kvd], [T, kvd]], [T, C], c_o[0][-1])
        linear(p + "attn_wo", p + "attn_wo", C, C, trace[p + "attn"][-1], "attn_forward")
        residual(p + "attn residual", ops.add_rows([x], [trace[p + "attn"][-1]])[0])
        if not pre:
            norm_pair(p + "attn_norm", trace[p + "resid_attn"][-1])
        x = trace[p + "resid_attn"][-1]
        if pre:
            fc1_cache = c1 if config.mlp == "plain" else c1[0]  # swiglu: (fc1's, gate's)
            norm_pair(p + "mlp_norm", fc1_cache[0][-1])
        if config.mlp == "plain":
            linear(p + "mlp_fc1", p + "mlp_fc1", C, Hd, c_act[-1], "mlp_forward")
            pair(p + act, act, "mlp_forward", "mlp_backward", [[T, Hd]], [T, Hd], c2[0][-1])
        else:  # swiglu: fc2 (act(gate x) * fc1 x); the gated op's cache holds act's input
            linear(p + "mlp_fc1", p + "mlp_fc1 (up)", C, Hd, c_act[2][-1], "mlp_forward")
            linear(p + "mlp_gate", p + "mlp_gate", C, Hd, c_act[1][-1], "mlp_forward")
            pair(p + f"{act}(gate) * up", "gated", "mlp_forward", "mlp_backward",
                 [[T, Hd], [T, Hd]], [T, Hd], c2[0][-1])
        linear(p + "mlp_fc2", p + "mlp_fc2", Hd, C, trace[p + "mlp"][-1], "mlp_forward")
        residual(p + "mlp residual", ops.add_rows([x], [trace[p + "mlp"][-1]])[0])
        if not pre:
            norm_pair(p + "mlp_norm", trace[p + "resid_mlp"][-1])
        x = trace[p + "resid_mlp"][-1]
    if config.final_norm:
        norm_pair("final_norm", trace["final"][-1])
    linear(model.lm_head_name(config), "lm_head", C, V, logits[-1], "forward")
    if loss is not None:
        pair("cross-entropy loss", "cross_entropy", "loss_and_grads", "loss_and_grads",
             [[T, V], [T]], [], [loss])
        bwd[-1]["values"] = _few(dlogits[-1])  # d loss / d logits at the last position
    if grads is None:  # nothing to differentiate: no backward pass
        bwd = []
    return fwd + bwd[::-1]


# --- PCA of the token embeddings ---------------------------------------------------------------


def pca_embeddings(wte, labels: list[str], k: int = 2, tol: float = 1e-14,
                   max_iter: int = 2000) -> dict:
    """The rows of wte (V, C) projected on their k principal axes: the top eigenvectors of their
    covariance S, found by power iteration with deflation.

    Power iteration: v <- S v / |S v| converges to the eigenvector of S's largest eigenvalue
    (S is symmetric positive semi-definite, so largest in magnitude too), its error shrinking
    by lambda2 / lambda1 per step. Iterating with P = S^(2^SQUARINGS) instead (same
    eigenvectors) shrinks it by (lambda2 / lambda1)^1024 per step: close eigenvalues converge
    in a few steps, and ten (C, C) products cost less than many slow steps. Deflation,
    S <- S - lambda v v^T, removes the axis found so the next run finds the next one;
    re-orthogonalizing against the axes found keeps rounding from bringing them back. Axes come
    out orthonormal, in order of decreasing variance (lambda, the Rayleigh quotient v^T S v)."""
    V, C = len(wte), len(wte[0])
    mean = [sum(col) / V for col in zip(*wte)]
    X = [[x - m for x, m in zip(row, mean)] for row in wte]  # (V, C), centred
    XT = ops.transpose(X)  # (C, V)
    S = [[s / V for s in row] for row in ops.matmul(XT, XT)]  # covariance (C, C), biased
    total = sum(S[i][i] for i in range(C))
    rng = random.Random(0)  # a fixed start: the same page for the same model
    axes, variances = [], []
    for _ in range(min(k, C)):
        v = _top_eigenvector(S, [rng.gauss(0, 1) for _ in range(C)], axes, tol, max_iter)
        lam = _dot(v, ops.matvec(S, v))  # the Rayleigh quotient: the variance along v
        biggest = max(range(C), key=lambda i: abs(v[i]))
        if v[biggest] < 0:  # a sign convention, for a stable picture
            v = [-x for x in v]
        axes.append(v)
        variances.append(lam)
        S = [[s - lam * a * b for s, b in zip(row, v)] for row, a in zip(S, v)]  # deflate
    points = [[_dot(x, axis) for axis in axes] for x in X]
    return {"axes": axes, "variance": variances, "total_variance": total, "mean": mean,
            "points": points, "labels": list(labels)}


SQUARINGS = 10  # P = S^1024


def _top_eigenvector(S, start, axes, tol, max_iter):
    """The unit eigenvector of the symmetric S's largest eigenvalue, orthogonal to `axes`."""
    P = S
    for _ in range(SQUARINGS):
        P = ops.matmul(P, P)  # P P^T = P^2, as P is symmetric
        size = max(abs(x) for row in P for x in row)
        if size == 0.0:
            break
        P = [[x / size for x in row] for row in P]  # rescaled: no overflow, same eigenvectors
    v = _unit(_orthogonal(start, axes))
    for _ in range(max_iter):
        w = _orthogonal(ops.matvec(P, v), axes)
        size = math.sqrt(_dot(w, w))
        if size == 0.0:  # no variance left off the axes found: any orthogonal unit vector
            return v
        w = [x / size for x in w]
        done = max(abs(a - b) for a, b in zip(w, v)) < tol
        v = w
        if done:
            break
    return v


def _dot(a, b) -> float:
    return ops.dots(a, [b])[0]


def _unit(v):
    size = math.sqrt(sum(x * x for x in v))
    return [x / size for x in v]


def _orthogonal(v, axes):
    """v minus its components along the (orthonormal) axes."""
    for a in axes:
        d = _dot(v, a)
        v = [x - d * y for x, y in zip(v, a)]
    return v


# --- the page ----------------------------------------------------------------------------------


def to_json(data: dict, indent: int | None = None) -> str:
    """The data as JSON text (NaN or infinity refused: the page could not parse them)."""
    return json.dumps(data, allow_nan=False, indent=indent)


def render_page(data: dict, live: bool = False) -> str:
    """The self-contained page (explain.html) with the data inlined. The JSON goes inside a
    <script type="application/json"> element: '<', '>' and '&' are written as \\u escapes, so no
    text (a token "</script>") can end the element early, and JSON.parse reads them back.
    live: the page of `puregpt serve`, which asks the server for new data."""
    with open(TEMPLATE, encoding="utf-8") as f:
        page = f.read()
    blob = to_json(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if live:  # how the live page is known (by its clients, its tests)
        page = page.replace("<head>", '<head>\n<meta name="puregpt-live" content="1">', 1)
    return page.replace(LIVE_MARK, "true" if live else "false").replace(DATA_MARK, blob)
