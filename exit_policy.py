"""When a token leaves the backbone: the state-transition-similarity rule, the trivial rules tests use, and a replay."""
import math
import numbers

import torch.nn.functional as F


def transition_similarity(h_in, h_out):
    """s_l = cos(h_l, h_{l+1}): how little block l turned each token's residual state. (B, T, d) -> (B, T)."""
    return F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)


class SimilarityExit:
    """Exit after block l (l >= min_layer) when min over the batch's tokens of s_l exceeds tau.

    A block that barely changes the residual state says the deeper blocks will refine rather than
    rewrite it, so their cheap river copies can take over with little error. tau > 1 never exits.
    The check is O(d) per token and block.
    """

    def __init__(self, tau, min_layer=0):
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite real number (cosine threshold, > 1 never exits), got {tau!r}")
        if isinstance(min_layer, bool) or not isinstance(min_layer, int) or min_layer < 0:
            raise ValueError(f"min_layer must be an int >= 0, got {min_layer!r}")
        self.tau = float(tau)
        self.min_layer = min_layer

    def should_exit(self, layer, h_in, h_out):
        if layer < self.min_layer or self.tau > 1:
            return False
        return transition_similarity(h_in, h_out).min().item() > self.tau

    def __repr__(self):
        return f"SimilarityExit(tau={self.tau}, min_layer={self.min_layer})"


class NeverExit:
    """Run the whole backbone."""

    def should_exit(self, layer, h_in, h_out):
        return False


class FixedExit:
    """Exit after block `layer` whatever the states say."""

    def __init__(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"FixedExit layer must be an int >= 0, got {layer!r}")
        self.layer = layer

    def should_exit(self, layer, h_in, h_out):
        return layer == self.layer


class ReplayedExit:
    """Exit after block `layer`, a depth drawn elsewhere (bench.py --shape replays depths measured on a real model),
    while s_l is still computed after every block as SimilarityExit computes it: on weights where the rule means
    nothing (random ones), a step still pays for the rule's own work."""

    def __init__(self, layer):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"ReplayedExit layer must be an int >= 0, got {layer!r}")
        self.layer = layer

    def should_exit(self, layer, h_in, h_out):
        transition_similarity(h_in, h_out).min().item()  # the rule's work and its host sync; the decision is replayed
        return layer == self.layer
