"""Configuration: the model's shape (GPTConfig), the training recipe (TrainConfig), and presets.

Both dataclasses are stored in every checkpoint and rebuilt from it with `from_dict`, which rejects
unknown keys, wrong types and impossible values with a message naming the field. Values are also
bounded (MODEL_LIMITS, TRAIN_LIMITS, MAX_PARAMS), so that a damaged checkpoint or a typo such as
`--block-size 100000000` is refused at once rather than allocating for minutes. Presets are plain
data: a name mapped to overrides of the two dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from .fsutil import brief, brief_names

CHOICES = {
    "pos": ("learned", "sinusoidal", "none", "rope"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "activation": ("relu", "gelu", "gelu_tanh", "silu"),
    "mlp": ("plain", "swiglu"),
    "schedule": ("linear", "cosine", "constant"),
    "mode": ("auto", "docs", "stream"),
    "long_docs": ("split", "truncate"),
    "log_format": ("full", "microgpt"),
    "tokenizer": ("char", "bpe"),
}


# Upper bounds, checked by __post_init__ (naming the field). Generous for GPT-2 (124M to 1.5B
# parameters, a 50,257-token vocabulary, 1,024 positions) and for Llama-like models (32k to 256k
# tokens, up to 128k positions, 126 layers), far beyond what pure Python trains; a new field whose
# size drives an allocation gets its bound here.
MODEL_LIMITS: dict[str, int | float] = {
    "vocab_size": 2 ** 20,  # 1,048,576 tokens
    "block_size": 2 ** 17,  # 131,072 positions
    "n_layer": 1024,
    "n_embd": 2 ** 16,  # 65,536 (n_head divides it, so it is bounded too)
    "init_std": 100.0,  # larger weights overflow the forward pass (see checkpoint.MAX_WEIGHT)
}
# The whole model: model.num_params_of(config) parameters at most (model.check_size, called by
# init_params and the loaders before anything is built; config cannot import model). 2**31 = 2.1
# billion: GPT-2 XL (1.5B) fits; as Python floats that many need ~64 GB.
MAX_PARAMS = 2 ** 31
TRAIN_LIMITS: dict[str, int | float] = {
    "batch_size": 2 ** 16,  # sequences per micro-batch (each held in memory with its activations)
    "grad_accum": 2 ** 16,
    "workers": 1024,  # processes
    "vocab_size": 2 ** 20,  # the BPE vocabulary to learn: as MODEL_LIMITS
}


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


def _check_types(obj) -> None:
    """Reject values whose type differs from the field's declared type (bool is not an int here)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        want = {"int": int, "float": float, "bool": bool, "str": str,
                "int | None": int}[f.type]
        if want is float and type(value) is int:  # JSON and CLI users write 1 for 1.0
            value = float(value)
            setattr(obj, f.name, value)
        if value is None and f.type.endswith("| None"):  # None: the documented automatic value
            continue
        if type(value) is not want:
            raise ConfigError(
                f"{type(obj).__name__}.{f.name} must be {f.type}, got {type(value).__name__} "
                f"({brief(value)})")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be one of "
                              f"{', '.join(CHOICES[f.name])}; got {brief(value)}")
        if want is float and not math.isfinite(value):
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be finite, got {value!r}")


def _check_limits(obj, limits: dict) -> None:
    for name, top in limits.items():
        value = getattr(obj, name)
        if value > top:
            raise ConfigError(f"{type(obj).__name__}.{name} must be at most {top:,}, got "
                              f"{brief(value)} (puregpt's limit: larger values would allocate "
                              f"more than a computer holds)")


def _from_dict(cls, d: dict):
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {brief_names(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    return cls(**d)


@dataclass
class GPTConfig:
    """The model's shape. Dimension names used throughout: B sequences in a batch, T positions
    of one sequence, N all positions of a batch, C n_embd, V vocab_size, hd head_dim."""

    vocab_size: int = 27
    block_size: int = 16  # longest context the model sees; learned positions have this many rows
    n_layer: int = 1
    n_embd: int = 16  # C
    n_head: int = 4  # head_dim = C // n_head
    pos: str = "learned"  # learned | sinusoidal (fixed, Vaswani et al.) | none | rope (rotary)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_affine: bool = False  # learnable gain (and bias, for layernorm) in every norm
    norm_position: str = "pre"  # pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (2017 paper)
    emb_norm: bool = True  # normalize the embedding sum before the first block (microgpt)
    final_norm: bool = False  # normalize before lm_head (GPT-2's ln_f)
    activation: str = "relu"  # relu | gelu (exact, erf) | gelu_tanh (GPT-2's approximation) | silu
    bias: bool = False  # biases in the attention and MLP linear layers
    tie_embeddings: bool = False  # lm_head shares wte
    init_std: float = 0.08  # weights ~ N(0, init_std)
    scaled_init: bool = False  # GPT-2: attn_wo and mlp_fc2 get init_std / sqrt(2 n_layer)
    norm_eps: float = 1e-5
    # the modern block (Llama and after); the defaults keep the GPT-2-era block above
    rope_theta: float = 10000.0  # pos="rope": pair i of a head turns by p * theta^(-2i/hd)
    mlp: str = "plain"  # plain: fc2 act(fc1 x) | swiglu: fc2 (silu(gate x) * fc1 x)
    mlp_hidden: int | None = None  # the MLP's hidden width H; None: 4C (plain), Llama's rule
    mlp_multiple_of: int = 32  # swiglu with mlp_hidden None: H = 8C/3 rounded up to a multiple
    n_kv_head: int | None = None  # heads of K and V (grouped-query attention); None: n_head
    qk_norm: bool = False  # RMSNorm with a gain (hd,) on each head's q and k before the scores

    def __post_init__(self):
        _check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be >= 1, got "
                                  f"{brief(getattr(self, name))}")
        _check_limits(self, MODEL_LIMITS)
        if self.vocab_size < 2:
            raise ConfigError("GPTConfig.vocab_size must be >= 2 (at least one character + BOS)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by "
                              f"n_head ({brief(self.n_head)})")
        if self.init_std < 0 or self.norm_eps <= 0:
            raise ConfigError("GPTConfig.init_std must be >= 0 and norm_eps > 0")
        self._check_modern()

    def _check_modern(self) -> None:
        """The switches of the modern block: each refusal names the flag that fixes it."""
        for name in ("mlp_hidden", "n_kv_head"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"GPTConfig.{name} must be >= 1 (or null: automatic), got "
                                  f"{brief(value)} (--{name.replace('_', '-')})")
        if self.mlp_multiple_of < 1:
            raise ConfigError(f"GPTConfig.mlp_multiple_of must be >= 1, got "
                              f"{brief(self.mlp_multiple_of)} (--mlp-multiple-of)")
        if self.mlp_hidden is not None and self.mlp_hidden > 4 * MODEL_LIMITS["n_embd"]:
            raise ConfigError(f"GPTConfig.mlp_hidden must be at most "
                              f"{4 * MODEL_LIMITS['n_embd']:,}, got {brief(self.mlp_hidden)} "
                              f"(--mlp-hidden)")
        if self.rope_theta <= 0:
            raise ConfigError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta} "
                              f"(--rope-theta)")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"GPTConfig.n_head ({self.n_head}) must be divisible by "
                              f"n_kv_head ({brief(self.n_kv_head)}): each K/V head serves a "
                              f"group of query heads (--n-kv-head)")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"GPTConfig.pos='rope' turns pairs of channels, so the head "
                              f"dimension must be even; n_embd / n_head = {self.head_dim} "
                              f"(change --n-embd or --n-head, or --pos)")
        if self.mlp == "swiglu" and self.activation != "silu":
            raise ConfigError(f"GPTConfig.mlp='swiglu' gates with SiLU: it needs "
                              f"activation='silu', got {self.activation!r} (add --activation "
                              f"silu, or use --mlp plain)")

    @property
    def kv_heads(self) -> int:
        """Heads of K and V: n_kv_head, or n_head when unset (plain multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden(self) -> int:
        """The MLP's hidden width H. Unset: 4C for the plain MLP; for SwiGLU Llama's rule,
        2/3 of 4C (the gate's third matrix keeps the parameter count) rounded up to a
        multiple of mlp_multiple_of."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "plain":
            return 4 * self.n_embd
        m = self.mlp_multiple_of
        return m * -(-int(2 * 4 * self.n_embd / 3) // m)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return _from_dict(cls, d)


@dataclass
class TrainConfig:
    """How to train: data handling, batches, optimizer, schedule, evaluation."""

    steps: int = 1000
    batch_size: int = 1  # documents (docs mode) or windows (stream mode) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.01
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); applied to 2-D matmul weights only
    schedule: str = "linear"  # linear (to zero, microgpt) | cosine (after warmup) | constant
    warmup: int = 0  # steps of linear warmup (cosine and constant schedules)
    min_lr_frac: float = 0.0  # cosine decays to lr * min_lr_frac
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 = off
    seed: int = 42
    data_seed: int = -1  # seeds the documents' shuffle (split and order) alone; -1: use seed
    mode: str = "auto"  # auto | docs (one document per line) | stream (continuous text)
    long_docs: str = "split"  # docs longer than block_size: split into windows, or truncate
    tokenizer: str = "char"  # char (one token per character) | bpe (byte-level BPE, learned)
    vocab_size: int = 512  # size of the BPE vocabulary to learn (tokenizer="bpe")
    val_fraction: float = 0.1  # share of documents (or of the text) held out for validation
    eval_every: int = 100  # steps between validation evaluations (0 = only at the end)
    eval_tokens: int = 20000  # validation positions per evaluation (fixed sample)
    workers: int = 0  # processes per step (batch split; backward split at batch 1); 0 = per core
    log_every: int = 0  # steps between plain log lines (0 = about 20 lines per run)
    log_format: str = "full"  # full | microgpt (exactly microgpt's "step s / n | loss x" lines)

    def __post_init__(self):
        _check_types(self)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got "
                                  f"{brief(getattr(self, name))}")
        _check_limits(self, TRAIN_LIMITS)
        if self.data_seed < -1:
            raise ConfigError(f"TrainConfig.data_seed must be >= 0, or -1 (use seed), got "
                              f"{brief(self.data_seed)}")
        for name in ("warmup", "eval_every", "eval_tokens", "workers", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got "
                                  f"{brief(getattr(self, name))}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("TrainConfig.lr, weight_decay and grad_clip must be >= 0, eps > 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError("TrainConfig.beta1 and beta2 must be in [0, 1)")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ConfigError(f"TrainConfig.vocab_size must be >= 257 for a byte-level BPE (256 "
                              f"bytes + BOS), got {self.vocab_size}")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError("TrainConfig.min_lr_frac must be in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _from_dict(cls, d)


# Fields added to GPTConfig after checkpoints of format 1 were first written, with the value
# that reproduces what those checkpoints were trained with: a stored config that lacks one of
# these gets that value. Any other missing key is an error: a silently defaulted key would
# change the model (a gpt2 checkpoint without "activation" would load as ReLU).
ADDED_MODEL_FIELDS: dict[str, object] = {
    "rope_theta": 10000.0, "mlp": "plain", "mlp_hidden": None, "mlp_multiple_of": 32,
    "n_kv_head": None, "qk_norm": False,  # the modern block (issue 15): all off before it
}
ADDED_TRAIN_FIELDS: dict[str, object] = {"data_seed": -1}  # the same rule for TrainConfig

# Training settings that may change when a run is resumed: they shape the optimizer's future or
# the reporting, not the data order or the model, so the run stays a continuation of itself.
RESUMABLE_CHANGES = ("steps", "lr", "beta1", "beta2", "eps", "weight_decay", "schedule", "warmup",
                     "min_lr_frac", "grad_clip", "eval_every", "eval_tokens", "workers",
                     "log_every", "log_format")

# Presets: name -> {"model": GPTConfig overrides, "train": TrainConfig overrides}.
PRESETS: dict[str, dict[str, dict]] = {
    # Karpathy's microgpt, number for number: one document per step, no validation split,
    # documents truncated at block_size, linear decay to zero.
    "microgpt": {
        "model": dict(n_layer=1, n_embd=16, n_head=4, block_size=16),
        "train": dict(steps=1000, batch_size=1, lr=0.01, schedule="linear", val_fraction=0.0,
                      long_docs="truncate", eval_every=0, mode="docs",
                      log_every=1, log_format="microgpt"),
    },
    # The default for `puregpt train`: microgpt's architecture, twice as wide, trained on batches
    # of 32 names with a cosine schedule. Chosen by measurement (see README, "Is my loss
    # normal?"): the lowest validation loss on the bundled names reachable in ~2 minutes on two
    # cores; wider or deeper models were still improving when time ran out.
    "default": {
        "model": dict(n_layer=1, n_embd=32, n_head=4, block_size=16),
        "train": dict(steps=1000, batch_size=32, lr=0.01, schedule="cosine", warmup=30,
                      min_lr_frac=0.1, eval_every=250),
    },
    # The exact GPT-2 block: learned positions, pre-LayerNorm with gain and bias, tanh-GELU,
    # biases, a final LayerNorm, lm_head tied to wte, N(0, 0.02) init with scaled projections.
    "gpt2": {
        "model": dict(n_layer=2, n_embd=32, n_head=4, block_size=32, pos="learned",
                      norm="layernorm", norm_affine=True, norm_position="pre", emb_norm=False,
                      final_norm=True, activation="gelu_tanh", bias=True, tie_embeddings=True,
                      init_std=0.02, scaled_init=True),
        "train": dict(lr=0.003, beta1=0.9, beta2=0.95, schedule="cosine", warmup=50,
                      weight_decay=0.1, grad_clip=1.0, batch_size=16, min_lr_frac=0.1),
    },
    # The Llama block (Llama 2/3, and Qwen, Mistral, SmolLM without their extras): RoPE, RMSNorm
    # with a gain before each sub-block and at the end, a SwiGLU MLP, grouped-query attention
    # (2 K/V heads for 4 query heads), no biases, an untied head, N(0, 0.02) init; the gpt2
    # preset's size and recipe, so the two compare directly.
    "llama": {
        "model": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, pos="rope",
                      norm="rmsnorm", norm_affine=True, norm_position="pre", emb_norm=False,
                      final_norm=True, mlp="swiglu", activation="silu", bias=False,
                      tie_embeddings=False, init_std=0.02),
        "train": dict(lr=0.003, beta1=0.9, beta2=0.95, schedule="cosine", warmup=50,
                      weight_decay=0.1, grad_clip=1.0, batch_size=16, min_lr_frac=0.1),
    },
}


def preset(name: str) -> dict[str, dict]:
    """The overrides of a preset, as fresh dicts; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return {part: dict(values) for part, values in PRESETS[name].items()}
