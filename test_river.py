"""Property tests: the decoder against a naive reference, the cache under any exit schedule, kernels against
dequantize-then-matmul, the bundled model end to end, and every bad input."""
import ast
import collections
import ctypes
import dataclasses
import gc
import graphlib
import inspect
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import calibrate
import kernels
import kv_strategies
import load_weights
from exit_policy import FixedExit, NeverExit, ReplayedExit, SimilarityExit, transition_similarity
from kv_cache import KVCache, Writer
from load_weights import load_model
from model import Block, Linear, LlamaConfig, Transformer, attend
from kv_strategies import STRATEGIES, BaselineEngine
from quantize import QuantizedLinear, QuantizedWeight, check_quant_args, quantize_weight
import river as river_module
from river import (DEFAULT_EIGHT_BIT_LAYERS, DEFAULT_TAU, MODES, Engine, ExitRiver, default_eight_bit_layers,
                   load_river, main as river_main)

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------ independent reference

def naive_rope(x, positions, cfg):
    """x (T, heads, head_dim), rotate-half layout, angles computed here from scratch (with llama3 scaling)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / cfg.head_dim)
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        old = s["original_max_position_embeddings"]
        new = []
        for f in inv_freq.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / s["high_freq_factor"]:
                new.append(f)
            elif wavelen > old / s["low_freq_factor"]:
                new.append(f / s["factor"])
            else:
                smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
                new.append((1 - smooth) * f / s["factor"] + smooth * f)
        inv_freq = torch.tensor(new, dtype=torch.float64)
    angle = positions.double()[:, None] * inv_freq[None, :]                      # (T, half)
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def naive_attention(q, k, v):
    """q (T, n_heads, hd), k/v (T, n_kv_heads, hd): causal softmax attention with K/V repeated per head."""
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, n_heads * hd)


def naive_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_forward(model, tokens, river=None, last_backbone=None):
    """Full-sequence forward with no cache, written from the equations. With a river, token s runs backbone
    blocks 0..last_backbone[s] and river copies after; every layer's K/V of s comes from the block s ran.
    Returns logits (T, vocab), per layer the K and V it computed, (T, n_kv_heads, head_dim), and the residual
    states h_0..h_L, each (T, d_model)."""
    cfg = model.cfg
    T = tokens.shape[0]
    positions = torch.arange(T)
    h = model.embed.weight.float()[tokens]
    kv, states = [], [h]
    for layer in range(cfg.n_layers):
        paths = [model.blocks[layer]] + ([river.blocks[layer]] if river is not None else [])
        backbone = torch.ones(T, dtype=torch.bool) if river is None else torch.tensor(
            [layer <= e for e in last_backbone])[:, None]

        def per_token(fn):  # each token's row from the path it took at this layer
            outs = [fn(p).float() for p in paths]
            return outs[0] if len(outs) == 1 else torch.where(backbone.view(T, *[1] * (outs[0].dim() - 1)),
                                                                 outs[0], outs[1])
        x = per_token(lambda p: naive_rms_norm(h, p.attn_norm.weight.float(), cfg.norm_eps))
        qkv = per_token(lambda p: p.attn.wqkv(x.to(model.dtype)))
        q, k, v = qkv.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
        q = naive_rope(q.reshape(T, cfg.n_heads, cfg.head_dim), positions, cfg)
        k = naive_rope(k.reshape(T, cfg.n_kv_heads, cfg.head_dim), positions, cfg)
        v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
        kv.append((k, v))
        att = naive_attention(q, k, v)
        h = h + per_token(lambda p: p.attn.wo(att.to(model.dtype)))
        x = per_token(lambda p: naive_rms_norm(h, p.mlp_norm.weight.float(), cfg.norm_eps))
        gate_up = per_token(lambda p: p.mlp.w_gate_up(x.to(model.dtype)))
        gate, up = gate_up.split(cfg.ffn_dim, dim=-1)
        h = h + per_token(lambda p: p.mlp.w_down((F.silu(gate) * up).to(model.dtype)))
        states.append(h)
    h = naive_rms_norm(h, model.norm.weight.float(), cfg.norm_eps)
    return h @ model.lm_head.weight.float().t(), kv, states


# --------------------------------------------------------------------------------------------- tiny models

@st.composite
def tiny_configs(draw, quantizable=False):
    """Random small Llama configs; `quantizable` keeps every in_features a multiple of 32 for int4."""
    n_kv_heads = draw(st.integers(1, 3))
    n_heads = n_kv_heads * draw(st.integers(1, 3))
    if quantizable:  # q_dim = n_heads * head_dim is wo's in_features
        head_dim = 16 if n_heads % 2 == 0 and draw(st.booleans()) else 32
        d_model, ffn_dim = draw(st.sampled_from([32, 64])), draw(st.sampled_from([64, 96]))
    else:
        head_dim = draw(st.sampled_from([2, 4, 6, 8]))
        d_model, ffn_dim = draw(st.integers(3, 33)), draw(st.integers(3, 41))
    scaling = draw(st.sampled_from([None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}]))
    return LlamaConfig(vocab_size=draw(st.integers(5, 70)), d_model=d_model, n_layers=draw(st.integers(1, 4)),
                       n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, head_dim=head_dim,
                       rope_theta=draw(st.sampled_from([10000.0, 500.0])), rope_scaling=scaling, max_seq_len=64,
                       tie_embeddings=draw(st.booleans()))


def assert_close_bf16(got, expected):
    """bf16 activations keep about 3 significant digits: compare relative to the tensor's own scale."""
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def tiny_model(cfg, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------- decoder and the cache

@PROPERTY
@given(cfg=tiny_configs(), n_prompt=st.integers(1, 8), n_steps=st.integers(0, 5), seed=st.integers(0, 99))
def test_cached_decoding_equals_full_forward_and_naive_reference(cfg, n_prompt, n_steps, seed):
    model = tiny_model(cfg, seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + n_steps), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)[0]                                       # one causal forward, no cache
        reference, _, _ = reference_forward(model, tokens[0])
        cache = model.new_cache(n_prompt + n_steps)
        steps = [model(tokens[:, :n_prompt], 0, cache)[0]]
        for t in range(n_prompt, n_prompt + n_steps):
            steps.append(model(tokens[:, t:t + 1], t, cache)[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-4)
    assert cache.holes(n_prompt + n_steps) == []
    assert (cache.writer[:, :n_prompt + n_steps] == Writer.BACKBONE).all()


def test_cache_refuses_writes_past_capacity():
    cache = KVCache(n_layers=2, n_kv_heads=1, head_dim=4, capacity=3)
    k = torch.zeros(1, 1, 2, 4)
    cache.write(0, 0, k, k, Writer.BACKBONE)
    with pytest.raises(IndexError, match="outside its capacity 3"):
        cache.write(0, 2, k, k, Writer.BACKBONE)
    assert cache.writer[0, 2] == Writer.EMPTY, "a refused write must leave the record untouched"


def test_batched_decoding_matches_single_sequences():
    cfg = LlamaConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=32)
    model = tiny_model(cfg, 0)
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.new_cache(7, batch_size=2)
        batched = torch.cat([model(tokens[:, :4], 0, cache)] + [model(tokens[:, t:t + 1], t, cache)
                                                               for t in range(4, 7)], dim=1)
        for b in range(2):
            torch.testing.assert_close(batched[b], model(tokens[b:b + 1])[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- quantization

@PROPERTY
@given(bits=st.sampled_from([4, 8]), n=st.integers(1, 40), groups=st.integers(1, 4),
       group_size=st.sampled_from([32, 64, 128]), seed=st.integers(0, 99))
def test_quantizer_is_within_half_a_step_and_refinement_never_hurts(bits, n, groups, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * group_size, generator=g) * torch.rand(n, 1, generator=g)
    rtn = quantize_weight(w, bits, group_size, refine_steps=0)
    step = rtn.scale.repeat_interleave(group_size, dim=1)
    assert ((w - rtn.dequantize()).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all(), "error above half a step"
    qw = quantize_weight(w, bits, group_size)
    assert qw.q.min() >= 0 and qw.q.max() <= 2 ** bits - 1
    group_error = lambda q: (w - q.dequantize()).pow(2).view(n, groups, group_size).sum(-1)  # noqa: E731
    assert (group_error(qw) <= group_error(rtn) * (1 + 1e-4) + 1e-9).all(), "refinement raised an error"


@PROPERTY
@given(n=st.integers(1, 40), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 5), seed=st.integers(0, 99))
def test_torch_int4_kernel_equals_dequantized_matmul(n, groups, group_size, rows, seed):
    """The paper's W4A16 (the whole-model control): PyTorch's int4 kernel, bf16 activations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n * 16, groups * group_size, generator=g) * torch.rand(n * 16, 1, generator=g)
    qw = quantize_weight(w, 4, group_size)
    x = torch.randn(rows, w.shape[1], generator=g).bfloat16()
    # The kernel computes with bf16 scales and zeros (the value of code 8): the reference dequantizes with them.
    scale, zero = qw.scale.bfloat16().float(), (qw.low + 8 * qw.scale).bfloat16().float()
    w_kernel = (qw.q.float() - 8) * scale.repeat_interleave(group_size, 1) + zero.repeat_interleave(group_size, 1)
    expected = x.float() @ w_kernel.t()
    got = QuantizedLinear(qw, "cpu", "bf16")(x).float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def dequantized_fp16(qw):
    """The weight as the int16-activation products hold it: scale and low rounded to fp16."""
    return (qw.q.float() * qw.scale.half().float().repeat_interleave(qw.group_size, 1)
            + qw.low.half().float().repeat_interleave(qw.group_size, 1))


def int16_bound(x, w, group_size):
    """Largest error int16 activations (half a step per input, a step being the group's max / 32639) can add to
    x (M, K) @ w (N, K)^T, with room for fp32 rounding."""
    M, K = x.shape
    step = x.abs().view(M, K // group_size, group_size).amax(-1) / 32639                      # (M, G)
    per_input = (step / 2).repeat_interleave(group_size, 1)                                   # (M, K)
    return per_input @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t()) + 1e-6


@PROPERTY
@given(bits=st.sampled_from([4, 8]), n=st.integers(1, 40), groups=st.integers(1, 5),
       group_size=st.sampled_from([32, 64, 128]), rows=st.integers(1, 4), seed=st.integers(0, 99))
def test_int16_activation_product_equals_dequantized_matmul(bits, n, groups, group_size, rows, seed):
    """The river's products in plain torch (the native kernel's twin) against an fp32 matmul of the dequantized
    weight, within the error int16 activations can add."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * group_size, generator=g)
    qw = quantize_weight(w, bits, group_size)
    x = torch.randn(rows, w.shape[1], generator=g) * torch.rand(rows, 1, generator=g) * 10
    w_ref = dequantized_fp16(qw)
    got = QuantizedLinear(qw, "cpu", "int16")(x)
    assert ((got - x @ w_ref.t()).abs() <= int16_bound(x, w_ref, group_size)).all()


@pytest.mark.parametrize("bits, group_size, message", [
    (3, 64, "bits must be 4 or 8"), (16, 64, "bits must be 4 or 8"), (4, 0, "group_size must be"),
    (4, 48, "group_size must be"), (4, 96, "does not divide in_features 64"), (8, 512, "at most 256")])
def test_quantizer_rejects_bad_arguments(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(torch.randn(8, 64), bits, group_size)


# ------------------------------------------------------------------------------------------- the river

def tiny_river(cfg, seed, bits):
    model = tiny_model(cfg, seed)
    return model, ExitRiver(model, bits, 32)


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), bits=st.sampled_from([4, 8]), n_prompt=st.integers(1, 6),
       exits=st.lists(st.integers(-1, 4), min_size=0, max_size=6), seed=st.integers(0, 99))
def test_any_exit_schedule_leaves_a_whole_cache_written_once_by_the_right_path(cfg, bits, n_prompt, exits, seed):
    """Prefill exits after block exits[0], decode token t after block exits[t]; -1 means no backbone block."""
    model, river = tiny_river(cfg, seed, bits)
    engine = Engine(model, river)
    L = cfg.n_layers
    exits = [min(e, L - 1) for e in (exits or [L - 1])]
    tokens = torch.randint(0, cfg.vocab_size, (n_prompt + len(exits) - 1,),
                           generator=torch.Generator().manual_seed(seed))
    last_backbone = [exits[0]] * n_prompt + exits[1:]
    cache = model.new_cache(len(tokens))

    def run(chunk, start, exit_after):
        mode, policy = ("quantized", None) if exit_after < 0 else ("river", FixedExit(exit_after))
        logits, depth = engine.forward(chunk[None], start, cache, mode, policy, all_logits=True)
        assert depth == exit_after + 1
        return logits[0]
    logits = [run(tokens[:n_prompt], 0, exits[0])]
    for i, e in enumerate(exits[1:]):
        logits.append(run(tokens[n_prompt + i:n_prompt + i + 1], n_prompt + i, e))

    S = len(tokens)
    assert cache.holes(S) == []
    assert (cache.write_count[:, :S] == 1).all(), "every (layer, position) written exactly once"
    expected_writer = np.array([[Writer.BACKBONE if layer <= e else Writer.RIVER for e in last_backbone]
                                for layer in range(L)])
    np.testing.assert_array_equal(cache.writer[:, :S], expected_writer)
    ref_logits, ref_kv, _ = reference_forward(model, tokens, river, last_backbone)
    for layer, (k, v) in enumerate(ref_kv):
        assert_close_bf16(cache.k[layer, 0, :, :S].transpose(0, 1), k)
        assert_close_bf16(cache.v[layer, 0, :, :S].transpose(0, 1), v)
    assert_close_bf16(torch.cat(logits), ref_logits)


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), seed=st.integers(0, 99), n_new=st.integers(1, 6), batch=st.integers(1, 3),
       tau=st.floats(1, 1e6, exclude_min=True))
def test_river_with_tau_above_one_is_exactly_the_backbone(cfg, seed, n_new, batch, tau):
    model, river = tiny_river(cfg, seed, 4)
    engine = Engine(model, river)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist()
    backbone = engine.generate(prompt, n_new, "backbone")
    for policy in (SimilarityExit(tau), NeverExit()):
        river_run = engine.generate(prompt, n_new, "river", policy)
        assert river_run.tokens == backbone.tokens
        assert river_run.backbone_blocks == [cfg.n_layers] * len(backbone.tokens)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 5 + n_new), generator=g)
    runs = {}
    for mode, policy in (("backbone", None), ("river", SimilarityExit(tau))):
        cache = model.new_cache(5 + n_new, batch_size=batch)
        steps = [engine.forward(tokens[:, :5], 0, cache, mode, policy, all_logits=True)]
        steps += [engine.forward(tokens[:, t:t + 1], t, cache, mode, policy) for t in range(5, 5 + n_new)]
        runs[mode] = torch.cat([logits for logits, _ in steps], dim=1), [depth for _, depth in steps], cache
    (logits_a, depths_a, cache_a), (logits_b, depths_b, cache_b) = runs["backbone"], runs["river"]
    assert depths_a == depths_b == [cfg.n_layers] * (1 + n_new)
    assert torch.equal(logits_a, logits_b), "bit-equal logits"
    assert torch.equal(cache_a.k, cache_b.k) and torch.equal(cache_a.v, cache_b.v), "bit-equal K/V"
    assert (cache_b.writer == Writer.BACKBONE).all() and (cache_b.write_count == 1).all()


def hand_similarities(states):
    """s_l = cos(h_l, h_{l+1}) written out, from the residual states h_0..h_L (each (..., d_model)): (L, ...)."""
    h = torch.stack(states)
    before, after = h[:-1], h[1:]
    return (before * after).sum(-1) / (before.norm(dim=-1) * after.norm(dim=-1))


def step_similarities(model, river, tokens, last_backbone, start, end):
    """(L, B, end - start): s_l of each batch row's tokens start..end-1 on the backbone path, the tokens before
    them having taken the paths last_backbone says (those paths wrote the cache slots a step reads)."""
    schedule = last_backbone + [model.cfg.n_layers - 1] * (end - start)
    return torch.stack([hand_similarities(reference_forward(model, row[:end], river, schedule)[2])[:, start:end]
                        for row in tokens], dim=1)


def depths_the_rule_allows(minima, tau, min_layer, margin=1e-5):
    """The exit depths (backbone blocks run) the rule allows, given minima[l] = min of s_l over a step's batch
    and tokens: after the first block l >= min_layer, never the last, whose minimum exceeds tau; tau > 1 never
    exits. A minimum within `margin` of tau (the engine rounds differently from the reference) allows both."""
    allowed, n_layers = [], len(minima)
    for layer in range(min_layer, n_layers - 1 if tau <= 1 else 0):
        if minima[layer] > tau - margin:
            allowed.append(layer + 1)
        if minima[layer] > tau + margin:
            return allowed
    return allowed + [n_layers]


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), bits=st.sampled_from([4, 8]), batch=st.integers(1, 3),
       n_prompt=st.integers(1, 5), n_steps=st.integers(0, 4), min_layer=st.integers(0, 2), seed=st.integers(0, 99),
       data=st.data())
def test_engine_exits_where_the_hand_computed_similarities_say(cfg, bits, batch, n_prompt, n_steps, min_layer,
                                                                seed, data):
    """SimilarityExit in the engine, step by step, against the rule applied by hand to similarities from the
    reference decoder: each step's depth, then the cache record and the logits and K/V of that schedule. tau
    lies between two of the prefill's per-block minima and means (over batch and tokens): exits happen at
    varied depths, and a rule on the mean, or on anything but the block's input and output, exits elsewhere."""
    model, river = tiny_river(cfg, seed, bits)
    engine, L, S = Engine(model, river), cfg.n_layers, n_prompt + n_steps
    tokens = torch.randint(0, cfg.vocab_size, (batch, S), generator=torch.Generator().manual_seed(seed))
    prefill = step_similarities(model, river, tokens, [], 0, n_prompt).flatten(1)       # (L, batch * n_prompt)
    levels = sorted({v for layer in range(min_layer, L - 1) for v in (prefill[layer].min().item(),
                                                                       prefill[layer].mean().item())})
    taus = [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [levels[0] - 0.1 if levels else 0.0, 1.5]
    tau = data.draw(st.sampled_from(taus), label="tau")
    policy = SimilarityExit(tau, min_layer)
    cache = model.new_cache(S, batch_size=batch)
    last_backbone, logits = [], []
    for start, end in [(0, n_prompt)] + [(t, t + 1) for t in range(n_prompt, S)]:
        minima = step_similarities(model, river, tokens, last_backbone, start, end).flatten(1).amin(1)
        step_logits, depth = engine.forward(tokens[:, start:end], start, cache, "river", policy, all_logits=True)
        assert depth in depths_the_rule_allows(minima.tolist(), tau, min_layer), f"step at {start}"
        last_backbone += [depth - 1] * (end - start)
        logits.append(step_logits)
    expected_writer = np.array([[Writer.BACKBONE if layer <= e else Writer.RIVER for e in last_backbone]
                                for layer in range(L)])
    np.testing.assert_array_equal(cache.writer, expected_writer)
    assert (cache.write_count == 1).all(), "every (layer, position) written exactly once"
    logits = torch.cat(logits, dim=1)                                                   # (batch, S, vocab)
    for b in range(batch):
        ref_logits, ref_kv, _ = reference_forward(model, tokens[b], river, last_backbone)
        assert_close_bf16(logits[b], ref_logits)
        for layer, (k, v) in enumerate(ref_kv):
            assert_close_bf16(cache.k[layer, b].transpose(0, 1), k)
            assert_close_bf16(cache.v[layer, b].transpose(0, 1), v)


def test_a_batch_or_a_prefill_exits_on_its_minimum_not_its_mean():
    """tau between the minimum and the mean of s_0 over a batch of two, then over a prefill of four tokens: the
    token block 0 turned most keeps them all on the backbone past block 0."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    engine = Engine(model, river)
    for tokens in (torch.tensor([[5], [9]]), torch.tensor([[5, 9, 14, 3]])):
        B, T = tokens.shape
        s = step_similarities(model, river, tokens, [], 0, T).flatten(1)                # (L, B * T)
        tau = (s[0].min() + s[0].mean()).item() / 2
        allowed = depths_the_rule_allows(s.amin(1).tolist(), tau, 0)
        assert len(allowed) == 1 and allowed[0] > 1, "the case is built for the mean to exit after block 0"
        _, depth = engine.forward(tokens, 0, model.new_cache(T, batch_size=B), "river", SimilarityExit(tau))
        assert depth == allowed[0]


def test_rerunning_a_step_overwrites_its_slots_and_counts_both_writes():
    """A decode step run again at the same position (a regenerated token) rewrites that position in every
    layer: the record counts two writes and names the latest path, and the cache and logits equal a run where
    only the second step happened."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 1, 4)
    engine = Engine(model, river)
    prompt = torch.tensor([[3, 1, 4, 1]])
    rerun, fresh = model.new_cache(5), model.new_cache(5)
    for cache in (rerun, fresh):
        engine.forward(prompt, 0, cache, "backbone")
    engine.forward(torch.tensor([[5]]), 4, rerun, "backbone")
    logits_rerun, _ = engine.forward(torch.tensor([[9]]), 4, rerun, "river", FixedExit(0))
    logits_fresh, _ = engine.forward(torch.tensor([[9]]), 4, fresh, "river", FixedExit(0))
    assert (rerun.write_count[:, :4] == 1).all() and (rerun.write_count[:, 4] == 2).all()
    assert rerun.writer[:, 4].tolist() == [Writer.BACKBONE, Writer.RIVER, Writer.RIVER]
    assert torch.equal(logits_rerun, logits_fresh)
    assert torch.equal(rerun.k, fresh.k) and torch.equal(rerun.v, fresh.v)


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), bits=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_quantized_mode_equals_a_decoder_built_from_dequantized_weights(cfg, bits, seed):
    model, river = tiny_river(cfg, seed, bits)
    dequantized = tiny_model(cfg, seed)
    with torch.no_grad():
        for block in dequantized.blocks:
            for linear in (block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down):
                linear.weight.copy_(quantize_weight(linear.weight, bits, 32).dequantize())
    tokens = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    got, depth = Engine(model, river).forward(tokens, 0, model.new_cache(6), "quantized", all_logits=True)
    assert depth == 0
    # bf16 activations inside the low-bit kernels set the tolerance.
    assert_close_bf16(got, dequantized(tokens))


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy():
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
    model, river = tiny_river(cfg, 4, 4)
    engine = Engine(model, river)
    runs = [engine.generate([1, 2, 3], 12, "river", SimilarityExit(0.5), temperature=1.5, seed=s).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy_tokens = engine.generate([1, 2, 3], 12, "river", SimilarityExit(0.5)).tokens
    assert engine.generate([1, 2, 3], 12, "river", SimilarityExit(0.5), temperature=1.5, top_p=1e-6,
                           seed=1).tokens == greedy_tokens


def test_similarity_rule_exits_at_first_block_above_tau():
    h0 = torch.tensor([[[1.0, 0.0]]])
    assert transition_similarity(h0, torch.tensor([[[1.0, 1.0]]])).item() == pytest.approx(math.sqrt(0.5))
    policy = SimilarityExit(0.9, min_layer=1)
    same, turned = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert not policy.should_exit(0, h0, same), "below min_layer"
    assert policy.should_exit(1, h0, same)
    assert not policy.should_exit(1, h0, turned)
    both = torch.cat([same, turned], dim=1)  # minimum over tokens decides
    assert not policy.should_exit(1, torch.cat([h0, h0], dim=1), both)
    assert not SimilarityExit(1.0001).should_exit(5, h0, same), "tau > 1 never exits"


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), float("-inf"), "0.5", None, True])
def test_tau_must_be_a_finite_number(tau):
    with pytest.raises(ValueError, match="tau must be a finite real number"):
        SimilarityExit(tau)


def test_generate_rejects_bad_input_before_doing_anything():
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    engine = Engine(model, river)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        engine.generate(list(range(14)), 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.generate([1, 2], 2, mode="fast")
    for bad, message in (({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
                         ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
                         ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
                         ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
                         ({"top_p": math.nan}, r"top_p must be in \(0, 1\], got nan"),
                         ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                         ({"seed": 2**64}, "seed must be None or an int")):
        with pytest.raises(ValueError, match=message):
            engine.generate([1, 2], **{"max_new_tokens": 2, **bad})
    with pytest.raises(ValueError, match="needs an ExitRiver"):
        Engine(model).generate([1, 2], 2, mode="river")
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------ the depth cap

def holding_first_blocks(model, depth):
    """A Transformer built to hold only blocks 0..depth-1 (what load_model(backbone_depth=depth) builds), with
    `model`'s weights: strict loading, so it has no parameter of a deeper block."""
    capped = Transformer(model.cfg, backbone_depth=depth)
    names = capped.state_dict().keys()
    capped.load_state_dict({name: value for name, value in model.state_dict().items() if name in names})
    return capped.to(model.dtype).eval()


def expected_writer(depths_by_position, n_layers):
    """(n_layers, positions): BACKBONE where the position's token ran the backbone block, RIVER after."""
    return np.array([[Writer.BACKBONE if layer < d else Writer.RIVER for d in depths_by_position]
                     for layer in range(n_layers)])


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 5), n_steps=st.integers(0, 4),
       seed=st.integers(0, 99), data=st.data())
def test_a_capped_backbone_never_runs_block_d_or_deeper(cfg, n_prompt, n_steps, seed, data):
    """Engine(max_backbone_depth=D), and an engine on a model that holds only D blocks, under a rule that never
    exits and one that exits early: prefill and every decode step stop at min(D, the rule's depth), layers D.. of the
    cache are written by the river alone, each slot once, and logits and K/V are the reference decoder's for that
    schedule; the two engines agree bit for bit."""
    L = cfg.n_layers
    D = data.draw(st.integers(0, L), label="D")
    early = data.draw(st.integers(0, L - 1), label="early exit after block")
    model, river = tiny_river(cfg, seed, 4)
    capped_model = holding_first_blocks(model, D)
    assert len(capped_model.blocks) == D
    S = n_prompt + n_steps
    tokens = torch.randint(0, cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(seed))
    for policy, free_depth in ((SimilarityExit(2.0), L), (FixedExit(early), early + 1)):
        depth = min(D, free_depth)
        runs = []
        for engine in (Engine(model, river, native=False, max_backbone_depth=D), Engine(capped_model, river)):
            assert len(engine.backbone) == D
            cache = model.new_cache(S)
            steps = [engine.forward(tokens[None, :n_prompt], 0, cache, "river", policy, all_logits=True)]
            steps += [engine.forward(tokens[None, t:t + 1], t, cache, "river", policy) for t in range(n_prompt, S)]
            assert [d for _, d in steps] == [depth] * (1 + n_steps)
            assert (cache.writer[D:, :S] == Writer.RIVER).all(), "a layer past the cap written by the backbone"
            np.testing.assert_array_equal(cache.writer, expected_writer([depth] * S, L))
            assert (cache.write_count == 1).all()
            assert engine.generate(tokens[:n_prompt].tolist(), 3, "river", policy).backbone_blocks == [depth] * 3
            runs.append((torch.cat([logits for logits, _ in steps], dim=1), cache))
        (logits, cache), (logits_b, cache_b) = runs
        assert torch.equal(logits, logits_b) and torch.equal(cache.k, cache_b.k) and torch.equal(cache.v, cache_b.v)
        ref_logits, ref_kv, _ = reference_forward(model, tokens, river, [depth - 1] * S)
        assert_close_bf16(logits[0], ref_logits)
        for layer, (k, v) in enumerate(ref_kv):
            assert_close_bf16(cache.k[layer, 0].transpose(0, 1), k)
            assert_close_bf16(cache.v[layer, 0].transpose(0, 1), v)


def test_capped_engines_refuse_what_they_cannot_run(tmp_path):
    """Each a ValueError naming the problem: a cap deeper than the blocks held, a cap with no river for the blocks
    past it, the whole-backbone mode on a capped engine, a depth out of range (engine, model, loaders)."""
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    two = holding_first_blocks(model, 2)
    with pytest.raises(ValueError, match="max_backbone_depth 3: the model holds only its first 2 blocks"):
        Engine(two, river, max_backbone_depth=3)
    for engine in (lambda: Engine(two), lambda: Engine(model, max_backbone_depth=2)):
        with pytest.raises(ValueError, match="a backbone of 2 of the model's 4 blocks needs an ExitRiver"):
            engine()
    for capped in (Engine(model, river, max_backbone_depth=2), Engine(two, river)):
        with pytest.raises(ValueError, match="mode 'backbone' runs every block; this engine's backbone stops after "
                                             "2 of 4"):
            capped.generate([1, 2], 2, "backbone")
        with pytest.raises(ValueError, match="mode 'backbone' runs every block"):
            capped.forward(torch.tensor([[1]]), 0, model.new_cache(1), "backbone")
    for bad in (-1, 5, True, 2.0, "2"):
        with pytest.raises(ValueError, match=re.escape(f"max_backbone_depth must be an int in [0, 4] (the model's "
                                                       f"blocks), got {bad!r}")):
            Engine(model, river, max_backbone_depth=bad)
        with pytest.raises(ValueError, match=r"max_backbone_depth must be an int in \[0, 4\]"):
            Transformer(cfg, backbone_depth=bad)
    with pytest.raises(ValueError, match="the full-depth forward needs all 4 blocks; this model holds the first 2"):
        two(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="a river copies every one of the model's 4 blocks"):
        ExitRiver(two, 4, 32)
    folder = write_checkpoint(cfg, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"max_backbone_depth must be an int in \[0, 4\] \(the model's blocks\), "
                                         "got 5"):
        load_model(folder, backbone_depth=5)
    with pytest.raises(ValueError, match=r"max_backbone_depth must be an int in \[0, 4\] \(the model's blocks\), "
                                         "got -1"):
        load_river(folder, backbone_depth=-1, group_size=32)


# A checkpoint deep enough to cap: four blocks, every width a multiple of 64 (River's default groups) and of 16 (the
# native kernels), the bundled tokenizer.
DEEP = LlamaConfig(vocab_size=1, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                   max_seq_len=512, tie_embeddings=True)


def write_checkpoint(cfg, folder, seed=0):
    """A tiny random model written as an HF-format folder by the exporter, with the bundled tokenizer (the config's
    vocabulary set to the tokenizer's). Returns the folder."""
    _, tokenizer = load_weights.load_config_and_tokenizer()
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.get_vocab_size())
    model = tiny_model(cfg, seed)
    shapes, tensors = load_weights.hf_tensor_shapes(cfg), {}
    for ours, names in load_weights.hf_tensor_names(cfg).items():
        tensors.update(zip(names, model.state_dict()[ours].split([shapes[n][0] for n in names])))
    load_weights.save_hf_folder(cfg, tensors, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    return write_checkpoint(DEEP, tmp_path_factory.mktemp("deep") / "ckpt")


def block_tensors(layer):
    """The HF tensor names of one block."""
    return [name for name in load_weights.hf_tensor_shapes(DEEP) if name.startswith(f"model.layers.{layer}.")]


@pytest.fixture
def reads(monkeypatch):
    """A Counter of the HF tensors read from any checkpoint (Checkpoint.read) while the test runs."""
    counted = collections.Counter()
    read = load_weights.Checkpoint.read

    def counting(self, names, device, dtype):
        counted.update(names)
        return read(self, names, device, dtype)
    monkeypatch.setattr(load_weights.Checkpoint, "read", counting)
    return counted


@pytest.fixture
def streams(monkeypatch):
    """Every block stream a load opens (load_weights.stream_blocks), in order: per stream, a weak reference to each
    block it handed out, and how many of the blocks it handed out before were still held anywhere at that moment."""
    opened = []
    stream_blocks = load_weights.stream_blocks

    def tracked(checkpoint, cfg, layers, device, dtype):
        stream = types.SimpleNamespace(blocks=[], held_before=[])
        opened.append(stream)
        for block in stream_blocks(checkpoint, cfg, layers, device, dtype):
            gc.collect()
            stream.held_before.append(sum(ref() is not None for ref in stream.blocks))
            stream.blocks.append(weakref.ref(block))
            yield block
    monkeypatch.setattr(load_weights, "stream_blocks", tracked)
    return opened


def parameter_count(cfg, depth):
    """Parameters of the embedding (the head tied to it), final norm and the first `depth` blocks, by hand."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    block = 2 * d + d * (q + 2 * kv) + q * d + d * 2 * f + f * d
    return cfg.vocab_size * d + d + depth * block


def assert_holds_first_blocks(model, depth):
    """The model holds blocks 0..depth-1 and nothing of a deeper one: no parameter or state of it, and exactly the
    bytes of its first blocks in bf16."""
    assert [block.layer for block in model.blocks] == list(range(depth))
    names = set(dict(model.named_parameters())) | set(model.state_dict())
    assert {int(name.split(".")[1]) for name in names if name.startswith("blocks.")} == set(range(depth))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == 2 * parameter_count(model.cfg, depth)
    assert list(model.buffers()) == []


@pytest.mark.parametrize("depth", [0, 1, 3, 4])
def test_blocks_past_the_depth_are_never_resident(deep_checkpoint, depth, reads, streams):
    """load_model and load_river with backbone_depth=D hold blocks 0..D-1 only. load_model never reads a deeper
    block; load_river reads each deeper block once, for its river copy, and drops it at once: when a block is handed
    out, at most the one before it (the copy being made of it) is still held, and none is once the load returns."""
    model, _ = load_model(deep_checkpoint, dtype=torch.bfloat16, backbone_depth=depth)
    assert_holds_first_blocks(model, depth)
    assert reads == collections.Counter(["model.embed_tokens.weight", "model.norm.weight"]
                                        + [n for layer in range(depth) for n in block_tensors(layer)])
    assert [[ref() for ref in stream.blocks] for stream in streams] == [list(model.blocks)]
    reads.clear(), streams.clear()
    del model
    model, river, _ = load_river(deep_checkpoint, backbone_depth=depth)
    assert_holds_first_blocks(model, depth)
    assert reads == collections.Counter(["model.embed_tokens.weight", "model.norm.weight"]
                                        + [n for layer in range(DEEP.n_layers) for n in block_tensors(layer)]
                                        + [n for layer in range(depth) for n in block_tensors(layer)])
    *_, copied, kept = streams  # the blocks read for the river, then those kept
    assert max(copied.held_before) <= 1, "blocks read for their river copies were held past the next one"
    gc.collect()
    assert [ref() for ref in copied.blocks] == [None] * DEEP.n_layers, "a block read for its river copy is still held"
    assert [ref() for ref in kept.blocks] == list(model.blocks)
    assert [block.layer for block in river.blocks] == list(range(DEEP.n_layers))
    assert not any(isinstance(m, nn.Linear) for m in river.modules()), "a full-precision matrix in the river"


def test_load_blocks_reads_each_block_only_when_asked(deep_checkpoint, reads):
    """load_blocks is a generator: opening it reads no weight, and each block is read when it is asked for, the
    blocks after it not yet; its blocks are the whole model's."""
    whole, _ = load_model(deep_checkpoint, dtype=torch.bfloat16)
    reads.clear()
    stream = load_weights.load_blocks(deep_checkpoint, None, "cpu", torch.bfloat16)
    assert inspect.isgenerator(stream) and not reads
    for layer in range(DEEP.n_layers):
        block = next(stream)
        assert block.layer == layer
        assert reads == collections.Counter(n for l in range(layer + 1) for n in block_tensors(l))
        assert block.state_dict().keys() == whole.blocks[layer].state_dict().keys()
        assert all(torch.equal(v, whole.blocks[layer].state_dict()[k]) for k, v in block.state_dict().items())
    with pytest.raises(StopIteration):
        next(stream)
    reads.clear()
    assert [block.layer for block in load_weights.load_blocks(deep_checkpoint, [2], "cpu", torch.bfloat16)] == [2]
    assert reads == collections.Counter(block_tensors(2))


def run_steps(engine, tokens, n_prompt, policy):
    """Prefill, then one decode step per later token: (each step's logits and depth, the cache)."""
    cache = engine.model.new_cache(len(tokens))
    steps = [engine.forward(torch.tensor([tokens[:n_prompt]]), 0, cache, "river", policy, all_logits=True)]
    steps += [engine.forward(torch.tensor([[tokens[t]]]), t, cache, "river", policy)
              for t in range(n_prompt, len(tokens))]
    return steps, cache


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_a_river_loaded_with_d_blocks_is_bit_equal_to_the_whole_model_capped_at_d(deep_checkpoint, depth):
    """load_river(backbone_depth=D) against the whole model loaded with load_model and its ExitRiver capped at run
    time: the same river weights, and on the torch path and the native one alike the same logits, depths, K/V and
    record, bit for bit, and the same generated tokens. At D = the layer count, also Engine(max_backbone_depth=None),
    today's River."""
    model, river, _ = load_river(deep_checkpoint, backbone_depth=depth)
    whole, _ = load_model(deep_checkpoint, dtype=torch.bfloat16)
    whole_river = ExitRiver(whole, 4, 64, eight_bit_layers=default_eight_bit_layers(4, "int16", depth, DEEP.n_layers))
    a, b = river.state_dict(), whole_river.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(depth)).tolist()
    for native in (False, None):
        engines = [Engine(model, river, native=native), Engine(whole, whole_river, native=native,
                                                               max_backbone_depth=depth)]
        if depth == DEEP.n_layers:
            engines.append(Engine(whole, whole_river, native=native))
        assert len({e.path for e in engines}) == 1 and all(len(e.backbone) == depth for e in engines)
        for policy in (SimilarityExit(2.0), FixedExit(1), SimilarityExit(0.3)):
            (steps, cache), *others = [run_steps(e, tokens, 5, policy) for e in engines]
            assert max(d for _, d in steps) <= depth
            for other_steps, other_cache in others:
                assert [d for _, d in other_steps] == [d for _, d in steps]
                assert all(torch.equal(x, y) for (x, _), (y, _) in zip(other_steps, steps))
                assert torch.equal(other_cache.k, cache.k) and torch.equal(other_cache.v, cache.v)
                assert (other_cache.writer == cache.writer).all()
            runs = [e.generate(tokens[:5], 4, "river", policy) for e in engines]
            assert all(r.tokens == runs[0].tokens and r.backbone_blocks == runs[0].backbone_blocks for r in runs)


# ------------------------------------------------------------------------------------------- calibration

class WordTokenizer:
    """Encodes "w7 w8 ..." as [7, 8, ...] and records every text it was given."""

    def __init__(self):
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        return types.SimpleNamespace(ids=[int(word[1:]) for word in text.split()])


class ScoredProblem:
    """A scored problem: reading it fails the test."""

    def __iter__(self):
        raise AssertionError("the calibration split read a scored problem")

    __getitem__ = __len__ = __str__ = __iter__


class Problems(list):
    """HumanEval's problems as a list that records every index and slice asked of it."""

    def __init__(self, items):
        super().__init__(items)
        self.asked = []

    def __getitem__(self, key):
        self.asked.append(key)
        return super().__getitem__(key)

    def __iter__(self):
        self.asked.append(slice(None))
        return super().__iter__()

    def read(self):
        """Indices of every problem read."""
        every = range(len(self))
        return sorted({i for key in self.asked for i in (every[key] if isinstance(key, slice) else [every[key]])})


@pytest.mark.parametrize("n, scored", [(1, None), (3, None), (2, 5), (12, 12)])
def test_the_calibration_split_never_reads_a_scored_problem(n, scored, monkeypatch):
    """calibration_sequences(n, scored=S) reads problems S..S+n-1 (S default n) and nothing else: the scored ones
    would fail the test if read, and each problem's prompt and solution are encoded as its context and target."""
    skip = n if scored is None else scored
    problem = lambda i: (f"w{2 * i}", " ".join(f"w{j}" for j in range(1000 * i, 1000 * i + 20)))  # noqa: E731
    problems = Problems([ScoredProblem() for _ in range(skip)] + [problem(i) for i in range(skip, 40)])
    monkeypatch.setattr(calibrate, "humaneval_problems", lambda: problems)
    tokenizer = WordTokenizer()
    sequences = calibrate.calibration_sequences(tokenizer, n, 16, scored=scored)
    assert problems.read() == list(range(skip, skip + n))
    assert sorted(tokenizer.texts) == sorted(text for i in range(skip, skip + n) for text in problem(i))
    assert sequences == [([2 * i], list(range(1000 * i, 1000 * i + 16))) for i in range(skip, skip + n)]


@pytest.mark.parametrize("n, scored, max_target", [(1, None, 8), (3, None, 16), (2, 5, 4)])
def test_calibration_text_windows_are_disjoint_from_the_scored_ones(n, scored, max_target, tmp_path):
    """With --text, the scored split is the text's first n windows (32 tokens of context, up to max_target of
    target) and the calibration split the n windows after the `scored` ones: no token of one is in the other."""
    skip = n if scored is None else scored
    window = 32 + max_target
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in range((skip + n + 1) * window)), encoding="utf-8")
    scored_split = calibrate.quality_sequences(WordTokenizer(), skip, max_target, text)
    held_out = calibrate.calibration_sequences(WordTokenizer(), n, max_target, text, scored=scored)
    def by_hand(k):  # window k: its 32 context tokens, then max_target of target
        return list(range(k * window, k * window + 32)), list(range(k * window + 32, (k + 1) * window))
    assert scored_split == [by_hand(k) for k in range(skip)]
    assert held_out == [by_hand(k) for k in range(skip, skip + n)]
    tokens = lambda split: {i for context, target in split for i in context + target}  # noqa: E731
    assert not tokens(scored_split) & tokens(held_out)


def nll_by_hand(model, sequences):
    """Mean NLL per target token of the backbone: one causal forward over context and target, no cache."""
    losses = []
    with torch.no_grad():
        for context, target in sequences:
            logits = model(torch.tensor([context + target]))[0, len(context) - 1:-1]
            losses += F.cross_entropy(logits.float(), torch.tensor(target), reduction="none").tolist()
    return sum(losses) / len(losses)


def fastest_within(calibration, budget):
    """The picked tau by hand: among the taus whose increase is within the budget, those with the fewest mean
    backbone blocks; of those, the one with the smallest increase. None when no tau is within."""
    within = [t for t, increase in calibration.nll_increase.items() if increase <= budget]
    if not within:
        return None
    fewest = min(calibration.mean_backbone_blocks[t] for t in within)
    fastest = [t for t in within if calibration.mean_backbone_blocks[t] == fewest]
    return min(fastest, key=lambda t: calibration.nll_increase[t])


def test_calibrate_tau_picks_the_fastest_tau_within_the_budget():
    """calibrate_tau on a tiny model: the backbone NLL is the one computed by hand, tau above 1 costs nothing and
    runs every block, tau -1 leaves after the first block; the pick is the fastest tau within the budget, for a
    budget that admits all, one that admits some, and one below every increase (None)."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
    model, river = tiny_river(cfg, 2, 4)
    engine = Engine(model, river, native=False)
    g = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(0, 64, (c,), generator=g).tolist(), torch.randint(0, 64, (t,), generator=g).tolist())
                 for c, t in ((5, 6), (3, 8), (7, 2))]
    steps = sum(len(target) - 1 for _, target in sequences)
    taus = (2.0, 0.95, 0.8, 0.5, 0.0, -1.0)
    result = calibrate.calibrate_tau(engine, sequences, taus, 1e6)
    assert result.backbone_nll == pytest.approx(nll_by_hand(model, sequences), abs=1e-4)
    assert list(result.nll_increase) == list(taus) and all(len(result.depths[t]) == steps for t in taus)
    assert result.nll_increase[2.0] == 0.0 and result.depths[2.0] == [cfg.n_layers] * steps
    assert result.depths[-1.0] == [1] * steps
    for tau in taus:
        assert result.mean_backbone_blocks[tau] == pytest.approx(sum(result.depths[tau]) / steps)
        assert all(1 <= d <= cfg.n_layers for d in result.depths[tau])
    assert result.tau == fastest_within(result, 1e6) and result.mean_backbone_blocks[result.tau] == 1
    increases = sorted(set(result.nll_increase.values()))
    budget = (increases[0] + increases[1]) / 2 if increases[0] > 0 else max(increases[0] + 1e-3, 1e-3)
    again = calibrate.calibrate_tau(engine, sequences, taus, budget, backbone_nll=result.backbone_nll)
    assert again.nll_increase == result.nll_increase and again.tau == fastest_within(result, budget)
    assert again.tau is not None
    # the same runs, judged against a backbone 1 nat better: every increase near 1, a budget of 0.5 admits none
    assert all(abs(increase) < 0.5 for increase in result.nll_increase.values())
    none = calibrate.calibrate_tau(engine, sequences, taus, 0.5, backbone_nll=result.backbone_nll - 1)
    assert none.tau is None and all(none.nll_increase[t] > 0.5 for t in taus)


@PROPERTY
@given(results=st.dictionaries(st.floats(-1, 1), st.tuples(st.sampled_from([-0.2, 0.0, 0.05, 0.1, 0.3]),
                                                           st.sampled_from([1.0, 2.5, 4.0])), min_size=1, max_size=6),
       budget=st.sampled_from([1e-3, 0.05, 0.1, 0.2, 1.0]))
def test_the_picked_tau_is_within_the_budget_and_none_within_is_faster(results, budget):
    calibration = calibrate.Calibration(budget, 2.0, {t: inc for t, (inc, _) in results.items()},
                                        {t: blocks for t, (_, blocks) in results.items()})
    tau = calibration.pick()
    assert tau == calibration.tau
    within = [t for t, (inc, _) in results.items() if inc <= budget]
    if not within:
        assert tau is None
        return
    assert tau in within
    for other in within:  # none within is faster, nor as fast with a smaller increase
        assert results[tau][1] < results[other][1] or (results[tau][1] == results[other][1]
                                                        and results[tau][0] <= results[other][0])


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, 0, 0.0, -0.1, "0.1", None])
def test_a_quality_budget_is_a_finite_increase_above_zero(budget):
    with pytest.raises(ValueError, match="quality budget must be a finite NLL increase > 0"):
        calibrate.check_budget(budget)
    with pytest.raises(ValueError, match="quality budget must be"):  # before anything runs: no engine is needed
        calibrate.calibrate_tau(None, [], (0.9,), budget)



# ------------------------------------------------------------------------------------- the bundled model

@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load_model()
    return model, tokenizer


def greedy(model, tokenizer, text, n):
    return tokenizer.decode(Engine(model).generate(tokenizer.encode(text).ids, n, "backbone",
                                                   stop_ids=[2]).tokens)


def test_bundled_model_knows_the_capital_of_france(bundled):
    model, tokenizer = bundled
    ids = tokenizer.encode("The capital of France is").ids
    with torch.no_grad():
        next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Paris"
    reply = greedy(model, tokenizer, load_weights.chat_prompt("What is the capital of France?"), 20)
    assert "Paris" in reply


def test_stop_tokens_come_from_the_checkpoint(bundled):
    _, tokenizer = bundled
    assert load_weights.stop_token_ids(tokenizer) == [0, 2]  # <|endoftext|>, <|im_end|> (also its eos_token)


def test_bundled_tokenizer_keeps_chat_markers_whole(bundled):
    _, tokenizer = bundled
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[-1] == 2
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x + 12").ids) == "def f(x):\n    return x + 12"


def test_export_then_load_gives_the_same_logits(bundled, tmp_path):
    model, tokenizer = bundled
    subprocess.run([sys.executable, "load_weights.py", "--export", str(tmp_path / "hf")], check=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    exported, exported_tokenizer = load_model(tmp_path / "hf")
    ids = tokenizer.encode("def add(a, b):").ids
    assert exported_tokenizer.encode("def add(a, b):").ids == ids
    with torch.no_grad():
        assert torch.equal(exported(torch.tensor([ids])), model(torch.tensor([ids])))


def test_first_runs_at_once_both_get_the_model_and_abandoned_conversions_are_removed(tmp_path):
    """Two first runs race to convert the bundled model into an empty cache: both load it (the loser of the
    rename takes the winner's folder). The staging folders of conversions that died (their process gone, or
    older than any conversion takes) are removed by the next conversion; a live one is left alone."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    dead = tmp_path / f"{load_weights.STAGING_PREFIX}{host}-{ended.pid}-a1b2c3d4"
    old = tmp_path / f"{load_weights.STAGING_PREFIX}elsewhere-1-a1b2c3d4"
    live = tmp_path / f"{load_weights.STAGING_PREFIX}{host}-{os.getpid()}-a1b2c3d4"
    for staging in (dead, old, live):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half a model")
    hours_ago = time.time() - 2 * load_weights.ABANDONED_AFTER_S
    os.utime(old, (hours_ago, hours_ago))
    env = {**os.environ, kernels.CACHE_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"}  # one core each
    runs = [subprocess.Popen([sys.executable, "-c", "import load_weights; load_weights.load_model()"], env=env,
                             cwd=Path(__file__).parent, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate()[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([load_weights.BUNDLED_NAME, live.name])


def test_bundled_river_with_tau_above_one_equals_backbone_and_exits_early_below(bundled):
    model, tokenizer = bundled
    engine = Engine(model, ExitRiver(model, 4, 64))
    prompt = tokenizer.encode("def fibonacci(n):").ids
    backbone = engine.generate(prompt, 8, "backbone")
    assert engine.generate(prompt, 8, "river", SimilarityExit(1.1)).tokens == backbone.tokens
    early = engine.generate(prompt, 8, "river", SimilarityExit(0.9))
    assert max(early.backbone_blocks) < model.cfg.n_layers


def strict_json(text):
    """json.loads that refuses NaN and infinities, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def times_read_per_layer(reads):
    """{block: how many times each of its tensors was read} from a Counter of HF tensor names read."""
    per_layer = collections.defaultdict(set)
    for name, count in reads.items():
        if name.startswith("model.layers."):
            per_layer[int(name.split(".")[2])].add(count)
    return {layer: counts.pop() if len(counts) == 1 else counts for layer, counts in per_layer.items()}


def test_cli_json_output_is_strict_json(capsys, reads):
    """River capped at 3 blocks on the bundled model: no token runs a fourth, and blocks 3.. are read once (for their
    river copies) and never held; blocks 0..2 twice (their copies, then the blocks kept)."""
    river_main(["--prompt", "The capital of France is", "--max-new-tokens", "3", "--json", "--mode", "river",
                "--max-backbone-depth", "3"])
    out = strict_json(capsys.readouterr().out)
    assert len(out["tokens"]) == 3 and len(out["backbone_blocks"]) == 3 and max(out["backbone_blocks"]) <= 3
    assert {"text", "decode_tokens_per_s"} <= out.keys()
    assert out["max_backbone_depth"] == 3 and out["backbone_blocks_held"] == 3
    assert out["tau"] == DEFAULT_TAU and out["quality_budget"] is None and out["calibration"] is None
    assert times_read_per_layer(reads) == {layer: 2 if layer < 3 else 1 for layer in range(30)}
    river_main(["--prompt", "Hi", "--max-new-tokens", "1", "--json", "--mode", "backbone"])
    out = strict_json(capsys.readouterr().out)
    assert len(out["tokens"]) == 1 and out["decode_tokens_per_s"] is None, "no decode step, no rate"


@pytest.fixture
def weights_never_load(monkeypatch):
    """Loading any model's weights fails the test: the errors under test must come before."""
    def refuse(*args):
        raise AssertionError("model weights were loaded before the error")
    monkeypatch.setattr(load_weights, "load_hf_folder", refuse)


def assert_usage_error(raised, capsys, message):
    """argparse's exit: status 2, nothing on stdout, the usage and then one error line naming the argument."""
    assert raised.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert re.search(r": error: " + message, err.splitlines()[-1]), err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "argument --prompt: the prompt is empty"),
    (["--tau", "nan"], "argument --tau: tau must be a finite real number"),
    (["--tau", "inf"], "argument --tau: tau must be a finite real number"),
    (["--tau", "x"], "argument --tau: invalid float value: 'x'"),
    (["--temperature", "nan"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--top-p", "0"], r"argument --top-p: top_p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"argument --top-p: top_p must be in \(0, 1\]"),
    (["--top-p", "nan"], r"argument --top-p: top_p must be in \(0, 1\], got nan"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: max_new_tokens must be a positive int, got 0"),
    (["--max-new-tokens", "9000"], "argument --max-new-tokens: prompt of 1 tokens plus 9000 new tokens exceeds "
                                   "the model's context of 8192"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--bits", "3"], "argument --bits: invalid choice: 3"),
    (["--group-size", "40"], "argument --group-size: group_size must be a positive multiple of 32"),
    (["--group-size", "128"], "argument --group-size: group_size 128 does not divide the model's d_model 576"),
    (["--seed", str(2**64)], "argument --seed: seed must be None or an int"),
    (["--device", "tpu"], "argument --device: device 'tpu' is not supported; use cpu or cuda"),
    pytest.param(["--device", "cuda"], "argument --device: device cuda was asked for, but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the error when CUDA is absent")),
    (["--max-backbone-depth", "31"], r"argument --max-backbone-depth: max_backbone_depth must be an int in \[0, 30\] "
                                     r"\(the model's blocks\), got 31"),
    (["--max-backbone-depth", "-1"], r"argument --max-backbone-depth: max_backbone_depth must be an int in \[0, 30\]"),
    (["--max-backbone-depth", "2.5"], "argument --max-backbone-depth: invalid int value: '2.5'"),
    (["--max-backbone-depth", "3", "--mode", "backbone"],
     r"argument --max-backbone-depth: caps River's backbone \(--mode river\); --mode backbone runs every backbone "
     "block"),
    (["--quality-budget", "nan"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "inf"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "0"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget=-0.1"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "x"], "argument --quality-budget: invalid float value: 'x'"),
    (["--quality-budget", "0.1", "--tau", "0.9"], "argument --tau: not allowed with argument --quality-budget"),
    (["--tau", "0.9", "--quality-budget", "0.1"], "argument --quality-budget: not allowed with argument --tau"),
    (["--quality-budget", "0.1", "--mode", "quantized"], r"argument --quality-budget: picks River's tau \(--mode "
                                                         r"river\); --mode quantized has none"),
])
def test_cli_bad_argument_is_a_usage_error_before_any_weight_loads(argv, message, capsys, weights_never_load):
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x"] + argv)
    assert_usage_error(raised, capsys, message)


@pytest.mark.parametrize("argv, held, read_twice", [
    (["--mode", "river", "--max-backbone-depth", "2"], 2, {0, 1}),
    (["--mode", "river", "--max-backbone-depth", "0"], 0, set()),
    (["--mode", "river"], 4, {0, 1, 2, 3}),
    (["--mode", "quantized"], 0, set()),
    (["--mode", "quantized", "--max-backbone-depth", "3"], 0, set()),
    (["--mode", "backbone"], 4, set()),
])
def test_cli_loads_only_the_blocks_its_mode_runs(deep_checkpoint, argv, held, read_twice, capsys, reads):
    """Each mode holds what it runs and nothing more: River its first D backbone blocks (default all), the quantized
    mode none (with or without a cap); River and the quantized mode read every block once for its river copy, and
    again only the backbone blocks they keep; the backbone reads each block once."""
    river_main(["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "3", "--json"] + argv)
    out = strict_json(capsys.readouterr().out)
    assert out["backbone_blocks_held"] == held
    assert max(out["backbone_blocks"]) <= (0 if "quantized" in argv else held)
    assert times_read_per_layer(reads) == {layer: 2 if layer in read_twice else 1 for layer in range(DEEP.n_layers)}


@pytest.fixture
def small_calibration(monkeypatch):
    """--quality-budget on a split of two problems with targets of 6 tokens (the wiring, in seconds), recording each
    call of calibration_sequences and the backbone depth of the engine calibrate_tau ran on."""
    monkeypatch.setattr(calibrate, "CALIBRATION_PROBLEMS", 2)
    monkeypatch.setattr(calibrate, "CALIBRATION_MAX_TARGET", 6)
    calls = types.SimpleNamespace(sequences=[], engine_depths=[])
    calibration_sequences, calibrate_tau = calibrate.calibration_sequences, calibrate.calibrate_tau

    def recorded_sequences(*args, **kwargs):
        calls.sequences.append((args[1:], kwargs))
        return calibration_sequences(*args, **kwargs)

    def recorded_tau(engine, *args, **kwargs):
        calls.engine_depths.append(len(engine.backbone))
        return calibrate_tau(engine, *args, **kwargs)
    monkeypatch.setattr(calibrate, "calibration_sequences", recorded_sequences)
    monkeypatch.setattr(calibrate, "calibrate_tau", recorded_tau)
    return calls


def test_cli_quality_budget_picks_tau_on_the_calibration_split(deep_checkpoint, small_calibration, capsys):
    """--quality-budget on a tiny checkpoint: tau calibrated on the split after the scored problems with the whole
    backbone loaded, the fastest tau within the budget by the reported per-tau results, the cap applied to the run
    after it; strict JSON with the budget, the tau and every tau's results; the tau named on stderr."""
    budget = 0.007  # on this checkpoint, between the increases of the two taus that exit early
    river_main(["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "3", "--json",
                "--quality-budget", str(budget), "--max-backbone-depth", "2", "--eight-bit-layers", "-1"])
    captured = capsys.readouterr()
    out = strict_json(captured.out)
    assert [args for args, _ in small_calibration.sequences] == [(2, 6, None, 2)]
    assert small_calibration.engine_depths == [DEEP.n_layers], "calibrated on a capped backbone"
    calibration = out["calibration"]
    assert out["quality_budget"] == budget and out["backbone_blocks_held"] == DEEP.n_layers
    assert list(calibration["nll_increase"]) == list(calibration["mean_backbone_blocks"]) == [
        str(tau) for tau in calibrate.CALIBRATION_TAUS]
    by_hand = types.SimpleNamespace(nll_increase={float(t): v for t, v in calibration["nll_increase"].items()},
                                    mean_backbone_blocks={float(t): v for t, v in
                                                          calibration["mean_backbone_blocks"].items()})
    assert out["tau"] == calibration["tau"] == fastest_within(by_hand, budget)
    assert out["tau"] is not None and max(calibration["nll_increase"].values()) > budget
    assert max(out["backbone_blocks"]) <= 2
    assert f"quality budget {budget:g}: tau {out['tau']:g} " in captured.err


def test_cli_quality_budget_no_tau_meets_is_a_one_line_error(deep_checkpoint, small_calibration, monkeypatch, capsys):
    """Every tau costing more than the budget (River's NLL raised by a nat): a one-line error, exit status 1,
    nothing on stdout, after the per-tau results on stderr."""
    mean_nll = calibrate.mean_nll
    monkeypatch.setattr(calibrate, "mean_nll", lambda engine, mode, policy, sequences: (
        lambda nll, depths: (nll + (mode == "river"), depths))(*mean_nll(engine, mode, policy, sequences)))
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x", "--model", str(deep_checkpoint), "--quality-budget", "0.5", "--json"])
    assert raised.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert re.fullmatch(r"error: no tau of 0.5 0.8 .* 0.99 meets the quality budget 0.5: the smallest NLL increase "
                        r"on the calibration split is \+\d\.\d{4} \(tau [\d.]+\)", err.splitlines()[-1]), err
    assert len(err.splitlines()) == 1 + len(calibrate.CALIBRATION_TAUS)


# ------------------------------------------------------------------------------------ bad checkpoints

@pytest.fixture
def small_checkpoint(tmp_path):
    """A tiny HF-format folder written by the exporter, for corrupting one piece at a time."""
    cfg = LlamaConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                      tie_embeddings=True)
    model = tiny_model(cfg, 0)
    _, tokenizer = load_weights.load_config_and_tokenizer()
    tensors = {}
    for ours, names in load_weights.hf_tensor_names(cfg).items():
        rows = [load_weights.hf_tensor_shapes(cfg)[n][0] for n in names]
        tensors.update(zip(names, model.state_dict()[ours].split(rows)))
    cfg.vocab_size = tokenizer.get_vocab_size()  # the tokenizer must fit the vocabulary
    tensors["model.embed_tokens.weight"] = torch.randn(cfg.vocab_size, 16)
    load_weights.save_hf_folder(cfg, tensors, tokenizer, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_small_checkpoint_loads(small_checkpoint):
    model, _ = load_model(small_checkpoint)
    assert model.cfg.n_layers == 1


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder_and_files(small_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (small_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_model(small_checkpoint)


def test_missing_weights_file(small_checkpoint):
    (small_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(small_checkpoint)


def test_missing_config(small_checkpoint):
    (small_checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(small_checkpoint)


def test_truncated_weights(small_checkpoint):
    path = small_checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(small_checkpoint)


def test_missing_tensor_and_wrong_shape_are_named(small_checkpoint):
    path = small_checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(9, 16)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(9, 16\), "
                                         r"config.json implies \(8, 16\)"):
        load_model(small_checkpoint)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.k_proj.weight is missing"):
        load_model(small_checkpoint)


def truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def reshape_a_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(9, 16)
    save_file(tensors, folder / "model.safetensors")


def drop_a_config_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (shutil.rmtree, r"model folder \S+ckpt does not exist"),
    (lambda folder: (folder / "model.safetensors").unlink(), r"weights file \S+model.safetensors is missing"),
    (truncate_weights, r"weights file \S+model.safetensors is truncated or corrupt"),
    (reshape_a_tensor, r"tensor model.layers.0.self_attn.k_proj.weight has shape \(9, 16\), config.json implies"),
    (lambda folder: (folder / "config.json").write_text("{"), r"config.json is not valid JSON"),
    (drop_a_config_field, r"config.json lacks the field hidden_size"),
    (lambda folder: (folder / "tokenizer.json").write_text('{"x'), r"tokenizer file \S+ is corrupt"),
], ids=["no folder", "no weights", "truncated", "wrong shape", "config not JSON", "config field", "tokenizer"])
def test_cli_bad_checkpoint_is_a_one_line_error(small_checkpoint, damage, message, capsys):
    damage(small_checkpoint)
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x", "--model", str(small_checkpoint), "--mode", "backbone"])
    assert raised.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err


def test_cli_errors_in_a_real_process_end_without_a_traceback(small_checkpoint):
    truncate_weights(small_checkpoint)
    for argv, status in ((["river.py", "--prompt", "x", "--tau", "nan"], 2),
                         (["river.py", "--prompt", "x", "--model", str(small_checkpoint), "--mode", "backbone"], 1),
                         (["bench.py", "--threads", "0"], 2)):
        run = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=Path(__file__).parent)
        assert run.returncode == status and run.stdout == "", (argv, run.stderr)
        assert "Traceback" not in run.stderr and run.stderr.splitlines()[-1].startswith(
            (f"{argv[0]}: error: argument ", "error: weights file ")), run.stderr


def test_other_architectures_are_refused(small_checkpoint):
    edit_config(small_checkpoint, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="only Llama-style decoders"):
        load_model(small_checkpoint)


def test_tokenizer_larger_than_vocabulary_is_refused(small_checkpoint):
    edit_config(small_checkpoint, vocab_size=1000)
    with pytest.raises(ValueError, match="the tokenizer does not belong to this model"):
        load_model(small_checkpoint)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=3, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="LlamaConfig.n_layers must be a positive int"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=0, n_heads=2, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                    rope_scaling={"rope_type": "yarn"})


def test_kernel_shape_limits_are_clear_errors():
    with pytest.raises(ValueError, match="out_features 40 to be a multiple of 16"):
        QuantizedLinear(quantize_weight(torch.randn(40, 64), 4, 32), "cpu", "bf16")
    with pytest.raises(ValueError, match="8-bit weights take int16 activations"):
        QuantizedLinear(quantize_weight(torch.randn(16, 64), 8, 32), "cpu", "bf16")
    packed = kernels.pack_lowbit(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(40, 2), torch.zeros(40, 2), 4)
    with pytest.raises(ValueError, match="blocks of 16"):  # packs (for the torch path), but the kernels refuse it
        kernels.matrix((packed, 40, 64, 32, 4), [])


def test_quant_arguments_checked_up_front():
    check_quant_args(8, 64)
    with pytest.raises(ValueError, match="activations must be one of"):
        check_quant_args(4, 64, "int8")
    with pytest.raises(ValueError):
        check_quant_args(4, 33)
    cfg = LlamaConfig(vocab_size=40, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=96)
    with pytest.raises(ValueError, match="group_size 64 does not divide the model's ffn_dim 96"):
        ExitRiver(tiny_model(cfg, 0), 4, 64)


def test_a_cuda_device_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="device 'cuda:1' does not exist: torch sees 1 CUDA GPU"):
        load_weights.resolve_device("cuda:1")


# ------------------------------------------------------------------------------------------ native kernels

ISAS_HERE = kernels.usable_isas()
each_isa_here = pytest.mark.parametrize("isa", ISAS_HERE or [
    pytest.param(None, marks=pytest.mark.skip(reason="this CPU runs none of the native kernels' instruction sets"))])

# (out_features, in_features): the bundled model's products, Llama-3.2-1B's, and small ones with odd group counts.
PRODUCT_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (3072, 2048), (2048, 2048), (16384, 2048),
                  (2048, 8192), (48, 96), (16, 224)]


def native_product(lib, weight, x):
    """y = W x through kernels.cpp for a bf16 weight or a low-bit (codes, scale, low, bits) tuple."""
    keep = []
    if not isinstance(weight, torch.Tensor):
        codes, scale, low, bits = weight
        N, K = codes.shape
        weight = (kernels.pack_lowbit(codes, scale, low, bits), N, K, K // scale.shape[1], bits)
    mat = kernels.matrix(weight, keep)
    y = torch.empty(mat.n)
    lib.product(ctypes.byref(mat), x.contiguous().data_ptr(), y.data_ptr(), 2)
    return y


@each_isa_here
@pytest.mark.parametrize("bits", [4, 8])
def test_native_lowbit_product_equals_its_twin_and_the_dequantized_matmul(isa, bits):
    lib = kernels.native(isa)
    assert lib is not None and lib.isa == isa
    g = torch.Generator().manual_seed(bits)
    for N, K in PRODUCT_SHAPES:
        group = 64 if K % 64 == 0 else 32
        codes = torch.randint(0, 2 ** bits, (N, K), generator=g).to(torch.uint8)
        scale = (torch.rand(N, K // group, generator=g) * 0.3 / 2 ** bits).half().float()
        low = (-scale * 2 ** (bits - 1) * (1 + 0.1 * torch.randn(N, K // group, generator=g))).half().float()
        x = torch.randn(K, generator=g) * 3
        x[::97] *= 40  # a few outliers, as real activations have
        y = native_product(lib, (codes, scale, low, bits), x)
        qw = QuantizedWeight(codes.int(), scale, low, bits, group)
        twin = QuantizedLinear(qw, "cpu", "int16")(x[None])[0]
        torch.testing.assert_close(y, twin, rtol=1e-5, atol=1e-5 * twin.abs().max().item())
        w = dequantized_fp16(qw)
        assert ((y - w @ x).abs() <= int16_bound(x[None], w, group)[0]).all(), (N, K)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(bits=st.sampled_from([4, 8]), n=st.integers(1, 40), groups=st.integers(1, 3), group=st.sampled_from([32, 64]))
def test_unpacking_the_kernels_layout_gives_back_every_code_scale_and_low(bits, n, groups, group):
    """QuantizedLinear holds its weight only in kernels.cpp's packed layout; the torch path unpacks it: the round
    trip must be exact for every row count (a last block of 16 rows part empty), group size and bit width."""
    g = torch.Generator().manual_seed(n * groups + bits)
    codes = torch.randint(0, 2 ** bits, (n, groups * group), generator=g).to(torch.uint8)
    scale, low = torch.rand(n, groups, generator=g), torch.randn(n, groups, generator=g)
    packed = kernels.pack_lowbit(codes, scale, low, bits)
    assert packed.numel() == -(-n // 16) * 16 * groups * (group * bits // 8 + 4)  # codes at `bits`, two fp16 each
    got_codes, got_scale, got_low = kernels.unpack_lowbit(packed, n, groups * group, bits)
    assert torch.equal(got_codes, codes)
    assert torch.equal(got_scale, scale.half().float()) and torch.equal(got_low, low.half().float())


@each_isa_here
def test_native_bf16_product_is_the_fp32_matmul(isa):
    lib = kernels.native(isa)
    g = torch.Generator().manual_seed(0)
    for N, K in PRODUCT_SHAPES + [(49152, 576), (7, 100), (3, 16)]:  # the LM head; row and input tails
        w = torch.randn(N, K, generator=g).bfloat16()
        x = torch.randn(K, generator=g)
        expected = w.float() @ x
        torch.testing.assert_close(native_product(lib, w, x), expected, rtol=1e-5, atol=1e-5 * K ** 0.5)


@each_isa_here
@settings(max_examples=8, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 5),
       exits=st.lists(st.integers(-1, 4), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_native_decode_equals_the_torch_path_under_any_exit_schedule(isa, cfg, n_prompt, exits, seed):
    """bf16 tiny models: every decode step through kernels.cpp, backbone blocks up to the schedule's exit and
    river blocks (4-bit, the last 8-bit) after, against the same steps in plain torch: logits, K/V, the record."""
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river, native=isa), Engine(model, river, native=False)
    L = cfg.n_layers
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + len(exits)), generator=torch.Generator().manual_seed(seed))
    caches = [model.new_cache(tokens.shape[1]) for _ in range(2)]
    for engine, cache in zip((fast, plain), caches):
        engine.forward(tokens[:, :n_prompt], 0, cache, "backbone")
    for i, e in enumerate(exits):
        e = min(e, L - 1)
        mode, policy = ("quantized", None) if e < 0 else ("river", FixedExit(e))
        step = tokens[:, n_prompt + i:n_prompt + i + 1]
        (got, depth), (expected, expected_depth) = (engine.forward(step, n_prompt + i, cache, mode, policy)
                                                    for engine, cache in zip((fast, plain), caches))
        assert depth == expected_depth == e + 1
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    one_token_prefill = n_prompt == 1  # a one-token prompt is a one-token step: native too
    assert fast.native is not None and fast.native_steps == len(exits) + one_token_prefill and plain.native_steps == 0
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
    assert (caches[0].writer == caches[1].writer).all() and (caches[0].write_count == 1).all()


@each_isa_here
@settings(max_examples=8, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 4), pick=st.integers(0, 8),
       min_layer=st.integers(0, 2), seed=st.integers(0, 99))
def test_native_step_exits_where_the_similarity_rule_says(isa, cfg, n_prompt, pick, min_layer, seed):
    """The native step applies the exit rule itself (no return to Python between blocks): its similarities are
    the torch path's s_l = cos(h_l, h_{l+1}), and it leaves after the first block whose s_l exceeds tau."""
    model = tiny_model(cfg, seed, torch.bfloat16)
    engine = Engine(model, ExitRiver(model, 4, 32), native=isa)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + 1), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(n_prompt + 1)
    engine.forward(tokens[:, :n_prompt], 0, cache, "backbone")
    # the states a full backbone step passes through, in plain torch, on a copy of the cache
    reference = model.new_cache(n_prompt + 1)
    reference.k.copy_(cache.k), reference.v.copy_(cache.v)
    pos = model.positions(n_prompt, 1, reference, torch.float32)
    h, sims = model.embed_tokens(tokens[:, n_prompt:]).float(), []
    with torch.inference_mode():
        for block in model.blocks:
            h_next = block(h, pos, reference)
            sims.append(transition_similarity(h, h_next).item())
            h = h_next
    candidates = sorted(sims[min_layer:-1]) or [0.0]
    tau = (candidates[pick % len(candidates)] + candidates[min(pick % len(candidates) + 1, len(candidates) - 1)]) / 2
    tau = tau if pick < 8 else 1.5
    if any(abs(s - tau) < 1e-4 for s in sims):
        return  # a similarity on the threshold itself may round either way
    expected = next((l + 1 for l, s in enumerate(sims[:-1]) if l >= min_layer and s > tau), cfg.n_layers)
    got = torch.full((cfg.n_layers,), float("nan"))
    rule = engine.native.exit_rule("river", SimilarityExit(tau, min_layer))
    _, depth = engine.native.forward(tokens[:, n_prompt:], n_prompt, cache, rule, similarity=got)
    assert depth == expected
    checked = min(depth, cfg.n_layers - 1)
    torch.testing.assert_close(got[:checked], torch.tensor(sims[:checked]), rtol=0, atol=1e-4)


@each_isa_here
@settings(max_examples=6, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 4), layer=st.integers(0, 4), seed=st.integers(0, 99))
def test_a_replayed_exit_leaves_at_its_depth_and_still_computes_the_similarity(isa, cfg, n_prompt, layer, seed):
    """Replay (bench.py --shape): the step leaves after the block it is given, native and torch alike, and the native
    step still computes s_l after every backbone block it runs -- the similarities the rule itself sees -- and none
    after."""
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32)
    fast, plain = Engine(model, river, native=isa), Engine(model, river, native=False)
    L, layer = cfg.n_layers, min(layer, cfg.n_layers - 1)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + 1), generator=torch.Generator().manual_seed(seed))
    caches = [model.new_cache(n_prompt + 1) for _ in range(3)]
    for engine, cache in zip((fast, fast, plain), caches):
        engine.forward(tokens[:, :n_prompt], 0, cache, "backbone")
    step = tokens[:, n_prompt:]
    replayed, by_rule = torch.full((L,), float("nan")), torch.full((L,), float("nan"))
    _, depth = fast.native.forward(step, n_prompt, caches[0], fast.native.exit_rule("river", ReplayedExit(layer)),
                                   similarity=replayed)
    fast.native.forward(step, n_prompt, caches[1], fast.native.exit_rule("river", SimilarityExit(1.5)),
                        similarity=by_rule)  # tau > 1: every block runs, every s_l computed
    assert depth == layer + 1 == plain.forward(step, n_prompt, caches[2], "river", ReplayedExit(layer))[1]
    torch.testing.assert_close(replayed[:depth], by_rule[:depth], rtol=0, atol=1e-6)
    assert replayed[depth:].isnan().all()


@each_isa_here
@settings(max_examples=8, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 4), n_steps=st.integers(1, 4),
       seed=st.integers(0, 99), data=st.data())
def test_a_capped_native_step_never_runs_block_d_or_deeper(isa, cfg, n_prompt, n_steps, seed, data):
    """The native step with the backbone capped at D (kernels' Model.backbone_blocks): under a rule that never exits,
    one that exits after a drawn block and the similarity rule at tau -1 (exits after the first block), every step
    stops at min(D, the rule's depth), exactly where the torch path stops, with its logits and K/V, and layers D..
    are written by the river alone."""
    L = cfg.n_layers
    D = data.draw(st.integers(0, L), label="D")
    early = data.draw(st.integers(0, L - 1), label="early exit after block")
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    S = n_prompt + n_steps
    tokens = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(seed))
    for policy, free_depth in ((SimilarityExit(2.0), L), (FixedExit(early), early + 1),
                               (SimilarityExit(-1.0), min(1, L))):
        depth = min(D, free_depth)
        fast = Engine(model, river, native=isa, max_backbone_depth=D)
        plain = Engine(model, river, native=False, max_backbone_depth=D)
        caches = [model.new_cache(S) for _ in range(2)]
        for engine, cache in zip((fast, plain), caches):
            assert engine.forward(tokens[:, :n_prompt], 0, cache, "river", policy)[1] == depth
        for t in range(n_prompt, S):
            (got, got_depth), (expected, expected_depth) = (engine.forward(tokens[:, t:t + 1], t, cache, "river",
                                                                           policy)
                                                            for engine, cache in zip((fast, plain), caches))
            assert got_depth == expected_depth == depth
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
        assert fast.native_steps == n_steps + (n_prompt == 1) and plain.native_steps == 0
        for cache in caches:
            assert (cache.writer[D:] == Writer.RIVER).all(), "a layer past the cap written by the backbone"
            np.testing.assert_array_equal(cache.writer, expected_writer([depth] * S, L))
            assert (cache.write_count == 1).all()
        for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_native_decode_equals_the_torch_path_on_the_bundled_model():
    """Teacher-forced over two HumanEval prompts, River at the default tau: logits within bf16 resolution of the
    same arithmetic in plain torch at every position, and the same exit depth at >= 99% of positions."""
    if not ISAS_HERE:
        pytest.skip("this CPU runs none of the native kernels' instruction sets")
    model, tokenizer = load_model(dtype=torch.bfloat16)
    river = ExitRiver(model, 4, 64, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river), Engine(model, river, native=False)
    assert fast.native is not None
    policy = SimilarityExit(DEFAULT_TAU)
    depths, worst = [], 0.0
    for prompt, solution in calibrate.humaneval_problems()[:2]:
        context, target = tokenizer.encode(prompt).ids, tokenizer.encode(solution).ids[:24]
        (got, got_depths, _), (expected, expected_depths, _) = (
            calibrate.teacher_forced(e, "river", policy, context, target) for e in (fast, plain))
        # bf16 resolution: one unit in the last place of a bf16 number as large as the position's largest logit
        ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().amax(-1))) - 7)
        worst = max(worst, ((got - expected).abs().amax(-1) / ulp).max().item())
        depths += [a == b for a, b in zip(got_depths, expected_depths)]
    assert fast.native_steps == len(depths) and worst <= 1, worst
    assert sum(depths) >= 0.99 * len(depths)


def test_a_failed_build_falls_back_to_torch_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "ISAS", {isa: (set(), ["-mno-such-flag"]) for isa in kernels.ISAS})
    monkeypatch.setattr(kernels, "_loaded", {})
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, head_dim=16)
    model = tiny_model(cfg, 0, torch.bfloat16)
    river = ExitRiver(model, 4, 32)
    engine = Engine(model, river)
    assert engine.native is None
    assert "could not build the native" in capsys.readouterr().err
    assert len(engine.generate([1, 2, 3], 4, "river", SimilarityExit(0.5)).tokens) == 4
    assert engine.native_steps == 0
    with pytest.raises(ValueError, match="native decode was asked for but cannot run"):
        Engine(model, river, native=True)
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        kernels.native("sse9")


def test_every_instruction_set_compiles_and_each_usable_one_loads_from_its_own_folder(tmp_path):
    """The AVX-512 source must compile on a Zen 3 too (it cannot run there), and a cache folder shared between a
    Zen 4 and a Zen 3 never hands one machine the other's build."""
    for isa in kernels.ISAS:
        assert kernels.compile_object(isa, tmp_path / f"{isa}.o").stat().st_size > 0
    for isa in ISAS_HERE:
        assert f"{os.sep}kernels{os.sep}{isa}-" in kernels.native(isa).path


# ---------------------------------------------------------------------------------- CUDA (skipped on CPU)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (4, 128), (8, 64)])
def test_cuda_kernels_equal_dequantized_matmul(bits, group_size):
    g = torch.Generator().manual_seed(bits + group_size)
    w = torch.randn(192, 512, generator=g)
    qw = quantize_weight(w, bits, group_size)
    x = torch.randn(3, 512, generator=g).bfloat16()
    expected = x.float() @ qw.dequantize().t()
    got = QuantizedLinear(qw, "cuda")(x.cuda()).float().cpu()
    assert_close_bf16(got, expected)


@cuda_only
def test_cuda_engine_matches_cpu_engine():
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(cfg, 0).to(device=device, dtype=torch.bfloat16)
        engine = Engine(model, ExitRiver(model, 4, 32))
        for mode, policy in (("backbone", None), ("quantized", None), ("river", FixedExit(0))):
            logits, _ = engine.forward(tokens.to(device), 0, model.new_cache(9), mode, policy, all_logits=True)
            results[device, mode] = logits.float().cpu()
    for mode in ("backbone", "quantized", "river"):
        assert_close_bf16(results["cuda", mode], results["cpu", mode])


# ------------------------------------------------------------------- the KV strategies River argues against

def run_schedule(engine, mode, tokens, n_prompt, exits, before_step=lambda cache: None):
    """Prefill then decode, token t exiting after block exits[t] (capped by what the strategy allows)."""
    cache = engine.model.new_cache(len(tokens))
    before_step(cache)
    steps = [engine.forward(tokens[None, :n_prompt], 0, cache, mode, FixedExit(exits[0]), all_logits=True)]
    for i, e in enumerate(exits[1:]):
        before_step(cache)
        steps.append(engine.forward(tokens[None, n_prompt + i:n_prompt + i + 1], n_prompt + i, cache, mode,
                                    FixedExit(e)))
    return cache, steps


def strategy_case(cfg, n_prompt, exits, seed):
    """A tiny model, the drawn exits clamped to its depth, and tokens for the prompt and every decode step."""
    exits = [min(e, cfg.n_layers - 1) for e in exits]
    tokens = torch.randint(0, cfg.vocab_size, (n_prompt + len(exits) - 1,),
                           generator=torch.Generator().manual_seed(seed))
    return tiny_model(cfg, seed), exits, tokens


strategy_schedules = dict(cfg=tiny_configs(), n_prompt=st.integers(1, 5),
                          exits=st.lists(st.integers(0, 3), min_size=1, max_size=6), seed=st.integers(0, 99))


@pytest.mark.parametrize("mode", STRATEGIES)
def test_strategies_without_exits_are_exactly_the_backbone(mode):
    cfg = LlamaConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=32)
    model = tiny_model(cfg, 3)
    prompt = list(range(1, 7))
    backbone = Engine(model).generate(prompt, 6, "backbone")
    engine = BaselineEngine(model)
    for policy in (NeverExit(), SimilarityExit(1.01)):
        assert engine.generate(prompt, 6, mode, policy).tokens == backbone.tokens
    cache_a, cache_b = model.new_cache(6), model.new_cache(6)
    logits_a, _ = Engine(model).forward(torch.tensor([prompt]), 0, cache_a, "backbone", all_logits=True)
    logits_b, _ = engine.forward(torch.tensor([prompt]), 0, cache_b, mode, NeverExit(), all_logits=True)
    assert torch.equal(logits_a, logits_b) and torch.equal(cache_a.k, cache_b.k)


@PROPERTY
@given(**strategy_schedules)
def test_recomputation_leaves_the_backbone_cache(cfg, n_prompt, exits, seed):
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)
    engine = BaselineEngine(model)
    cache, _ = run_schedule(engine, "recompute", tokens, n_prompt, exits)
    engine.strategies["recompute"].flush(cache)
    backbone_cache = model.new_cache(len(tokens))
    model(tokens[None], 0, backbone_cache)
    assert cache.holes(len(tokens)) == [] and (cache.write_count[:, :len(tokens)] == 1).all()
    torch.testing.assert_close(cache.k, backbone_cache.k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.v, backbone_cache.v, rtol=1e-4, atol=1e-4)


@PROPERTY
@given(**strategy_schedules)
def test_masking_never_reads_an_empty_slot(cfg, n_prompt, exits, seed):
    """Poison every empty slot with huge values before each step: outputs that do not move never read them."""
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)

    def poison(cache):
        layers, positions = np.nonzero(cache.writer == Writer.EMPTY)
        cache.k[layers, :, :, positions] = 1e4
        cache.v[layers, :, :, positions] = 1e4
    _, clean = run_schedule(BaselineEngine(model), "mask", tokens, n_prompt, exits)
    cache, dirty = run_schedule(BaselineEngine(model), "mask", tokens, n_prompt, exits, before_step=poison)
    for (a, _), (b, _) in zip(clean, dirty):
        torch.testing.assert_close(a, b)
    expected_holes = sum(cfg.n_layers - 1 - e for e in exits[1:]) + n_prompt * (cfg.n_layers - 1 - exits[0])
    assert len(cache.holes(len(tokens))) == expected_holes


@PROPERTY
@given(**strategy_schedules)
def test_propagation_fills_every_slot(cfg, n_prompt, exits, seed):
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)
    cache, _ = run_schedule(BaselineEngine(model), "propagate", tokens, n_prompt, exits)
    S = len(tokens)
    assert cache.holes(S) == [] and (cache.write_count[:, :S] == 1).all()
    last = [exits[0]] * n_prompt + exits[1:]
    expected = np.array([[Writer.BACKBONE if layer <= e else Writer.PROPAGATED for e in last]
                         for layer in range(cfg.n_layers)])
    np.testing.assert_array_equal(cache.writer[:, :S], expected)


@PROPERTY
@given(**strategy_schedules)
def test_monotonic_exit_never_deepens_and_reads_no_hole(cfg, n_prompt, exits, seed):
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)
    cache, steps = run_schedule(BaselineEngine(model), "monotonic", tokens, n_prompt, exits)
    depths = [d for _, d in steps]
    assert all(b <= a for a, b in zip(depths, depths[1:])), "exit depth rose along the sequence"
    assert depths == [min(e + 1 for e in exits[:i + 1]) for i in range(len(exits))]
    for t, depth in enumerate([depths[0]] * n_prompt + depths[1:]):  # every layer a token ran was readable
        assert (cache.writer[:depth, :t + 1] != Writer.EMPTY).all()


def test_unknown_strategy_is_refused():
    cfg = LlamaConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8)
    with pytest.raises(ValueError, match="strategy must be one of"):
        BaselineEngine(tiny_model(cfg, 0)).generate([1], 2, "skip")


def test_strategies_command_line_runs_a_strategy(capsys):
    kv_strategies.main(["--prompt", "Hi", "--max-new-tokens", "2", "--json", "--mode", "mask"])
    out = strict_json(capsys.readouterr().out)
    assert out["mode"] == "mask" and len(out["tokens"]) == 2 and out["path"] == "torch, eager"


# ------------------------------------------------------------------------------------------------ the seams

def test_imports_flow_one_way():
    """No module of the project imports one that imports it back, not even inside a function: river.py's command
    line once imported kv_strategies, which is built on river."""
    here = Path(__file__).parent
    modules = {path.stem for path in here.glob("*.py")}
    imports = {}
    for name in modules:
        imported = set()
        for node in ast.walk(ast.parse((here / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        imports[name] = imported & modules
    list(graphlib.TopologicalSorter(imports).static_order())  # raises CycleError, naming the cycle
    assert "river" in imports["kv_strategies"]  # so the strategies sit on River's engine, not under it


def test_compiled_decode_steps_equal_eager():
    """Compiling (used by bench.py) changes speed, not results: same tokens; logits and K/V within fp32 noise
    for the backbone, within bf16 rounding where river kernels round their activations to bf16."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = tiny_model(cfg, 5)
    river = ExitRiver(model, 4, 32)
    prompt = list(range(3, 10))

    def run(engine):
        tokens = {mode: engine.generate(prompt, 5, mode, FixedExit(0)).tokens for mode in MODES}
        logits, caches = {}, {}
        for mode in MODES:
            caches[mode] = cache = model.new_cache(8)
            engine.forward(torch.tensor([prompt]), 0, cache, mode, FixedExit(0))
            logits[mode] = engine.forward(torch.tensor([[11]]), 7, cache, mode, FixedExit(0))[0]
        return tokens, logits, caches
    eager_tokens, eager_logits, eager_caches = run(Engine(model, river))
    engine = Engine(model, river, compile=True)
    compiled_tokens, compiled_logits, compiled_caches = run(engine)
    assert engine.model.blocks[0].compiled_step is not None and engine.river.blocks[0].compiled_step is not None
    assert engine.model.compiled_logits is not None
    assert compiled_tokens == eager_tokens
    for mode in MODES:
        tol = 1e-4 if mode == "backbone" else 1e-2
        torch.testing.assert_close(compiled_logits[mode], eager_logits[mode], rtol=tol, atol=tol)
        torch.testing.assert_close(compiled_caches[mode].k, eager_caches[mode].k, rtol=tol, atol=tol)
        torch.testing.assert_close(compiled_caches[mode].v, eager_caches[mode].v, rtol=tol, atol=tol)


def test_a_compiled_engine_leaves_the_shared_model_eager(monkeypatch):
    """Compiling runs on copies that share the weights: an eager engine on the same model and river, built before
    a compiled one, still runs every block and the head eagerly."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = tiny_model(cfg, 5)
    river = ExitRiver(model, 4, 32)
    eager = Engine(model, river, native=False)
    compiled = Engine(model, river, compile=True, native=False)
    assert compiled.model.blocks[0].compiled_step is not None and compiled.river.blocks[0].compiled_step is not None
    assert compiled.model.blocks[0].attn.wqkv.weight is model.blocks[0].attn.wqkv.weight
    assert compiled.river.blocks[1].mlp is river.blocks[1].mlp
    assert eager.model is model and eager.river is river and eager.path == "torch, eager"
    eager_calls = []

    def counted(function):  # the eager path looks these up at each call; compiled code does not call them
        def run(*args):
            eager_calls.append(function.__qualname__)
            return function(*args)
        return run
    monkeypatch.setattr(Block, "step", counted(Block.step))
    monkeypatch.setattr(Transformer, "logits", counted(Transformer.logits))
    cache = model.new_cache(4)
    eager.forward(torch.tensor([[1, 2, 3]]), 0, cache, "river", FixedExit(0))
    eager_calls.clear()
    eager.forward(torch.tensor([[4]]), 3, cache, "river", FixedExit(0))  # one token: where compiled code would run
    assert eager_calls == ["Block.step"] * cfg.n_layers + ["Transformer.logits"]


def test_compiled_one_row_linear_is_the_matmul():
    """Linear's compiled one-row path (a multiply and a sum) against an fp32 matmul, in bf16 and fp32; more
    rows keep F.linear."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        layer = Linear(96, 80).to(dtype)
        compiled = torch.compile(layer.forward, dynamic=True)
        for rows in (1, 3):
            x = torch.randn(1, rows, 96, dtype=dtype)
            y = compiled(x)
            assert y.shape == (1, rows, 80) and y.dtype == dtype
            torch.testing.assert_close(y.float(), x.float() @ layer.weight.float().t(), rtol=tol, atol=tol)


def test_compiled_one_token_attention_is_masked_softmax():
    """attend's compiled one-token path against a naive masked softmax, holes in the mask included."""
    torch.manual_seed(0)
    compiled = torch.compile(attend, dynamic=True)
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    mask = torch.rand(3, 9) < 0.6
    mask[:, 0] = True                                        # every query row sees at least one key
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(compiled(q, k, v, mask, True), torch.softmax(scores, -1) @ v)
