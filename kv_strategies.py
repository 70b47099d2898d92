"""The answers to KV cache absence that River argues against, as small strategies one engine loop runs.

Every strategy here exits a token when the same similarity policy says so, and with no river the token's
output comes from its exit state through the original final norm and LM head. They differ only in what the
skipped layers' cache slots get, which is what later tokens read.
"""
import dataclasses

import torch

import river_cli
from exit_policy import similarity
from kv_cache import Writer
from river import Engine


class Strategy:
    """What a strategy does around the backbone blocks of one sequence. The hooks here leave the plain backbone as
    it is; a strategy overrides the ones it needs, and keeps whatever it must remember between steps."""

    def __init__(self, model):
        self.model = model

    def new_sequence(self):
        """A prefill at position 0 starts a new sequence: forget the last one."""

    def deepest_exit(self):
        """The most blocks this step may run."""
        return self.model.cfg.n_layers

    def before_block(self, layer, cache):
        """Runs before the step's block `layer`; returns the blocks it ran for other tokens."""
        return 0

    def positions(self, pos, layer, cache):
        """The positions (and attention mask) block `layer` runs this step with."""
        return pos

    def after_exit(self, x, depth, pos, cache):
        """The step ran blocks 0..depth-1 and left with states x (B, T, d_model); what do layers depth.. get?"""


class Propagate(Strategy):
    """CALM: the skipped layers' K/V are projected from the exit state through each skipped layer's own norm and
    K/V projections."""

    def after_exit(self, x, depth, pos, cache):
        for skipped in self.model.blocks[depth:]:
            k, v = skipped.attn.project_kv(skipped.attn_norm(x), pos)
            cache.write(skipped.layer, pos.start, k, v, Writer.PROPAGATED)


class Mask(Strategy):
    """D-LLM: skipped layers write nothing, and later tokens' attention skips the empty slots."""

    def positions(self, pos, layer, cache):
        """The step's mask, less the slots of `layer` nobody wrote (the step's own slots are written first)."""
        readable = cache.filled(layer)
        readable[pos.start:pos.start + pos.length] = True
        return dataclasses.replace(pos, attn_mask=pos.attn_mask & readable)


class Recompute(Strategy):
    """EE-LLM: the exited token's state waits; when a later token runs a layer the waiting tokens lack, they run it
    too, batched with it, so the cache ends up exact."""

    def __init__(self, model):
        super().__init__(model)
        self.pending = {}  # position -> [next layer it lacks, its state there (B, d_model)]

    def new_sequence(self):
        self.pending.clear()

    def before_block(self, layer, cache):
        """Run `layer` for every waiting token that lacks it, contiguous runs batched; returns the tokens it ran."""
        waiting = sorted(p for p, (next_layer, _) in self.pending.items() if next_layer == layer)
        runs = []
        for p in waiting:
            if runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        block = self.model.blocks[layer]
        for run in runs:
            x = torch.stack([self.pending[p][1] for p in run], dim=1)            # (B, len(run), d_model)
            h = block(x, self.model.positions(run[0], len(run), cache), cache)
            for i, p in enumerate(run):
                if layer + 1 == self.model.cfg.n_layers:
                    del self.pending[p]
                else:
                    self.pending[p] = [layer + 1, h[:, i]]
        return len(waiting)

    def after_exit(self, x, depth, pos, cache):
        if depth < self.model.cfg.n_layers:
            for i in range(pos.length):
                self.pending[pos.start + i] = [depth, x[:, i]]

    def flush(self, cache):
        """Finish every waiting token's missing layers, leaving the cache exact; returns the blocks run."""
        return sum(self.before_block(layer, cache) for layer in range(self.model.cfg.n_layers))


class Monotonic(Strategy):
    """SkipDecode: a token may exit no deeper than the token before it, so nothing it reads is empty."""

    def __init__(self, model):
        super().__init__(model)
        self.depth_cap = model.cfg.n_layers  # the previous token's exit depth

    def new_sequence(self):
        self.depth_cap = self.model.cfg.n_layers

    def deepest_exit(self):
        return self.depth_cap

    def after_exit(self, x, depth, pos, cache):
        self.depth_cap = depth


STRATEGIES = (Propagate, Mask, Recompute, Monotonic)


class BaselineEngine(Engine):
    """Token-level early exit without a river: the engine's generation loop, with a forward of its own that runs
    the backbone until the exit rule says leave and lets a strategy (one of STRATEGIES) do the rest."""

    def __init__(self, model, strategy, compile=False):
        super().__init__(model, river=None, native=False, compile=compile)  # its forward is its own
        if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
            raise ValueError(f"strategy must be one of {[s.__name__ for s in STRATEGIES]}, got {strategy!r}")
        self.strategy = strategy(model)

    @property
    def path(self):
        return f"{super().path}, {type(self.strategy).__name__.lower()}"

    def check_rule(self, rule):
        """Any rule that runs block 0: without a river, a token that leaves goes straight to the final norm and LM
        head."""
        if rule.max_depth == 0:
            raise ValueError(f"{rule} runs no backbone block; a strategy without a river needs at least one")

    @torch.inference_mode()
    def forward(self, tokens, start, cache, rule, all_logits=False):
        """Like Engine.forward; returns (logits, blocks run), counting blocks recomputed for waiting tokens."""
        model, strategy = self.model, self.strategy
        if start == 0:
            strategy.new_sequence()
        x = model.embed_tokens(tokens)
        pos = model.positions(start, tokens.shape[1], cache)
        self.check_rule(rule)
        deepest = strategy.deepest_exit() if rule.max_depth is None else min(strategy.deepest_exit(), rule.max_depth)
        blocks_run = 0
        for layer, block in enumerate(model.blocks):
            blocks_run += strategy.before_block(layer, cache)
            h = self.run_block(block, x, strategy.positions(pos, layer, cache), cache)
            blocks_run += 1
            leaves = layer + 1 == deepest or (layer < model.cfg.n_layers - 1 and rule.leaves(layer, x, h))
            x = h
            if leaves:
                break
        strategy.after_exit(x, layer + 1, pos, cache)
        return self.head(x if all_logits else x[:, -1:], layer + 1), blocks_run


def strategy_mode(strategy):
    """The --mode that runs `strategy`: River's exit rule, no river."""
    return river_cli.Mode(lambda tau, cap: similarity(tau), river=False,
                      engine=lambda model, _river, _native, compile: BaselineEngine(model, strategy, compile))


def main(argv=None):
    """river.py's command line, with the strategies as modes beside River's."""
    river_cli.main(argv, {**river_cli.MODES, **{s.__name__.lower(): strategy_mode(s) for s in STRATEGIES}})


if __name__ == "__main__":
    main()
