"""The Exit River (a low-bit copy of every block, writing the backbone's KV cache slots) and the generation engine."""
import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

import kernels
from compiled import compiled_function, streamed_head, streamed_step
from cli import check_argument, fail, option, reading_files
from exit_policy import NEVER, RIVER_ONLY, ExitRule, similarity
from generation import (Generation, check_fits_context, check_generation, check_max_new_tokens, check_seed,
                        check_temperature, check_top_p, sample, sync)
from gptq import CalibrationInputs, load_stored_river, rounded, save_whole, stored_river_path
from kv_cache import Writer
from model import check_held, token_ids_error
from speculative import check_draft_length, default_draft_length, check_speculative, generate_speculative
from quantize import ACTIVATIONS, QuantizedLinear, check_quant_args, quantize_weight

# The paper's operating point, chosen on the choosing split (calibrate.CHOOSING, bundled model): the highest tau of
# calibrate.CALIBRATION_TAUS at which a token still runs the paper's 3 to 4 backbone blocks on average (tau 0.96 runs
# more than 4). The earlier rule, the lowest tau within half the whole-model W4A16 NLL increase, no longer tells taus
# apart with GPTQ copies (every tau meets it there); RESULTS.md has both.
DEFAULT_TAU = 0.95
DEFAULT_GROUP_SIZE = 64
# The last block turns the residual state the most (its transition similarity is the lowest on the bundled model):
# its 4-bit copy cost the most NLL of any single block, and on the choosing split 8 bits still lower River's loss at
# DEFAULT_TAU, for 1.8 MB of weights (RESULTS.md).
DEFAULT_EIGHT_BIT_LAYERS = (-1,)
# The river's LM head, where an exited token ends (a token that ran every backbone block ends at the model's own): at
# 8 bits it costs River almost no NLL on the choosing split at DEFAULT_TAU and a bf16 head's bytes are a large share
# of a River step; 4 bits cost clearly more NLL (RESULTS.md).
DEFAULT_HEAD_BITS = 8


# ---------------------------------------------------------------------------------------------- the river

def default_activations(device):
    """int16 activations on CPU, where integer dot products make low-bit weights fast (kernels.cpp); bf16 on CUDA
    (PyTorch's 4-bit kernel: the paper's W4A16)."""
    return "int16" if torch.device(device).type == "cpu" else "bf16"


def default_eight_bit_layers(bits, activations, held=None, n_layers=None):
    """River's 8-bit blocks unless asked otherwise, where 8-bit weights can go (int16 activations) and the rest are
    4-bit: the last one; and with only the backbone's first `held` blocks held (a capped River), every block from
    there on. Those copies have no backbone
    twin left: every token that reaches the cap and every prompt the cap stops (a prefill leaves at the minimum over
    its tokens, so usually at the cap) runs them, and a prompt's K/V there is what every later token reads. Measured
    on HumanEval at tau 0.95, D 8: NLL +0.09 with 4-bit copies there, +0.014 with 8-bit (README). None otherwise."""
    if bits != 4 or activations != "int16":
        return ()
    if held is None or held >= n_layers:
        return DEFAULT_EIGHT_BIT_LAYERS
    return tuple(range(held, n_layers))  # the last block among them


def river_block(block, bits=4, group_size=64, activations="int16", refine_steps=10, hessians=None, packed=None):
    """A low-bit twin of `block`: same interface, same norms, and -- the point -- the same `layer`,
    so it reads and writes the very cache slots its backbone twin would have written. refine_steps: the quantizer's
    least-squares rounds (quantize_weight). hessians: {matrix name: X^T X of its inputs} to round with GPTQ.
    packed: {matrix name: its packed int16-activation weight} of a stored river, taken as it is."""
    twin = copy.deepcopy(block)
    twin.cache_writer = Writer.RIVER
    device = block.attn_norm.weight.device
    for parent in (twin.attn, twin.mlp):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if packed is not None:
                layer = QuantizedLinear.from_packed(packed[name].to(device), *child.weight.shape, bits, group_size)
            else:
                qw = (quantize_weight(child.weight, bits, group_size, refine_steps) if hessians is None
                      else rounded(child.weight, hessians[name], bits, group_size, refine_steps))
                layer = QuantizedLinear(qw, device, activations)
            setattr(parent, name, layer)
    return twin


def check_group_size_fits(cfg, group_size):
    """Groups must tile the input width of every block weight: d_model (wqkv, w_gate_up), the attention
    heads' width (wo) and ffn_dim (w_down). Checked from the config, before any weight is read or quantized."""
    widths = {"d_model": cfg.d_model, "n_heads * head_dim": cfg.q_dim, "ffn_dim": cfg.ffn_dim}
    misfits = [f"{name} {width}" for name, width in widths.items() if width % group_size]
    if misfits:
        raise ValueError(f"group_size {group_size} does not divide the model's {', '.join(misfits)}")


def check_layers(layers, n_layers):
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"eight_bit_layers must be block indices in [{-n_layers}, {n_layers}), got {layer!r}")


class ExitRiver(nn.Module):
    """One low-bit copy of every backbone block, river block j writing layer j's K/V.

    Blocks in `eight_bit_layers` (negative indices count from the end) get 8-bit weights, the others `bits`:
    where a block's quantization error costs the most, it can be paid for there alone (README, "The last block at
    8 bits").
    refine_steps=0 skips the quantizer's least squares: minutes saved at 1B, for speed runs on random weights.
    blocks: the backbone blocks to copy, in layer order (default model.blocks). An iterator that reads each from the
    checkpoint when asked (load_weights.load_blocks) builds the river of a depth-capped model, whose deep blocks are
    never loaded: each is copied and dropped.
    head_bits: 4 or 8 for a low-bit copy of the LM head, which every pass that left the backbone ends at (a
    departure from the paper, which keeps the original head); None keeps the model's bf16 head. A pass that ran every
    backbone block always ends at the model's own head (Engine.head).
    calibration: token sequences (lists of ids) to round every matrix on with GPTQ (gptq.py), each on the inputs the
    backbone gives it on them; None rounds each weight to its own nearest grid (quantize_weight).
    """

    def __init__(self, model, bits=4, group_size=64, activations=None, eight_bit_layers=(), refine_steps=10,
                 blocks=None, head_bits=None, calibration=None, stored=None):
        super().__init__()
        n_layers = model.cfg.n_layers
        activations = activations or default_activations(model.device)
        check_quant_args(bits, group_size, activations)
        check_group_size_fits(model.cfg, group_size)
        check_layers(eight_bit_layers, n_layers)
        eight = {layer % n_layers for layer in eight_bit_layers}
        if eight:
            check_quant_args(8, group_size, activations)
        self.group_size, self.activations = group_size, activations
        self.bits = [8 if layer in eight else bits for layer in range(n_layers)]  # per block
        if stored is not None and (calibration is not None or activations != "int16"):
            raise ValueError("a stored river is taken as it is (int16 activations): no calibration, no other layout")
        blocks = model.blocks if blocks is None else blocks
        inputs = None if calibration is None else CalibrationInputs(model, calibration)
        pairs = ((b, None) for b in blocks) if inputs is None else inputs.through(blocks)
        self.blocks = nn.ModuleList(river_block(b, self.bits[b.layer], group_size, activations, refine_steps, h,
                                                None if stored is None else stored["blocks"][b.layer])
                                    for b, h in pairs)
        if [b.layer for b in self.blocks] != list(range(n_layers)):
            raise ValueError(f"a river copies every one of the model's {n_layers} blocks in order; got blocks "
                             f"{[b.layer for b in self.blocks]} (a model holding only its first blocks needs blocks=)")
        self.head = None
        if head_bits is not None:
            check_head_bits(head_bits, group_size)
            if stored is not None:
                self.head = QuantizedLinear.from_packed(stored["head"].to(model.device), *model.lm_head.weight.shape,
                                                        head_bits, group_size)
            else:
                qw = (quantize_weight(model.lm_head.weight, head_bits, group_size, refine_steps) if inputs is None
                      else rounded(model.lm_head.weight, inputs.head_hessian(), head_bits, group_size, refine_steps))
                self.head = QuantizedLinear(qw, model.device, "int16")

    def stored(self):
        """What ExitRiver(stored=...) rebuilds this river from (int16 activations): each block's packed weights by
        matrix name, and the head's."""
        return {"blocks": [{name.split(".")[-1]: m.packed for name, m in b.named_modules()
                            if isinstance(m, QuantizedLinear)} for b in self.blocks],
                "head": None if self.head is None else self.head.packed}


def check_head_bits(head_bits, group_size):
    """The river's LM head: 4 or 8 bits, int16 activations whatever the blocks' (its product is the kernels' or
    their twin's)."""
    if isinstance(head_bits, bool) or not isinstance(head_bits, int) or head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8 (None: the model's bf16 head), got {head_bits!r}")
    check_quant_args(head_bits, group_size, "int16")


def load_river(path=None, device="cpu", held=None, bits=4, group_size=DEFAULT_GROUP_SIZE, activations=None,
               eight_bit_layers=None, dtype=torch.bfloat16, head_bits=None, calibration=None):
    """(model holding its first `held` backbone blocks (default all), ExitRiver of every block, tokenizer), read in the
    order that keeps memory lowest: the embedding, final norm and head; each block read, its river copy made and the
    block dropped; then the backbone blocks kept. held 0: a river alone (the whole-model low-bit mode).
    eight_bit_layers: default those of a River holding `held` blocks (default_eight_bit_layers). calibration: token
    sequences to round the copies on with GPTQ (ExitRiver); such a river is kept in the cache folder once made
    (gptq.stored_river_path) and later loads read it, never running the calibration pass again."""
    from load_weights import load_blocks, load_model, model_dir
    model, tokenizer = load_model(path, device, dtype, held=0)
    held = model.cfg.n_layers if held is None else check_held(held, model.cfg.n_layers)
    activations = activations or default_activations(model.device)
    if eight_bit_layers is None:
        eight_bit_layers = default_eight_bit_layers(bits, activations, held, model.cfg.n_layers)
    store = stored = None
    if calibration is not None and activations == "int16":
        settings = {"bits": bits, "group_size": group_size, "eight_bit_layers": sorted(
            layer % model.cfg.n_layers for layer in eight_bit_layers), "head_bits": head_bits}
        store = stored_river_path(model_dir(path), settings, calibration)
        stored = load_stored_river(store)
    river = ExitRiver(model, bits, group_size, activations, eight_bit_layers,
                      blocks=load_blocks(path, None, model.device, dtype), head_bits=head_bits,
                      calibration=None if stored is not None else calibration, stored=stored)
    if store is not None and stored is None:
        save_whole(river.stored(), store)
    model.blocks.extend(load_blocks(path, range(held), model.device, dtype))
    return model, river, tokenizer


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    """Generation on one model and its river: each step runs the backbone until the exit rule says leave, the river
    copies of the remaining blocks, then the original final norm and LM head; every block writes its layer's slots
    of one KV cache. The rule is the whole difference between the modes: NEVER is the backbone, RIVER_ONLY the
    whole model on its low-bit copies, similarity(tau) River."""

    def __init__(self, model, river=None, native=None, compile=False):
        """native: None runs one-token decode steps through kernels.cpp where this CPU and these weights allow
        (bf16 backbone, river with int16 activations), False never, True insists (an error where it cannot); an
        instruction set's name ("avx512", "avx2") picks that one where None would pick the best.
        compile: the torch path's one-token block steps and head through torch.compile (where the native kernels do
        not run: CUDA, bf16 river activations, the KV strategies); the model stays as it is."""
        if river is not None and len(river.blocks) != model.cfg.n_layers:
            raise ValueError(f"river has {len(river.blocks)} blocks, the model {model.cfg.n_layers}")
        self.model, self.river = model, river
        # On CPU the residual stream and activations stay fp32 whatever the weights' precision, as in
        # kernels.cpp; on CUDA they take the weights' dtype (bf16 tensor cores).
        self.act_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
        self.native = None
        if native is not False:
            why = NativeDecoder.unsupported(model, river)
            lib = None if why else kernels.native(native if isinstance(native, str) else None)
            if native is True and (why or lib is None):
                raise ValueError(f"native decode was asked for but cannot run: {why or 'no kernels for this CPU'}")
            if lib is not None:
                self.native = NativeDecoder(lib, model, river)
        self.compiled = compile
        self.rules_checked = set()  # the exit rules check_rule has passed on this engine

    @property
    def path(self):
        """Which code runs the one-token decode steps: "native <instruction set>" or the torch path."""
        if self.native is not None:
            return f"native {self.native.isa}"
        return "torch, compiled" if self.compiled else "torch, eager"

    def check_rule(self, rule):
        """A rule this engine can run: one that may leave the backbone needs a river, and a model holding only its
        first blocks needs a rule that leaves by then."""
        if not isinstance(rule, ExitRule):
            raise TypeError(f"an exit rule must be an exit_policy.ExitRule, got {type(rule).__name__}")
        n_layers, held = self.model.cfg.n_layers, len(self.model.blocks)
        leaves_early = rule.max_depth is not None and rule.max_depth < n_layers  # RIVER_ONLY's max_depth 0 included
        if self.river is None and (rule.checks_similarity or leaves_early):
            raise ValueError(f"{rule} may leave the backbone, and this engine has no ExitRiver to go on with")
        if held < n_layers and (rule.max_depth is None or rule.max_depth > held):
            raise ValueError(f"this model holds only its first {held} of {n_layers} backbone blocks: its rule must "
                             f"leave by then (ExitRule.capped({held})), got {rule}")

    def forward(self, tokens, start, cache, rule, all_logits=False):
        """tokens (B, T) at positions start..start+T-1 -> (logits, backbone blocks run). Logits are (B, 1, vocab) for
        the last token, or (B, T, vocab) with all_logits: a prefill only needs the last. A prefill (T > 1) leaves at
        one depth for all its tokens: the rule sees the minimum over them."""
        if not isinstance(rule, ExitRule) or rule not in self.rules_checked:  # a decode loop brings one rule each step
            self.check_rule(rule)
            self.rules_checked.add(rule)
        if self.native is not None and tokens.shape[0] == 1 and cache is not None:
            return self.native.forward(tokens, start, cache, rule, all_logits)  # no autograd there to switch off
        return self.torch_forward(tokens, start, cache, rule, all_logits)

    @torch.inference_mode()
    def torch_forward(self, tokens, start, cache, rule, all_logits=False):
        """Engine.forward through PyTorch's modules, block by block."""
        model, n_layers = self.model, self.model.cfg.n_layers
        x = model.embed_tokens(tokens).to(self.act_dtype)                     # h_0: (B, T, d_model)
        pos = model.positions(start, tokens.shape[1], cache, self.act_dtype)
        depth = 0
        for block in model.blocks[:rule.max_depth]:
            h = self.run_block(block, x, pos, cache)                          # h_{l+1}
            leaves = depth < n_layers - 1 and rule.leaves(depth, x, h)
            x, depth = h, depth + 1
            if leaves:
                break
        for block in self.river.blocks[depth:] if depth < n_layers else ():
            x = self.run_block(block, x, pos, cache)  # river block j writes layer j: the cache stays whole
        return self.head(x if all_logits else x[:, -1:], depth), depth

    def head(self, x, depth):
        """The final norm and LM head after `depth` backbone blocks: the model's own after all of them, so a pass that
        never left is the backbone's bit for bit; the river's low-bit head, where it holds one, after an exit (this
        project's departure from the paper: README); the model's through torch.compile for one position when this
        engine compiles."""
        if depth < self.model.cfg.n_layers and self.river is not None and self.river.head is not None:
            return self.river.head(self.model.norm(x))
        if self.compiled and x.shape[1] == 1:
            return compiled_function(streamed_head)(self.model, x)
        return self.model.head(x)

    def run_block(self, block, x, pos, cache):
        """block(x), its one-token steps through torch.compile when this engine compiles (prefill stays eager)."""
        if not (self.compiled and x.shape[1] == 1 and cache is not None):
            return block(x, pos, cache)
        k_cache, v_cache = cache.claim(block.layer, pos.start, 1, block.cache_writer)
        return compiled_function(streamed_step)(block, x, pos.cos, pos.sin, pos.attn_mask, k_cache, v_cache,
                                                pos.start)

    def generate(self, prompt, max_new_tokens, rule, temperature=0.0, top_p=1.0, seed=None, stop_ids=(),
                 on_token=None):
        """Generate from a list of prompt ids under an exit rule; greedy unless temperature > 0. on_token(id): called
        with each token as it is chosen, outside the timed steps (river.py streams the text through it)."""
        self.check_rule(rule)
        model = self.model
        check_generation(prompt, max_new_tokens, model.cfg.max_seq_len, temperature, top_p, seed)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(0 if seed is None else seed)
        cache = model.new_cache(len(prompt) + max_new_tokens)
        tokens = torch.tensor([prompt], device=model.device)
        sync(model.device)
        t0 = time.perf_counter()
        logits, depth = self.forward(tokens, 0, cache, rule)
        out, depths = [sample(logits[0, -1], temperature, top_p, generator)], [depth]
        prefill_s, steps = time.perf_counter() - t0, []
        on_token = on_token or (lambda token: None)
        on_token(out[-1])
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            t0 = time.perf_counter()
            tokens = torch.tensor([[out[-1]]], device=model.device)
            logits, depth = self.forward(tokens, len(prompt) + len(out) - 1, cache, rule)
            out.append(sample(logits[0, -1], temperature, top_p, generator))  # reads the logits: syncs
            depths.append(depth)
            steps.append(time.perf_counter() - t0)
            on_token(out[-1])
        return Generation(out, depths, prefill_s, steps)


class NativeDecoder:
    """Passes of a batch of one on CPU through kernels.cpp, a decode step's one token or a prompt's many: the whole
    pass (embedding, backbone blocks with the exit rule, river copies, final norm and LM head) in one native call, one
    thread team. The torch path of Engine.forward is its twin (fp32 residual stream, bf16 K/V, int16-activation river
    products); the same cache, the same record of who wrote each slot."""

    def __init__(self, lib, model, river):
        cfg = model.cfg
        self.model, self.isa = model, lib.isa
        dims = kernels.Dims(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.norm_eps)
        kernels.on_huge_pages([*model.parameters(), *(() if river is None else (*river.parameters(), *river.buffers()))])
        backbone = [block_weights(b) for b in model.blocks]
        blocks = None if river is None else [block_weights(b) for b in river.blocks]

        river_head = None if river is None or river.head is None else matrix_of(river.head)
        self.decoder = kernels.Decoder(lib, dims, backbone, blocks, model.embed.weight, model.inv_freq,
                                       model.norm.weight, model.lm_head.weight, river_head)
        self.exits = {}  # ExitRule -> its C struct, filled once (a decode step runs the same rule again and again)

    @staticmethod
    def unsupported(model, river):
        """Why the native path cannot run this model and river, or None when it can."""
        cfg = model.cfg
        if model.device.type != "cpu" or model.dtype != torch.bfloat16:
            return f"the native path runs bf16 weights on CPU, not {model.dtype} on {model.device.type}"
        if cfg.d_model % kernels.BLOCK_ROWS or cfg.ffn_dim % kernels.BLOCK_ROWS or cfg.head_dim % 16:
            return f"d_model {cfg.d_model}, ffn_dim {cfg.ffn_dim} or head_dim {cfg.head_dim} is not a multiple of 16"
        if cfg.head_dim > kernels.MAX_HEAD_DIM:
            return f"head_dim {cfg.head_dim} is above the kernels' {kernels.MAX_HEAD_DIM}"
        if river is not None and river.activations != "int16":
            return f"the native river takes int16 activations, not {river.activations}"
        if river is not None and river.head is not None and cfg.vocab_size % kernels.BLOCK_ROWS:
            return f"the river's low-bit head has {cfg.vocab_size} rows, not a multiple of {kernels.BLOCK_ROWS}"
        return None

    def forward(self, tokens, start, cache, rule, all_logits=False, similarity=None):
        """Engine.forward for a batch of one, tokens (1, T). similarity: see kernels.Decoder.forward."""
        T = tokens.shape[1]
        if T == 0:
            raise ValueError("a pass needs at least one token")
        cache.check_range(start, T)  # before the kernel writes
        if rule not in self.exits:
            self.exits[rule] = native_exit(rule, self.model)
        logits, depth = self.decoder.forward(tokens[0], start, cache.k, cache.v, self.exits[rule], torch.get_num_threads(),
                                        all_logits, similarity)
        if depth < 0:  # the kernel checks the ids before anything else, and ran nothing
            raise token_ids_error(tokens, self.model.cfg.vocab_size)
        cache.record_pass(depth, start, T)
        return logits, depth


def native_exit(rule, model):
    """An ExitRule as kernels.cpp reads it: the one place the C struct is filled."""
    max_depth = model.cfg.n_layers if rule.max_depth is None else min(rule.max_depth, model.cfg.n_layers)
    return kernels.Exit(int(rule.checks_similarity), rule.tau if rule.checks_similarity else 0.0, rule.min_layer,
                        max_depth)


def matrix_of(linear):
    """A linear layer's weight as the kernels take it: bf16, or (packed, N, K, group size, bits)."""
    if isinstance(linear, QuantizedLinear):
        return linear.packed, linear.out_features, linear.in_features, linear.group_size, linear.bits
    return linear.weight


def block_weights(block):
    """A block's norms and matrices as kernels.Stack takes them."""
    return {"attn_norm": block.attn_norm.weight, "mlp_norm": block.mlp_norm.weight,
            "qkv": matrix_of(block.attn.wqkv), "o": matrix_of(block.attn.wo),
            "gate_up": matrix_of(block.mlp.w_gate_up), "down": matrix_of(block.mlp.w_down)}



# ------------------------------------------------------------------------------------------ command line

@dataclass(frozen=True)
class Mode:
    """What `--mode NAME` runs, mapped once from its name: the weights it loads, its engine and its exit rule.
    River's own modes differ only in the rule; kv_strategies.py adds the KV strategies River argues against."""
    rule: Callable                 # (tau, max_backbone_depth or None) -> ExitRule
    river: bool = True             # loads an ExitRiver, and so takes --max-backbone-depth
    holds_backbone: bool = True    # keeps backbone blocks (the whole-model low-bit mode keeps none)
    calibrates: bool = False       # tau is its to choose: takes --quality-budget
    engine: Callable = None        # (model, river, native, compile) -> an engine; None: Engine


MODES = {
    "backbone": Mode(lambda tau, cap: NEVER, river=False),
    "quantized": Mode(lambda tau, cap: RIVER_ONLY, holds_backbone=False),
    "river": Mode(lambda tau, cap: similarity(tau) if cap is None else similarity(tau).capped(cap), calibrates=True),
}


# The exit rules speculative generation may draft with (--drafter), from River's tau.
DRAFTERS = {"quantized": lambda tau: RIVER_ONLY, "river": similarity}


def add_river_options(parser):
    """The options that say what the river's copies are: widths, the head, rounding, groups, activations."""
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="river weights (default 4)")
    parser.add_argument("--head-bits", type=int, choices=(4, 8, 16), default=DEFAULT_HEAD_BITS,
                        help="the river's LM head, which every token that may leave the backbone ends at (16: the "
                             "model's own bf16 head; the backbone mode always uses it)")
    parser.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                        help="how the river's weights are rounded: GPTQ on HumanEval's calibration split (default; "
                             "about 25 s the first time, then read from the cache folder) or each weight to its "
                             "nearest grid point")
    parser.add_argument("--group-size", type=option(int, partial(check_quant_args, 4)), default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--activations", choices=ACTIVATIONS, default=None,
                        help="river activations: int16 per group (default on CPU: integer dot products in the native "
                             "kernels) or bf16 (PyTorch's 4-bit kernel, the paper's W4A16; default on CUDA)")
    parser.add_argument("--eight-bit-layers", type=int, nargs="*", default=None, metavar="LAYER",
                        help="river blocks kept at 8 bits (negative counts from the end; default with int16 "
                             f"activations: {' '.join(map(str, DEFAULT_EIGHT_BIT_LAYERS))}, the last block)")


def parser_for(modes):
    import calibrate
    parser = argparse.ArgumentParser(description="Generate with River-LLM early exit.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--model", default=None, help="HF Llama folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=option(int, check_max_new_tokens), default=64)
    parser.add_argument("--mode", choices=tuple(modes), default="river",
                        help="what runs (kv_strategies.py's command line adds the KV strategies River argues against)")
    exit_rule = parser.add_mutually_exclusive_group()
    exit_rule.add_argument("--tau", type=option(float, similarity), default=DEFAULT_TAU,
                           help="exit threshold on the transition similarity; > 1 never exits")
    exit_rule.add_argument("--quality-budget", type=option(float, calibrate.check_budget), default=None, metavar="B",
                           help="--mode river: pick tau instead of --tau, the fastest (fewest backbone blocks per "
                                f"token) of {' '.join(map(str, calibrate.CALIBRATION_TAUS))} whose mean NLL "
                                "increase over the backbone is at most B nats per token on HumanEval's choosing "
                                f"split (problems {calibrate.CHOOSING.start}..{calibrate.CHOOSING.stop - 1}, disjoint "
                                "from the ones bench.py scores and GPTQ rounds on), teacher-forced once per tau and "
                                "once through the whole backbone before generating (a few minutes)")
    parser.add_argument("--max-backbone-depth", type=int, default=None, metavar="D",
                        help="--mode river: every token leaves the backbone after block D - 1 at the latest, and the "
                             "backbone's blocks from D on are never loaded (their river copies are made one block at "
                             "a time as the checkpoint is read; with --quality-budget all are loaded, to calibrate "
                             "on); 0 to the model's layer count (default: all)")
    add_river_options(parser)
    parser.add_argument("--speculative", action="store_true",
                        help="--mode river: lossless generation, River drafting and the whole backbone checking the "
                             "drafts in one pass; the output is the backbone's (greedy: token for token)")
    parser.add_argument("--draft-length", type=option(int, check_draft_length), default=None, metavar="K",
                        help="--speculative: most tokens drafted per check (it adapts to recent acceptance below that; default "
                             "by instruction set: speculative.DRAFT_LENGTHS)")
    parser.add_argument("--drafter", choices=tuple(DRAFTERS), default="quantized",
                        help="--speculative: the exit rule that drafts: every block a river copy (quantized: with "
                             "River's default copies and head, 1.54x the backbone on HumanEval's calibration split "
                             "with AVX-512) or River's similarity rule at --tau")
    parser.add_argument("--no-native", action="store_true",
                        help="run decode steps in plain torch even where the native kernels could")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=option(float, check_temperature), default=0.0)
    parser.add_argument("--top-p", type=option(float, check_top_p), default=1.0)
    parser.add_argument("--seed", type=option(int, check_seed), default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the torch path's one-token decode steps (where the native kernels do "
                             "not run: CUDA, bf16 river activations, --no-native); seconds to start")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end (else the text as it "
                                                            "is generated)")
    return parser


def parse_arguments(argv, modes):
    """The arguments, every check that needs no weights done (the config and tokenizer are read for those), and what
    the run needs besides them: (args, mode, device, cfg, tokenizer, prompt ids, stop ids, river's eight-bit blocks)."""
    from load_weights import chat_prompt, load_config_and_tokenizer, resolve_device, stop_token_ids
    parser = parser_for(modes)
    args = parser.parse_args(argv)
    mode = modes[args.mode]
    args.drafter = DRAFTERS[args.drafter]  # the name mapped once to its rule
    args.bits = args.bits or 4
    if not args.prompt:
        parser.error("argument --prompt: the prompt is empty")
    if args.max_backbone_depth is not None and not mode.river:
        parser.error(f"argument --max-backbone-depth: caps River's backbone (--mode river); --mode {args.mode} runs "
                     "every backbone block")
    if args.speculative and not (mode.river and mode.holds_backbone):
        parser.error(f"argument --speculative: River drafts and the backbone checks (--mode river); --mode {args.mode} "
                     "has no drafter")
    if args.speculative and args.max_backbone_depth is not None:
        parser.error("argument --speculative: the backbone checks every draft with all its blocks; "
                     "--max-backbone-depth would drop them")
    if args.quality_budget is not None and not mode.calibrates:
        parser.error(f"argument --quality-budget: picks River's tau (--mode river); --mode {args.mode} has none")
    device = check_argument(parser, "--device", resolve_device, args.device)

    def read_prompt():  # config and tokenizer only: what the model's size decides fails before its weights load
        cfg, tokenizer = load_config_and_tokenizer(args.model)
        text = chat_prompt(args.prompt, args.model) if args.chat else args.prompt
        return cfg, tokenizer, tokenizer.encode(text).ids, stop_token_ids(tokenizer, args.model)
    cfg, tokenizer, prompt, stop = reading_files(read_prompt)
    check_argument(parser, "--max-new-tokens", check_fits_context, len(prompt), args.max_new_tokens, cfg.max_seq_len)
    if args.max_backbone_depth is not None:
        check_argument(parser, "--max-backbone-depth", check_held, args.max_backbone_depth, cfg.n_layers)
    args.activations = args.activations or default_activations(device)
    check_argument(parser, "--activations", check_quant_args, args.bits, args.group_size, args.activations)
    eight_bit = args.eight_bit_layers
    if eight_bit is None:
        eight_bit = default_eight_bit_layers(args.bits, args.activations,
                                             args.max_backbone_depth if mode.holds_backbone else None, cfg.n_layers)
    check_argument(parser, "--eight-bit-layers", check_layers, eight_bit, cfg.n_layers)
    if mode.river:
        check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    return args, mode, device, cfg, tokenizer, prompt, stop, eight_bit


def load_weights_of(mode, args, device, eight_bit, tokenizer):
    """(model, river or None) holding what the mode runs, through the streaming loader: each block read, its river copy
    made, the block dropped; then the backbone blocks kept (none for the whole-model low-bit mode; River all of them
    when it calibrates, since the cap applies at run time, else its first D)."""
    from load_weights import load_model
    if not mode.river:
        return reading_files(load_model, args.model, device, torch.bfloat16)[0], None
    held = 0 if not mode.holds_backbone else None if args.quality_budget is not None else args.max_backbone_depth
    head_bits = None if args.head_bits == 16 else args.head_bits
    calibration = None
    if args.rounding == "gptq":
        import calibrate
        calibration = reading_files(calibrate.rounding_sequences, tokenizer)
    model, river, _ = reading_files(load_river, args.model, device, held, args.bits, args.group_size,
                                    args.activations, eight_bit, torch.bfloat16, head_bits, calibration)
    return model, river


def calibrated_tau(engine, tokenizer, budget):
    """--quality-budget: the fastest tau within the budget on HumanEval's choosing split, with the whole backbone
    (a cap would bias the choice: calibrate.calibrate_tau); a one-line error when none is."""
    import calibrate
    split = reading_files(calibrate.choosing_sequences, tokenizer, len(calibrate.CHOOSING), calibrate.MAX_TARGET)
    calibration = calibrate.calibrate_tau(engine, split, calibrate.CALIBRATION_TAUS, budget,
                                          log=lambda message: print(message, file=sys.stderr))
    if calibration.tau is None:
        best = min(calibration.nll_increase, key=calibration.nll_increase.get)
        fail(f"no tau of {' '.join(map(str, calibrate.CALIBRATION_TAUS))} meets the quality budget {budget:g}: the "
             f"smallest NLL increase on the choosing split is {calibration.nll_increase[best]:+.4f} (tau {best:g})")
    print(f"quality budget {budget:g}: tau {calibration.tau:g} (NLL increase "
          f"{calibration.nll_increase[calibration.tau]:+.4f} on the choosing split, "
          f"{calibration.mean_backbone_blocks[calibration.tau]:.2f} backbone blocks per token)", file=sys.stderr)
    return calibration


class TextStream:
    """Prints generated text as tokens arrive, as llama.cpp and transformers' TextStreamer do: a character whose
    bytes are split across tokens is printed once it is whole (until then its prefix decodes to U+FFFD)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.tokens, self.printed = tokenizer, out or sys.stdout, [], ""

    def __call__(self, token):
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def close(self):
        """Whatever is left (an incomplete character at the very end), then a newline."""
        text = self.tokenizer.decode(self.tokens)
        self.out.write((text[len(self.printed):] if text.startswith(self.printed) else "") + "\n")
        self.out.flush()


def main(argv=None, modes=MODES):
    """modes: the --mode choices, name -> Mode; kv_strategies.py adds its strategies, so this file never imports it."""
    args, mode, device, cfg, tokenizer, prompt, stop, eight_bit = parse_arguments(argv, modes)
    model, river = load_weights_of(mode, args, device, eight_bit, tokenizer)
    native = False if args.no_native else None
    engine = (mode.engine or Engine)(model, river, native, args.compile)
    tau, calibration = args.tau, None
    if args.quality_budget is not None:
        calibration = calibrated_tau(engine, tokenizer, args.quality_budget)
        tau = calibration.tau
    rule = mode.rule(tau, args.max_backbone_depth)
    if args.compile:  # compile outside the timed run
        engine.generate(prompt, min(3, args.max_new_tokens), rule)
    stream = None if args.json else TextStream(tokenizer)
    if args.speculative:
        try:
            check_speculative(engine, args.drafter(tau), args.draft_length or default_draft_length(engine))
        except ValueError as err:
            fail(f"--speculative: {err}")
        rule = args.drafter(tau)
        result = generate_speculative(engine, prompt, args.max_new_tokens, rule, args.draft_length,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop_ids=stop,
                                      on_token=stream)
    else:
        result = engine.generate(prompt, args.max_new_tokens, rule, args.temperature, args.top_p, args.seed, stop,
                                 on_token=stream)
    if args.json:
        print(json.dumps({"text": tokenizer.decode(result.tokens), "tokens": result.tokens, "depths": result.depths,
                          "decode_tokens_per_s": result.decode_tokens_per_s, "prefill_s": result.prefill_s,
                          "mode": args.mode, "rule": rule.as_json(), "tau": tau,
                          "quality_budget": args.quality_budget,
                          "calibration": None if calibration is None else calibration_json(calibration),
                          "max_backbone_depth": args.max_backbone_depth, "held_blocks": len(model.blocks),
                          "bits": args.bits, "head_bits": args.head_bits, "rounding": args.rounding,
                          "activations": args.activations,
                          "eight_bit_layers": list(eight_bit),
                          "path": engine.path, "speculative": speculation_json(result) if args.speculative else None},
                         allow_nan=False))
        return
    stream.close()
    rate = result.decode_tokens_per_s
    print(f"[{args.mode}{' speculative' if args.speculative else ''}] "
          + ("no decode step" if rate is None else f"decode {rate:.1f} tok/s")
          + (f", {result.acceptance:.2f} of drafts accepted, {result.tokens_per_verification:.2f} tokens per check"
             if args.speculative and result.verified else
             f", mean backbone blocks per token {sum(result.depths) / len(result.depths):.2f} of {cfg.n_layers}"))


def speculation_json(result):
    return {"drafted": result.drafted, "accepted": result.accepted, "verified": result.verified,
            "acceptance": result.acceptance, "tokens_per_verification": result.tokens_per_verification}


def calibration_json(calibration):
    """What --json reports of a calibrate.Calibration: the tau picked and, per tau tried (keys as text), the NLL
    increase and mean backbone blocks; a number that is not finite as null (strict JSON)."""
    def number(value):
        return value if math.isfinite(value) else None
    return {"tau": calibration.tau,
            "nll_increase": {str(t): number(v) for t, v in calibration.nll_increase.items()},
            "mean_backbone_blocks": {str(t): number(v) for t, v in calibration.mean_backbone_blocks.items()}}


if __name__ == "__main__":
    main()
