"""Lossless River: River drafts a few tokens, the backbone checks them all in one pass, and the output is the
backbone's own (greedy: token for token; sampled: its distribution)."""
import time
from dataclasses import dataclass, field

import torch

from exit_policy import NEVER, ExitRule
from generation import Generation, check_generation, greedy, nucleus, sync

MAX_DRAFT = 15  # drafts a check takes at most: with the last kept token, the native short pass of 16 tokens (whose
                # products and attention are bit for bit those of one-token steps)
# The most drafted per check, by the native build's instruction set: each the fastest of several on the choosing split
# (calibrate.CHOOSING's first 8 prompts, 64 greedy tokens, River's copies drafting as a whole model, RESULTS.md). A
# check of k + 1 tokens streams the bf16 weights once, so on AVX-512 it costs little more than a step until its
# arithmetic shows and longer drafts pay; AVX2's check is arithmetic (two FMAs per bf16 pair), so short drafts win.
DRAFT_LENGTHS = {"avx512": 6, "avx2": 2}


def default_draft_length(engine):
    return DRAFT_LENGTHS.get(engine.native.isa if engine.native is not None else None, 3)


@dataclass
class Speculation(Generation):
    """A speculative generation: step_s holds the seconds of each draft-and-verify round (and decode_tokens_per_s
    counts the tokens they made); drafted and accepted count drafted tokens, verified the backbone's passes."""
    drafted: int = 0
    accepted: int = 0
    verified: int = 0
    looked_up: int = 0           # of the drafted: those Lookup proposed, which no block ran
    looked_up_accepted: int = 0  # ... and of the accepted
    round_lookups: list = field(default_factory=list)  # per round: whether its drafts were looked up
    draft_lengths: list = field(default_factory=list)
    draft_depths: list = field(default_factory=list)  # backbone blocks each draft step ran (depths: every kept token
                                                      # is the backbone's, from a pass through all its blocks)

    @property
    def acceptance(self):
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_verification(self):
        """Tokens each backbone pass kept: the accepted drafts and the backbone's own next token."""
        return (len(self.tokens) - 1) / self.verified if self.verified else None


def check_speculative(engine, rule, draft_length):
    """Only what keeps the output exactly the backbone's: the native path, whose k-token pass is bit-equal to k
    one-token steps (the torch path's batched products round differently), a model holding every backbone block, and
    a drafter rule that runs on it."""
    if engine.native is None:
        raise ValueError(f"speculative generation needs the native path, whose multi-token pass equals one-token "
                         f"steps bit for bit; this engine runs {engine.path}, whose batched products round differently")
    if len(engine.model.blocks) < engine.model.cfg.n_layers:
        raise ValueError("speculative generation verifies with the whole backbone; this model holds only its first "
                         f"{len(engine.model.blocks)} blocks (a depth-capped River cannot check its drafts)")
    if not isinstance(rule, ExitRule):
        raise TypeError(f"the drafter's exit rule must be an exit_policy.ExitRule, got {type(rule).__name__}")
    check_draft_length(draft_length)


def check_draft_length(draft_length):
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or not 1 <= draft_length <= MAX_DRAFT:
        raise ValueError(f"draft_length must be an int in [1, {MAX_DRAFT}], got {draft_length!r}")


class Drafts:
    """How many tokens the next round drafts: one more than last time when every draft was kept, one fewer when none
    was, within [1, most]; starting at `most`."""

    def __init__(self, most, adapt=True):
        self.length, self.most, self.adapt = most, most, adapt

    def update(self, drafted, accepted):
        if self.adapt:
            self.length = min(self.most, self.length + 1) if accepted == drafted else \
                max(1, self.length - 1) if accepted == 0 else self.length


class Lookup:
    """Drafts that cost nothing: where the text so far ends with n tokens (n from LONGEST down to SHORTEST) that also
    came earlier, the tokens that followed them then. Code repeats itself (names, indentation, calls), and a repeat
    found in the prompt or the output is drafted without running any block. SHORTEST 3 rather than 2: chosen on the
    choosing split's first 12 prompts (RESULTS.md), where the two tied within noise."""
    LONGEST, SHORTEST = 4, 3

    def __init__(self, tokens):
        self.text, self.seen = [], {}  # n-gram -> the position right after its latest occurrence but the last
        self.extend(tokens)

    def extend(self, tokens):
        for token in tokens:
            self.text.append(token)
            end = len(self.text)
            for n in range(self.SHORTEST, self.LONGEST + 1):
                if end > n:  # the n-gram ending one token back is now followed by a known token
                    self.seen[tuple(self.text[end - 1 - n:end - 1])] = end - 1

    def drafts(self, most):
        for n in range(self.LONGEST, self.SHORTEST - 1, -1):
            at = self.seen.get(tuple(self.text[-n:])) if len(self.text) >= n else None
            if at is not None:
                return self.text[at:at + most]
        return []


def generate_speculative(engine, prompt, max_new_tokens, rule, draft_length=None, adapt=True, temperature=0.0,
                         top_p=1.0, seed=None, stop_ids=(), on_token=None, lookup=True):
    """Generate from prompt ids as the backbone would, River (the exit rule `rule`) drafting and the backbone checking.

    The prompt is prefilled through the whole backbone. Each round drafts up to draft_length tokens from the last kept
    token: those the text so far repeats (Lookup), for free, where it repeats its last few tokens and `lookup` is on;
    else River's, one step each. The backbone then runs that token and the drafts in one pass, which writes every
    layer's K/V for them (overwriting the drafter's). Greedy: the longest prefix of drafts on which the backbone's
    choice agrees is kept, then the backbone's own next token; sampled: each draft is kept with probability
    min(1, p/q) (p the backbone's, q the drafter's, both through the same temperature and top-p), a rejected one
    replaced by a draw from max(0, p - q): the standard rule, which keeps the backbone's distribution. The slots of
    rejected drafts are dropped from the cache."""
    draft_length = default_draft_length(engine) if draft_length is None else draft_length
    check_speculative(engine, rule, draft_length)
    model = engine.model
    check_generation(prompt, max_new_tokens, model.cfg.max_seq_len, temperature, top_p, seed)
    generator = torch.Generator(device=model.device).manual_seed(0 if seed is None else seed)
    choose = Chooser(temperature, top_p, generator, model.cfg.vocab_size)
    cache = model.new_cache(len(prompt) + max_new_tokens)
    on_token = on_token or (lambda token: None)
    sync(model.device)
    t0 = time.perf_counter()
    logits, _ = engine.forward(torch.tensor([prompt], device=model.device), 0, cache, NEVER)
    out = [choose.sample(logits[0, -1])]
    result = Speculation(out, [], time.perf_counter() - t0, [])
    on_token(out[-1])
    drafts = Drafts(draft_length, adapt)
    index = Lookup(prompt + out) if lookup else None
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        t0 = time.perf_counter()
        room = max_new_tokens - len(out)
        proposed = index.drafts(min(draft_length, room)) if index is not None else []
        proposed = proposed[:next((i + 1 for i, t in enumerate(proposed) if t in stop_ids), len(proposed))]
        kept = speculation_round(engine, cache, len(prompt) + len(out) - 1, out[-1], rule, choose,
                                 min(drafts.length, room), stop_ids, result, proposed)
        if not proposed:
            drafts.update(result.draft_lengths[-1], len(kept) - 1)
        if index is not None:
            index.extend(kept)
        for token in kept:
            if len(out) == max_new_tokens or out[-1] in stop_ids:
                break
            out.append(token)
            on_token(token)
        result.step_s.append(time.perf_counter() - t0)
    result.depths = [model.cfg.n_layers] * len(out)
    return result


def speculation_round(engine, cache, pos, last, rule, choose, length, stop_ids, result, proposed=()):
    """One round from token `last` at position pos: draft up to `length` tokens (or take the `proposed` ones, which
    no block ran), verify them with the backbone in one pass, drop the rejected drafts' slots; returns the tokens kept
    (the accepted drafts, then the backbone's own)."""
    model = engine.model
    drafted, q = list(proposed), [choose.certain(token) for token in proposed]
    token = last
    for i in range(0 if proposed else length):
        logits, depth = engine.forward(torch.tensor([[token]], device=model.device), pos + i, cache, rule)
        token, probs = choose.draft(logits[0, -1])
        drafted.append(token)
        q.append(probs)
        result.draft_depths.append(depth)
        if token in stop_ids:
            break
    logits, _ = engine.forward(torch.tensor([[last] + drafted], device=model.device), pos, cache, NEVER,
                               all_logits=True)
    kept = choose.verify(logits[0], drafted, q)
    cache.drop(pos + len(kept))  # positions past the last kept token's (its own slot is written next round)
    result.drafted += len(drafted)
    result.accepted += len(kept) - 1
    result.looked_up += len(proposed)
    result.looked_up_accepted += len(kept) - 1 if proposed else 0
    result.round_lookups.append(bool(proposed))
    result.verified += 1
    result.draft_lengths.append(len(drafted))
    return kept


class Chooser:
    """Greedy choice (temperature 0) or sampling with the standard acceptance rule."""

    def __init__(self, temperature, top_p, generator, vocab=None):
        self.temperature, self.top_p, self.generator, self.vocab = temperature, top_p, generator, vocab

    def distribution(self, logits):
        """The distribution sampling draws from: softmax at the temperature, cut to the nucleus of top_p."""
        return nucleus(torch.softmax(logits.float() / self.temperature, dim=-1), self.top_p)

    def sample(self, logits):
        if self.temperature == 0:
            return greedy(logits)
        return int(torch.multinomial(self.distribution(logits), 1, generator=self.generator))

    def certain(self, token):
        """The distribution of a draft proposed without sampling: all its mass on the token (None when greedy)."""
        if self.temperature == 0:
            return None
        return torch.nn.functional.one_hot(torch.tensor(token), self.vocab).float()

    def draft(self, logits):
        """A drafted token and the distribution it was drawn from (None when greedy)."""
        if self.temperature == 0:
            return greedy(logits), None
        probs = self.distribution(logits)
        return int(torch.multinomial(probs, 1, generator=self.generator)), probs

    def verify(self, logits, drafted, q):
        """logits (len(drafted) + 1, vocab): the backbone's after the last kept token and after each draft. The
        accepted drafts and one token of the backbone's: its choice where the first draft fails, or after the last."""
        kept = []
        for i, token in enumerate(drafted):
            if self.temperature == 0:
                choice = greedy(logits[i])
                if choice != token:
                    return kept + [choice]
            else:
                p = self.distribution(logits[i])
                if torch.rand((), generator=self.generator) * q[i][token] > p[token]:  # accept with min(1, p/q)
                    residual = (p - q[i]).clamp(min=0)
                    return kept + [int(torch.multinomial(residual / residual.sum(), 1, generator=self.generator))]
            kept.append(token)
        return kept + [self.sample(logits[len(drafted)])]
