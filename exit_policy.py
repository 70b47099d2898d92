"""When a token leaves the backbone: one rule, read alike by the torch path, the native step and a prompt's prefill."""
import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch.nn.functional as F


def transition_similarity(h_in, h_out):
    """s_l = cos(h_l, h_{l+1}): how little block l turned each token's residual state. (B, T, d) -> (B, T)."""
    return F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)


@dataclass(frozen=True)
class ExitRule:
    """How a token leaves the backbone, as one value.

    After backbone block `layer` a step leaves when
      - layer >= min_layer and s_l, at its minimum over the step's tokens (a batch, or every token of a prompt:
        a prefill leaves at one depth), exceeds tau: a block that barely changes the residual state says the deeper
        blocks will refine rather than rewrite it, so their cheap river copies can take over with little error; or
      - it has run max_depth blocks (a cap; 0: every block is a river copy, the whole-model low-bit mode).
    It never leaves after the last block: there is no river left to run.

    tau = inf never computes s_l (the plain backbone); a finite tau above 1 computes it after every block from
    min_layer on and never fires. The check costs O(d_model) per token and block.
    """
    tau: float = math.inf
    min_layer: int = 0
    max_depth: int | None = None

    def __post_init__(self):
        tau, min_layer, max_depth = self.tau, self.min_layer, self.max_depth
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or math.isnan(tau) or tau == -math.inf:
            raise ValueError(f"tau must be a real number (cosine threshold; above 1 never exits), got {tau!r}")
        if isinstance(min_layer, bool) or not isinstance(min_layer, int) or min_layer < 0:
            raise ValueError(f"min_layer must be an int >= 0, got {min_layer!r}")
        if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0):
            raise ValueError(f"max_depth must be None or an int >= 0 (backbone blocks a token may run), got "
                             f"{max_depth!r}")
        object.__setattr__(self, "tau", float(tau))

    @property
    def checks_similarity(self):
        return self.tau != math.inf

    def leaves(self, layer, h_in, h_out):
        """After block `layer` took h_in (B, T, d) to h_out: leave the backbone now?"""
        fires = self.checks_similarity and layer >= self.min_layer and \
            transition_similarity(h_in, h_out).min().item() > self.tau
        return fires or (self.max_depth is not None and layer + 1 >= self.max_depth)

    def as_json(self):
        """The rule as strict JSON: tau null where it never checks."""
        return {"tau": self.tau if self.checks_similarity else None, "min_layer": self.min_layer,
                "max_depth": self.max_depth}

    def capped(self, depth):
        """The same rule, leaving after `depth` backbone blocks at the latest."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"a cap must be an int >= 0 (backbone blocks a token may run), got {depth!r}")
        return dataclasses.replace(self, max_depth=depth if self.max_depth is None else min(depth, self.max_depth))


NEVER = ExitRule()                   # the whole backbone: the full-precision model
RIVER_ONLY = ExitRule(max_depth=0)   # every block a river copy: the whole-model low-bit mode


def similarity(tau, min_layer=0):
    """The method's rule: leave after the first block from min_layer on whose s_l exceeds tau."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite real number (cosine threshold; above 1 never exits), got {tau!r}")
    return ExitRule(tau, min_layer)


def after(depth):
    """Leave after `depth` backbone blocks whatever the states say."""
    if depth is None:  # ExitRule(max_depth=None) never leaves: that rule is NEVER
        raise ValueError("after takes a depth: an int >= 0 (backbone blocks a token runs), got None")
    return ExitRule(max_depth=depth)
