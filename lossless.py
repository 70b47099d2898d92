"""Lossless River in the bench: on the scored prompts its tokens against the backbone's, its speed over the backbone's,
how its drafts fared, and the round model: what a draft step and a check cost, and the speedup those costs predict."""
import statistics

import torch

from exit_policy import NEVER
from measure import log, median_us
from speculative import MAX_DRAFT

SPECULATION_TOKENS = 96  # new tokens per scored prompt in the lossless row's identity check


def measure_speculation(comparison, inputs):
    """Lossless River on each scored prompt: its greedy tokens against the backbone's (identical n of N), its decode
    speed over the backbone's there (the mean of the per-prompt ratios), acceptance, tokens kept per check, the share
    of drafts looked up; and on the native path the round model: a draft step's and each check's cost in backbone
    steps (round_costs), and the speedup they predict for the very rounds each prompt ran."""
    row = comparison.speculative
    if row is None:
        return None
    log(f"lossless River: {len(inputs.scored)} scored prompts x {SPECULATION_TOKENS} greedy tokens against the backbone")
    costs = round_costs(row.engine, row.rule, inputs.prompt)
    identical, ratios, predicted, runs = 0, [], [], []
    for context, _ in inputs.scored:
        base = comparison.backbone.generate(context, SPECULATION_TOKENS)
        spec = row.generate(context, SPECULATION_TOKENS)
        identical += spec.tokens == base.tokens
        if spec.decode_tokens_per_s and base.decode_tokens_per_s:
            ratios.append(spec.decode_tokens_per_s / base.decode_tokens_per_s)
            rounds = sum((0 if lookup else drafted) * costs["draft"] + costs["check"][drafted + 1]
                         for drafted, lookup in zip(spec.draft_lengths, spec.round_lookups))
            predicted.append((len(spec.tokens) - 1) / rounds)
        runs.append(spec)
    total = lambda name: sum(getattr(spec, name) for spec in runs)  # noqa: E731
    return {"identical": identical, "prompts": len(inputs.scored), "new_tokens": SPECULATION_TOKENS,
            "mean_ratio_to_backbone": statistics.mean(ratios) if ratios else None,
            "acceptance": total("accepted") / total("drafted") if total("drafted") else None,
            "tokens_per_verification": sum(len(s.tokens) - 1 for s in runs) / total("verified"),
            "looked_up_share": total("looked_up") / total("drafted") if total("drafted") else None,
            "looked_up_acceptance": total("looked_up_accepted") / total("looked_up") if total("looked_up") else None,
            "round_costs_in_backbone_steps": costs,
            "round_model_ratio": statistics.mean(predicted) if predicted else None}


def round_costs(engine, rule, prompt, repeats=15):
    """What a lossless round's passes cost, in one-token backbone steps, timed after `prompt`: a draft step of the
    drafter's rule, and a check of m tokens (the last kept and m - 1 drafts, every token's logits) for m = 2 up to
    the longest check; with the backbone step's microseconds."""
    model = engine.model
    cache = model.new_cache(len(prompt) + MAX_DRAFT + 1)
    engine.forward(torch.tensor([prompt[:-1]], device=model.device), 0, cache, NEVER)
    tokens = torch.tensor([prompt[-1:] * (MAX_DRAFT + 1)], device=model.device)  # the same slots rewritten each time

    def us(rule, m):
        return median_us(lambda: engine.forward(tokens[:, :m], len(prompt) - 1, cache, rule, all_logits=m > 1), 1,
                         repeats)
    step = us(NEVER, 1)
    return {"backbone_step_us": step, "draft": us(rule, 1) / step,
            "check": {m: us(NEVER, m) / step for m in range(2, MAX_DRAFT + 2)}}


def print_speculation(result, comparison):
    """Lossless River: its speed over the backbone's, identity, acceptance, and the round model beside it."""
    sp = result["speculation"]
    if sp is None:
        return
    row, base = result["modes"][comparison.speculative.name], result["modes"][comparison.backbone.name]
    print(f"lossless River (drafts looked up in the text where it repeats itself, else River's copies as a whole "
          f"model; the backbone checks): {row['decode_tokens_per_s']:.1f} tok/s = "
          f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x the backbone on the speed prompt, "
          f"{sp['mean_ratio_to_backbone']:.2f}x over the {sp['prompts']} scored prompts; acceptance "
          f"{sp['acceptance']:.3f} ({sp['looked_up_share']:.0%} of drafts looked up, {sp['looked_up_acceptance']:.3f} "
          f"of those kept), {sp['tokens_per_verification']:.2f} tokens per check; greedy tokens identical to the "
          f"backbone's on {sp['identical']}/{sp['prompts']} prompts ({sp['new_tokens']} new tokens each)")
    costs = sp["round_costs_in_backbone_steps"]
    checks = ", ".join(f"{m}: {costs['check'][m]:.2f}" for m in (2, 4, 8, 16) if m in costs["check"])
    print(f"  a round's passes in backbone steps ({costs['backbone_step_us']:.0f} us): a draft step "
          f"{costs['draft']:.2f}, a check of m tokens {checks}; the rounds the prompts ran predict "
          f"{sp['round_model_ratio']:.2f}x, measured {sp['mean_ratio_to_backbone']:.2f}x")
