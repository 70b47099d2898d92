"""The method's properties: cached decoding equals the full forward and a naive decoder; under any exit schedule the
cache has no hole, each slot written once by the path the schedule says; the exit rule fires where the similarities
computed by hand say; tau above 1 is the backbone bit for bit; a cap holds; compiling changes nothing; imports flow
one way."""
import ast
import dataclasses
import graphlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import calibrate
import river as river_module
from conftest import (ISAS_HERE, PROPERTY, assert_close_bf16, depths_the_rule_allows, expected_writer,
                      holding_first_blocks, reference_forward, shipped_tiny_river, step_similarities, tiny_configs,
                      tiny_model, tiny_river, write_checkpoint)
from exit_policy import NEVER, RIVER_ONLY, ExitRule, after, similarity, transition_similarity
from generation import greedy
from kv_cache import KVCache, Writer
from load_weights import load_config_and_tokenizer, load_model
from model import Block, Linear, LlamaConfig, Transformer, attend
from compiled import streamed_attention, streamed_product
from quantize import quantize_weight
from river import DEFAULT_HEAD_BITS, Engine, ExitRiver, load_river


# ---------------------------------------------------------------------------------------- decoder and the cache

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


# ---------------------------------------------------------------------------------------------------- the river

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
        rule = RIVER_ONLY if exit_after < 0 else after(exit_after + 1)
        logits, depth = engine.forward(chunk[None], start, cache, rule, all_logits=True)
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
    """The river as river.py ships it (GPTQ copies, the last block and the LM head 8-bit): tau above 1 generates the
    backbone's tokens, and its logits and K/V equal the backbone's bit for bit, prefill and decode steps, a batch
    too."""
    model, river = shipped_tiny_river(cfg, seed)
    assert river.head is not None and river.bits[-1] == 8
    engine = Engine(model, river)
    plain = Engine(model, None, native=engine.native.isa if engine.native else False)  # no river at all, same path
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist()
    backbone = plain.generate(prompt, n_new, NEVER)
    for rule in (similarity(tau), NEVER):
        river_run = engine.generate(prompt, n_new, rule)
        assert river_run.tokens == backbone.tokens
        assert river_run.depths == [cfg.n_layers] * len(backbone.tokens)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 5 + n_new), generator=g)
    runs = {}
    for mode, runner, rule in (("backbone", plain, NEVER), ("river", engine, similarity(tau))):
        cache = model.new_cache(5 + n_new, batch_size=batch)
        steps = [runner.forward(tokens[:, :5], 0, cache, rule, all_logits=True)]
        steps += [runner.forward(tokens[:, t:t + 1], t, cache, rule) for t in range(5, 5 + n_new)]
        runs[mode] = torch.cat([logits for logits, _ in steps], dim=1), [depth for _, depth in steps], cache
    (logits_a, depths_a, cache_a), (logits_b, depths_b, cache_b) = runs["backbone"], runs["river"]
    assert depths_a == depths_b == [cfg.n_layers] * (1 + n_new)
    assert torch.equal(logits_a, logits_b), "bit-equal logits"
    assert torch.equal(cache_a.k, cache_b.k) and torch.equal(cache_a.v, cache_b.v), "bit-equal K/V"
    assert (cache_b.writer == Writer.BACKBONE).all() and (cache_b.write_count == 1).all()


NO_EXIT_PATHS = [False, *ISAS_HERE]  # the torch path and every native instruction set this CPU runs


def never_leaving_rules(n_layers, tau):
    """Every kind of rule that runs all the blocks: NEVER, a similarity rule whose tau is never reached, a fixed depth
    of L, a cap of L on such a similarity rule."""
    return {"never": NEVER, "similarity": similarity(tau), "fixed depth L": after(n_layers),
            "capped at L": similarity(tau).capped(n_layers)}


def passes(engine, tokens, n_prompt, rule):
    """A prefill of the first n_prompt tokens (every position's logits), then one decode step per token after them:
    (logits (1, T, vocab), each pass's depth, the cache)."""
    cache = engine.model.new_cache(tokens.shape[1])
    steps = [engine.forward(tokens[:, :n_prompt], 0, cache, rule, all_logits=True)]
    steps += [engine.forward(tokens[:, t:t + 1], t, cache, rule) for t in range(n_prompt, tokens.shape[1])]
    return torch.cat([logits for logits, _ in steps], dim=1), [depth for _, depth in steps], cache


def assert_never_leaving_is_the_backbone(model, river, native, tokens, n_prompt, n_new, tau):
    """Each never-leaving rule on River's engine against an engine with no river at all (the backbone), on one path:
    logits, depths, K/V, writers and write counts bit for bit, and the greedy tokens; then a rule leaving after block
    L-2 ends at the river's head, not at the model's."""
    L = model.cfg.n_layers
    engine, backbone = Engine(model, river, native=native), Engine(model, None, native=native)
    assert engine.path == backbone.path == (f"native {native}" if native else "torch, eager")
    logits, depths, cache = passes(backbone, tokens, n_prompt, NEVER)
    prompt = tokens[0, :n_prompt].tolist()
    greedy_tokens = backbone.generate(prompt, n_new, NEVER).tokens
    for name, rule in never_leaving_rules(L, tau).items():
        got, got_depths, got_cache = passes(engine, tokens, n_prompt, rule)
        assert got_depths == depths == [L] * (1 + tokens.shape[1] - n_prompt), (native, name)
        assert torch.equal(got, logits), (native, name)
        assert torch.equal(got_cache.k, cache.k) and torch.equal(got_cache.v, cache.v), (native, name)
        assert (got_cache.writer == cache.writer).all() and (got_cache.write_count == cache.write_count).all()
        assert engine.generate(prompt, n_new, rule).tokens == greedy_tokens, (native, name)
    if L > 1:  # after block L-2: the river's last copy, then its head
        left, left_depths, _ = passes(engine, tokens, n_prompt, after(L - 1))
        head, river.head = river.head, None
        try:
            model_head, _, _ = passes(Engine(model, river, native=native), tokens, n_prompt, after(L - 1))
        finally:
            river.head = head
        assert left_depths == [L - 1] * (1 + tokens.shape[1] - n_prompt)
        assert not torch.equal(left, model_head), native


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), seed=st.integers(0, 99), n_prompt=st.integers(1, 20),
       n_steps=st.integers(1, 5), tau=st.floats(1, 1e6, exclude_min=True))
def test_the_shipped_river_that_never_leaves_is_the_backbone_bit_for_bit(cfg, seed, n_prompt, n_steps, tau):
    """The card's property in the configuration that ships (GPTQ copies, the last block and the LM head 8-bit), on the
    torch path and every native instruction set here: under each rule that runs every backbone block, a prefill and
    the decode steps after it give the backbone's logits, depths, K/V, writers and write counts bit for bit, and
    greedy generation its tokens; a rule that leaves after block L-2 ends at the river's head (the property is not
    bought by never using it)."""
    cfg = dataclasses.replace(cfg, vocab_size=-(-cfg.vocab_size // 16) * 16)  # the native low-bit head's rows
    model, river = shipped_tiny_river(cfg, seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + n_steps), generator=torch.Generator().manual_seed(seed))
    for native in NO_EXIT_PATHS:
        assert_never_leaving_is_the_backbone(model, river, native, tokens, n_prompt, n_steps, tau)


def test_the_bundled_river_as_river_py_loads_it_never_leaving_is_the_backbone():
    """The same on the bundled model with the river river.py loads by default (load_river as its command line calls
    it: GPTQ copies on the rounding split, the last block and the LM head 8-bit), a HumanEval prompt prefilled and
    twelve of its solution's tokens teacher-forced, on every path."""
    _, tokenizer = load_config_and_tokenizer()
    model, river, _ = load_river(head_bits=DEFAULT_HEAD_BITS, calibration=calibrate.rounding_sequences(tokenizer))
    assert river.head is not None and river.head.bits == 8 and river.bits == [4] * 29 + [8]
    prompt, solution = calibrate.humaneval_problems()[0]
    context = tokenizer.encode(prompt).ids
    tokens = torch.tensor([context + tokenizer.encode(solution).ids[:12]])
    for native in NO_EXIT_PATHS:
        assert_never_leaving_is_the_backbone(model, river, native, tokens, len(context), 4, 1.5)


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), bits=st.sampled_from([4, 8]), batch=st.integers(1, 3),
       n_prompt=st.integers(1, 5), n_steps=st.integers(0, 4), min_layer=st.integers(0, 2), seed=st.integers(0, 99),
       data=st.data())
def test_engine_exits_where_the_hand_computed_similarities_say(cfg, bits, batch, n_prompt, n_steps, min_layer,
                                                                seed, data):
    """The similarity rule in the engine, step by step, against the rule applied by hand to similarities from the
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
    rule = similarity(tau, min_layer)
    cache = model.new_cache(S, batch_size=batch)
    last_backbone, logits = [], []
    for start, end in [(0, n_prompt)] + [(t, t + 1) for t in range(n_prompt, S)]:
        minima = step_similarities(model, river, tokens, last_backbone, start, end).flatten(1).amin(1)
        step_logits, depth = engine.forward(tokens[:, start:end], start, cache, rule, all_logits=True)
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
        _, depth = engine.forward(tokens, 0, model.new_cache(T, batch_size=B), similarity(tau))
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
        engine.forward(prompt, 0, cache, NEVER)
    engine.forward(torch.tensor([[5]]), 4, rerun, NEVER)
    logits_rerun, _ = engine.forward(torch.tensor([[9]]), 4, rerun, after(1))
    logits_fresh, _ = engine.forward(torch.tensor([[9]]), 4, fresh, after(1))
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
    got, depth = Engine(model, river).forward(tokens, 0, model.new_cache(6), RIVER_ONLY, all_logits=True)
    assert depth == 0
    # bf16 activations inside the low-bit kernels set the tolerance.
    assert_close_bf16(got, dequantized(tokens))


def test_a_native_pass_record_reads_as_the_same_writes_made_one_by_one():
    """KVCache.record_pass keeps a native pass's record until the record is read: after passes, a drop and a block's
    own record between them, the arrays equal those of the same writes recorded one layer at a time as they came."""
    lazy, eager = (KVCache(n_layers=3, n_kv_heads=1, head_dim=4, capacity=8) for _ in range(2))
    history = [("pass", 3, 0, 4), ("pass", 1, 4, 1), ("pass", 0, 5, 2), ("drop", 5), ("block", 2, 5, 1),
               ("pass", 2, 5, 3), ("pass", 3, 4, 1)]
    for event in history:
        if event[0] == "pass":
            _, depth, start, length = event
            lazy.record_pass(depth, start, length)
            for layer in range(3):
                eager.record(layer, start, length, Writer.BACKBONE if layer < depth else Writer.RIVER)
        elif event[0] == "drop":
            lazy.drop(event[1])
            eager.drop(event[1])
        else:
            for cache in (lazy, eager):
                cache.record(*event[1:], Writer.PROPAGATED)
    assert lazy.passes, "the last passes wait for a read"
    np.testing.assert_array_equal(lazy.writer, eager.writer)
    np.testing.assert_array_equal(lazy.write_count, eager.write_count)
    assert not lazy.passes
    with pytest.raises(IndexError, match="outside its capacity 8"):
        lazy.record_pass(1, 7, 2)
    assert (lazy.writer == eager.writer).all(), "a refused pass must leave the record untouched"


@PROPERTY
@given(values=st.lists(st.sampled_from([-1.0, 0.0, 2.5, math.inf, -math.inf, math.nan]), min_size=1, max_size=40))
def test_greedy_picks_what_torch_argmax_picks(values):
    """generation.greedy (numpy's argmax on CPU) against torch.argmax: the first of equal maxima, a NaN above all."""
    logits = torch.tensor(values)
    assert greedy(logits) == int(logits.argmax())


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy():
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
    model, river = tiny_river(cfg, 4, 4)
    engine = Engine(model, river)
    runs = [engine.generate([1, 2, 3], 12, similarity(0.5), temperature=1.5, seed=s).tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy_tokens = engine.generate([1, 2, 3], 12, similarity(0.5)).tokens
    assert engine.generate([1, 2, 3], 12, similarity(0.5), temperature=1.5, top_p=1e-6,
                           seed=1).tokens == greedy_tokens


# ------------------------------------------------------------------------------------------------ the exit rule

def test_similarity_rule_exits_at_first_block_above_tau():
    h0 = torch.tensor([[[1.0, 0.0]]])
    assert transition_similarity(h0, torch.tensor([[[1.0, 1.0]]])).item() == pytest.approx(math.sqrt(0.5))
    rule = similarity(0.9, min_layer=1)
    same, turned = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert not rule.leaves(0, h0, same), "below min_layer"
    assert rule.leaves(1, h0, same)
    assert not rule.leaves(1, h0, turned)
    both = torch.cat([same, turned], dim=1)  # minimum over tokens decides
    assert not rule.leaves(1, torch.cat([h0, h0], dim=1), both)
    assert not similarity(1.0001).leaves(5, h0, same), "tau > 1 never exits"


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), float("-inf"), "0.5", None, True])
def test_tau_must_be_a_finite_number(tau):
    with pytest.raises(ValueError, match="tau must be a finite real number"):
        similarity(tau)


@pytest.mark.parametrize("field, bad, message", [
    ("tau", math.nan, "tau must be a real number (cosine threshold; above 1 never exits)"),
    ("tau", -math.inf, "tau must be a real number (cosine threshold; above 1 never exits)"),
    ("tau", "0.5", "tau must be a real number (cosine threshold; above 1 never exits)"),
    ("tau", None, "tau must be a real number (cosine threshold; above 1 never exits)"),
    ("tau", True, "tau must be a real number (cosine threshold; above 1 never exits)"),
    ("min_layer", -1, "min_layer must be an int >= 0"), ("min_layer", True, "min_layer must be an int >= 0"),
    ("min_layer", 1.0, "min_layer must be an int >= 0"), ("min_layer", None, "min_layer must be an int >= 0"),
    ("max_depth", -1, "max_depth must be None or an int >= 0 (backbone blocks a token may run)"),
    ("max_depth", True, "max_depth must be None or an int >= 0 (backbone blocks a token may run)"),
    ("max_depth", 2.0, "max_depth must be None or an int >= 0 (backbone blocks a token may run)"),
    ("max_depth", "2", "max_depth must be None or an int >= 0 (backbone blocks a token may run)"),
])
def test_an_exit_rule_refuses_a_bad_value(field, bad, message):
    """ExitRule checks each field when it is made (tau = inf is the backbone's own rule, so only NaN and -inf of
    the floats are refused), and so do the helpers that make one."""
    with pytest.raises(ValueError, match=re.escape(f"{message}, got {bad!r}") + "$"):
        ExitRule(**{field: bad})
    helper = {"tau": lambda: similarity(bad), "min_layer": lambda: similarity(0.5, bad),
              "max_depth": lambda: after(bad)}[field]
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}") + "$"):
        helper()


def test_after_needs_a_depth():
    """after(None) would be a rule that never leaves: NEVER has a name of its own."""
    with pytest.raises(ValueError, match="after takes a depth: an int >= 0"):
        after(None)


def test_an_exit_rule_leaves_where_its_fields_say():
    """leaves() against the rule written out, for each kind of rule: NEVER never (and never computes s_l: it is given
    no states), RIVER_ONLY before block 0, after(d) once d blocks have run, the similarity rule when s_l exceeds tau
    strictly from min_layer on, a capped rule at its cap at the latest; capped() only ever lowers a cap; checks_
    similarity says which rules compute s_l; as_json is strict JSON."""
    h, same, turned = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert transition_similarity(h, same).item() == 1.0 and transition_similarity(h, turned).item() == 0.0
    for layer in range(6):
        assert not NEVER.leaves(layer, None, None)
        assert RIVER_ONLY.leaves(layer, None, None)
        assert after(3).leaves(layer, None, None) == (layer + 1 >= 3)
        assert ExitRule(tau=2.0, max_depth=3).leaves(layer, h, same) == (layer + 1 >= 3), "a replay: the cap alone"
        assert similarity(0.5, min_layer=2).leaves(layer, h, same) == (layer >= 2)
        assert not similarity(0.5, min_layer=2).leaves(layer, h, turned)
        assert similarity(0.5, min_layer=2).capped(4).leaves(layer, h, turned) == (layer + 1 >= 4)
    assert not similarity(1.0).leaves(0, h, same) and not similarity(0.0).leaves(0, h, turned), "s_l == tau stays"
    assert similarity(0.999).leaves(0, h, same) and similarity(-0.001).leaves(0, h, turned)
    rule = similarity(0.9, 1)
    assert rule.capped(5).capped(3) == rule.capped(3).capped(5) == ExitRule(0.9, 1, 3)
    assert NEVER.capped(2) == after(2) and RIVER_ONLY.capped(4) == RIVER_ONLY and rule.max_depth is None
    assert [r.checks_similarity for r in (NEVER, RIVER_ONLY, after(2), similarity(0.5), ExitRule(tau=2.0),
                                          rule.capped(1))] == [False, False, False, True, True, True]
    assert type(ExitRule(tau=1).tau) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.tau = 0.5
    assert NEVER.as_json() == {"tau": None, "min_layer": 0, "max_depth": None}
    assert RIVER_ONLY.as_json() == {"tau": None, "min_layer": 0, "max_depth": 0}
    assert rule.capped(4).as_json() == {"tau": 0.9, "min_layer": 1, "max_depth": 4}
    for r in (NEVER, RIVER_ONLY, rule.capped(4), ExitRule(tau=2.0)):
        assert json.loads(json.dumps(r.as_json(), allow_nan=False)) == r.as_json()


def test_an_engine_refuses_a_rule_it_cannot_run():
    """Engine.check_rule, before anything runs (the cache untouched): on an engine without a river, any rule that
    may leave the backbone (the similarity rule, a depth short of the model's, RIVER_ONLY); on a model holding its
    first 2 blocks, any rule that may run deeper (no cap, a cap past them); anything but an ExitRule. What each
    engine can run runs, at the depths the rule says."""
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    two = holding_first_blocks(model, 2)
    cases = [
        (Engine(model), [similarity(0.5), similarity(0.5).capped(4), after(3), RIVER_ONLY, after(0)],
         [(NEVER, 4), (after(4), 4), (after(9), 4)],
         "may leave the backbone, and this engine has no ExitRiver to go on with"),
        (Engine(two, river), [NEVER, similarity(0.5), after(3), similarity(0.5).capped(3), ExitRule(tau=2.0)],
         [(after(2), 2), (after(1), 1), (RIVER_ONLY, 0), (ExitRule(tau=2.0, max_depth=2), 2)],
         "this model holds only its first 2 of 4 backbone blocks: its rule must leave by then (ExitRule.capped(2))"),
    ]
    for engine, refused, runs, message in cases:
        for rule in refused:
            cache = model.new_cache(3)
            with pytest.raises(ValueError, match=re.escape(message)):
                engine.check_rule(rule)
            with pytest.raises(ValueError, match=re.escape(message)):
                engine.forward(torch.tensor([[1, 2]]), 0, cache, rule)
            with pytest.raises(ValueError, match=re.escape(message)):
                engine.generate([1, 2], 1, rule)
            assert (cache.writer == Writer.EMPTY).all() and not cache.k.any(), "a refused rule ran"
        for rule, depth in runs:
            engine.check_rule(rule)
            assert engine.generate([1, 2], 3, rule).depths == [depth] * 3
        for bad in ("river", None, 0.9, after):
            with pytest.raises(TypeError, match=f"an exit rule must be an exit_policy.ExitRule, got "
                                                f"{type(bad).__name__}"):
                engine.check_rule(bad)


def test_generate_rejects_bad_input_before_doing_anything():
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    engine = Engine(model, river)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([], 4, NEVER)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        engine.generate(list(range(14)), 4, NEVER)
    with pytest.raises(TypeError, match="an exit rule must be an exit_policy.ExitRule, got str"):
        engine.generate([1, 2], 2, "fast")
    for bad, message in (({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
                         ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
                         ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
                         ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
                         ({"top_p": math.nan}, r"top_p must be in \(0, 1\], got nan"),
                         ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                         ({"seed": 2**64}, "seed must be None or an int")):
        with pytest.raises(ValueError, match=message):
            engine.generate([1, 2], rule=NEVER, **{"max_new_tokens": 2, **bad})
    with pytest.raises(ValueError, match="may leave the backbone, and this engine has no ExitRiver to go on with"):
        Engine(model).generate([1, 2], 2, similarity(0.5))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------ the depth cap

@PROPERTY
@given(cfg=tiny_configs(quantizable=True), n_prompt=st.integers(1, 5), n_steps=st.integers(0, 4),
       seed=st.integers(0, 99), data=st.data())
def test_a_capped_backbone_never_runs_block_d_or_deeper(cfg, n_prompt, n_steps, seed, data):
    """A rule capped at D (ExitRule.capped) on the whole model, and on a model that holds only D blocks, for a rule
    that never exits and one that exits early: prefill and every decode step stop at min(D, the rule's depth), no
    backbone block from D on runs, layers D.. of the cache are written by the river alone, each slot once, and logits
    and K/V are the reference decoder's for that schedule; the two engines agree bit for bit."""
    L = cfg.n_layers
    D = data.draw(st.integers(0, L), label="D")
    early = data.draw(st.integers(0, L - 1), label="early exit after block")
    model, river = tiny_river(cfg, seed, 4)
    capped_model = holding_first_blocks(model, D)
    assert len(capped_model.blocks) == D
    S = n_prompt + n_steps
    tokens = torch.randint(0, cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(seed))
    past_the_cap = []  # every run of a backbone block from D on, on either model
    for block in list(model.blocks[D:]) + list(capped_model.blocks[D:]):
        block.register_forward_hook(lambda module, args, out: past_the_cap.append(module.layer))
    for rule, free_depth in ((similarity(2.0), L), (after(early + 1), early + 1)):
        depth = min(D, free_depth)
        runs = []
        for engine in (Engine(model, river, native=False), Engine(capped_model, river)):
            capped = rule.capped(D)
            cache = model.new_cache(S)
            steps = [engine.forward(tokens[None, :n_prompt], 0, cache, capped, all_logits=True)]
            steps += [engine.forward(tokens[None, t:t + 1], t, cache, capped) for t in range(n_prompt, S)]
            assert [d for _, d in steps] == [depth] * (1 + n_steps)
            assert (cache.writer[D:, :S] == Writer.RIVER).all(), "a layer past the cap written by the backbone"
            np.testing.assert_array_equal(cache.writer, expected_writer([depth] * S, L))
            assert (cache.write_count == 1).all()
            assert engine.generate(tokens[:n_prompt].tolist(), 3, capped).depths == [depth] * 3
            assert past_the_cap == [], "a backbone block past the cap ran"
            runs.append((torch.cat([logits for logits, _ in steps], dim=1), cache))
        (logits, cache), (logits_b, cache_b) = runs
        assert torch.equal(logits, logits_b) and torch.equal(cache.k, cache_b.k) and torch.equal(cache.v, cache_b.v)
        ref_logits, ref_kv, _ = reference_forward(model, tokens, river, [depth - 1] * S)
        assert_close_bf16(logits[0], ref_logits)
        for layer, (k, v) in enumerate(ref_kv):
            assert_close_bf16(cache.k[layer, 0].transpose(0, 1), k)
            assert_close_bf16(cache.v[layer, 0].transpose(0, 1), v)


def test_capped_engines_refuse_what_they_cannot_run(tmp_path):
    """Each an error naming the problem, before anything runs: on a model holding its first 2 blocks a rule that may
    run deeper (a cap past them, no cap, the whole backbone), a cap with no river for the blocks past it, a cap or a
    number of blocks held out of range (rule, model, loaders)."""
    cfg = LlamaConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    two = holding_first_blocks(model, 2)
    holds_two = re.escape("this model holds only its first 2 of 4 backbone blocks: its rule must leave by then "
                          "(ExitRule.capped(2))")
    cache = model.new_cache(2)
    for rule in (after(3), similarity(0.5).capped(3), similarity(0.5), NEVER):
        with pytest.raises(ValueError, match=holds_two):
            Engine(two, river).generate([1, 2], 2, rule)
        with pytest.raises(ValueError, match=holds_two):
            Engine(two, river).forward(torch.tensor([[1]]), 0, cache, rule)
    for engine in (Engine(two), Engine(model)):
        with pytest.raises(ValueError, match="may leave the backbone, and this engine has no ExitRiver to go on with"):
            engine.forward(torch.tensor([[1]]), 0, cache, after(2))
    assert (cache.writer == Writer.EMPTY).all(), "a refused step wrote the cache"
    for bad in (-1, True, 2.0, "2", None):
        for rule in (similarity(0.5), after(3)):
            with pytest.raises(ValueError, match=re.escape(f"a cap must be an int >= 0 (backbone blocks a token may "
                                                           f"run), got {bad!r}")):
                rule.capped(bad)
    for bad in (-1, 5, True, 2.0, "2"):
        with pytest.raises(ValueError, match=re.escape(f"backbone blocks held must be an int in [0, 4] (the model's "
                                                       f"blocks), got {bad!r}")):
            Transformer(cfg, held=bad)
    with pytest.raises(ValueError, match="the full-depth forward needs all 4 blocks; this model holds the first 2"):
        two(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="a river copies every one of the model's 4 blocks"):
        ExitRiver(two, 4, 32)
    folder = write_checkpoint(cfg, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"backbone blocks held must be an int in \[0, 4\] \(the model's blocks\), "
                                         "got 5"):
        load_model(folder, held=5)
    with pytest.raises(ValueError, match=r"backbone blocks held must be an int in \[0, 4\] \(the model's blocks\), "
                                         "got -1"):
        load_river(folder, held=-1, group_size=32)


# ---------------------------------------------------------------------------------------------------- compiling

def test_compiled_decode_steps_equal_eager(monkeypatch):
    """Compiling (Engine(compile=True): the one-token block steps, backbone and river, and the head through
    torch.compile) changes speed, not results: same tokens; logits and K/V within fp32 noise for the backbone, within
    bf16 rounding where river kernels round their activations to bf16. An eager engine compiles nothing."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = tiny_model(cfg, 5)
    river = ExitRiver(model, 4, 32)
    prompt = list(range(3, 10))
    rules = {"backbone": NEVER, "quantized": RIVER_ONLY, "river": after(1)}
    compiled_calls, compiled_function = set(), river_module.compiled_function
    # (the streamed step is its own function: compiled.py, so the model holds nothing about compiling)

    def recorded(function):  # what ran through compiled code: the function and, for a block, who it writes as
        compiled = compiled_function(function)

        def run(*args):
            compiled_calls.add((function.__qualname__, getattr(args[0], "cache_writer", None)))
            return compiled(*args)
        return run
    monkeypatch.setattr(river_module, "compiled_function", recorded)

    def run(engine):
        tokens = {mode: engine.generate(prompt, 5, rule).tokens for mode, rule in rules.items()}
        logits, caches = {}, {}
        for mode, rule in rules.items():
            caches[mode] = cache = model.new_cache(8)
            engine.forward(torch.tensor([prompt]), 0, cache, rule)
            logits[mode] = engine.forward(torch.tensor([[11]]), 7, cache, rule)[0]
        return tokens, logits, caches
    eager_tokens, eager_logits, eager_caches = run(Engine(model, river))
    assert compiled_calls == set(), "an eager engine ran compiled code"
    engine = Engine(model, river, compile=True)
    compiled_tokens, compiled_logits, compiled_caches = run(engine)
    assert engine.path == "torch, compiled"
    assert compiled_calls == {("streamed_step", Writer.BACKBONE), ("streamed_step", Writer.RIVER),
                              ("streamed_head", None)}
    assert compiled_tokens == eager_tokens
    for mode in rules:
        tol = 1e-4 if mode == "backbone" else 1e-2
        torch.testing.assert_close(compiled_logits[mode], eager_logits[mode], rtol=tol, atol=tol)
        torch.testing.assert_close(compiled_caches[mode].k, eager_caches[mode].k, rtol=tol, atol=tol)
        torch.testing.assert_close(compiled_caches[mode].v, eager_caches[mode].v, rtol=tol, atol=tol)


def module_state(*modules):
    """Per submodule: its attributes, names only (a compiled forward set on it would show), and its tensors."""
    return [(type(m).__name__, sorted(vars(m)), {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()})
            for root in modules for m in root.modules()]


def test_a_compiled_engine_leaves_the_shared_model_eager(monkeypatch):
    """Compiling lives in the engine, not the model: a compiled engine runs on the very model and river it was given
    and, once it has run, has changed nothing of them (no attribute, no forward set on a module, no weight); an eager
    engine on the same model and river, built before it, still runs every block and the head eagerly."""
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = tiny_model(cfg, 5)
    river = ExitRiver(model, 4, 32)
    before = module_state(model, river)
    eager = Engine(model, river, native=False)
    compiled = Engine(model, river, compile=True, native=False)
    assert compiled.model is model and compiled.river is river and compiled.path == "torch, compiled"
    assert eager.model is model and eager.river is river and eager.path == "torch, eager"
    cache = model.new_cache(5)
    compiled.forward(torch.tensor([[1, 2, 3]]), 0, cache, after(1))
    compiled.forward(torch.tensor([[4]]), 3, cache, after(1))  # one token: through compiled code
    after_compiling = module_state(model, river)
    assert [(name, attrs) for name, attrs, _ in after_compiling] == [(name, attrs) for name, attrs, _ in before]
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
               for (_, _, a), (_, _, b) in zip(after_compiling, before))
    eager_calls = []

    def counted(function):  # the eager path looks these up at each call; compiled code does not call them
        def run(*args):
            eager_calls.append(function.__qualname__)
            return function(*args)
        return run
    monkeypatch.setattr(Block, "step", counted(Block.step))
    monkeypatch.setattr(Transformer, "head", counted(Transformer.head))
    cache = model.new_cache(4)
    eager.forward(torch.tensor([[1, 2, 3]]), 0, cache, after(1))
    eager_calls.clear()
    eager.forward(torch.tensor([[4]]), 3, cache, after(1))  # one token: where compiled code would run
    assert eager_calls == ["Block.step"] * cfg.n_layers + ["Transformer.head"]


def test_compiled_one_row_linear_is_the_matmul():
    """The streamed product through torch.compile (as a compiled engine's one-token steps run it: one row) against an
    fp32 matmul, in bf16 and fp32; more rows and low-bit layers keep their own forward."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        layer = Linear(96, 80).to(dtype)
        compiled = torch.compile(streamed_product, dynamic=True)
        for rows in (1, 3):
            x = torch.randn(1, rows, 96, dtype=dtype)
            y = compiled(layer, x) if rows == 1 else streamed_product(layer, x)
            assert y.shape == (1, rows, 80) and y.dtype == dtype
            torch.testing.assert_close(y.float(), x.float() @ layer.weight.float().t(), rtol=tol, atol=tol)


def test_compiled_one_token_attention_is_masked_softmax():
    """The streamed attention through torch.compile (a compiled engine's one-token step: the G query rows of one
    token) against a naive masked softmax, holes in the mask included, and against the model's own attend."""
    torch.manual_seed(0)
    compiled = torch.compile(streamed_attention, dynamic=True)
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    mask = torch.rand(3, 9) < 0.6
    mask[:, 0] = True                                        # every query row sees at least one key
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(compiled(q, k, v, mask), torch.softmax(scores, -1) @ v)
    torch.testing.assert_close(attend(q, k, v, mask), torch.softmax(scores, -1) @ v)


# ---------------------------------------------------------------------------------------------------- the seams

# What each library module may import of the project (the design, section 2): the backbone knows nothing of exits
# or rivers, the cache is plain storage, the exit rule sees tensors only, the native engine tensors, a model's config
# and its cache; river.py's command line (river_cli) reads checkpoints (load_weights) and calibrates; kv_strategies
# sits on River's engine; bench.py, on top, may import any.
BENCH = ("bench", "rows", "measure", "scaling", "plots", "llamacpp", "lossless")  # the measuring front end, on top of everything
MAY_IMPORT = {"kv_cache": set(), "exit_policy": set(), "storage": set(), "cli": set(), "model": {"kv_cache"},
              "quantize": set(), "river_native": {"model", "quantize", "storage"}, "calibrate": {"exit_policy"},
              "load_weights": {"model", "storage"},
              "river": {"model", "kv_cache", "exit_policy", "quantize", "river_native", "load_weights", "generation",
                        "compiled", "gptq"},
              "river_cli": {"river", "model", "exit_policy", "quantize", "cli", "calibrate", "load_weights",
                            "generation", "speculative"},
              "compiled": {"model"}, "gptq": {"quantize", "storage"},
              "kv_strategies": {"river", "river_cli", "model", "kv_cache", "exit_policy"},
              "generation": set(), "speculative": {"generation", "exit_policy"}}


def test_imports_flow_one_way():
    """No module of the project imports one that imports it back, not even inside a function (river.py's command
    line once imported kv_strategies, which is built on river); no library module imports one above it (MAY_IMPORT),
    nor bench.py, nor a test file."""
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
    library = {name for name in modules if not name.startswith("test_") and name not in ("conftest",) + BENCH}
    assert library == MAY_IMPORT.keys(), "a library module with no place in MAY_IMPORT"
    for name in library:
        assert imports[name] <= MAY_IMPORT[name], f"{name} imports {sorted(imports[name] - MAY_IMPORT[name])}"
    assert not any(imports[name] & set(BENCH) for name in library), "a library module imports the bench"
    assert not any(any(m.startswith("test_") or m == "conftest" for m in imports[name])
                   for name in library | set(BENCH)), "a library module or the bench imports a test file"
