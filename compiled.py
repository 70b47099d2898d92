"""The torch path's one-token step as a compiling engine runs it: products and attention written as multiplies and
sums that inductor fuses into single passes over the weights and the cache (the model itself knows nothing of it)."""
import functools
import math

import torch

from model import Linear, apply_rope


@functools.cache
def compiled_function(function):
    """`function` through torch.compile with positions and sizes symbolic, made once and shared by every engine that
    compiles: blocks of one kind (backbone, or a river of given bits) share a graph (a second torch.compile of the
    same function would compile everything again). Per-op overhead, not arithmetic, dominates a one-token step of a
    small model in eager PyTorch; compiling removes most of it."""
    return torch.compile(function, dynamic=True)


def streamed_product(linear, x):
    """linear(x) for one row x (1, 1, in) on CPU. A bf16 weight's product written as a broadcast multiply and a sum,
    which inductor fuses into one vectorized loop that streams W once with fp32 accumulation: about twice the BLAS
    call on 2 cores, where the library path first upcasts W. Eager would materialize the whole product, so only the
    compiled step takes this form; low-bit layers keep their own kernels."""
    if type(linear) is not Linear or x.device.type != "cpu":
        return linear(x)
    if linear.weight.dtype == torch.bfloat16:
        x = x.to(torch.bfloat16).to(x.dtype)  # as Linear: fp32 activations rounded to bf16 for bf16 weights
    return (x.unsqueeze(-2).float() * linear.weight.float()).sum(-1).to(x.dtype)    # (1, 1, out)


def streamed_attention(q, k, v, mask):
    """Softmax attention of one token's query rows q (B, n_kv_heads, G, hd) over k, v (B, n_kv_heads, S, hd) under
    mask (G, S), as multiplies and sums: a few hundred keys are too little work for SDPA's own setup."""
    scores = (q.unsqueeze(-2).float() * k.unsqueeze(-3).float()).sum(-1) / math.sqrt(q.shape[-1])  # (B, H, G, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs.unsqueeze(-1) * v.unsqueeze(-3).float()).sum(-2).to(q.dtype)


def streamed_step(block, x, cos, sin, attn_mask, k_cache, v_cache, start):
    """Block.step for one token x (B, 1, d_model) with the streamed products and attention; the same arithmetic as
    Block.step up to the order of fp32 sums (a test holds them together)."""
    attn, cfg = block.attn, block.attn.cfg
    B = x.shape[0]
    qkv = streamed_product(attn.wqkv, block.attn_norm(x))                        # (B, 1, q_dim + 2 kv_dim)
    qk = apply_rope(qkv[..., :cfg.q_dim + cfg.kv_dim].view(B, 1, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), cos, sin)
    q = qk[:, 0, :cfg.n_heads].reshape(B, cfg.n_kv_heads, cfg.heads_per_kv, cfg.head_dim)
    k = qk[:, 0, cfg.n_heads:, None]                                             # (B, n_kv_heads, 1, hd)
    v = qkv[:, 0, cfg.q_dim + cfg.kv_dim:].view(B, cfg.n_kv_heads, 1, cfg.head_dim)
    end = start + 1
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    y = streamed_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask[:, :end])  # (B, kv, G, hd)
    h = x + streamed_product(attn.wo, y.reshape(B, 1, cfg.q_dim))
    gate, up = streamed_product(block.mlp.w_gate_up, block.mlp_norm(h)).chunk(2, dim=-1)
    return h + streamed_product(block.mlp.w_down, torch.nn.functional.silu(gate) * up)


def streamed_head(model, x):
    """Transformer.head for one position, the LM head streamed."""
    return streamed_product(model.lm_head, model.norm(x))

