"""The answers to KV cache absence that River argues against, as small variants of the same engine and exit rule.

Every strategy here exits a token when the same similarity policy says so, and with no river the token's
output comes from its exit state through the original final norm and LM head. They differ only in what the
skipped layers' cache slots get, which is what later tokens read:
  propagate  (CALM)      the skipped layers' K/V are projected from the exit state through each skipped
                         layer's own norm and K/V projections;
  mask       (D-LLM)     skipped layers write nothing, and later tokens' attention skips the empty slots;
  recompute  (EE-LLM)    the exited token's state waits; when a later token runs a layer the waiting tokens
                         lack, they run it too, batched with it, so the cache ends up exact;
  monotonic  (SkipDecode) a token may exit no deeper than the token before it, so nothing it reads is empty.
"""
import dataclasses

import torch

from exit_policy import NeverExit
from kv_cache import Writer
from river import Engine, main as river_main

STRATEGIES = ("propagate", "mask", "recompute", "monotonic")


class BaselineEngine(Engine):
    """Token-level early exit without a river. Keeps the little state a strategy needs between the steps of
    one sequence (a prefill at position 0 starts a new one)."""

    def __init__(self, model, compile=False):
        super().__init__(model, river=None, compile=compile, native=False)  # its forward is its own
        self.pending = {}       # recompute: position -> [next layer it lacks, its state there (d_model,)]
        self.depth_cap = model.cfg.n_layers  # monotonic: the previous token's exit depth

    def check_mode(self, mode):
        if mode not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {mode!r}")

    @torch.inference_mode()
    def forward(self, tokens, start, cache, mode="propagate", policy=None, all_logits=False):
        """Like Engine.forward; returns (logits, blocks run), counting blocks recomputed for waiting tokens."""
        self.check_mode(mode)
        model, n_layers = self.model, self.model.cfg.n_layers
        if start == 0:
            self.pending.clear()
            self.depth_cap = n_layers
        policy = policy or NeverExit()
        x = model.embed_tokens(tokens)
        pos = model.positions(start, tokens.shape[1], cache)
        cap = self.depth_cap if mode == "monotonic" else n_layers
        blocks_run = 0
        for layer, block in enumerate(model.blocks):
            if mode == "recompute":
                blocks_run += self.catch_up(layer, cache)
            h = block(x, self.mask_empty(pos, cache, layer) if mode == "mask" else pos, cache)
            blocks_run += 1
            exits = layer + 1 == cap or (layer < n_layers - 1 and policy.should_exit(layer, x, h))
            x = h
            if exits:
                break
        depth = layer + 1
        if mode == "propagate":
            for skipped in model.blocks[depth:]:
                k, v = skipped.attn.project_kv(skipped.attn_norm(x), pos)
                cache.write(skipped.layer, start, k, v, Writer.PROPAGATED)
        elif mode == "recompute" and depth < n_layers:
            for i in range(tokens.shape[1]):
                self.pending[start + i] = [depth, x[:, i]]
        elif mode == "monotonic":
            self.depth_cap = depth
        return model.head(x if all_logits else x[:, -1:]), blocks_run

    def mask_empty(self, pos, cache, layer):
        """The step's mask, less the slots of `layer` nobody wrote (the step's own slots are written first)."""
        readable = cache.filled(layer)
        readable[pos.start:pos.start + pos.length] = True
        return dataclasses.replace(pos, attn_mask=pos.attn_mask & readable)

    def catch_up(self, layer, cache):
        """Run `layer` for every waiting token that lacks it, contiguous runs batched; returns tokens run."""
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

    def flush(self, cache):
        """Finish every waiting token's missing layers (recompute), leaving the cache exact."""
        blocks = 0
        for layer in range(self.model.cfg.n_layers):
            blocks += self.catch_up(layer, cache)
        return blocks


def main(argv=None):
    """river.py's command line, with the strategies as modes beside River's."""
    river_main(argv, {name: BaselineEngine for name in STRATEGIES})


if __name__ == "__main__":
    main()
