"""The KV strategies River argues against (kv_strategies.py): each does to the skipped layers' slots what its paper
says, and without exits each is the backbone."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import PROPERTY, tiny_configs, tiny_model
from exit_policy import NEVER, RIVER_ONLY, after, similarity
from kv_cache import Writer
from kv_strategies import STRATEGIES, BaselineEngine, Mask, Monotonic, Propagate, Recompute
from model import LlamaConfig
from river import Engine


# -------------------------------------------------------------------------------------------- the KV strategies

def run_schedule(engine, tokens, n_prompt, exits, before_step=lambda cache: None):
    """Prefill then decode, token t exiting after block exits[t] (capped by what the strategy allows)."""
    cache = engine.model.new_cache(len(tokens))
    before_step(cache)
    steps = [engine.forward(tokens[None, :n_prompt], 0, cache, after(exits[0] + 1), all_logits=True)]
    for i, e in enumerate(exits[1:]):
        before_step(cache)
        steps.append(engine.forward(tokens[None, n_prompt + i:n_prompt + i + 1], n_prompt + i, cache, after(e + 1)))
    return cache, steps


def strategy_case(cfg, n_prompt, exits, seed):
    """A tiny model, the drawn exits clamped to its depth, and tokens for the prompt and every decode step."""
    exits = [min(e, cfg.n_layers - 1) for e in exits]
    tokens = torch.randint(0, cfg.vocab_size, (n_prompt + len(exits) - 1,),
                           generator=torch.Generator().manual_seed(seed))
    return tiny_model(cfg, seed), exits, tokens


strategy_schedules = dict(cfg=tiny_configs(), n_prompt=st.integers(1, 5),
                          exits=st.lists(st.integers(0, 3), min_size=1, max_size=6), seed=st.integers(0, 99))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda strategy: strategy.__name__.lower())
def test_strategies_without_exits_are_exactly_the_backbone(strategy):
    cfg = LlamaConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=32)
    model = tiny_model(cfg, 3)
    prompt = list(range(1, 7))
    backbone = Engine(model).generate(prompt, 6, NEVER)
    engine = BaselineEngine(model, strategy)
    for rule in (NEVER, similarity(1.01)):
        assert engine.generate(prompt, 6, rule).tokens == backbone.tokens
    cache_a, cache_b = model.new_cache(6), model.new_cache(6)
    logits_a, _ = Engine(model).forward(torch.tensor([prompt]), 0, cache_a, NEVER, all_logits=True)
    logits_b, _ = engine.forward(torch.tensor([prompt]), 0, cache_b, NEVER, all_logits=True)
    assert torch.equal(logits_a, logits_b) and torch.equal(cache_a.k, cache_b.k)


@PROPERTY
@given(**strategy_schedules)
def test_recomputation_leaves_the_backbone_cache(cfg, n_prompt, exits, seed):
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)
    engine = BaselineEngine(model, Recompute)
    cache, _ = run_schedule(engine, tokens, n_prompt, exits)
    engine.strategy.flush(cache)
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
    _, clean = run_schedule(BaselineEngine(model, Mask), tokens, n_prompt, exits)
    cache, dirty = run_schedule(BaselineEngine(model, Mask), tokens, n_prompt, exits, before_step=poison)
    for (a, _), (b, _) in zip(clean, dirty):
        torch.testing.assert_close(a, b)
    expected_holes = sum(cfg.n_layers - 1 - e for e in exits[1:]) + n_prompt * (cfg.n_layers - 1 - exits[0])
    assert len(cache.holes(len(tokens))) == expected_holes


@PROPERTY
@given(**strategy_schedules)
def test_propagation_fills_every_slot(cfg, n_prompt, exits, seed):
    model, exits, tokens = strategy_case(cfg, n_prompt, exits, seed)
    cache, _ = run_schedule(BaselineEngine(model, Propagate), tokens, n_prompt, exits)
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
    cache, steps = run_schedule(BaselineEngine(model, Monotonic), tokens, n_prompt, exits)
    depths = [d for _, d in steps]
    assert all(b <= a for a, b in zip(depths, depths[1:])), "exit depth rose along the sequence"
    assert depths == [min(e + 1 for e in exits[:i + 1]) for i in range(len(exits))]
    for t, depth in enumerate([depths[0]] * n_prompt + depths[1:]):  # every layer a token ran was readable
        assert (cache.writer[:depth, :t + 1] != Writer.EMPTY).all()


def test_unknown_strategy_is_refused():
    cfg = LlamaConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8)
    for strategy in ("skip", Engine, None):
        with pytest.raises(ValueError, match="strategy must be one of"):
            BaselineEngine(tiny_model(cfg, 0), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda strategy: strategy.__name__.lower())
def test_a_strategy_refuses_a_rule_that_runs_no_backbone_block(strategy):
    """Without a river a token must run block 0 at least: RIVER_ONLY (after(0)) is refused before anything runs."""
    cfg = LlamaConfig(vocab_size=20, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8)
    model = tiny_model(cfg, 0)
    engine, cache = BaselineEngine(model, strategy), model.new_cache(2)
    for rule in (RIVER_ONLY, after(0)):
        with pytest.raises(ValueError, match="runs no backbone block; a strategy without a river needs at least one"):
            engine.forward(torch.tensor([[1, 2]]), 0, cache, rule)
        with pytest.raises(ValueError, match="runs no backbone block"):
            engine.generate([1, 2], 2, rule)
    assert (cache.writer == Writer.EMPTY).all()
    assert engine.generate([1, 2], 2, after(1)).depths[0] == 1
