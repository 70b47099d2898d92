"""The river's weights and the kernels that run them: the quantizer, the torch products against dequantize-then-matmul,
the native CPU kernels against their torch twins, and (skipped without a GPU) the CUDA path."""
import ctypes
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import calibrate
import river_native
from conftest import (copy_of, ISAS_HERE, PROPERTY, assert_close_bf16, count_native_steps, depths_the_rule_allows,
                      each_isa_here, expected_writer, holding_first_blocks, step_similarities, tiny_configs,
                      tiny_model)
from exit_policy import NEVER, RIVER_ONLY, ExitRule, after, similarity, transition_similarity
from kv_cache import Writer
from load_weights import load_model
from model import LlamaConfig
from quantize import (QuantizedLinear, QuantizedWeight, check_quant_args, pack_lowbit, quantize_activations,
                      quantize_weight, unpack_lowbit)
from river import DEFAULT_TAU, Engine, ExitRiver


# ------------------------------------------------------------------------------------------------- quantization

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
    (4, 48, "group_size must be"), (4, 96, "does not divide in_features 64"), (8, 512, "at most 256"),
    (4, 4128, "at most 4096")])
def test_quantizer_rejects_bad_arguments(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(torch.randn(8, 64), bits, group_size)


def test_kernel_shape_limits_are_clear_errors():
    with pytest.raises(ValueError, match="out_features 40 to be a multiple of 16"):
        QuantizedLinear(quantize_weight(torch.randn(40, 64), 4, 32), "cpu", "bf16")
    with pytest.raises(ValueError, match="8-bit weights take int16 activations"):
        QuantizedLinear(quantize_weight(torch.randn(16, 64), 8, 32), "cpu", "bf16")
    packed = pack_lowbit(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(40, 2), torch.zeros(40, 2), 4)
    with pytest.raises(ValueError, match="blocks of 16"):  # packs (for the torch path), but the kernels refuse it
        river_native.matrix((packed, 40, 64, 32, 4), [])


def test_quant_arguments_checked_up_front():
    check_quant_args(8, 64)
    with pytest.raises(ValueError, match="activations must be one of"):
        check_quant_args(4, 64, "int8")
    with pytest.raises(ValueError):
        check_quant_args(4, 33)
    cfg = LlamaConfig(vocab_size=40, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=96)
    with pytest.raises(ValueError, match="group_size 64 does not divide the model's ffn_dim 96"):
        ExitRiver(tiny_model(cfg, 0), 4, 64)


# ----------------------------------------------------------------------------------------------- native kernels

# (out_features, in_features): the bundled model's products, Llama-3.2-1B's, and small ones with odd group counts.
PRODUCT_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (3072, 2048), (2048, 2048), (16384, 2048),
                  (2048, 8192), (48, 96), (16, 224)]


def native_product(lib, weight, x):
    """Y = X W^T through the native kernels for a bf16 weight or a low-bit (codes, scale, low, bits) tuple; x is one input
    (K,) or T of them (T, K)."""
    keep = []
    if not isinstance(weight, torch.Tensor):
        codes, scale, low, bits = weight
        N, K = codes.shape
        weight = (pack_lowbit(codes, scale, low, bits), N, K, K // scale.shape[1], bits)
    mat = river_native.matrix(weight, keep)
    T = 1 if x.dim() == 1 else x.shape[0]
    y = torch.empty((T, mat.n) if x.dim() > 1 else (mat.n,))
    lib.product(ctypes.byref(mat), x.contiguous().data_ptr(), T, y.data_ptr(), 2)
    return y


@each_isa_here
@pytest.mark.parametrize("bits", [4, 8])
def test_native_lowbit_product_equals_its_twin_and_the_dequantized_matmul(isa, bits):
    lib = river_native.native(isa)
    assert lib is not None and lib.isa == isa
    g = torch.Generator().manual_seed(bits)
    for N, K in PRODUCT_SHAPES:
        group = 64 if K % 64 == 0 else 32
        codes = torch.randint(0, 2 ** bits, (N, K), generator=g).to(torch.uint8)
        scale = (torch.rand(N, K // group, generator=g) * 0.3 / 2 ** bits).half().float()
        low = (-scale * 2 ** (bits - 1) * (1 + 0.1 * torch.randn(N, K // group, generator=g))).half().float()
        qw = QuantizedWeight(codes.int(), scale, low, bits, group)
        w = dequantized_fp16(qw)
        for T in (1, 5):  # one token, and a pass of several reading each weight once
            x = torch.randn(T, K, generator=g) * 3
            x[:, ::97] *= 40  # a few outliers, as real activations have
            y = native_product(lib, (codes, scale, low, bits), x)
            twin = QuantizedLinear(qw, "cpu", "int16")(x)
            # the same int16 codes; only the fp32 order of summing the groups' partial sums may differ
            assert ((y - twin).abs() <= 1e-5 * (x.abs() @ w.abs().T) + 1e-6).all(), (N, K, T)
            assert ((y - x @ w.T).abs() <= int16_bound(x, w, group)).all(), (N, K, T)


@each_isa_here
@pytest.mark.parametrize("bits", [4, 8])
def test_native_int16_activations_are_the_twins_bit_for_bit(isa, bits):
    """The kernels' int16 rounding of activations (each group's step and codes, prepared by the whole thread team)
    equals quantize.quantize_activations exactly: with one code of 1 per row (row r picks input r), a scale of 1 and a
    low of 0, row r's output is the single product code * step, rounded once, so any code or step off shows."""
    lib = river_native.native(isa)
    g = torch.Generator().manual_seed(7 + bits)
    for K, group in [(192, 64), (96, 32), (256, 128)]:
        codes = torch.eye(K, dtype=torch.uint8)
        scale, low = torch.ones(K, K // group), torch.zeros(K, K // group)
        for T in (1, 3, 5, 17):  # a step, short passes, a long one
            x = torch.randn(T, K, generator=g) * 3
            x[:, ::37] *= 50                              # outliers
            x[:, 5::41] = torch.round(x[:, 5::41] * 4) / 4  # values on a coarse grid: ties of the rounding
            x[0, :group] = 0                              # an all-zero group
            xq, step, _ = quantize_activations(x, group)
            expected = (xq * step[..., None]).flatten(1)
            assert torch.equal(native_product(lib, (codes, scale, low, bits), x), expected), (K, group, T)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(bits=st.sampled_from([4, 8]), n=st.integers(1, 40), groups=st.integers(1, 3), group=st.sampled_from([32, 64]))
def test_unpacking_the_kernels_layout_gives_back_every_code_scale_and_low(bits, n, groups, group):
    """QuantizedLinear holds its weight only in the packed layout the native kernels read; the torch path unpacks it: the round
    trip must be exact for every row count (a last block of 16 rows part empty), group size and bit width."""
    g = torch.Generator().manual_seed(n * groups + bits)
    codes = torch.randint(0, 2 ** bits, (n, groups * group), generator=g).to(torch.uint8)
    scale, low = torch.rand(n, groups, generator=g), torch.randn(n, groups, generator=g)
    packed = pack_lowbit(codes, scale, low, bits)
    assert packed.numel() == -(-n // 16) * 16 * groups * (group * bits // 8 + 4)  # codes at `bits`, two fp16 each
    got_codes, got_scale, got_low = unpack_lowbit(packed, n, groups * group, bits)
    assert torch.equal(got_codes, codes)
    assert torch.equal(got_scale, scale.half().float()) and torch.equal(got_low, low.half().float())


@each_isa_here
def test_native_bf16_product_is_the_fp32_matmul_of_bf16_inputs(isa):
    """The bf16 product rounds its activations to bf16 (vdpbf16ps takes bf16 pairs; the AVX2 path rounds the same
    way), then sums in fp32: against an fp32 matmul of the rounded inputs, one token and several, with row and input
    tails."""
    lib = river_native.native(isa)
    g = torch.Generator().manual_seed(0)
    for N, K in PRODUCT_SHAPES + [(49152, 576), (7, 100), (3, 16), (200, 64)]:  # the LM head; row and input tails
        w = torch.randn(N, K, generator=g).bfloat16()
        for T in (1, 3, 5, 16, 17, 30, 33):  # a step, short passes, long ones (tiles of 5 or 12 tokens, and the rest)
            x = torch.randn(T, K, generator=g)
            expected = x.bfloat16().float() @ w.float().T
            torch.testing.assert_close(native_product(lib, w, x), expected, rtol=1e-5, atol=1e-5 * K ** 0.5)


@each_isa_here
def test_the_softmax_weights_are_2_to_the_x_within_2e_7(isa):
    """Attention's weights are 2^(s - max) (its scores carry log2 e): within 2e-7 relative of float64's 2^x for x in
    [-125, 0], exactly 1 at the max, and a negligible 2^-125 (never a NaN) below, -inf included."""
    lib = river_native.native(isa)
    x = torch.cat([torch.linspace(-125, 0, 1 << 20), torch.tensor([0.0, -0.5, -1.0, -1e-30, -126, -1e4, -float("inf")]),
                   torch.zeros(9)])
    y = torch.empty_like(x)
    lib.exp2(x.data_ptr(), x.numel(), y.data_ptr())
    inside = x >= -125
    rel = (y[inside].double() / torch.exp2(x[inside].double()) - 1).abs()
    assert rel.max() < 2e-7, (rel.max().item(), x[inside][rel.argmax()].item())
    assert (y[x == 0] == 1).all() and (y[~inside] <= 2.0 ** -124).all() and (y[~inside] >= 0).all()


@each_isa_here
def test_a_tokens_bf16_product_is_the_same_bits_whatever_tokens_share_its_short_pass(isa):
    """Up to SHORT_PASS tokens, every bf16 sum runs in one order, whatever tile of rows and tokens holds it: each token
    of a pass of T tokens gets the bits a one-token product gives it (the verifier's logits equal one-token steps'
    because of this), with row and input tails. (A longer pass, a prefill, may sum in another order.)"""
    lib = river_native.native(isa)
    g = torch.Generator().manual_seed(1)
    for N, K in [(960, 576), (576, 1536), (7, 100), (4100, 64)]:
        w = torch.randn(N, K, generator=g).bfloat16()
        x = torch.randn(16, K, generator=g)
        alone = torch.cat([native_product(lib, w, x[t:t + 1]) for t in range(16)])
        for T in (2, 3, 4, 5, 7, 9, 16):
            assert torch.equal(native_product(lib, w, x[:T]), alone[:T]), (N, K, T)


@each_isa_here
@settings(max_examples=8, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 5),
       exits=st.lists(st.integers(-1, 4), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_native_decode_equals_the_torch_path_under_any_exit_schedule(isa, cfg, n_prompt, exits, seed):
    """bf16 tiny models: the prompt and every decode step through the native kernels, backbone blocks up to the schedule's
    exit and river blocks (4-bit, the last 8-bit) after, against the same passes in plain torch: logits (to bf16
    resolution: both round the activations of bf16 products to bf16, and an fp32 sum in another order can move one
    across a rounding boundary), K/V, the record."""
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river, native=isa), Engine(model, river, native=False)
    native_steps = count_native_steps(fast)
    L = cfg.n_layers
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + len(exits)), generator=torch.Generator().manual_seed(seed))
    caches = [model.new_cache(tokens.shape[1]) for _ in range(2)]
    for engine, cache in zip((fast, plain), caches):
        engine.forward(tokens[:, :n_prompt], 0, cache, NEVER)
    for i, e in enumerate(exits):
        e = min(e, L - 1)
        rule = RIVER_ONLY if e < 0 else after(e + 1)
        step = tokens[:, n_prompt + i:n_prompt + i + 1]
        (got, depth), (expected, expected_depth) = (engine.forward(step, n_prompt + i, cache, rule)
                                                    for engine, cache in zip((fast, plain), caches))
        assert depth == expected_depth == e + 1
        assert_close_bf16(got, expected)
    assert fast.native is not None and len(native_steps) == len(exits) + 1 and plain.native is None
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
    engine.forward(tokens[:, :n_prompt], 0, cache, NEVER)
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
    _, depth = engine.native.forward(tokens[:, n_prompt:], n_prompt, cache, similarity(tau, min_layer), similarity=got)
    assert depth == expected
    checked = min(depth, cfg.n_layers - 1)
    torch.testing.assert_close(got[:checked], torch.tensor(sims[:checked]), rtol=0, atol=1e-4)


@each_isa_here
@settings(max_examples=6, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 4), layer=st.integers(0, 4), seed=st.integers(0, 99))
def test_a_replayed_exit_leaves_at_its_depth_and_still_computes_the_similarity(isa, cfg, n_prompt, layer, seed):
    """Replay (bench.py --shape: ExitRule(tau above 1, max_depth d)): the step leaves after the block it is given,
    native and torch alike, and the native step still computes s_l after every backbone block it runs -- the
    similarities the rule itself sees -- and none after."""
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32)
    fast, plain = Engine(model, river, native=isa), Engine(model, river, native=False)
    L, layer = cfg.n_layers, min(layer, cfg.n_layers - 1)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + 1), generator=torch.Generator().manual_seed(seed))
    caches = [model.new_cache(n_prompt + 1) for _ in range(3)]
    for engine, cache in zip((fast, fast, plain), caches):
        engine.forward(tokens[:, :n_prompt], 0, cache, NEVER)
    step = tokens[:, n_prompt:]
    replay = ExitRule(tau=2.0, max_depth=layer + 1)
    replayed, by_rule = torch.full((L,), float("nan")), torch.full((L,), float("nan"))
    _, depth = fast.native.forward(step, n_prompt, caches[0], replay, similarity=replayed)
    fast.native.forward(step, n_prompt, caches[1], similarity(1.5),
                        similarity=by_rule)  # tau > 1: every block runs, every s_l computed
    assert depth == layer + 1 == plain.forward(step, n_prompt, caches[2], replay)[1]
    torch.testing.assert_close(replayed[:depth], by_rule[:depth], rtol=0, atol=1e-6)
    assert replayed[depth:].isnan().all()


@each_isa_here
@settings(max_examples=8, deadline=None, derandomize=True)
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 4), n_steps=st.integers(1, 4),
       seed=st.integers(0, 99), data=st.data())
def test_a_capped_native_step_never_runs_block_d_or_deeper(isa, cfg, n_prompt, n_steps, seed, data):
    """The native step of a model holding only its first D backbone blocks (river_native.Decoder holds no others), under a
    rule capped at D that never exits, one that exits after a drawn block and the similarity rule at tau -1 (exits
    after the first block): every step stops at min(D, the rule's depth), exactly where the torch path on the whole
    model under the same rule stops, with its logits and K/V, and layers D.. are written by the river alone."""
    L = cfg.n_layers
    D = data.draw(st.integers(0, L), label="D")
    early = data.draw(st.integers(0, L - 1), label="early exit after block")
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    S = n_prompt + n_steps
    tokens = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(seed))
    held = holding_first_blocks(model, D)
    for rule, free_depth in ((similarity(2.0), L), (after(early + 1), early + 1), (similarity(-1.0), min(1, L))):
        depth, rule = min(D, free_depth), rule.capped(D)
        fast = Engine(held, river, native=isa)
        plain = Engine(model, river, native=False)
        native_steps = count_native_steps(fast)
        caches = [model.new_cache(S) for _ in range(2)]
        for engine, cache in zip((fast, plain), caches):
            assert engine.forward(tokens[:, :n_prompt], 0, cache, rule)[1] == depth
        for t in range(n_prompt, S):
            (got, got_depth), (expected, expected_depth) = (engine.forward(tokens[:, t:t + 1], t, cache, rule)
                                                            for engine, cache in zip((fast, plain), caches))
            assert got_depth == expected_depth == depth
            assert_close_bf16(got, expected)
        assert len(fast.native.decoder.backbone.layers) == D and plain.native is None
        assert len(native_steps) == n_steps + 1  # the prompt prefills natively too
        for cache in caches:
            assert (cache.writer[D:] == Writer.RIVER).all(), "a layer past the cap written by the backbone"
            np.testing.assert_array_equal(cache.writer, expected_writer([depth] * S, L))
            assert (cache.write_count == 1).all()
        for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@each_isa_here
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_and_torch_steps_leave_where_each_kind_of_rule_says(isa, seed):
    """Every kind of ExitRule, through river_native.native_exit (where the C struct is filled) and through the torch path:
    NEVER, RIVER_ONLY, after(d) for every d (past the layer count too), the similarity rule with and without
    min_layer, capped, a replay (tau above 1 and a cap). A decode step leaves at the same depth on both paths, the one
    the rule gives when applied by hand to the reference decoder's similarities, with close logits and the record of
    that depth."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=16)
    L, n_prompt = cfg.n_layers, 4
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river, native=isa), Engine(model, river, native=False)
    native_steps = count_native_steps(fast)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + 1), generator=torch.Generator().manual_seed(seed))
    prefilled = model.new_cache(n_prompt + 1)
    plain.forward(tokens[:, :n_prompt], 0, prefilled, NEVER)
    # s_l of the step's token on the backbone path, from the reference decoder; taus in the middle of wide gaps
    sims = step_similarities(model, river, tokens, [L - 1] * n_prompt, n_prompt, n_prompt + 1)[:, 0, 0].tolist()
    levels = sorted(sims[:-1])
    taus = [(a + b) / 2 for a, b in zip(levels, levels[1:]) if b - a > 0.04] + [levels[0] - 0.05, -1.0, 1.5]
    by_hand = {}  # rule -> the depths it allows (a similarity within 1e-2 of tau may round either way)
    by_hand[NEVER], by_hand[RIVER_ONLY] = [L], [0]
    for d in range(L + 2):
        by_hand[after(d)] = [min(d, L)]
        by_hand[ExitRule(tau=2.0, max_depth=d)] = [min(d, L)]
    for tau in taus:
        for min_layer in (0, 2):
            allowed = depths_the_rule_allows(sims, tau, min_layer, margin=1e-2)
            by_hand[similarity(tau, min_layer)] = allowed
            for cap in (1, 3):
                by_hand[similarity(tau, min_layer).capped(cap)] = sorted({min(d, cap) for d in allowed})
    assert len({tuple(depths) for depths in by_hand.values()}) >= L, "the rules should leave at varied depths"
    for rule, allowed in by_hand.items():
        caches = [copy_of(prefilled, model) for _ in range(2)]
        (got, depth), (expected, expected_depth) = (engine.forward(tokens[:, n_prompt:], n_prompt, cache, rule)
                                                    for engine, cache in zip((fast, plain), caches))
        assert depth == expected_depth and depth in allowed, (rule, depth, expected_depth, allowed)
        assert_close_bf16(got, expected)
        for cache in caches:
            assert cache.writer[:, n_prompt].tolist() == [Writer.BACKBONE] * depth + [Writer.RIVER] * (L - depth)
            assert (cache.write_count[:, n_prompt] == 1).all()
    assert len(native_steps) == len(by_hand)


@each_isa_here
def test_the_native_decoder_refuses_a_rule_deeper_than_its_blocks(isa):
    """river_native.Decoder.step checks the rule against the blocks it holds before the C step could run past them (an
    engine's check_rule comes first; this is the native step's own guard): a decoder of a model holding 2 of 4
    blocks refuses a rule that may run 3 or all 4, a decoder without a river any rule that may leave the backbone;
    the cache is not written."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=16)
    model = tiny_model(cfg, 0, torch.bfloat16)
    river = ExitRiver(model, 4, 32)
    held, alone = Engine(holding_first_blocks(model, 2), river, native=isa), Engine(model, native=isa)
    assert held.native is not None and alone.native is not None
    cache = model.new_cache(2)
    for rule in (after(3), NEVER, similarity(0.5)):
        with pytest.raises(ValueError, match="the rule may run (3|4) backbone blocks; this decoder holds 2"):
            held.native.forward(torch.tensor([[1]]), 0, cache, rule)
    for rule in (similarity(0.5), after(2), RIVER_ONLY):
        with pytest.raises(ValueError, match="this decoder has no river"):
            alone.native.forward(torch.tensor([[1]]), 0, cache, rule)
    assert not cache.k.any() and (cache.writer == Writer.EMPTY).all()
    assert held.native.forward(torch.tensor([[1]]), 0, cache, after(2))[1] == 2


@each_isa_here
def test_a_native_pass_refuses_token_ids_outside_the_vocabulary(isa):
    """The kernel reads each id's row of the embedding: an id outside [0, vocab) is refused as the torch path refuses
    it, before anything runs (a step, or a prompt with one bad id among good ones), and the cache is not written;
    ids in another integer type or a strided view run as the same ids in int64."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=16)
    model = tiny_model(cfg, 0, torch.bfloat16)
    engine, plain = Engine(model, ExitRiver(model, 4, 32), native=isa), Engine(model, native=False)
    assert engine.native is not None
    cache = model.new_cache(8)
    for bad in ([[64]], [[-1]], [[2**40]], [[3, 1, 64, 1]], [[-5, 2]]):
        for e, rule in ((engine, NEVER), (engine, similarity(0.5)), (plain, NEVER)):
            with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
                e.forward(torch.tensor(bad), 0, cache, rule)
    assert not cache.k.any() and (cache.writer == Writer.EMPTY).all()
    logits = [engine.forward(ids, 0, model.new_cache(8), NEVER)[0] for ids in
              (torch.tensor([[3, 1, 4]]), torch.tensor([[3, 1, 4]], dtype=torch.int32),
               torch.tensor([[3, 9, 1, 9, 4]])[:, ::2])]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_native_decode_equals_the_torch_path_on_the_bundled_model():
    """Teacher-forced over two HumanEval prompts (each prefilled by one native pass), River at the default tau:
    logits within a few bf16 units of the same arithmetic in plain torch at every position, and the same exit depth
    at >= 99% of positions. Both paths round a bf16 product's activations to bf16; a sum taken in another order can
    move one across a rounding boundary, and 30 blocks and a bf16 cache carry such flips on (measured: 2.3 units)."""
    if not ISAS_HERE:
        pytest.skip("this CPU runs none of the native kernels' instruction sets")
    model, tokenizer = load_model(dtype=torch.bfloat16)
    river = ExitRiver(model, 4, 64, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river), Engine(model, river, native=False)
    assert fast.native is not None
    native_steps = count_native_steps(fast)
    rule = similarity(DEFAULT_TAU)
    depths, worst = [], 0.0
    for prompt, solution in calibrate.humaneval_problems()[:2]:
        context, target = tokenizer.encode(prompt).ids, tokenizer.encode(solution).ids[:24]
        (got, got_depths, _), (expected, expected_depths, _) = (
            calibrate.teacher_forced(e, rule, context, target) for e in (fast, plain))
        # bf16 resolution: one unit in the last place of a bf16 number as large as the position's largest logit
        ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().amax(-1))) - 7)
        worst = max(worst, ((got - expected).abs().amax(-1) / ulp).max().item())
        depths += [a == b for a, b in zip(got_depths, expected_depths)]
    assert len(native_steps) == len(depths) + 2 and worst <= 4, worst  # + the 2 prompts' passes
    assert sum(depths) >= 0.99 * len(depths)


def test_a_failed_build_falls_back_to_torch_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(river_native, "ISAS", {isa: (set(), ["-mno-such-flag"]) for isa in river_native.ISAS})
    monkeypatch.setattr(river_native, "_loaded", {})
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, head_dim=16)
    model = tiny_model(cfg, 0, torch.bfloat16)
    river = ExitRiver(model, 4, 32)
    engine = Engine(model, river)
    assert engine.native is None
    assert "could not build the native" in capsys.readouterr().err
    assert len(engine.generate([1, 2, 3], 4, similarity(0.5)).tokens) == 4
    assert engine.path == "torch, eager"
    with pytest.raises(ValueError, match="native decode was asked for but cannot run"):
        Engine(model, river, native=True)
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        river_native.native("sse9")


def test_every_instruction_set_compiles_and_each_usable_one_loads_from_its_own_folder(tmp_path):
    """The AVX-512 source must compile on a Zen 3 too (it cannot run there), and a cache folder shared between a
    Zen 4 and a Zen 3 never hands one machine the other's build."""
    for isa in river_native.ISAS:
        assert river_native.compile_object(isa, tmp_path / f"{isa}.o").stat().st_size > 0
    for isa in ISAS_HERE:
        assert f"{os.sep}kernels{os.sep}{isa}-" in river_native.native(isa).path


# ---------------------------------------------------------------------------------------- CUDA (skipped on CPU)

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
        for mode, rule in (("backbone", NEVER), ("quantized", RIVER_ONLY), ("river", after(1))):
            logits, _ = engine.forward(tokens.to(device), 0, model.new_cache(9), rule, all_logits=True)
            results[device, mode] = logits.float().cpu()
    for mode in ("backbone", "quantized", "river"):
        assert_close_bf16(results["cuda", mode], results["cpu", mode])


@each_isa_here
@pytest.mark.parametrize("head_bits", [4, 8])
def test_a_rivers_low_bit_head_runs_natively_as_its_twin_and_never_in_the_backbones_pass(isa, head_bits):
    """A river holding a low-bit LM head: every pass that left the backbone ends at it, native and torch alike (logits
    within bf16 resolution, and against the dequantized head within int16 rounding), one leaving after block L-2
    included; a pass that ran every backbone block, whatever its rule (NEVER, a fixed depth of L, a cap of L, a
    similarity rule whose tau is never reached), ends at the model's bf16 head, bit for bit what an engine without the
    river's head gives."""
    cfg = LlamaConfig(vocab_size=96, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=64)
    model = tiny_model(cfg, 3, torch.bfloat16)
    plain_river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,), head_bits=head_bits)
    assert river.head is not None and plain_river.head is None
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(head_bits))
    L = cfg.n_layers
    rules = (NEVER, RIVER_ONLY, after(1), after(L - 1), after(L), similarity(1.5).capped(L), similarity(1.5),
             similarity(0.5), similarity(-1.0))
    depths = {}
    for rule in rules:
        results = []
        for engine in (Engine(model, river, native=isa), Engine(model, river, native=False),
                       Engine(model, plain_river, native=isa), Engine(model, plain_river, native=False)):
            cache = model.new_cache(9)
            results.append(engine.forward(tokens, 0, cache, rule, all_logits=True))
        (fast, depth), (plain, plain_depth), (bf16_head, _), (plain_bf16_head, _) = results
        assert depth == plain_depth
        depths[rule] = depth
        assert_close_bf16(fast, plain)
        if depth == L:
            assert torch.equal(fast, bf16_head) and torch.equal(plain, plain_bf16_head)
        else:
            assert not torch.equal(fast, bf16_head)  # the river's head, not the model's
            # the same hidden states through the dequantized head: the difference is the head's quantization alone
            w = river.head.unpacked()
            dequantized = (w[0].float().view(cfg.vocab_size, -1, 32) * w[1][..., None] + w[2][..., None]).flatten(1)
            bf16_err = (bf16_head - fast).abs().max()
            assert bf16_err <= (model.lm_head.weight.float() - dequantized).abs().sum(-1).max() * 10
    assert depths[after(L - 1)] == L - 1 and depths[RIVER_ONLY] == 0
    assert {depths[rule] for rule in (NEVER, after(L), similarity(1.5).capped(L), similarity(1.5))} == {L}


def test_a_river_head_of_other_widths_is_refused():
    cfg = LlamaConfig(vocab_size=32, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=8)
    model = tiny_model(cfg, 0)
    for bad in (2, 3, 16, True, "8", 8.0):
        with pytest.raises(ValueError, match="head_bits must be 4 or 8"):
            ExitRiver(model, 4, 32, head_bits=bad)


def test_weights_move_to_huge_pages_once_and_keep_their_values():
    """on_huge_pages keeps each tensor object and its values, puts its data in one 2 MB-aligned mapping, never moves
    a tensor twice (native decoders keep raw pointers) and leaves small sets where they are."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, 64, generator=g).to(torch.bfloat16) for n in (5, 300, 17)]
    tensors.append(torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=g))
    values = [t.clone() for t in tensors]
    assert river_native.on_huge_pages(tensors, least=1 << 40) == 0  # below the threshold: nothing moves
    pointers = [t.data_ptr() for t in tensors]
    ids = [id(t) for t in tensors]
    moved = river_native.on_huge_pages(tensors + [tensors[0]], least=0)  # a tensor listed twice moves once
    if moved == 0:
        pytest.skip("this OS offers no MADV_HUGEPAGE")
    assert [id(t) for t in tensors] == ids and all(torch.equal(t, v) for t, v in zip(tensors, values))
    assert all(t.data_ptr() != p for t, p in zip(tensors, pointers)) and all(t.data_ptr() % 64 == 0 for t in tensors)
    assert tensors[0].data_ptr() % river_native.HUGE_PAGE == 0
    again = [t.data_ptr() for t in tensors]
    assert river_native.on_huge_pages(tensors, least=0) == 0 and [t.data_ptr() for t in tensors] == again
