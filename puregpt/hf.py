"""Hugging Face interchange: export a puregpt model as a directory that
`transformers.GPT2LMHeadModel.from_pretrained` (a GPT-2-shaped model) or
`LlamaForCausalLM.from_pretrained` (a llama-shaped one) and `AutoTokenizer.from_pretrained` load,
and import such a directory as a puregpt checkpoint. Pure Python (json, struct, array): neither
direction needs torch, transformers or safetensors.

The layout (puregpt stores a linear layer's weight [out][in], as torch's Linear; GPT-2's Conv1D
stores it (in, out), so every projection is transposed; Q, K and V are fused into one c_attn):

    puregpt                             GPT-2 (model.safetensors)
    wte (V, C)                          transformer.wte.weight (V, C)
    wpe (T, C)                          transformer.wpe.weight (T, C)
    layer{l}.attn_norm_g, _b            transformer.h.{l}.ln_1.weight, .bias
    layer{l}.attn_wq, attn_wk, attn_wv  transformer.h.{l}.attn.c_attn.weight (C, 3C)
                                            = [Wq^T Wk^T Wv^T] (side by side)
    layer{l}.attn_wq_b, _wk_b, _wv_b    transformer.h.{l}.attn.c_attn.bias (3C) = [bq bk bv]
    layer{l}.attn_wo (C, C), _b         transformer.h.{l}.attn.c_proj.weight (C, C) = Wo^T, .bias
    layer{l}.mlp_norm_g, _b             transformer.h.{l}.ln_2.weight, .bias
    layer{l}.mlp_fc1 (4C, C), _b        transformer.h.{l}.mlp.c_fc.weight (C, 4C) = W^T, .bias
    layer{l}.mlp_fc2 (C, 4C), _b        transformer.h.{l}.mlp.c_proj.weight (4C, C) = W^T, .bias
    final_norm_g, _b                    transformer.ln_f.weight, .bias
    lm_head (V, C), untied models only  lm_head.weight (V, C); tied: GPT-2 reuses wte

A Llama-shaped model (--preset llama) is written as a LlamaForCausalLM instead; its linear
layers are torch Linears, stored [out][in] as puregpt stores them, so every tensor is a copy:

    puregpt                             Llama (model.safetensors)
    wte (V, C)                          model.embed_tokens.weight (V, C)
    layer{l}.attn_norm_g (C,)           model.layers.{l}.input_layernorm.weight
    layer{l}.attn_wq (C, C), _b         model.layers.{l}.self_attn.q_proj.weight, .bias
    layer{l}.attn_wk, _wv (KV, C), _b   model.layers.{l}.self_attn.k_proj, v_proj
                                            (KV = kv_heads * hd)
    layer{l}.attn_wo (C, C), _b         model.layers.{l}.self_attn.o_proj
    layer{l}.mlp_norm_g (C,)            model.layers.{l}.post_attention_layernorm.weight
    layer{l}.mlp_gate (H, C), _b        model.layers.{l}.mlp.gate_proj (silu(gate x) * up x)
    layer{l}.mlp_fc1 (H, C), _b         model.layers.{l}.mlp.up_proj
    layer{l}.mlp_fc2 (C, H), _b         model.layers.{l}.mlp.down_proj
    final_norm_g (C,)                   model.norm.weight
    lm_head (V, C), untied models only  lm_head.weight; tied (tie_word_embeddings): embed_tokens

Nothing is permuted: puregpt's RoPE turns channel i of a head with channel i + hd/2 (the
"rotate_half" convention of transformers' Llama), heads are consecutive hd-wide slices of q_proj's
output, and query head h reads K/V head h // (n_head / kv_heads), as transformers' repeat_kv.

What GPT-2 can express: the GPT-2 block (learned positions, pre-LayerNorm with gain and bias,
biases, a final LayerNorm) with any of puregpt's activations (config.json's activation_function
"gelu_new" for gelu_tanh, "gelu" for the exact GELU, "relu") and a tied or untied lm_head
(tie_word_embeddings). Everything else is refused rather than faked with constant weights (zero
biases, unit gains, a frozen sinusoid table), so an export imports back to the same config.

What Llama can express: RoPE (any rope_theta, no rope_scaling), RMSNorm with a gain before
each sub-block and at the end (rms_norm_eps = norm_eps), no embedding norm, the SwiGLU MLP of any
width (intermediate_size), grouped-query attention (num_key_value_heads), biases in both the
attention and the MLP or in neither (attention_bias, mlp_bias), a tied or untied head. QK-norm is
not part of Llama: a model with it is refused.

Tokenizers: a byte-level BPE vocabulary is written as GPT-2's vocab.json + merges.txt (and the
equivalent tokenizer.json); a character vocabulary as a tokenizer.json for the `tokenizers`
library (each character a word of a WordLevel model, split one character at a time, BOS an added
special token "<|endoftext|>"), so AutoTokenizer gives puregpt's ids in both cases. One
difference: HF tokenizers turn the literal text "<|endoftext|>" into the BOS id, puregpt encodes
it as ordinary text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from array import array

from .checkpoint import Checkpoint, CheckpointError, read_header, read_tensor, read_tensor_array
from .config import MODEL_LIMITS, ConfigError, GPTConfig
from .fsutil import (InputError, atomic_write, brief, brief_names, fsync_dir, open_regular,
                     parse_json, read_limited)
from .model import check_size, num_params_of, param_shapes
from .tokenizer import CharTokenizer

EXPORT_DTYPES = {"F32": ("f", "float32"), "F64": ("d", "float64")}
CHAR_BOS_TOKEN = "<|endoftext|>"  # the BOS token's text in an exported character vocabulary
CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
              "invert": False}  # every character (newlines included) its own piece
# puregpt activation -> config.json activation_function, and what import accepts
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                      "relu": "relu"}
FLOAT32_MAX = 3.4028234663852886e38
MAX_JSON_FILE = 64 * 1024 * 1024  # config.json, tokenizer.json...: Llama 3's tokenizer.json is 9 MB
# buffers some checkpoints carry, not weights: GPT-2's causal mask and its fill value, the RoPE
# frequencies older transformers saved with a Llama
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"
                     r"|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# puregpt field -> (value GPT-2 needs, why, the flag that sets it)
_GPT2_SHAPE = {
    "pos": ("learned", "GPT-2 learns its position embeddings (wpe)", "--pos learned"),
    "norm": ("layernorm", "GPT-2 normalizes with LayerNorm", "--norm layernorm"),
    "norm_affine": (True, "GPT-2's LayerNorms have a gain and a bias", "--norm-affine"),
    "norm_position": ("pre", "GPT-2 normalizes before each sub-block (x + f(norm(x)))",
                      "--norm-position pre"),
    "emb_norm": (False, "GPT-2 has no norm after the embeddings", "--no-emb-norm"),
    "final_norm": (True, "GPT-2 ends with a LayerNorm (ln_f)", "--final-norm"),
    "bias": (True, "GPT-2's attention and MLP layers have biases", "--bias"),
    "mlp": ("plain", "GPT-2's MLP is c_proj act(c_fc x), not gated", "--mlp plain"),
    "mlp_hidden": (None, "GPT-2's MLP is 4 n_embd wide", "no --mlp-hidden"),
    "n_kv_head": (None, "GPT-2 has as many K/V heads as query heads", "no --n-kv-head"),
    "qk_norm": (False, "GPT-2 does not normalize q and k", "--no-qk-norm"),
}
_GPT2_ACTIVATION_FLAG = "--activation gelu_tanh"

# the same for a Llama (LlamaForCausalLM); its free choices (rope_theta, mlp_hidden, n_kv_head,
# bias, tie_embeddings, norm_eps) are config.json keys
_LLAMA_SHAPE = {
    "pos": ("rope", "Llama rotates q and k (RoPE)", "--pos rope"),
    "norm": ("rmsnorm", "Llama normalizes with RMSNorm", "--norm rmsnorm"),
    "norm_affine": (True, "Llama's RMSNorms have a gain", "--norm-affine"),
    "norm_position": ("pre", "Llama normalizes before each sub-block (x + f(norm(x)))",
                      "--norm-position pre"),
    "emb_norm": (False, "Llama has no norm after the embeddings", "--no-emb-norm"),
    "final_norm": (True, "Llama ends with an RMSNorm (model.norm)", "--final-norm"),
    "mlp": ("swiglu", "Llama's MLP is down(silu(gate x) * up x)", "--mlp swiglu"),
    "activation": ("silu", "Llama's MLP gates with SiLU", "--activation silu"),
    "qk_norm": (False, "Llama has no norm on q and k (QK-norm; Qwen3 and OLMo 2 have one, "
                       "puregpt exports only Llama)", "--no-qk-norm"),
}


# --- the layout --------------------------------------------------------------------------------


def _incompatibilities(config: GPTConfig, shape: dict) -> list[str]:
    out = []
    for name, (want, why, flag) in shape.items():
        have = getattr(config, name)
        if have != want:
            out.append(f"{name}={have!r}: {why} (use {flag})")
    return out


def gpt2_incompatibilities(config: GPTConfig) -> list[str]:
    """What keeps `config` from being a GPT-2 (one line per option, with the flag that fixes
    it); empty when the model can be exported."""
    out = _incompatibilities(config, _GPT2_SHAPE)
    if config.activation not in ACTIVATION_TO_HF:
        out.append(f"activation={config.activation!r}: puregpt exports GPT-2 with "
                   f"{', '.join(ACTIVATION_TO_HF)} (use {_GPT2_ACTIVATION_FLAG})")
    return out


def llama_incompatibilities(config: GPTConfig) -> list[str]:
    """What keeps `config` from being a LlamaForCausalLM, as gpt2_incompatibilities."""
    return _incompatibilities(config, _LLAMA_SHAPE)


def architecture(config: GPTConfig) -> str:
    """"llama" for a model LlamaForCausalLM expresses, else "gpt2" (what _check_exportable
    verifies: a GPT2LMHeadModel)."""
    return "gpt2" if llama_incompatibilities(config) else "llama"


def _layout(config: GPTConfig) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
    """Every Hugging Face tensor as (name, its shape, how it is made from puregpt's tensors,
    those tensors' names). How: "copy" (same values, same shape), "T" (a Conv1D weight:
    puregpt's [out][in] transposed), "qkv" (Wq, Wk, Wv transposed side by side), "cat" (vectors
    one after the other). GPT-2's names lack their "transformer." prefix (see _file_name)."""
    return _llama_layout(config) if architecture(config) == "llama" else _gpt2_layout(config)


def _llama_layout(config: GPTConfig) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
    """A LlamaForCausalLM's tensors, in the order of its named_parameters: all copies."""
    V, C, H = config.vocab_size, config.n_embd, config.hidden
    KV = config.kv_heads * config.head_dim  # K's and V's width
    out = [("model.embed_tokens.weight", (V, C), "copy", ("wte",))]

    def linear(name, shape, weight):
        out.append((name + ".weight", shape, "copy", (weight,)))
        if config.bias:
            out.append((name + ".bias", shape[:1], "copy", (weight + "_b",)))

    for l in range(config.n_layer):
        h, p = f"model.layers.{l}.", f"layer{l}."
        for proj, weight, rows in (("q", "attn_wq", C), ("k", "attn_wk", KV), ("v", "attn_wv", KV),
                                   ("o", "attn_wo", C)):
            linear(f"{h}self_attn.{proj}_proj", (rows, C), p + weight)
        linear(h + "mlp.gate_proj", (H, C), p + "mlp_gate")
        linear(h + "mlp.up_proj", (H, C), p + "mlp_fc1")
        linear(h + "mlp.down_proj", (C, H), p + "mlp_fc2")
        out += [(h + "input_layernorm.weight", (C,), "copy", (p + "attn_norm_g",)),
                (h + "post_attention_layernorm.weight", (C,), "copy", (p + "mlp_norm_g",))]
    out.append(("model.norm.weight", (C,), "copy", ("final_norm_g",)))
    if not config.tie_embeddings:
        out.append(("lm_head.weight", (V, C), "copy", ("lm_head",)))
    return out


def _gpt2_layout(config: GPTConfig) -> list[tuple[str, tuple[int, ...], str, tuple[str, ...]]]:
    """GPT2LMHeadModel's tensors (see _layout)."""
    V, C, T = config.vocab_size, config.n_embd, config.block_size
    out = [("wte.weight", (V, C), "copy", ("wte",)), ("wpe.weight", (T, C), "copy", ("wpe",))]
    for l in range(config.n_layer):
        h, p = f"h.{l}.", f"layer{l}."
        out += [
            (h + "ln_1.weight", (C,), "copy", (p + "attn_norm_g",)),
            (h + "ln_1.bias", (C,), "copy", (p + "attn_norm_b",)),
            (h + "attn.c_attn.weight", (C, 3 * C), "qkv",
             (p + "attn_wq", p + "attn_wk", p + "attn_wv")),
            (h + "attn.c_attn.bias", (3 * C,), "cat",
             (p + "attn_wq_b", p + "attn_wk_b", p + "attn_wv_b")),
            (h + "attn.c_proj.weight", (C, C), "T", (p + "attn_wo",)),
            (h + "attn.c_proj.bias", (C,), "copy", (p + "attn_wo_b",)),
            (h + "ln_2.weight", (C,), "copy", (p + "mlp_norm_g",)),
            (h + "ln_2.bias", (C,), "copy", (p + "mlp_norm_b",)),
            (h + "mlp.c_fc.weight", (C, 4 * C), "T", (p + "mlp_fc1",)),
            (h + "mlp.c_fc.bias", (4 * C,), "copy", (p + "mlp_fc1_b",)),
            (h + "mlp.c_proj.weight", (4 * C, C), "T", (p + "mlp_fc2",)),
            (h + "mlp.c_proj.bias", (C,), "copy", (p + "mlp_fc2_b",)),
        ]
    out += [("ln_f.weight", (C,), "copy", ("final_norm_g",)),
            ("ln_f.bias", (C,), "copy", ("final_norm_b",))]
    if not config.tie_embeddings:
        out.append(("lm_head.weight", (V, C), "copy", ("lm_head",)))
    return out


def _file_name(name: str) -> str:
    """The name a tensor has in files transformers writes: GPT-2's all but lm_head under
    transformer. (Llama's names are the file's already.)"""
    return name if name.startswith(("lm_head.", "model.")) else "transformer." + name


def _to_hf(how: str, tensors: list) -> list[float]:
    """The flat, row-major values of one GPT-2 tensor, from puregpt's tensors."""
    if how == "copy":
        t = tensors[0]
        return [x for row in t for x in row] if isinstance(t[0], list) else list(t)
    if how == "cat":
        return [x for t in tensors for x in t]
    if how == "T":  # (in, out): row i holds column i of [out][in]
        return [x for column in zip(*tensors[0]) for x in column]
    # qkv: row i of (C, 3C) is column i of Wq, then of Wk, then of Wv
    return [x for cq, ck, cv in zip(*(zip(*w) for w in tensors)) for col in (cq, ck, cv)
            for x in col]


def _from_hf(how: str, values: list[float], shape: tuple[int, ...], names: tuple[str, ...],
             config: GPTConfig) -> dict:
    """puregpt's tensors (name -> matrix or vector) from one GPT-2 tensor's flat values."""
    if how == "copy":
        if len(shape) == 1:
            return {names[0]: values}
        rows, cols = shape
        return {names[0]: [values[r * cols:(r + 1) * cols] for r in range(rows)]}
    if how == "cat":
        n = len(values) // len(names)
        return {name: values[k * n:(k + 1) * n] for k, name in enumerate(names)}
    if how == "T":  # (in, out) -> [out][in]: row o is column o, every out-th value from o
        n_out = shape[1]
        return {names[0]: [values[o::n_out] for o in range(n_out)]}
    C = config.n_embd  # qkv: (C, 3C); Wq row o is column o, Wk row o column C + o, ...
    return {name: [values[k * C + o::3 * C] for o in range(C)] for k, name in enumerate(names)}


# --- export ------------------------------------------------------------------------------------


def _check_exportable(ckpt: Checkpoint, dtype: str) -> None:
    """Everything that could make an export fail, checked before anything is written."""
    config = ckpt.config
    gpt2, llama = gpt2_incompatibilities(config), llama_incompatibilities(config)
    if gpt2 and llama:
        flags = [flag for name, (want, _, flag) in _GPT2_SHAPE.items()
                 if getattr(config, name) != want]
        flags += [_GPT2_ACTIVATION_FLAG] if config.activation not in ACTIVATION_TO_HF else []
        as_gpt2 = ("GPT-2 cannot express:\n  " + "\n  ".join(gpt2) + "\nTrain a compatible "
                   f"model with --preset gpt2, or with the flags: {' '.join(flags)}")
        if config.pos != "rope" and config.mlp != "swiglu":  # a GPT-2-era model
            raise ConfigError("cannot export to Hugging Face GPT-2: this model has option(s) "
                              + as_gpt2 + " (a --preset llama model exports as a Llama)")
        flags = [flag for name, (want, _, flag) in _LLAMA_SHAPE.items()
                 if getattr(config, name) != want]
        raise ConfigError(  # a modern block: Llama first
            "cannot export to Hugging Face Llama: this model has option(s) LlamaForCausalLM "
            "cannot express:\n  " + "\n  ".join(llama) + "\nTrain a compatible model with "
            f"--preset llama, or with the flags: {' '.join(flags)}\nNor as a GPT-2: option(s) "
            + as_gpt2)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if ckpt.tokenizer.kind not in ("char", "bpe"):
        raise ConfigError(f"cannot export a {ckpt.tokenizer.kind!r} tokenizer")
    if ckpt.tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"the vocabulary has {ckpt.tokenizer.vocab_size} tokens but the "
                              f"config says vocab_size={config.vocab_size}")
    shapes = param_shapes(config)
    if set(ckpt.params) != set(shapes):
        raise CheckpointError(f"the parameters do not match the config: missing "
                              f"{sorted(set(shapes) - set(ckpt.params))}, unexpected "
                              f"{sorted(set(ckpt.params) - set(shapes))}")
    limit = FLOAT32_MAX if dtype == "F32" else math.inf
    for name, shape in shapes.items():
        t = ckpt.params[name]
        rows = t if len(shape) == 2 else [t]
        if len(shape) == 2 and not all(isinstance(r, list) for r in t):
            raise CheckpointError(f"parameter {name} must be a matrix of shape {list(shape)}")
        if len(rows) != (shape[0] if len(shape) == 2 else 1) or \
                any(len(r) != shape[-1] for r in rows):
            raise CheckpointError(f"parameter {name} does not have the config's shape "
                                  f"{list(shape)}")
        for r in rows:
            if not all(abs(x) <= limit for x in r):  # also false for NaN
                raise CheckpointError(
                    f"parameter {name} holds a value that is not finite"
                    + (" as float32 (export with dtype F64)" if dtype == "F32" else ""))


def _safetensors_chunks(ckpt: Checkpoint, dtype: str):
    """model.safetensors as transformers writes it, produced one tensor at a time."""
    typecode, _ = EXPORT_DTYPES[dtype]
    size = array(typecode).itemsize
    layout = _layout(ckpt.config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _, _ in layout:
        n = math.prod(shape) * size
        header[_file_name(name)] = {"dtype": dtype, "shape": list(shape),
                                    "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    yield len(blob).to_bytes(8, "little")
    yield blob
    for name, shape, how, names in layout:
        a = array(typecode, _to_hf(how, [ckpt.params[n] for n in names]))
        if sys.byteorder == "big":
            a.byteswap()
        yield a.tobytes()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _hf_config(ckpt: Checkpoint, dtype: str) -> dict:
    if architecture(ckpt.config) == "llama":
        return _llama_hf_config(ckpt, dtype)
    c, bos = ckpt.config, ckpt.tokenizer.bos
    return {
        "activation_function": ACTIVATION_TO_HF[c.activation],
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": bos,
        "dtype": EXPORT_DTYPES[dtype][1],
        "embd_pdrop": 0.0,
        "eos_token_id": bos,
        "initializer_range": c.init_std,
        "layer_norm_epsilon": c.norm_eps,
        "model_type": "gpt2",
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": None,
        "n_layer": c.n_layer,
        "n_positions": c.block_size,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_first_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "use_cache": True,
        "vocab_size": c.vocab_size,
        # read back by import_hf: how puregpt sample/score treat text (documents or a stream)
        "puregpt": {"mode": ckpt.trainer.get("mode", "docs"), "step": ckpt.step},
    }


def _llama_arch(c: GPTConfig) -> dict:
    """The config.json keys that shape a LlamaForCausalLM, from a llama-shaped puregpt config
    (import compares them to recognize the puregpt config an export recorded)."""
    return {
        "attention_bias": c.bias,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.n_embd,
        "intermediate_size": c.hidden,
        "max_position_embeddings": c.block_size,
        "mlp_bias": c.bias,
        "num_attention_heads": c.n_head,
        "num_hidden_layers": c.n_layer,
        "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size,
    }


def _llama_hf_config(ckpt: Checkpoint, dtype: str) -> dict:
    """LlamaForCausalLM's config.json: rope_theta both where transformers 4 reads it and in
    transformers 5's rope_parameters; puregpt's own config rides along for an exact import."""
    c, bos, torch_dtype = ckpt.config, ckpt.tokenizer.bos, EXPORT_DTYPES[dtype][1]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_llama_arch(c),
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": bos,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,  # the key transformers 4 reads
        "initializer_range": c.init_std,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "use_cache": True,
        "puregpt": {"mode": ckpt.trainer.get("mode", "docs"), "step": ckpt.step,
                    "config": c.to_dict()},
    }


def _bpe_tokenizer_json(tok) -> dict:
    """GPT-2's tokenizer.json for a puregpt BPETokenizer (what its hub repository holds)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_token(tok.bos, tok.bos_token)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(sorted(tok.encoder.items(), key=lambda kv: kv[1])),
                  "merges": [f"{a} {b}" for a, b in tok.merges]},
    }


def _char_tokenizer_json(tok: CharTokenizer) -> dict:
    """A character vocabulary for the `tokenizers` library: split into single characters, look
    each up in a WordLevel vocabulary (an unknown character is an error, as in puregpt), join
    the pieces back without spaces (the Fuse decoder)."""
    vocab = {ch: i for i, ch in enumerate(tok.chars)}
    vocab[CHAR_BOS_TOKEN] = tok.bos
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_token(tok.bos, CHAR_BOS_TOKEN)],
        "normalizer": None,
        "pre_tokenizer": CHAR_SPLIT,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def _added_token(i: int, text: str) -> dict:
    return {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _export_files(ckpt: Checkpoint, dtype: str) -> dict:
    """file name -> a zero-argument function giving its byte chunks (model.safetensors first:
    it is the one that takes time)."""
    tok, block = ckpt.tokenizer, ckpt.config.block_size
    files = {
        "model.safetensors": lambda: _safetensors_chunks(ckpt, dtype),
        "config.json": lambda: [_json_bytes(_hf_config(ckpt, dtype))],
        "generation_config.json": lambda: [_json_bytes(
            {"bos_token_id": tok.bos, "eos_token_id": tok.bos})],
    }
    if tok.kind == "bpe":
        files["vocab.json"] = lambda: [json.dumps(dict(sorted(
            tok.encoder.items(), key=lambda kv: kv[1])), ensure_ascii=False).encode("utf-8")]
        # transformers' slow GPT2Tokenizer drops merges.txt's first line: keep the header
        files["merges.txt"] = lambda: ["#version: 0.2\n".encode("utf-8"),
                                       "".join(f"{a} {b}\n" for a, b in tok.merges)
                                       .encode("utf-8")]
        files["tokenizer.json"] = lambda: [_json_bytes(_bpe_tokenizer_json(tok))]
        files["tokenizer_config.json"] = lambda: [_json_bytes({
            "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
            "add_bos_token": False, "bos_token": tok.bos_token, "eos_token": tok.bos_token,
            "unk_token": tok.bos_token, "clean_up_tokenization_spaces": False,
            "errors": "replace", "model_max_length": block})]
    else:
        files["tokenizer.json"] = lambda: [_json_bytes(_char_tokenizer_json(tok))]
        files["tokenizer_config.json"] = lambda: [_json_bytes({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": CHAR_BOS_TOKEN,
            "eos_token": CHAR_BOS_TOKEN, "clean_up_tokenization_spaces": False,
            "model_max_length": block})]
    files[DATA_RECIPE_FILE] = lambda: [_json_bytes(data_recipe(ckpt))]
    return files


# --- the data recipe and the optimizer state, for continuing elsewhere -------------------------

DATA_RECIPE_FILE = "puregpt_data.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def data_recipe(ckpt: Checkpoint) -> dict:
    """How the model's text was read, so another trainer (examples/continue_in_pytorch.py) can
    rebuild the same tokens and the same train/validation split with data.load_corpus: the data
    file and its SHA-256, the mode, the tokenizer kind, the block size, and the whole
    TrainConfig (seed, data_seed, val_fraction, long_docs, eval_tokens, the optimizer's
    settings). None where the checkpoint does not know (an imported model)."""
    tc = ckpt.train_config
    return {"data": ckpt.trainer.get("data"), "sha256": ckpt.trainer.get("sha256"),
            "mode": ckpt.trainer.get("mode"), "tokenizer": ckpt.tokenizer.kind,
            "block_size": ckpt.config.block_size, "step": ckpt.step,
            "train_config": tc.to_dict() if tc is not None else None}


def read_data_recipe(hf_dir) -> dict:
    """An exported directory's data recipe (see data_recipe), {} when it has none."""
    path = os.path.join(os.fspath(hf_dir), DATA_RECIPE_FILE)
    return _read_json(path) if os.path.lexists(path) else {}


def read_tokenizer(hf_dir):
    """The puregpt tokenizer (CharTokenizer or BPETokenizer) of a Hugging Face directory,
    without reading its weights."""
    hf_dir = os.fspath(hf_dir)
    kind, missing = _tokenizer_files(hf_dir)
    if missing:
        raise CheckpointError(f"{hf_dir}: missing file(s): {', '.join(missing)}")
    return _read_tokenizer(hf_dir, kind, _read_json(os.path.join(hf_dir, "config.json")))


def check_optimizer(ckpt: Checkpoint) -> None:
    """Refuse (before anything is written) a checkpoint without AdamW moments."""
    if not ckpt.optimizer or not ckpt.optimizer.get("step"):
        raise CheckpointError("this checkpoint holds no optimizer state (an imported model, or "
                              "one saved before its first step): export it without "
                              "--with-optimizer")


def export_optimizer(ckpt: Checkpoint, out_dir, dtype: str = "F32") -> None:
    """Write the checkpoint's AdamW moments as optimizer.safetensors beside an export: for each
    tensor NAME (as in model.safetensors, same layout and transposes), exp_avg.NAME (m)
    and exp_avg_sq.NAME (v), the names torch.optim.AdamW's state uses; the metadata holds the
    step count (Adam's bias correction continues from it) and beta1, beta2, eps, weight_decay."""
    check_optimizer(ckpt)
    opt, shapes, tc = ckpt.optimizer, param_shapes(ckpt.config), ckpt.train_config
    moments = {}
    for key, which in (("exp_avg", "m"), ("exp_avg_sq", "v")):
        for name, shape, how, names in _layout(ckpt.config):
            tensors = [opt[which][n] if len(shapes[n]) == 1 else
                       [opt[which][n][r * shapes[n][1]:(r + 1) * shapes[n][1]]
                        for r in range(shapes[n][0])] for n in names]
            moments[f"{key}.{_file_name(name)}"] = (shape, _to_hf(how, tensors))
    meta = {"format": "pt", "step": str(opt["step"])}
    if tc is not None:
        meta.update({k: repr(getattr(tc, k)) for k in ("beta1", "beta2", "eps", "weight_decay")})
    typecode, _ = EXPORT_DTYPES[dtype.upper()]
    size = array(typecode).itemsize
    header, offset = {"__metadata__": meta}, 0
    for name, (shape, _) in moments.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": dtype.upper(), "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n

    def chunks():
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        yield len(blob).to_bytes(8, "little")
        yield blob
        for _, values in moments.values():
            a = array(typecode, values)
            if sys.byteorder == "big":
                a.byteswap()
            yield a.tobytes()
    atomic_write(os.path.join(os.fspath(out_dir), OPTIMIZER_FILE), chunks())


def export_hf(ckpt: Checkpoint, out_dir, dtype: str = "F32") -> None:
    """Write ckpt as a Hugging Face directory (GPT2LMHeadModel, or LlamaForCausalLM for a
    llama-shaped model): config.json, generation_config.json, model.safetensors (dtype "F32" or
    "F64") and the tokenizer files (see the module docstring).

    Everything is checked first: a model neither can express raises ConfigError listing every
    option the nearer of the two lacks, and so does an out_dir holding files this export
    would not replace (stale files of another export would confuse loaders). A new out_dir is
    built beside its final place and renamed into it, so it appears complete or not at all; in
    an existing one each file is replaced atomically.
    """
    dtype = dtype.upper()
    _check_exportable(ckpt, dtype)
    out_dir = os.path.normpath(os.fspath(out_dir))
    files = _export_files(ckpt, dtype)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConfigError(f"{out_dir} exists and is not a directory")
        foreign = sorted(set(os.listdir(out_dir)) - set(files) - {OPTIMIZER_FILE})
        if foreign:
            raise ConfigError(f"{out_dir} already holds files this export would not replace: "
                              f"{', '.join(foreign)}; export into a new or empty directory")
        for name, chunks in files.items():
            atomic_write(os.path.join(out_dir, name), chunks())
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.{os.getpid()}.tmp")
    if os.path.exists(tmp):  # left by a crashed export of this same process id
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        for name, chunks in files.items():
            atomic_write(os.path.join(tmp, name), chunks())
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)


# --- import ------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    """A JSON object from a file, read within bounds (fsutil.read_limited, parse_json)."""
    try:
        d = parse_json(read_limited(path, MAX_JSON_FILE))
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {brief(d)}")
    return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# config.json's size keys -> the GPTConfig fields they become, whose limits they obey
_HF_FIELDS = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer",
              "n_embd": "n_embd", "max_position_embeddings": "block_size",
              "num_hidden_layers": "n_layer", "hidden_size": "n_embd"}
IMPORTABLE = ("gpt2", "llama")  # config.json's model_type values import_hf reads


def _check_sizes(d: dict, required: tuple[str, ...], problems: list) -> None:
    """Each required key present, a positive integer, within puregpt's limits (checked before
    anything is built from it)."""
    missing = [k for k in required if k not in d]
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    for k in required:
        if k in d and not (_is_int(d[k]) and d[k] >= 1):
            problems.append(f"{k} must be a positive integer, got {brief(d[k])}")
        elif k in _HF_FIELDS and d.get(k, 0) > MODEL_LIMITS[_HF_FIELDS[k]]:
            problems.append(f"{k}={brief(d[k])} is above puregpt's limit of "
                            f"{MODEL_LIMITS[_HF_FIELDS[k]]:,} (for its {_HF_FIELDS[k]})")


def _number(d: dict, key: str, default: float, problems: list, positive: bool = True):
    x = d.get(key, default)
    if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and (x > 0 or not positive)):
        problems.append(f"{key} must be a {'positive ' if positive else ''}number, got "
                        f"{brief(x)}")
    return x


def _boolean(d: dict, key: str, default: bool, problems: list):
    x = d.get(key, default)
    if not isinstance(x, bool):
        problems.append(f"{key} must be true or false, got {brief(x)}")
    return x


def _init_std(d: dict) -> float:
    """initializer_range, or 0.02 when unusable: only re-initialization would use it."""
    std = d.get("initializer_range", 0.02)
    if not (isinstance(std, (int, float)) and not isinstance(std, bool)
            and 0 <= std <= MODEL_LIMITS["init_std"]):
        std = 0.02
    return float(std)


def _refuse(path: str, problems: list) -> None:
    if problems:
        raise CheckpointError(f"{path}: cannot import this config:\n  " + "\n  ".join(problems))


def _build_config(path: str, **fields) -> GPTConfig:
    try:
        config = GPTConfig(**fields)
        check_size(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot import this config: {e}") from None
    return config


def _config_from_hf(d: dict, path: str) -> tuple[GPTConfig, dict]:
    """puregpt's config of the model config.json describes (a GPT-2 or a Llama); every problem
    found is listed in one CheckpointError. Also returns config.json's "puregpt" section."""
    extra = d.get("puregpt")
    extra = extra if isinstance(extra, dict) else {}
    if d.get("model_type") == "llama":
        return _llama_config_from_hf(d, path, extra), extra
    return _gpt_config_from_hf(d, path), extra


def _gpt_config_from_hf(d: dict, path: str) -> GPTConfig:
    problems = []
    if d.get("model_type") != "gpt2":
        problems.append(f"model_type is {brief(d.get('model_type'))}; puregpt imports "
                        f"{' and '.join(map(repr, IMPORTABLE))}")
    if "n_positions" not in d and "n_ctx" in d:
        d = {**d, "n_positions": d["n_ctx"]}
    _check_sizes(d, ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head"), problems)
    act = d.get("activation_function", "gelu_new")
    if not (isinstance(act, str) and act in ACTIVATION_FROM_HF):
        problems.append(f"activation_function {brief(act)} is not supported (supported: "
                        f"{', '.join(ACTIVATION_FROM_HF)})")
    eps = _number(d, "layer_norm_epsilon", 1e-5, problems)
    tie = _boolean(d, "tie_word_embeddings", True, problems)
    n_embd = d.get("n_embd")
    if d.get("n_inner") is not None and d.get("n_inner") != (4 * n_embd if _is_int(n_embd)
                                                             else None):
        problems.append(f"n_inner={brief(d['n_inner'])}: puregpt's MLP is 4 * n_embd wide")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if d.get(key, want) != want:
            problems.append(f"{key}={brief(d[key])} is not supported (puregpt needs {want!r})")
    if not problems and n_embd % d["n_head"]:
        problems.append(f"n_embd ({n_embd}) is not divisible by n_head ({d['n_head']})")
    _refuse(path, problems)
    return _build_config(
        path, vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
        n_embd=n_embd, n_head=d["n_head"], pos="learned", norm="layernorm", norm_affine=True,
        norm_position="pre", emb_norm=False, final_norm=True,
        activation=ACTIVATION_FROM_HF[act], bias=True, tie_embeddings=tie,
        init_std=_init_std(d), scaled_init=True, norm_eps=float(eps))


def _rope_theta(d: dict, problems: list) -> float:
    """RoPE's base from config.json: transformers 5's rope_parameters, or transformers 4's
    rope_theta; any RoPE scaling (linear, dynamic, YaRN, Llama 3's...) is refused by name."""
    theta = _number(d, "rope_theta", 10000.0, problems)
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            problems.append(f"{key} must be an object, got {brief(rope)}")
            continue
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            problems.append(f"{key} has rope_type {brief(kind)}: puregpt's RoPE has no scaling "
                            f"(only rope_type 'default' can be imported)")
        if "rope_theta" in rope:
            given = _number(rope, "rope_theta", 10000.0, problems)
            if "rope_theta" in d and given != theta:
                problems.append(f"{key}.rope_theta ({brief(given)}) differs from rope_theta "
                                f"({brief(theta)}): which one holds is unclear")
            theta = given
    rope = d.get("rope_parameters")
    for where in (d, rope if isinstance(rope, dict) else {}):  # RoPE on part of each head
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor={brief(where['partial_rotary_factor'])}: "
                            f"puregpt rotates every channel")
    return theta


def _llama_config_from_hf(d: dict, path: str, extra: dict) -> GPTConfig:
    """puregpt's config of a LlamaForCausalLM. When config.json's puregpt section (written by
    export_hf) holds a config that exports to the same Llama, that config is returned: it
    also keeps what Llama does not record (init_std's scaling, n_kv_head or mlp_hidden left
    automatic)."""
    problems = []
    _check_sizes(d, ("vocab_size", "max_position_embeddings", "num_hidden_layers", "hidden_size",
                     "intermediate_size", "num_attention_heads"), problems)
    C, heads = d.get("hidden_size"), d.get("num_attention_heads")
    kv = d.get("num_key_value_heads") if d.get("num_key_value_heads") is not None else heads
    act = d.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {brief(act)} is not supported: puregpt's SwiGLU gates "
                        f"with silu")
    eps = _number(d, "rms_norm_eps", 1e-6, problems)
    theta = _rope_theta(d, problems)
    tie = _boolean(d, "tie_word_embeddings", False, problems)
    bias = _boolean(d, "attention_bias", False, problems)
    if _boolean(d, "mlp_bias", False, problems) != bias:
        problems.append(f"attention_bias={brief(bias)} with mlp_bias={brief(d.get('mlp_bias'))}: "
                        f"puregpt's --bias puts biases in both the attention and the MLP, or "
                        f"in neither")
    if d.get("pretraining_tp") not in (None, 1):
        problems.append(f"pretraining_tp={brief(d['pretraining_tp'])} is not supported (its "
                        f"sliced projections; puregpt needs 1)")
    for key in ("sliding_window", "quantization_config"):
        if d.get(key) is not None:
            problems.append(f"{key}={brief(d[key])} is not supported (puregpt has no "
                            f"{key.replace('_', ' ').replace('config', 'weights')})")
    if not problems:
        if C % heads:
            problems.append(f"hidden_size ({C}) is not divisible by num_attention_heads "
                            f"({heads})")
        elif d.get("head_dim") not in (None, C // heads):
            problems.append(f"head_dim={brief(d['head_dim'])} differs from hidden_size / "
                            f"num_attention_heads = {C // heads}: puregpt's heads are "
                            f"n_embd / n_head wide")
        if not (_is_int(kv) and kv >= 1 and heads % kv == 0):
            problems.append(f"num_key_value_heads={brief(kv)} must divide num_attention_heads "
                            f"({heads})")
    _refuse(path, problems)
    config = _build_config(
        path, vocab_size=d["vocab_size"], block_size=d["max_position_embeddings"],
        n_layer=d["num_hidden_layers"], n_embd=C, n_head=heads,
        n_kv_head=None if kv == heads else kv, pos="rope", rope_theta=float(theta),
        norm="rmsnorm", norm_affine=True, norm_position="pre", emb_norm=False, final_norm=True,
        mlp="swiglu", activation="silu", mlp_hidden=d["intermediate_size"], bias=bias,
        tie_embeddings=tie, init_std=_init_std(d), scaled_init=False, norm_eps=float(eps))
    auto = dataclasses.replace(config, mlp_hidden=None)
    if auto.hidden == config.hidden:  # Llama's rule gives this width: keep it automatic
        config = auto
    try:
        recorded = GPTConfig.from_dict(extra.get("config"))
    except (ValueError, TypeError):  # absent, or not a config this puregpt reads
        return config
    same = not llama_incompatibilities(recorded) and _llama_arch(recorded) == _llama_arch(config)
    return recorded if same else config


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bos_token(hf_dir: str, hf_config: dict, id_to_token: dict) -> str:
    """The token puregpt uses as BOS (its document separator; GPT-2 uses <|endoftext|> as both
    its BOS and its EOS): tokenizer_config.json's eos/bos token, else config.json's
    eos/bos_token_id, else "<|endoftext|>"."""
    path = os.path.join(hf_dir, "tokenizer_config.json")
    tc = _read_json(path) if os.path.lexists(path) else {}
    candidates = [_token_text(tc.get("eos_token")), _token_text(tc.get("bos_token"))]
    candidates += [id_to_token.get(hf_config.get(k)) for k in ("eos_token_id", "bos_token_id")
                   if _is_int(hf_config.get(k))]
    known = set(id_to_token.values())
    for token in candidates + ["<|endoftext|>"]:
        if token in known:
            return token
    raise CheckpointError(f"{hf_dir}: cannot tell which token is BOS/EOS: neither "
                          f"tokenizer_config.json nor config.json names one in the vocabulary, "
                          f"and the vocabulary has no <|endoftext|>")


def _tokenizer_files(hf_dir: str) -> tuple[str, list[str]]:
    """Which tokenizer the directory holds ("files": vocab.json + merges.txt, "json":
    tokenizer.json), or ("", the names of the missing files)."""
    have = {name: os.path.lexists(os.path.join(hf_dir, name))  # a FIFO, a directory... is read
            for name in ("vocab.json", "merges.txt", "tokenizer.json")}  # and refused as such
    if have["vocab.json"] and have["merges.txt"]:
        return "files", []
    if have["tokenizer.json"]:
        return "json", []
    if have["vocab.json"] or have["merges.txt"]:
        return "", ["merges.txt" if have["vocab.json"] else "vocab.json"]
    return "", ["vocab.json + merges.txt (or tokenizer.json)"]


def _read_tokenizer(hf_dir: str, kind: str, hf_config: dict):
    from .bpe import BPETokenizer
    if kind == "files":
        vocab, merges = (os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt"))
        encoder = _read_json(vocab)
        id_to_token = {i: t for t, i in encoder.items() if _is_int(i)}
        try:
            return BPETokenizer.from_files(vocab, merges,
                                           _bos_token(hf_dir, hf_config, id_to_token))
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{hf_dir}: unusable tokenizer: {e}") from None
    path = os.path.join(hf_dir, "tokenizer.json")
    tj = _read_json(path)
    model = _object(tj.get("model"))
    added = tj.get("added_tokens") if isinstance(tj.get("added_tokens"), list) else []
    added = [t for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)]
    if model.get("type") == "WordLevel" and tj.get("pre_tokenizer") == CHAR_SPLIT:
        return _char_tokenizer(path, tj, model, added)
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: unsupported tokenizer model {brief(model.get('type'))}: "
                              f"puregpt reads a byte-level BPE (GPT-2's) or a character "
                              f"vocabulary written by `puregpt export`")
    pre = _object(tj.get("pre_tokenizer"))
    problems = []
    if tj.get("normalizer") is not None:
        problems.append("it has a normalizer")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or \
            not pre.get("use_regex", True):
        problems.append("its pre-tokenizer is not GPT-2's ByteLevel (add_prefix_space false, "
                        "use_regex true)")
    if model.get("ignore_merges") or model.get("dropout") or model.get("byte_fallback") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("its BPE model has options GPT-2's BPE lacks (ignore_merges, dropout, "
                        "byte_fallback, prefixes or suffixes)")
    if problems:
        raise CheckpointError(f"{path}: not a GPT-2 byte-level BPE: " + "; ".join(problems))
    encoder = dict(_object(model.get("vocab")))
    for t in added:
        encoder.setdefault(t.get("content"), t.get("id"))
    merges = model.get("merges") if isinstance(model.get("merges"), list) else []
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    id_to_token = {i: t for t, i in encoder.items() if _is_int(i)}
    try:
        return BPETokenizer(encoder, merges, _bos_token(hf_dir, hf_config, id_to_token))
    except ValueError as e:
        raise CheckpointError(f"{path}: unusable tokenizer: {e}") from None


def _object(value) -> dict:
    """A JSON object found in a tokenizer file, or {} for anything else (absent, null, a list)."""
    return value if isinstance(value, dict) else {}


def _char_tokenizer(path: str, tj: dict, model: dict, added: list) -> CharTokenizer:
    vocab = _object(model.get("vocab"))
    if not all(_is_int(i) for i in vocab.values()):
        raise CheckpointError(f"{path}: a vocabulary maps tokens to integer ids")
    specials = [t.get("content") for t in added if t.get("special")]
    chars = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    bos = [t for t in specials if t in vocab]
    if (len(bos) != 1 or vocab[bos[0]] != len(chars) or sorted(vocab.values()) !=
            list(range(len(vocab))) or chars != sorted(set(chars))
            or not all(len(c) == 1 for c in chars)):
        raise CheckpointError(f"{path}: a character vocabulary must hold single characters "
                              f"with ids 0..n-1 in sorted order and one special (BOS) token "
                              f"with id n, as `puregpt export` writes it")
    return CharTokenizer(chars)


def _read_weights(path: str, config: GPTConfig, rows: str = "list") -> dict:
    """puregpt's parameters from a GPT-2 or Llama model.safetensors, one tensor at a time (seek
    + read), each converted straight into puregpt's layout. rows="array": matrices keep array
    rows of the file's precision (transposed by array slicing, no float object made: what makes
    `puregpt import-hf` of a GPT-2 fast); vectors are lists either way."""
    read = read_tensor if rows == "list" else read_tensor_array
    llama = architecture(config) == "llama"
    model_name = "a LlamaForCausalLM" if llama else "a GPT-2 GPT2LMHeadModel"
    keys = ((("hidden_size", config.n_embd), ("num_hidden_layers", config.n_layer),
             ("intermediate_size", config.hidden), ("num_key_value_heads", config.kv_heads))
            if llama else (("n_embd", config.n_embd), ("n_layer", config.n_layer),
                           ("n_positions", config.block_size)))
    described = ", ".join(f"{k}={v}" for k, v in keys + (("vocab_size", config.vocab_size),))
    f, size = _open_weights(path)
    with f:
        header, data_start = read_header(f, path, size)
        tensors = {}  # name without "transformer." -> (name in the file, header entry)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            short = name[len("transformer."):] if name.startswith("transformer.") else name
            if _BUFFER.fullmatch(short):
                continue
            if short in tensors:
                raise CheckpointError(f"{path}: tensor {brief(short)} appears twice "
                                      f"({brief(tensors[short][0])} and {brief(name)})")
            tensors[short] = (name, info)
        too_big = _too_big(config, tensors)
        layout = _layout(config)
        expected = {name for name, *_ in layout}
        optional = {"lm_head.weight"} if config.tie_embeddings else set()
        missing = [_file_name(n) for n, *_ in layout if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {too_big}missing tensors: {brief_names(missing)}")
        unexpected = sorted(tensors[n][0] for n in set(tensors) - expected - optional)
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensors (not part of {model_name}): "
                                  f"{brief_names(unexpected)}")
        shapes = [(n, s) for n, s, *_ in layout]
        if "lm_head.weight" in tensors and config.tie_embeddings:
            shapes.append(("lm_head.weight", (config.vocab_size, config.n_embd)))
        bad = [f"{tensors[n][0]}: expected {list(s)}, found {brief(tensors[n][1]['shape'])}"
               for n, s in shapes if tuple(tensors[n][1]["shape"]) != s]
        if bad:
            raise CheckpointError(f"{path}: {too_big}tensor shapes do not match config.json ("
                                  f"{described}):\n  "
                                  + "\n  ".join(bad[:8]) + _more(bad, 8))
        if too_big:  # (the checks above name what is wrong first: this is the backstop)
            raise CheckpointError(f"{path}: {too_big.removesuffix(': ')}")
        params = {}
        for name, shape, how, names in layout:
            values = read(f, tensors[name][1], data_start, path, tensors[name][0])
            if len(shape) == 1:
                values = list(values)
            params.update(_from_hf(how, values, shape, names, config))
        if "lm_head.weight" in tensors and config.tie_embeddings:
            name = tensors["lm_head.weight"][0]
            head = read(f, tensors["lm_head.weight"][1], data_start, path, name)
            C = config.n_embd
            if any(head[r * C:(r + 1) * C] != row for r, row in enumerate(params["wte"])):
                raise CheckpointError(
                    f"{path}: {name} differs from {tensors[layout[0][0]][0]} but config.json "
                    f"ties them (tie_word_embeddings is true{'' if llama else ' or absent'}); set "
                    f"\"tie_word_embeddings\": false to import the separate head")
    shapes = param_shapes(config)
    assert set(params) == set(shapes), (sorted(params), sorted(shapes))
    return {name: params[name] for name in shapes}  # puregpt's order


def _open_weights(path: str):
    """(file, size) of model.safetensors; a FIFO, a device or an unreadable file is a
    CheckpointError naming it."""
    try:
        return open_regular(path)
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def _too_big(config: GPTConfig, tensors: dict) -> str:
    """"" when the file's tensors hold at least the parameters config.json describes (counted by
    arithmetic, before the layout is built), else the start of a message saying so. (The layout
    stays small whatever the file: MODEL_LIMITS bound n_layer; it names what is missing.)"""
    need = num_params_of(config)
    held = sum(math.prod(info["shape"]) for _, info in tensors.values())
    return "" if need <= held else (f"config.json describes a model of {need:,} parameters but "
                                    f"the file's tensors hold only {held:,} values: ")


def _more(items: list, shown: int) -> str:
    return f"\n  and {len(items) - shown} more" if len(items) > shown else ""


def import_hf(hf_dir, rows: str = "list") -> Checkpoint:
    """Read a Hugging Face GPT-2 or Llama directory (config.json with model_type "gpt2" or
    "llama", model.safetensors in F64/F32/F16/BF16, and vocab.json + merges.txt or a
    tokenizer.json: GPT-2's byte-level BPE, or a character vocabulary written by export_hf) into
    a puregpt checkpoint of the gpt2 or the llama shape. A Llama's rope_scaling, head_dim other
    than hidden_size / num_attention_heads, pretraining_tp > 1, sliding windows, quantized
    weights, an activation other than silu, and attention_bias without mlp_bias are refused by
    name.

    Both tensor-name styles are read (transformer.h.0... and bare h.0...); the attention-mask
    buffers (attn.bias, attn.masked_bias) and Llama's saved RoPE frequencies
    (rotary_emb.inv_freq) are ignored. A tied model may carry lm_head.weight
    only if it equals wte; tie_word_embeddings false gives an untied puregpt model
    (tie_embeddings=False). Every problem raises CheckpointError naming the file, key or tensor.
    The checkpoint's trainer metadata gives the mode `puregpt sample` and `score` use: "stream"
    (continuous text) unless config.json's "puregpt" section, written by export_hf, says "docs".
    rows: "list" (rows of floats, for training) or "array" (array rows as the file holds them,
    for saving straight away: save_checkpoint keeps float32 data as F32).
    """
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory (expected a Hugging Face GPT-2 or "
                              f"Llama directory with config.json, model.safetensors and "
                              f"tokenizer files)")
    config_path = os.path.join(hf_dir, "config.json")
    weights_path = os.path.join(hf_dir, "model.safetensors")
    missing = [n for n, p in (("config.json", config_path), ("model.safetensors", weights_path))
               if not os.path.lexists(p)]
    kind, missing_tok = _tokenizer_files(hf_dir)
    missing += missing_tok
    if missing:
        hint = ""
        if "model.safetensors" in missing:
            if os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json")):
                hint = " (sharded checkpoints are not supported: merge the shards first)"
            elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
                hint = (" (pytorch_model.bin is pickle, which puregpt does not read: resave "
                        "with save_pretrained(dir, safe_serialization=True))")
        raise CheckpointError(f"{hf_dir}: missing file(s): {', '.join(missing)}{hint}")
    hf_config = _read_json(config_path)
    config, extra = _config_from_hf(hf_config, config_path)
    tokenizer = _read_tokenizer(hf_dir, kind, hf_config)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but "
                              f"config.json says vocab_size={config.vocab_size}")
    params = _read_weights(weights_path, config, rows)
    mode = extra.get("mode") if extra.get("mode") in ("docs", "stream") else "stream"
    return Checkpoint(config, tokenizer, params, step=0,
                      trainer={"mode": mode, "imported_from": os.path.abspath(hf_dir)})
