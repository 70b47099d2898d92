"""What more than one test file uses: the independent references (a naive decoder written from the equations, the exit
rule applied by hand to its similarities), tiny models, hypothesis settings, checkpoints and fixtures."""
import collections
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings, strategies as st

import river_native
import load_weights
from kv_cache import Writer
from load_weights import load_model
from model import LlamaConfig, Transformer
from river import DEFAULT_EIGHT_BIT_LAYERS, DEFAULT_HEAD_BITS, ExitRiver

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------- independent reference

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


def expected_writer(depths_by_position, n_layers):
    """(n_layers, positions): BACKBONE where the position's token ran the backbone block, RIVER after."""
    return np.array([[Writer.BACKBONE if layer < d else Writer.RIVER for d in depths_by_position]
                     for layer in range(n_layers)])


def fastest_within(calibration, budget):
    """The picked tau by hand: among the taus whose increase is within the budget, those with the fewest mean
    backbone blocks; of those, the one with the smallest increase. None when no tau is within."""
    within = [t for t, increase in calibration.nll_increase.items() if increase <= budget]
    if not within:
        return None
    fewest = min(calibration.mean_backbone_blocks[t] for t in within)
    fastest = [t for t in within if calibration.mean_backbone_blocks[t] == fewest]
    return min(fastest, key=lambda t: calibration.nll_increase[t])


# -------------------------------------------------------------------------------------------------- tiny models

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


def tiny_river(cfg, seed, bits):
    model = tiny_model(cfg, seed)
    return model, ExitRiver(model, bits, 32)


def shipped_tiny_river(cfg, seed, dtype=torch.bfloat16):
    """A tiny model and its river as river.py and bench.py build one by default, in groups of 32: 4-bit copies rounded
    with GPTQ (here on random token sequences), the last block 8-bit, an 8-bit LM head."""
    model = tiny_model(cfg, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    sequences = tuple(tuple(torch.randint(0, cfg.vocab_size, (12,), generator=g).tolist()) for _ in range(3))
    return model, ExitRiver(model, 4, 32, eight_bit_layers=DEFAULT_EIGHT_BIT_LAYERS, head_bits=DEFAULT_HEAD_BITS,
                            calibration=sequences)


def holding_first_blocks(model, depth):
    """A Transformer built to hold only blocks 0..depth-1 (what load_model(held=depth) builds), with `model`'s
    weights: strict loading, so it has no parameter of a deeper block."""
    capped = Transformer(model.cfg, held=depth)
    names = capped.state_dict().keys()
    capped.load_state_dict({name: value for name, value in model.state_dict().items() if name in names})
    return capped.to(model.dtype).eval()


def copy_of(cache, model):
    """A fresh cache holding what `cache` holds, K/V and record."""
    copy = model.new_cache(cache.capacity)
    copy.k.copy_(cache.k), copy.v.copy_(cache.v)
    copy.writer[:], copy.write_count[:] = cache.writer, cache.write_count
    return copy


def count_native_steps(engine):
    """A list that gets one entry per decode step `engine` runs natively (a spy on its native decoder's forward);
    stays empty for an engine without one."""
    steps = []
    if engine.native is not None:
        forward = engine.native.forward

        def counted(*args, **kwargs):
            steps.append(args[1])  # the step's position
            return forward(*args, **kwargs)
        engine.native.forward = counted
    return steps


# -------------------------------------------------------------------------------------------------- checkpoints

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


@pytest.fixture(scope="session")
def deep_checkpoint(tmp_path_factory):
    return write_checkpoint(DEEP, tmp_path_factory.mktemp("deep") / "ckpt")


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


@pytest.fixture(scope="session")
def bundled():
    """The bundled model in fp32 and its tokenizer, loaded once for every test file."""
    model, tokenizer = load_model()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ command lines

def strict_json(text):
    """json.loads that refuses NaN and infinities, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


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


# ----------------------------------------------------------------------------------------------- native kernels

ISAS_HERE = river_native.usable_isas()


each_isa_here = pytest.mark.parametrize("isa", ISAS_HERE or [
    pytest.param(None, marks=pytest.mark.skip(reason="this CPU runs none of the native kernels' instruction sets"))])
