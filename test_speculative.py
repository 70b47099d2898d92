"""Lossless River (speculative.py): River drafts, the backbone checks; greedy output is the backbone's token for
token, the cache ends as the backbone's, and sampling keeps the backbone's distribution."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import calibrate
import river_native
from conftest import PROPERTY, copy_of, each_isa_here, tiny_model
from exit_policy import NEVER, RIVER_ONLY, after, similarity
from generation import nucleus
from kv_cache import Writer
from load_weights import chat_prompt, load_model, stop_token_ids
from model import LlamaConfig
from river import DEFAULT_TAU, Engine, ExitRiver
from speculative import (MAX_DRAFT, Chooser, Lookup, Speculation, check_speculative, generate_speculative,
                         speculation_round)

CFG = LlamaConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                  max_seq_len=256)


def engine_for(isa, seed=0, bits=4):
    model = tiny_model(CFG, seed, torch.bfloat16)
    return Engine(model, ExitRiver(model, bits, 32, eight_bit_layers=(-1,)), native=isa)


@each_isa_here
def test_the_check_pass_is_bit_equal_to_one_token_backbone_steps_at_every_draft_length(isa):
    """The check of k drafts (k + 1 tokens through the whole backbone in one pass) against k + 1 one-token backbone
    steps from the same cache: logits and every layer's K/V identical, for every k a check may take."""
    engine = engine_for(isa)
    model = engine.model
    tokens = torch.randint(0, CFG.vocab_size, (1, 40 + MAX_DRAFT + 1), generator=torch.Generator().manual_seed(1))
    prefilled = model.new_cache(tokens.shape[1])
    engine.forward(tokens[:, :40], 0, prefilled, NEVER)
    for k in range(1, MAX_DRAFT + 1):
        steps, one = copy_of(prefilled, model), copy_of(prefilled, model)
        stepped = torch.stack([engine.forward(tokens[:, 40 + i:41 + i], 40 + i, steps, NEVER)[0][0, -1]
                               for i in range(k + 1)])
        checked, depth = engine.forward(tokens[:, 40:41 + k], 40, one, NEVER, all_logits=True)
        assert depth == CFG.n_layers and torch.equal(stepped, checked[0]), k
        assert torch.equal(steps.k, one.k) and torch.equal(steps.v, one.v), k


class Scripted(Chooser):
    """A greedy chooser whose drafts are scripted (a stand-in for a drafter that errs where the test says), so every
    acceptance point of a round can be reached; the check stays the real one."""

    def __init__(self, script):
        super().__init__(0.0, 1.0, None)
        self.script = list(script)

    def draft(self, logits):
        return self.script.pop(0), None


def one_round_setup(engine, k=6):
    """A 20-token prompt whose last token starts a round of k drafts at position 19: the backbone's own greedy k + 1
    tokens after it, by one-token steps (what a perfect drafter drafts), the cache those steps leave (the reference),
    and a cache holding only the prompt's first 19 tokens, as a round finds it."""
    model = engine.model
    prompt = torch.randint(0, CFG.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    pos = prompt.shape[1] - 1
    reference = model.new_cache(40)
    engine.forward(prompt[:, :-1], 0, reference, NEVER)
    greedy, last = [], int(prompt[0, -1])
    for i in range(k + 1):
        last = int(engine.forward(torch.tensor([[last]]), pos + i, reference, NEVER)[0][0, -1].argmax())
        greedy.append(last)
    prefilled = model.new_cache(40)
    engine.forward(prompt[:, :-1], 0, prefilled, NEVER)
    return prompt, k, pos, greedy, reference, prefilled


@each_isa_here
def test_after_a_rejection_the_cache_is_the_backbones_and_no_dropped_slot_survives(isa):
    """A round whose drafts are the backbone's own choices up to point j and wrong after it, for every j, with a
    drafter at River's tau and two that surely leave the backbone (after block 1, and none: its river copies write
    every layer's records): the kept tokens are those j drafts and the backbone's next; every kept slot holds the K/V
    one-token backbone steps give, written by the backbone in every layer (the check overwrites the drafter's river
    records) and counted twice where the drafter wrote it first, once where only the check did (the last draft's);
    every slot past them is empty again, and the next round writes them afresh."""
    engine = engine_for(isa, seed=2)
    model = engine.model
    prompt, k, pos, greedy, reference, prefilled = one_round_setup(engine)
    for j, drafter in ((j, drafter) for drafter in (similarity(DEFAULT_TAU), after(1), RIVER_ONLY) for j in range(k + 1)):
        script = greedy[:j] + [(t + 1) % CFG.vocab_size for t in greedy[j:k]]
        cache, result = copy_of(prefilled, model), Speculation([], [], 0.0, [])
        kept = speculation_round(engine, cache, pos, int(prompt[0, -1]), drafter, Scripted(script), k, (), result)
        assert kept == greedy[:j + 1] and result.accepted == j and result.drafted == k
        if drafter.max_depth is not None:  # a drafter that leaves: its river copies wrote every slot it drafted
            assert max(result.draft_depths) < CFG.n_layers
        end = pos + j + 1  # the last kept token's own slot is written by the next round
        assert torch.equal(cache.k[:, :, :, :end], reference.k[:, :, :, :end])
        assert torch.equal(cache.v[:, :, :, :end], reference.v[:, :, :, :end])
        assert (cache.writer[:, :end] == Writer.BACKBONE).all()
        drafted_end = min(end, pos + k)  # the drafter ran the last kept token and every draft but the last
        assert (cache.write_count[:, pos:drafted_end] == 2).all() and (cache.write_count[:, :pos] == 1).all()
        assert (cache.write_count[:, drafted_end:end] == 1).all()
        assert (cache.writer[:, end:] == Writer.EMPTY).all() and (cache.write_count[:, end:] == 0).all()


@each_isa_here
@pytest.mark.parametrize("drafter", ["river", "quantized", "river_8bit"])
def test_greedy_speculative_output_is_the_backbones_token_for_token(isa, drafter):
    """Random prompts, drafts of every length up to MAX_DRAFT, a drafter that agrees often (8-bit copies), sometimes
    (River at the default tau) or rarely (the whole model low-bit): always the backbone's greedy tokens, and stops at
    max_new_tokens and at a stop id as generate does."""
    engine = engine_for(isa, seed=4, bits=8 if drafter == "river_8bit" else 4)
    rule = RIVER_ONLY if drafter == "quantized" else similarity(DEFAULT_TAU)
    g = torch.Generator().manual_seed(4)
    for draft_length in (1, 2, 5, MAX_DRAFT):
        prompt = torch.randint(0, CFG.vocab_size, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
        expected = engine.generate(prompt, 40, NEVER).tokens
        got = generate_speculative(engine, prompt, 40, rule, draft_length)
        assert got.tokens == expected, (draft_length, got.tokens, expected)
        assert got.verified >= 1 and 0 <= got.accepted <= got.drafted
        stop = expected[17]
        stopped = generate_speculative(engine, prompt, 40, rule, draft_length, stop_ids=(stop,)).tokens
        assert stopped == engine.generate(prompt, 40, NEVER, stop_ids=(stop,)).tokens


def looked_up_by_hand(text, most):
    """The latest earlier occurrence of the text's last n tokens (n from 4 down to 3), searched from the end, and up to
    `most` of the tokens that followed it; [] where none of those n-grams came before."""
    for n in (4, 3):
        if len(text) < n:
            continue
        for start in range(len(text) - n - 1, -1, -1):
            if text[start:start + n] == text[-n:]:
                return text[start + n:start + n + most]
    return []


@PROPERTY
@given(text=st.lists(st.integers(0, 4), max_size=60), more=st.lists(st.integers(0, 4), max_size=20),
       most=st.integers(1, MAX_DRAFT))
def test_lookup_drafts_what_followed_the_latest_repeat_of_the_texts_end(text, more, most):
    """Lookup's index against a search by hand, on a small alphabet (repeats everywhere), after its text and after
    more tokens appended in pieces, as rounds append their kept tokens."""
    index = Lookup(text)
    assert index.drafts(most) == looked_up_by_hand(text, most)
    for i in range(0, len(more), 3):
        index.extend(more[i:i + 3])
        assert index.drafts(most) == looked_up_by_hand(text + more[:i + 3], most)


@each_isa_here
def test_looked_up_drafts_are_checked_like_any_and_leave_the_backbones_cache(isa):
    """A round whose drafts Lookup proposed (no block ran them), right up to point j and wrong after it, for every j:
    the backbone's j tokens and its next are kept, every kept slot holds the K/V of one-token backbone steps, written
    once, by the backbone; every slot past them is empty again. And a whole generation on a prompt that repeats
    itself drafts by lookup, and ends as the backbone's tokens."""
    engine = engine_for(isa, seed=2)
    model = engine.model
    prompt, k, pos, greedy, reference, prefilled = one_round_setup(engine)
    for j in range(k + 1):
        proposed = greedy[:j] + [(t + 1) % CFG.vocab_size for t in greedy[j:k]]
        cache, result = copy_of(prefilled, model), Speculation([], [], 0.0, [])
        kept = speculation_round(engine, cache, pos, int(prompt[0, -1]), RIVER_ONLY, Chooser(0.0, 1.0, None), k, (),
                                 result, proposed)
        assert kept == greedy[:j + 1] and result.looked_up == k and result.looked_up_accepted == j
        assert result.draft_depths == [], "no block ran a looked-up draft"
        end = pos + j + 1
        assert torch.equal(cache.k[:, :, :, :end], reference.k[:, :, :, :end])
        assert torch.equal(cache.v[:, :, :, :end], reference.v[:, :, :, :end])
        assert (cache.writer[:, :end] == Writer.BACKBONE).all() and (cache.write_count[:, :end] == 1).all()
        assert (cache.writer[:, end:] == Writer.EMPTY).all() and (cache.write_count[:, end:] == 0).all()
    repeating = ([5, 17, 33, 2, 71, 8] * 6)[:-2]
    got = generate_speculative(engine, repeating, 40, RIVER_ONLY, 4)
    assert got.tokens == engine.generate(repeating, 40, NEVER).tokens and got.looked_up > 0
    assert generate_speculative(engine, repeating, 40, RIVER_ONLY, 4, lookup=False).looked_up == 0


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_the_acceptance_rule_keeps_the_backbones_distribution(top_p):
    """The standard rule on a vocabulary of 6: a draft drawn from q, kept with probability min(1, p/q), else a draw
    from max(0, p - q) normalized. 40,000 seeded rounds: the token that comes out is distributed as p (nucleus cut at
    top_p), by a chi-square test at p-value 1e-4, while q alone is far from it."""
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    q_logits = torch.tensor([0.0, 2.0, 0.5, 1.0, 0.0, -2.0])
    chooser = Chooser(1.0, top_p, torch.Generator().manual_seed(0))
    p, q = chooser.distribution(p_logits), chooser.distribution(q_logits)
    n, counts = 40_000, torch.zeros(6)
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=chooser.generator))
        counts[chooser.verify(torch.stack([p_logits, p_logits]), [draft], [q])[0]] += 1
    support = p > 0
    chi2 = (((counts - n * p) ** 2)[support] / (n * p[support])).sum().item()
    assert counts[~support].sum() == 0
    assert chi2 < chi_square_quantile(int(support.sum()) - 1), (chi2, counts / n, p)
    q_only = (((n * q - n * p) ** 2)[support] / (n * p[support])).sum().item()
    assert q_only > 100 * chi_square_quantile(int(support.sum()) - 1)  # the test can tell q from p


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_looked_up_draft_keeps_the_backbones_distribution(top_p):
    """A draft proposed without sampling (Lookup's: all its mass on one token, Chooser.certain) through the same rule:
    kept with probability p(token), else a draw from p without it. 40,000 seeded rounds, a likely and an unlikely
    proposal: the token that comes out is distributed as p, by the chi-square test above, where always keeping the
    proposal would fail it by far."""
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    chooser = Chooser(1.0, top_p, torch.Generator().manual_seed(1), vocab=6)
    p = chooser.distribution(p_logits)
    support = p > 0
    for proposal in (0, 2):
        n, counts = 40_000, torch.zeros(6)
        for _ in range(n):
            counts[chooser.verify(torch.stack([p_logits, p_logits]), [proposal], [chooser.certain(proposal)])[0]] += 1
        chi2 = (((counts - n * p) ** 2)[support] / (n * p[support])).sum().item()
        assert counts[~support].sum() == 0
        assert chi2 < chi_square_quantile(int(support.sum()) - 1), (proposal, chi2, counts / n, p)
        always = torch.zeros(6)
        always[proposal] = n
        assert (((always - n * p) ** 2)[support] / (n * p[support])).sum().item() > 100 * chi_square_quantile(5)


def test_several_drafts_in_a_row_and_the_bonus_token_keep_the_backbones_distribution():
    """Rounds of three drafts drawn from q_0, q_1, q_2 and checked against p_0 .. p_3 (each position's own, as a
    backbone whose next-token distribution at a position does not depend on the tokens before it): the token that comes
    out at each position, over the rounds that reach it, is distributed as that position's p, by the chi-square test
    at p-value 1e-4; position 3 is the bonus token, drawn from p_3 after all three drafts were kept. A rule that always
    took the draft (q) fails it at every drafted position."""
    g = torch.Generator().manual_seed(3)
    p_logits, q_logits = torch.randn(4, 6, generator=g) * 1.5, torch.randn(3, 6, generator=g) * 1.5
    chooser = Chooser(1.0, 1.0, torch.Generator().manual_seed(4))
    p = [chooser.distribution(row) for row in p_logits]
    q = [chooser.distribution(row) for row in q_logits]
    n, counts = 30_000, torch.zeros(4, 6)
    for _ in range(n):
        drafted = [int(torch.multinomial(q[i], 1, generator=chooser.generator)) for i in range(3)]
        for position, token in enumerate(chooser.verify(p_logits, drafted, q)):
            counts[position, token] += 1
    bound = chi_square_quantile(5)
    for position in range(4):
        reached = counts[position].sum()
        assert reached > 500, (position, reached)  # the bonus token is reached often enough to be tested
        chi2 = (((counts[position] - reached * p[position]) ** 2) / (reached * p[position])).sum().item()
        assert chi2 < bound, (position, chi2, counts[position] / reached, p[position])
        if position < 3:
            q_only = (((reached * q[position] - reached * p[position]) ** 2) / (reached * p[position])).sum().item()
            assert q_only > 10 * bound, position


def chi_square_quantile(df, tail=1e-4):
    """Wilson-Hilferty: the chi-square value with `tail` of the mass above it."""
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_nucleus_is_the_distribution_sampling_draws_from():
    probs = torch.tensor([0.5, 0.1, 0.3, 0.1])
    assert torch.allclose(nucleus(probs, 0.7), torch.tensor([0.5, 0.0, 0.3, 0.0]) / 0.8)
    assert torch.equal(nucleus(probs, 1.0), probs / probs.sum())


@each_isa_here
def test_speculative_generation_refuses_what_it_cannot_run_exactly(isa):
    """The torch path (its batched products round differently from one-token steps), a depth-capped model (no backbone
    to check with), a draft length outside 1..MAX_DRAFT: refused with a message naming the reason."""
    engine = engine_for(isa)
    plain = Engine(engine.model, engine.river, native=False)
    with pytest.raises(ValueError, match="needs the native path"):
        check_speculative(plain, similarity(0.9), 4)
    for bad in (0, MAX_DRAFT + 1, 2.0, True):
        with pytest.raises(ValueError, match="draft_length"):
            check_speculative(engine, similarity(0.9), bad)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_speculative(engine, [1] * 250, 10, similarity(0.9))


def test_greedy_speculative_output_is_the_backbones_on_the_bundled_model():
    """Two HumanEval prompts and a chat prompt, 48 new tokens each: River (tau 0.95, 4-bit copies) drafts, the output
    is the backbone's greedy output token for token (bench.py checks the 12 scored prompts at 96 tokens)."""
    model, tokenizer = load_model(dtype=torch.bfloat16)
    engine = Engine(model, ExitRiver(model, 4, 64, eight_bit_layers=(-1,)))
    if engine.native is None:
        pytest.skip("speculative generation needs the native kernels, which this CPU cannot run")
    stop = stop_token_ids(tokenizer, None)
    prompts = [p for p, _ in calibrate.humaneval_problems()[:2]] + [chat_prompt("Name three prime numbers.", None)]
    for text in prompts:
        prompt = tokenizer.encode(text).ids
        expected = engine.generate(prompt, 48, NEVER, stop_ids=stop).tokens
        got = generate_speculative(engine, prompt, 48, similarity(DEFAULT_TAU), stop_ids=stop)
        assert got.tokens == expected
        assert got.acceptance > 0.3


@pytest.mark.parametrize("drafter", ["quantized", "river"])
def test_river_py_speculative_prints_the_backbones_tokens(capsys, drafter):
    """Through the command line: --speculative (either drafter, with and without --no-lookup) prints the tokens
    --mode backbone prints, with the drafting figures in its JSON; --speculative where there is no drafter or no whole backbone is a usage error."""
    import json
    import river_cli
    if not river_native.usable_isas():
        pytest.skip("speculative generation needs the native kernels, which this CPU cannot run")
    base = ["--prompt", "def fizzbuzz(n):", "--max-new-tokens", "32", "--json"]
    river_cli.main(base + ["--mode", "backbone"])
    expected = json.loads(capsys.readouterr().out)["tokens"]
    river_cli.main(base + ["--speculative", "--drafter", drafter])
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == expected and got["speculative"]["verified"] >= 1
    river_cli.main(base + ["--speculative", "--drafter", drafter, "--no-lookup"])
    river_only = json.loads(capsys.readouterr().out)
    assert river_only["tokens"] == expected and river_only["speculative"]["looked_up"] == 0
    for bad in (["--mode", "backbone"], ["--max-backbone-depth", "8"]):
        with pytest.raises(SystemExit) as raised:
            river_cli.main(base + ["--speculative"] + bad)
        assert raised.value.code == 2 and "--speculative" in capsys.readouterr().err


@each_isa_here
def test_the_bench_reports_lossless_rivers_rounds_and_what_their_costs_predict(isa):
    """lossless.measure_speculation on a tiny model: every prompt's tokens the backbone's; acceptance, tokens per check
    and the looked-up share as counted by hand from generate_speculative's own record of the same runs; a draft
    step's and every check's cost measured (positive, one per check length); and the predicted ratio is those costs
    summed over the rounds each prompt ran, by hand."""
    import types
    import lossless
    engine = engine_for(isa, seed=5)
    g = torch.Generator().manual_seed(5)
    prompts = [(torch.randint(0, CFG.vocab_size, (12,), generator=g).tolist() * 2, []) for _ in range(3)]
    backbone = types.SimpleNamespace(generate=lambda prompt, n: engine.generate(prompt, n, NEVER))
    runs = []

    def speculative(prompt, n):
        runs.append(generate_speculative(engine, prompt, n, RIVER_ONLY))
        return runs[-1]
    row = types.SimpleNamespace(engine=engine, rule=RIVER_ONLY, generate=speculative)
    comparison = types.SimpleNamespace(speculative=row, backbone=backbone)
    sp = lossless.measure_speculation(comparison, types.SimpleNamespace(scored=prompts, prompt=prompts[0][0]))
    assert sp["identical"] == sp["prompts"] == 3
    drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    assert sp["acceptance"] == accepted / drafted and sp["looked_up_share"] == sum(r.looked_up for r in runs) / drafted
    assert sp["tokens_per_verification"] == sum(len(r.tokens) - 1 for r in runs) / sum(r.verified for r in runs)
    costs = sp["round_costs_in_backbone_steps"]
    assert costs["draft"] > 0 and sorted(costs["check"]) == list(range(2, MAX_DRAFT + 2))
    assert all(cost > 0 for cost in costs["check"].values())
    by_hand = [(len(r.tokens) - 1) / sum((0 if looked else n) * costs["draft"] + costs["check"][n + 1]
                                         for n, looked in zip(r.draft_lengths, r.round_lookups)) for r in runs]
    assert sp["round_model_ratio"] == pytest.approx(sum(by_hand) / len(by_hand))
