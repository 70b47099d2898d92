"""A generation's record, the checks on what a caller asks of one, and how the next token is chosen (greedy, or
nucleus sampling): shared by River's engine (river.py) and speculative generation (speculative.py)."""
import math
import numbers
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list             # generated ids
    depths: list             # backbone blocks run by the forward pass that produced each token (its exit depth)
    prefill_s: float
    step_s: list             # wall time of each decode step (every generated token after the first)

    @property
    def decode_tokens_per_s(self):
        """Tokens after the first per second of the steps that made them; None when there was no decode step (one
        token generated): no rate to report."""
        return (len(self.tokens) - 1) / sum(self.step_s) if self.step_s else None


def check_max_new_tokens(max_new_tokens):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def check_fits_context(n_prompt, max_new_tokens, context):
    if n_prompt + max_new_tokens > context:
        raise ValueError(f"prompt of {n_prompt} tokens plus {max_new_tokens} new tokens exceeds the model's "
                         f"context of {context}")


def check_temperature(temperature):
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")


def check_top_p(top_p):
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):  # NaN fails the comparison too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_seed(seed):
    if seed is not None and not (isinstance(seed, int) and -2**63 <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [-2**63, 2**64) (what torch takes), got {seed!r}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(logits):
    """The id of the largest of (vocab,) logits, as torch.argmax picks it (the first of equal maxima, a NaN above
    all): on CPU through numpy, whose argmax over a large vocabulary is an order of magnitude faster than torch's,
    which showed in a decode step's time (RESULTS.md)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int((logits.detach() if logits.requires_grad else logits).numpy().argmax())
    return int(logits.argmax())


def sample(logits, temperature, top_p, generator):
    """Next id from (vocab,) logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return greedy(logits)
    sorted_probs, order = sorted_nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


def sorted_nucleus(probs, top_p):
    """probs (vocab,) sorted, most likely first, cut to the smallest prefix holding top_p of the mass and
    renormalized; and the ids in that order."""
    sorted_probs, order = probs.sort(descending=True)
    sorted_probs = sorted_probs * (sorted_probs.cumsum(0) - sorted_probs < top_p)
    return sorted_probs / sorted_probs.sum(), order


def nucleus(probs, top_p):
    """sorted_nucleus in the ids' own order: the distribution nucleus sampling draws from."""
    sorted_probs, order = sorted_nucleus(probs, top_p)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def check_generation(prompt, max_new_tokens, context, temperature, top_p, seed):
    """Every check on what a caller asks of a generation, before anything runs (Engine.generate and
    speculative.generate_speculative alike)."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give at least one token")
    check_max_new_tokens(max_new_tokens)
    check_fits_context(len(prompt), max_new_tokens, context)
    check_temperature(temperature)
    check_top_p(top_p)
    check_seed(seed)
