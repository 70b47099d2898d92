"""A Llama-style decoder from scratch: config, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, blocks, LM head."""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kv_cache import KVCache, Writer


@dataclass
class LlamaConfig:
    vocab_size: int            # rows of the embedding and of the LM head
    d_model: int               # width of the residual stream
    n_layers: int              # decoder blocks
    n_heads: int               # query heads
    n_kv_heads: int            # key/value heads; each serves n_heads // n_kv_heads query heads (GQA)
    ffn_dim: int               # hidden width of the SwiGLU MLP
    head_dim: int = 0          # 0: d_model // n_heads
    norm_eps: float = 1e-5     # RMSNorm epsilon
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_scaling`; only the "llama3" type is supported
    max_seq_len: int = 2048    # longest context the model was trained for
    tie_embeddings: bool = True  # LM head reuses the embedding matrix

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not self.head_dim:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                                 "give head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; only 'llama3' is implemented")

    # Derived sizes, in one place.
    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @property
    def heads_per_kv(self):
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf):
        """Build from the dict of an HF `config.json`; refuse anything that is not a Llama-style decoder."""
        archs = hf.get("architectures") or []
        if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(f"config.json describes model_type={hf.get('model_type')!r}, "
                             f"architectures={archs}; only Llama-style decoders (model_type 'llama') are supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json sets {flag}=true; biased projections are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        return cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim") or 0,
                   norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=hf.get("rope_theta", 10000.0),
                   rope_scaling=hf.get("rope_scaling"), max_seq_len=hf.get("max_position_embeddings", 2048),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf(self):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.d_model, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "intermediate_size": self.ffn_dim, "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


def rope_inv_freq(cfg):
    """(head_dim // 2,) float64 rotation frequencies, with Llama-3 long-context scaling when configured."""
    inv_freq = cfg.rope_theta ** -(np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(in_band, blended, scaled)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, heads, head_dim) in HF's rotate-half layout, where dimension i pairs with i + head_dim/2:
    each pair (x1, x2) turns by its angle. cos, sin: (T, 1, head_dim/2).

    Two contiguous halves, not a roll of x: under torch.compile a roll becomes a gather that the fused
    attention would redo for every key it reads.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Positions:
    """What every block needs to know about the positions of this step, computed once per step."""
    start: int                # position of the first token of the step
    length: int               # tokens in the step (T)
    cos: torch.Tensor         # (T, 1, head_dim/2) of each position's rotation angles
    sin: torch.Tensor         # (T, 1, head_dim/2)
    attn_mask: torch.Tensor   # (heads_per_kv * T, kv_len) bool, True where a query may attend


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


UPCAST_ROWS = 4096  # rows of a bf16 weight Linear upcasts at a time for fp32 activations


class Linear(nn.Linear):
    """Bias-free nn.Linear. fp32 activations on bf16 weights (the CPU's backbone) are rounded to bf16 first, so every
    product of a weight and an input is exact and only the sums round, in fp32: the arithmetic of the native bf16
    products (and of llama.cpp's BF16). The weight is upcast a slice of rows at a time."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight)
        x = x.to(self.weight.dtype).to(x.dtype)
        # the LM head whole in fp32 would be a transient twice its size: 113 MB on the bundled model
        return torch.cat([F.linear(x, rows.to(x.dtype)) for rows in self.weight.split(UPCAST_ROWS)], dim=-1)


def attend(q, k, v, mask):
    """Softmax attention of q (B, n_kv_heads, G*T, head_dim) over k, v (B, n_kv_heads, S, head_dim), where the
    bool mask (G*T, S) allows it."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class Attention(nn.Module):
    """Grouped-query attention's projections: fused QKV in, heads merged and projected out. The attention
    itself runs in Block.step, between the cache write and these two."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wqkv = Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim)
        self.wo = Linear(cfg.q_dim, cfg.d_model)

    def project_qkv(self, x, cos, sin):
        """Normed states (B, T, d_model) -> q (B, n_kv_heads, G*T, head_dim), k and v (B, n_kv_heads, T, head_dim).

        GQA without repeating K/V: the G query heads that share a KV head become G*T query rows of it.
        """
        cfg, G = self.cfg, self.cfg.heads_per_kv
        B, T, _ = x.shape
        qkv = self.wqkv(x)                                                     # (B, T, q_dim + 2 kv_dim)
        qk = qkv[..., :cfg.q_dim + cfg.kv_dim].view(B, T, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim)
        qk = apply_rope(qk, cos, sin)                                          # q and k rotated in one go
        q, k = qk.split((cfg.n_heads, cfg.n_kv_heads), dim=2)
        v = qkv[..., cfg.q_dim + cfg.kv_dim:].view(B, T, cfg.n_kv_heads, cfg.head_dim)
        q = q.reshape(B, T, cfg.n_kv_heads, G, cfg.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(B, cfg.n_kv_heads, G * T, cfg.head_dim)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def merge_heads(self, y):
        """Attention output (B, n_kv_heads, G*T, head_dim) -> (B, T, d_model)."""
        cfg = self.cfg
        B, T = y.shape[0], y.shape[2] // cfg.heads_per_kv
        y = y.view(B, cfg.n_kv_heads, cfg.heads_per_kv, T, cfg.head_dim).permute(0, 3, 1, 2, 4)
        return self.wo(y.reshape(B, T, cfg.q_dim))

    def project_kv(self, x, pos):
        """Only the K and V this layer would write for normed states x (B, T, d_model), with no attention:
        each (B, n_kv_heads, T, head_dim). Used to fill a skipped layer from another layer's state."""
        cfg = self.cfg
        B, T, _ = x.shape
        kv = F.linear(x, self.wqkv.weight[cfg.q_dim:].to(x.dtype))                         # (B, T, 2 kv_dim)
        k = apply_rope(kv[..., :cfg.kv_dim].view(B, T, cfg.n_kv_heads, cfg.head_dim), pos.cos, pos.sin)
        v = kv[..., cfg.kv_dim:].view(B, T, cfg.n_kv_heads, cfg.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.w_gate_up = Linear(cfg.d_model, 2 * cfg.ffn_dim)
        self.w_down = Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: h_{l+1} = block_l(h_l). Writes its K/V into cache layer `self.layer`."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer                  # which cache slots this block reads and writes
        self.cache_writer = Writer.BACKBONE  # recorded in the cache beside every K/V this block writes
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cache):
        """x (B, T, d_model) -> (B, T, d_model), writing this step's K/V into cache layer `self.layer`."""
        k_cache, v_cache = (None, None) if cache is None else cache.claim(self.layer, pos.start, x.shape[1],
                                                                          self.cache_writer)
        return self.step(x, pos.cos, pos.sin, pos.attn_mask, k_cache, v_cache, pos.start)

    def step(self, x, cos, sin, attn_mask, k_cache, v_cache, start):
        """The block's arithmetic. K/V go into the layer's cache (B, n_kv_heads, capacity, head_dim) at
        start.., and attention reads the cache up to this step's last position under the mask; with no cache,
        only this step's K/V."""
        q, k, v = self.attn.project_qkv(self.attn_norm(x), cos, sin)
        if k_cache is not None:
            end = start + x.shape[1]
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            k, v, attn_mask = k_cache[:, :, :end], v_cache[:, :, :end], attn_mask[:, :end]  # nothing later is read
        y = attend(q, k, v, attn_mask)                                        # (B, n_kv_heads, G*T, head_dim)
        h = x + self.attn.merge_heads(y)
        return h + self.mlp(self.mlp_norm(h))


def check_held(held, n_layers):
    """A number of backbone blocks to hold in memory: an int in [0, n_layers]. Returns it."""
    if isinstance(held, bool) or not isinstance(held, int) or not 0 <= held <= n_layers:
        raise ValueError(f"backbone blocks held must be an int in [0, {n_layers}] (the model's blocks), got {held!r}")
    return held


def token_ids_error(tokens, vocab_size):
    """The error for ids outside [0, vocab_size): Transformer.embed_tokens' and the native pass's."""
    return ValueError(f"token ids must lie in [0, {vocab_size}), got {tokens.min().item()}..{tokens.max().item()}")


class Transformer(nn.Module):
    def __init__(self, cfg, held=None):
        """held: hold only blocks 0 .. held - 1 (default all): a depth-capped River runs the rest as river copies
        alone, so their full-precision weights need never be loaded."""
        super().__init__()
        held = cfg.n_layers if held is None else check_held(held, cfg.n_layers)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(held))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Host-side float64, so moving the model to bf16 never coarsens the rotation angles.
        self.inv_freq = rope_inv_freq(cfg)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, capacity, batch_size=1):
        if capacity > self.cfg.max_seq_len:
            raise ValueError(f"requested KV cache of {capacity} positions exceeds the model's context "
                             f"of {self.cfg.max_seq_len}")
        return KVCache(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, capacity,
                       batch_size=batch_size, dtype=self.dtype, device=self.device)

    def positions(self, start, length, cache=None, dtype=None):
        """RoPE tables (in `dtype`, default the weights') and the attention mask for positions
        start..start+length-1, shared by all blocks."""
        dtype = dtype or self.dtype
        angles = np.arange(start, start + length, dtype=np.float64)[:, None] * self.inv_freq  # (T, head_dim/2)
        cos = torch.from_numpy(np.cos(angles)[:, None, :]).to(self.device, dtype)          # (T, 1, head_dim/2)
        sin = torch.from_numpy(np.sin(angles)[:, None, :]).to(self.device, dtype)
        if cache is None:  # attention over this step's own tokens only
            mask = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        else:
            mask = cache.causal_mask(start, length)
        return Positions(start, length, cos, sin, mask.repeat(self.cfg.heads_per_kv, 1))

    def embed_tokens(self, tokens):
        """tokens (B, T) -> h_0 (B, T, d_model)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise token_ids_error(tokens, self.cfg.vocab_size)
        return self.embed(tokens)

    def head(self, x):
        """Final norm and LM head: (B, T, d_model) -> logits (B, T, vocab_size)."""
        return self.lm_head(self.norm(x))

    def forward(self, tokens, start=0, cache=None):
        """Full-depth backbone over tokens (B, T) at positions start..; without a cache, plain causal attention."""
        if len(self.blocks) < self.cfg.n_layers:
            raise ValueError(f"the full-depth forward needs all {self.cfg.n_layers} blocks; this model holds the "
                             f"first {len(self.blocks)}")
        x = self.embed_tokens(tokens)
        if start + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + tokens.shape[1]} exceed the model's context "
                             f"of {self.cfg.max_seq_len}")
        pos = self.positions(start, tokens.shape[1], cache)
        for block in self.blocks:
            x = block(x, pos, cache)
        return self.head(x)
