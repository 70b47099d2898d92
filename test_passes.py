"""The native pass of T tokens (native/river.cpp's river_forward: a prompt's prefill, the check of drafted tokens): against
the torch path and a naive full-sequence forward, and a short pass bit for bit equal to one-token steps."""
import dataclasses

import pytest
import torch

import river_native
from conftest import assert_close_bf16, copy_of, each_isa_here, reference_forward, tiny_model
from exit_policy import NEVER, RIVER_ONLY, ExitRule, after, similarity
from kv_cache import Writer
from load_weights import load_model
from model import LlamaConfig
from river import Engine, ExitRiver
import calibrate

# Widths the kernels take (multiples of 16, 4-bit groups of 32); two query heads per KV head, and one per KV head.
SHAPES = [LlamaConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                      max_seq_len=320),
          LlamaConfig(vocab_size=61, d_model=96, n_layers=2, n_heads=3, n_kv_heads=3, ffn_dim=64, head_dim=32,
                      max_seq_len=320, tie_embeddings=True)]
# Across the native pass's edges: one token, the short pass (16), a tile of positions (64), a chunk of tokens (128),
# a long pass's query block (16) and key block (64), and lengths that divide none of them nor the thread count.
PROMPT_LENGTHS = [1, 7, 16, 17, 63, 64, 65, 131, 200]


def engines(cfg, seed, isa):
    model = tiny_model(cfg, seed, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,))
    return model, river, Engine(model, river, native=isa), Engine(model, river, native=False)


def rules(n_layers):
    """Every exit depth a prompt can take: never, before block 0, after each block, and the similarity rule."""
    return [NEVER, RIVER_ONLY, *(after(d) for d in range(1, n_layers)), similarity(0.0), similarity(0.99)]


@each_isa_here
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_a_native_prefill_equals_the_torch_path_at_every_length_and_depth(isa, shape):
    """One native pass over a prompt against the torch path's: every token's logits to bf16 resolution, the same
    exit depth (one for the prompt: the minimum over its tokens), the same K/V in every layer and the same record.
    Asked for the last token's logits only, the pass prunes its last block to that token: the same depth, K/V and
    record still, its logits the torch path's last (and, for a short pass, the whole pass's last row bit for bit)."""
    cfg = SHAPES[shape]
    model, river, fast, plain = engines(cfg, shape, isa)
    g = torch.Generator().manual_seed(shape)
    for n in PROMPT_LENGTHS:
        tokens = torch.randint(0, cfg.vocab_size, (1, n), generator=g)
        for rule in rules(cfg.n_layers):
            caches = [model.new_cache(n) for _ in range(3)]
            (got, depth), (expected, expected_depth) = (engine.forward(tokens, 0, cache, rule, all_logits=True)
                                                        for engine, cache in zip((fast, plain), caches))
            last, last_depth = fast.forward(tokens, 0, caches[2], rule)
            assert depth == expected_depth == last_depth, (n, rule)
            assert_close_bf16(got, expected)
            assert_close_bf16(last, expected[:, -1:])
            if n <= 16:
                assert torch.equal(last, got[:, -1:]), (n, rule)
            for cache in caches[0], caches[2]:
                for a, b in ((cache.k, caches[1].k), (cache.v, caches[1].v)):
                    assert_close_bf16(a, b)
                assert (cache.writer == caches[1].writer).all() and (cache.write_count == 1).all()


@each_isa_here
@pytest.mark.parametrize("n", [17, 65, 200])
def test_a_long_pass_attends_as_a_naive_softmax_over_the_whole_sequence(isa, n):
    """The long pass's attention (query blocks, key blocks with an online softmax, fully masked blocks skipped) and a
    decode step's after it (tiles of positions split across threads, merged) against a naive forward of the whole
    sequence written from the equations (one score matrix, an explicit causal mask, one softmax)."""
    cfg = SHAPES[0]
    model, river, fast, _ = engines(cfg, 7, isa)
    tokens = torch.randint(0, cfg.vocab_size, (n + 3,), generator=torch.Generator().manual_seed(n))
    cache = model.new_cache(n + 3)
    logits, _ = fast.forward(tokens[None, :n], 0, cache, NEVER, all_logits=True)
    steps = [fast.forward(tokens[None, t:t + 1], t, cache, NEVER)[0][0, -1] for t in range(n, n + 3)]
    reference, kv, _ = reference_forward(model, tokens)
    assert_close_bf16(torch.cat([logits[0], torch.stack(steps)]), reference)
    for layer, (k, v) in enumerate(kv):
        assert_close_bf16(cache.k[layer, 0].transpose(0, 1), k)  # cache (kv_heads, T, hd) -> (T, kv_heads, hd)
        assert_close_bf16(cache.v[layer, 0].transpose(0, 1), v)


@each_isa_here
@pytest.mark.parametrize("threads", [1, 2])
def test_k_one_token_steps_equal_one_k_token_pass_bit_for_bit(isa, threads):
    """Past a prompt, a pass of k <= 16 tokens (the check of k - 1 drafted tokens) keeps each token's products and
    attention in the one-token step's order: its logits and K/V equal k one-token steps' exactly, at every k, under
    every fixed exit depth, with either thread count (a rule that checks similarities leaves a pass at the minimum over
    its tokens, so only rules fixed in advance can be compared)."""
    cfg = SHAPES[0]
    model, river, fast, _ = engines(cfg, 3, isa)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for n_prompt in (5, 70):
            tokens = torch.randint(0, cfg.vocab_size, (1, n_prompt + 16), generator=g)
            prefilled = model.new_cache(n_prompt + 16)
            fast.forward(tokens[:, :n_prompt], 0, prefilled, NEVER)
            for rule in (NEVER, RIVER_ONLY, after(1), ExitRule(2.0, 0, 2)):
                for k in range(1, 17):
                    steps, one = copy_of(prefilled, model), copy_of(prefilled, model)
                    stepped = torch.stack([fast.forward(tokens[:, n_prompt + i:n_prompt + i + 1], n_prompt + i, steps,
                                                        rule)[0][0, -1] for i in range(k)])
                    passed, _ = fast.forward(tokens[:, n_prompt:n_prompt + k], n_prompt, one, rule, all_logits=True)
                    assert torch.equal(stepped, passed[0]), (n_prompt, rule, k)
                    assert torch.equal(steps.k, one.k) and torch.equal(steps.v, one.v), (n_prompt, rule, k)
    finally:
        torch.set_num_threads(before)


@each_isa_here
def test_a_prompt_of_the_whole_context_runs_and_one_past_it_is_refused(isa):
    """A prompt as long as the model's context prefills (into the cache's last slot) as the torch path does; one
    more token is refused before anything is written, by the pass and by generate."""
    cfg = dataclasses.replace(SHAPES[0], max_seq_len=80)
    model, river, fast, plain = engines(cfg, 5, isa)
    tokens = torch.randint(0, cfg.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    caches = [model.new_cache(80) for _ in range(2)]
    (got, _), (expected, _) = (e.forward(tokens, 0, c, NEVER) for e, c in zip((fast, plain), caches))
    assert_close_bf16(got, expected)
    assert (caches[0].writer == Writer.BACKBONE).all()
    with pytest.raises(IndexError, match="outside its capacity 80"):
        fast.forward(torch.randint(0, cfg.vocab_size, (1, 81)), 0, model.new_cache(80), NEVER)
    with pytest.raises(ValueError, match="exceeds the model's context of 80"):
        fast.generate(tokens[0].tolist(), 1, NEVER)


def test_the_native_prefill_equals_the_torch_path_on_the_bundled_model():
    """A HumanEval prompt (154 tokens: past a chunk and two tiles) prefilled natively and in plain torch, River at the
    default tau: the prompt's depth, its last logits within a few bf16 units (as test_kernels' decode comparison)."""
    if not river_native.usable_isas():
        pytest.skip("this CPU runs none of the native kernels' instruction sets")
    model, tokenizer = load_model(dtype=torch.bfloat16)
    river = ExitRiver(model, 4, 64, eight_bit_layers=(-1,))
    fast, plain = Engine(model, river), Engine(model, river, native=False)
    prompt = tokenizer.encode(calibrate.humaneval_problems()[0][0]).ids
    tokens = torch.tensor([prompt])
    for rule in (NEVER, similarity(0.95), RIVER_ONLY):
        caches = [model.new_cache(len(prompt)) for _ in range(2)]
        (got, depth), (expected, expected_depth) = (e.forward(tokens, 0, c, rule) for e, c in zip((fast, plain), caches))
        assert depth == expected_depth, rule
        ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().max())) - 7)
        assert (got - expected).abs().max() <= 4 * ulp, rule
        assert (caches[0].writer == caches[1].writer).all()
