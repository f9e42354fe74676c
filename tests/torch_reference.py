"""An independent PyTorch implementation of puregpt's architecture family, the oracle of the
parity tests.

Built from torch's own modules (nn.Embedding, nn.Linear, nn.LayerNorm, nn.RMSNorm,
F.gelu, F.silu, F.scaled_dot_product_attention (with enable_gqa for grouped K/V heads),
F.cross_entropy) and autograd, in float64. RoPE is transformers' Llama formula written out
(rotate_half, cos/sin of cat(freqs, freqs)). Nothing
of puregpt's math is imported: puregpt is only the source of the config and of the weight values
copied in (`load`), and the gradients are handed back under puregpt's parameter names (`grads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64


def sinusoidal_table(block_size: int, C: int) -> torch.Tensor:
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same angle)."""
    p = torch.arange(block_size, dtype=DTYPE)[:, None]
    two_i = torch.arange(0, C, 2, dtype=DTYPE)
    angle = p / 10000.0 ** (two_i / C)
    pe = torch.zeros(block_size, C, dtype=DTYPE)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)[:, : C // 2]
    return pe


def rope_cos_sin(T: int, hd: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRotaryEmbedding: inv_freq = 1 / theta^(arange(0, hd, 2) / hd),
    freqs = positions x inv_freq, emb = cat(freqs, freqs); cos and sin (T, hd)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=DTYPE) / hd)
    freqs = torch.outer(torch.arange(T, dtype=DTYPE), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one of q, k: x (heads, T, hd)."""
    return x * cos + rotate_half(x) * sin


def make_norm(cfg) -> nn.Module:
    """RMSNorm: x / sqrt(mean(x^2) + eps) (* gain); LayerNorm: biased variance (* gain + bias)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine,
                          dtype=DTYPE)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine,
                        bias=cfg.norm_affine, dtype=DTYPE)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, b = cfg.n_embd, cfg.bias
        self.cfg = cfg
        # K/V heads and the MLP width, from the config's fields (not its derived properties)
        self.kv_heads = cfg.n_head if cfg.n_kv_head is None else cfg.n_kv_head
        hd = C // cfg.n_head
        if cfg.mlp_hidden is not None:
            H = cfg.mlp_hidden
        elif cfg.mlp == "swiglu":  # Llama: int(2 * 4C / 3), rounded up to a multiple
            m = cfg.mlp_multiple_of
            H = (int(2 * 4 * C / 3) + m - 1) // m * m
        else:
            H = 4 * C
        self.attn_norm, self.mlp_norm = make_norm(cfg), make_norm(cfg)
        self.attn_wq = nn.Linear(C, C, bias=b, dtype=DTYPE)
        self.attn_wk = nn.Linear(C, self.kv_heads * hd, bias=b, dtype=DTYPE)
        self.attn_wv = nn.Linear(C, self.kv_heads * hd, bias=b, dtype=DTYPE)
        self.attn_wo = nn.Linear(C, C, bias=b, dtype=DTYPE)
        if cfg.qk_norm:  # one gain per head channel, shared by the heads
            self.attn_q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps, dtype=DTYPE)
            self.attn_k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps, dtype=DTYPE)
        if cfg.mlp == "swiglu":
            self.mlp_gate = nn.Linear(C, H, bias=b, dtype=DTYPE)
        self.mlp_fc1 = nn.Linear(C, H, bias=b, dtype=DTYPE)
        self.mlp_fc2 = nn.Linear(H, C, bias=b, dtype=DTYPE)

    def attn(self, x):  # x (T, C), one sequence
        T, H = x.shape[0], self.cfg.n_head
        q = self.attn_wq(x).view(T, H, -1).transpose(0, 1)  # (H, T, hd)
        k, v = (w(x).view(T, self.kv_heads, -1).transpose(0, 1)
                for w in (self.attn_wk, self.attn_wv))  # (kv_heads, T, hd)
        if self.cfg.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        if self.cfg.pos == "rope":
            cos, sin = rope_cos_sin(T, q.shape[-1], self.cfg.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,  # scale 1/sqrt(hd)
                                             enable_gqa=self.kv_heads != H)
        return self.attn_wo(out.transpose(0, 1).reshape(T, -1))

    def mlp(self, x):
        h = self.mlp_fc1(x)
        act = self.cfg.activation
        if act == "silu":
            g = F.silu(self.mlp_gate(x) if self.cfg.mlp == "swiglu" else h)
            return self.mlp_fc2(g * h if self.cfg.mlp == "swiglu" else g)
        h = F.relu(h) if act == "relu" else F.gelu(h, approximate="tanh" if act == "gelu_tanh"
                                                    else "none")
        return self.mlp_fc2(h)

    def forward(self, x):
        if self.cfg.norm_position == "pre":
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x))
        return self.mlp_norm(x + self.mlp(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C, dtype=DTYPE)
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, C, dtype=DTYPE)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(cfg.block_size, C))
        self.emb_norm = make_norm(cfg) if cfg.emb_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.lm_head = (None if cfg.tie_embeddings
                        else nn.Linear(C, cfg.vocab_size, bias=False, dtype=DTYPE))

    def forward_one(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (T, V) of one sequence."""
        x = self.wte(tokens)
        pos = torch.arange(len(tokens))
        if self.cfg.pos == "learned":
            x = x + self.wpe(pos)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.pe[pos]
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return F.linear(x, self.wte.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, inputs: list[list[int]]) -> torch.Tensor:
        """Logits (N, V) of variable-length sequences laid end to end, like puregpt.forward."""
        return torch.cat([self.forward_one(torch.tensor(seq)) for seq in inputs])

    def loss(self, inputs, targets) -> torch.Tensor:
        """Mean cross-entropy over every target position of the batch; -1 targets ignored."""
        flat = torch.tensor([y for seq in targets for y in seq])
        return F.cross_entropy(self(inputs), flat, ignore_index=-1)

    # --- puregpt names <-> torch parameters ------------------------------------------------

    def named(self) -> dict[str, torch.Tensor]:
        """puregpt parameter name -> the torch parameter holding it."""
        out = {"wte": self.wte.weight}
        if self.cfg.pos == "learned":
            out["wpe"] = self.wpe.weight
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head.weight

        def add_norm(name, mod):
            if mod is not None and mod.weight is not None:
                out[name + "_g"] = mod.weight
                if getattr(mod, "bias", None) is not None:
                    out[name + "_b"] = mod.bias

        add_norm("emb_norm", self.emb_norm)
        add_norm("final_norm", self.final_norm)
        for l, blk in enumerate(self.blocks):
            p = f"layer{l}."
            add_norm(p + "attn_norm", blk.attn_norm)
            add_norm(p + "mlp_norm", blk.mlp_norm)
            if blk.cfg.qk_norm:
                out[p + "attn_q_norm_g"] = blk.attn_q_norm.weight
                out[p + "attn_k_norm_g"] = blk.attn_k_norm.weight
            for w in ("attn_wq", "attn_wk", "attn_wv", "attn_wo", "mlp_gate", "mlp_fc1",
                      "mlp_fc2"):
                lin = getattr(blk, w, None)
                if lin is None:
                    continue
                out[p + w] = lin.weight
                if lin.bias is not None:
                    out[p + w + "_b"] = lin.bias
        return out

    def load(self, params: dict) -> "TorchGPT":
        """Copy puregpt's parameter values in; every parameter on both sides must match up."""
        named = self.named()
        assert set(named) == set(params), set(named) ^ set(params)
        assert len(named) == len(list(self.parameters()))
        with torch.no_grad():
            for name, t in named.items():
                t.copy_(torch.tensor(params[name], dtype=DTYPE))
        return self

    def values(self) -> dict:
        return {name: t.detach().tolist() for name, t in self.named().items()}

    def grads(self) -> dict:
        return {name: t.grad.tolist() for name, t in self.named().items()}


def build(cfg, params: dict) -> TorchGPT:
    return TorchGPT(cfg).load(params)


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two nested lists (or tensors) of the same shape."""
    ta, tb = torch.as_tensor(a, dtype=DTYPE), torch.as_tensor(b, dtype=DTYPE)
    assert ta.shape == tb.shape, (ta.shape, tb.shape)
    return (ta - tb).abs().max().item() if ta.numel() else 0.0

