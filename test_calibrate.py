"""Calibration (calibrate.py): the splits are disjoint and each reads only its own problems, teacher-forced NLL equals
the one computed by hand, and the picked tau is the fastest within the quality budget."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import calibrate
from conftest import PROPERTY, fastest_within, tiny_river
from model import LlamaConfig
from river import Engine


# --------------------------------------------------------------------------------------------------- the splits

class WordTokenizer:
    """Encodes "w7 w8 ..." as [7, 8, ...] and records every text it was given."""

    def __init__(self):
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        return types.SimpleNamespace(ids=[int(word[1:]) for word in text.split()])


class ScoredProblem:
    """A problem of another split: reading it fails the test."""

    def __iter__(self):
        raise AssertionError("the choosing split read a problem of another split")

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
    """choosing_sequences(n) reads HumanEval problems 100..100+n-1 and nothing else, however many are scored (every
    other problem fails the test if read), and each problem's prompt and solution are encoded as its context and
    target; the four splits are disjoint, hold every problem, and the choosing one at least 1,500 target tokens' worth
    of problems (checked on the real data in test_bench)."""
    chosen = range(100, 100 + n)
    problem = lambda i: (f"w{2 * i}", " ".join(f"w{j}" for j in range(1000 * i, 1000 * i + 20)))  # noqa: E731
    problems = Problems([problem(i) if i in chosen else ScoredProblem() for i in range(164)])
    monkeypatch.setattr(calibrate, "humaneval_problems", lambda: problems)
    tokenizer = WordTokenizer()
    sequences = calibrate.choosing_sequences(tokenizer, n, 16, **({} if scored is None else {"scored": scored}))
    assert problems.read() == list(chosen)
    assert sorted(tokenizer.texts) == sorted(text for i in chosen for text in problem(i))
    assert sequences == [([2 * i], list(range(1000 * i, 1000 * i + 16))) for i in chosen]
    splits = (calibrate.SCORED, calibrate.ROUNDING, calibrate.HELD_OUT, calibrate.CHOOSING)
    assert sorted(i for split in splits for i in split) == list(range(calibrate.CHOOSING.stop))
    with pytest.raises(ValueError, match="the choosing split holds 32 problems, not 33"):
        calibrate.choosing_sequences(tokenizer, 33, 16)


@pytest.mark.parametrize("n, scored, max_target", [(1, None, 8), (3, None, 16), (2, 5, 4)])
def test_calibration_text_windows_are_disjoint_from_the_scored_ones(n, scored, max_target, tmp_path):
    """With --text, the scored split is the text's first n windows (32 tokens of context, up to max_target of
    target) and the choosing split the n windows after the `scored` ones (default as many as HumanEval's scored
    problems): no token of one is in the other."""
    skip = len(calibrate.SCORED) if scored is None else scored
    window = 32 + max_target
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in range((skip + n + 1) * window)), encoding="utf-8")
    scored_split = calibrate.quality_sequences(WordTokenizer(), skip, max_target, text)
    held_out = calibrate.choosing_sequences(WordTokenizer(), n, max_target, text, **(
        {} if scored is None else {"scored": scored}))
    def by_hand(k):  # window k: its 32 context tokens, then max_target of target
        return list(range(k * window, k * window + 32)), list(range(k * window + 32, (k + 1) * window))
    assert scored_split == [by_hand(k) for k in range(skip)]
    assert held_out == [by_hand(k) for k in range(skip, skip + n)]
    tokens = lambda split: {i for context, target in split for i in context + target}  # noqa: E731
    assert not tokens(scored_split) & tokens(held_out)


# -------------------------------------------------------------------------------------------------- picking tau

def nll_by_hand(model, sequences):
    """Mean NLL per target token of the backbone: one causal forward over context and target, no cache."""
    losses = []
    with torch.no_grad():
        for context, target in sequences:
            logits = model(torch.tensor([context + target]))[0, len(context) - 1:-1]
            losses += F.cross_entropy(logits.float(), torch.tensor(target), reduction="none").tolist()
    return sum(losses) / len(losses)


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
