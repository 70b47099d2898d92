"""The Exit River (W4A16 copies of every block sharing the backbone's KV cache) and the generation engine."""
import argparse
import copy
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

import kernels
from exit_policy import FixedExit, NeverExit, ReplayedExit, SimilarityExit
from kv_cache import Writer
from model import check_backbone_depth, compiled, compiled_blocks, copy_sharing_weights
from quantize import ACTIVATIONS, QuantizedLinear, check_quant_args, quantize_weight

MODES = ("backbone", "quantized", "river")
# Chosen from bench.py's sweep on the bundled model (see README): the lowest tau, in steps of 0.01, whose NLL
# increase stays under half of the whole-model W4A16 increase (0.94 does not).
DEFAULT_TAU = 0.95
DEFAULT_GROUP_SIZE = 64
# The last block turns the residual state the most (its transition similarity is the lowest, 0.3 to 0.75 on the
# bundled model): its 4-bit copy cost the most NLL of any single block, so the river keeps it at 8 bits (README).
DEFAULT_EIGHT_BIT_LAYERS = (-1,)


# ---------------------------------------------------------------------------------------------- the river

def default_activations(device):
    """int16 activations on CPU, where integer dot products make low-bit weights fast (kernels.cpp); bf16 on CUDA
    (PyTorch's 4-bit kernel: the paper's W4A16)."""
    return "int16" if torch.device(device).type == "cpu" else "bf16"


def default_eight_bit_layers(bits, activations, max_backbone_depth=None, n_layers=None):
    """River's 8-bit blocks unless asked otherwise, where 8-bit weights can go (int16 activations) and the rest are
    4-bit: the last one; and with the backbone capped at D blocks, every block from D on. Those copies have no backbone
    twin left: every token that reaches the cap and every prompt the cap stops (a prefill leaves at the minimum over
    its tokens, so usually at the cap) runs them, and a prompt's K/V there is what every later token reads. Measured
    on HumanEval at tau 0.95, D 8: NLL +0.09 with 4-bit copies there, +0.014 with 8-bit (README). None otherwise."""
    if bits != 4 or activations != "int16":
        return ()
    if max_backbone_depth is None or max_backbone_depth >= n_layers:
        return DEFAULT_EIGHT_BIT_LAYERS
    return tuple(range(max_backbone_depth, n_layers))  # the last block among them


def river_block(block, bits=4, group_size=64, activations="int16", refine_steps=10):
    """A low-bit twin of `block`: same interface, same norms, and -- the point -- the same `layer`,
    so it reads and writes the very cache slots its backbone twin would have written. refine_steps: the quantizer's
    least-squares rounds (quantize_weight)."""
    twin = copy.deepcopy(block)
    twin.cache_writer = Writer.RIVER
    device = block.attn_norm.weight.device
    for parent in (twin.attn, twin.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                qw = quantize_weight(child.weight, bits, group_size, refine_steps)
                setattr(parent, name, QuantizedLinear(qw, device, activations))
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
    """

    def __init__(self, model, bits=4, group_size=64, activations=None, eight_bit_layers=(), refine_steps=10,
                 blocks=None):
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
        self.blocks = nn.ModuleList(river_block(b, self.bits[b.layer], group_size, activations, refine_steps)
                                    for b in (model.blocks if blocks is None else blocks))
        if [b.layer for b in self.blocks] != list(range(n_layers)):
            raise ValueError(f"a river copies every one of the model's {n_layers} blocks in order; got blocks "
                             f"{[b.layer for b in self.blocks]} (a model holding only its first blocks needs blocks=)")


def load_river(path=None, device="cpu", backbone_depth=None, bits=4, group_size=DEFAULT_GROUP_SIZE, activations=None,
               eight_bit_layers=None, dtype=torch.bfloat16):
    """(model holding its first backbone_depth blocks (default all), ExitRiver of every block, tokenizer), read in the
    order that keeps memory lowest: the embedding, final norm and head; each block read, its river copy made and the
    block dropped; then the backbone blocks kept. backbone_depth 0: a river alone (the whole-model low-bit mode).
    eight_bit_layers: default those of a River capped at backbone_depth (default_eight_bit_layers)."""
    from load_weights import load_blocks, load_model
    model, tokenizer = load_model(path, device, dtype, backbone_depth=0)
    depth = model.cfg.n_layers if backbone_depth is None else check_backbone_depth(backbone_depth, model.cfg.n_layers)
    activations = activations or default_activations(model.device)
    if eight_bit_layers is None:
        eight_bit_layers = default_eight_bit_layers(bits, activations, depth, model.cfg.n_layers)
    river = ExitRiver(model, bits, group_size, activations, eight_bit_layers,
                      blocks=load_blocks(path, None, model.device, dtype))
    model.blocks.extend(load_blocks(path, range(depth), model.device, dtype))
    return model, river, tokenizer


# ------------------------------------------------------------------------------------------------ engine

@dataclass
class Generation:
    tokens: list             # generated ids
    backbone_blocks: list    # backbone blocks run by the forward pass that produced each token
    prefill_s: float
    step_s: list             # wall time of each decode step (every generated token after the first)

    @property
    def decode_tokens_per_s(self):
        """None when there was no decode step (one token generated): no rate to report."""
        return len(self.step_s) / sum(self.step_s) if self.step_s else None


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


class Engine:
    """One forward pass for the three modes: `backbone` (no exit), `quantized` (every block a river copy),
    `river` (backbone until the policy says exit, then river copies to the end). All share the final norm
    and LM head, and one KV cache."""

    def __init__(self, model, river=None, compile=False, native=None, max_backbone_depth=None):
        """native: None runs one-token decode steps through kernels.cpp where this CPU and these weights allow
        (bf16 backbone, river with int16 activations), False never, True insists (an error where it cannot); an
        instruction set's name ("avx512", "avx2") picks that one where None would pick the best.
        max_backbone_depth D: every token leaves the backbone after block D - 1 at the latest, and blocks D.. are
        never run (default: the blocks the model holds; a model loaded with backbone_depth=D holds no others)."""
        n_layers = model.cfg.n_layers
        if river is not None and len(river.blocks) != n_layers:
            raise ValueError(f"river has {len(river.blocks)} blocks, the model {n_layers}")
        depth = len(model.blocks) if max_backbone_depth is None else check_backbone_depth(max_backbone_depth, n_layers)
        if depth > len(model.blocks):
            raise ValueError(f"max_backbone_depth {depth}: the model holds only its first {len(model.blocks)} blocks")
        if depth < n_layers and river is None:
            raise ValueError(f"a backbone of {depth} of the model's {n_layers} blocks needs an ExitRiver for the rest")
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
                self.native = NativeDecoder(lib, model, river, depth)
        self.native_steps = 0  # decode steps that ran through kernels.cpp
        self.compiled = compile
        if compile:  # backbone and river alike, so the comparison stays fair; copies, so `model` and `river` stay eager
            self.model = compiled(model)
            if river is not None:
                self.river = copy_sharing_weights(river, blocks=compiled_blocks(river.blocks))
        self.backbone = list(self.model.blocks[:depth])  # the blocks a token may run before its exit

    @property
    def path(self):
        """Which code runs the one-token decode steps: "native <instruction set>" or the torch path."""
        if self.native is not None:
            return f"native {self.native.isa}"
        return "torch, compiled" if self.compiled else "torch, eager"

    def check_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "backbone" and self.river is None:
            raise ValueError(f"mode {mode!r} needs an ExitRiver; build the Engine with one")
        if mode == "backbone" and len(self.backbone) < self.model.cfg.n_layers:
            raise ValueError(f"mode 'backbone' runs every block; this engine's backbone stops after "
                             f"{len(self.backbone)} of {self.model.cfg.n_layers}")

    @torch.inference_mode()
    def forward(self, tokens, start, cache, mode="river", policy=None, all_logits=False):
        """tokens (B, T) at positions start..start+T-1 -> (logits, backbone blocks run). Logits are
        (B, 1, vocab) for the last token, or (B, T, vocab) with all_logits: a prefill only needs the last.

        A prefill (T > 1) exits at one depth for all its tokens: the policy sees the minimum over them. A capped
        backbone (max_backbone_depth) ends the loop early, prefill or not: its tokens all go on down the river.
        """
        self.check_mode(mode)
        rule = self.native.exit_rule(mode, policy) if self.native is not None else None
        if rule is not None and tokens.shape == (1, 1) and cache is not None:
            self.native_steps += 1
            return self.native.forward(tokens, start, cache, rule)
        model, n_layers = self.model, self.model.cfg.n_layers
        x = model.embed_tokens(tokens).to(self.act_dtype)                     # h_0: (B, T, d_model)
        pos = model.positions(start, tokens.shape[1], cache, self.act_dtype)
        depth = 0
        if mode != "quantized":
            policy = policy if mode == "river" and policy is not None else NeverExit()
            for layer, block in enumerate(self.backbone):  # all n_layers blocks, or a capped River's first ones
                h = block(x, pos, cache)                                       # h_{l+1}
                exits = layer < n_layers - 1 and policy.should_exit(layer, x, h)
                x, depth = h, layer + 1
                if exits:
                    break
        for block in self.river.blocks[depth:] if depth < n_layers else ():
            x = block(x, pos, cache)  # river block j writes layer j: the cache stays whole
        return model.head(x if all_logits else x[:, -1:]), depth

    def generate(self, prompt, max_new_tokens=64, mode="river", policy=None, temperature=0.0, top_p=1.0,
                 seed=None, stop_ids=()):
        """Generate from a list of prompt ids; greedy unless temperature > 0."""
        self.check_mode(mode)
        model = self.model
        if len(prompt) == 0:
            raise ValueError("prompt is empty: give at least one token")
        check_max_new_tokens(max_new_tokens)
        check_fits_context(len(prompt), max_new_tokens, model.cfg.max_seq_len)
        check_temperature(temperature)
        check_top_p(top_p)
        check_seed(seed)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(0 if seed is None else seed)
        cache = model.new_cache(len(prompt) + max_new_tokens)
        tokens = torch.tensor([prompt], device=model.device)
        sync(model.device)
        t0 = time.perf_counter()
        logits, depth = self.forward(tokens, 0, cache, mode, policy)
        out, depths = [sample(logits[0, -1], temperature, top_p, generator)], [depth]
        prefill_s, steps = time.perf_counter() - t0, []
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            t0 = time.perf_counter()
            tokens = torch.tensor([[out[-1]]], device=model.device)
            logits, depth = self.forward(tokens, len(prompt) + len(out) - 1, cache, mode, policy)
            out.append(sample(logits[0, -1], temperature, top_p, generator))  # reads the logits: syncs
            depths.append(depth)
            steps.append(time.perf_counter() - t0)
        return Generation(out, depths, prefill_s, steps)


class NativeDecoder:
    """One-token decode steps on CPU through kernels.cpp: the whole step (embedding, backbone blocks with the exit
    rule, river copies, final norm and LM head) in one native call, one thread team. Same arithmetic as the torch
    path of Engine.forward (fp32 activations, bf16 K/V, int16-activation river products), same cache, same
    record of who wrote each slot."""

    def __init__(self, lib, model, river, depth):
        """depth: the backbone blocks a token may run before its exit, the model's first ones (Engine.backbone)."""
        cfg = model.cfg
        self.model, self.isa = model, lib.isa
        dims = kernels.Dims(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.norm_eps)
        self.decoder = kernels.Decoder(lib, dims, [block_weights(b) for b in model.blocks[:depth]],
                                       None if river is None else [block_weights(b) for b in river.blocks],
                                       model.embed.weight, model.inv_freq, model.norm.weight, model.lm_head.weight)

    @staticmethod
    def unsupported(model, river):
        """Why the native path cannot run this model and river, or None when it can."""
        cfg = model.cfg
        if model.device.type != "cpu" or model.dtype != torch.bfloat16:
            return f"the native path runs bf16 weights on CPU, not {model.dtype} on {model.device.type}"
        if cfg.d_model % kernels.BLOCK_ROWS or cfg.ffn_dim % kernels.BLOCK_ROWS or cfg.head_dim % 16:
            return f"d_model {cfg.d_model}, ffn_dim {cfg.ffn_dim} or head_dim {cfg.head_dim} is not a multiple of 16"
        if river is not None and river.activations != "int16":
            return f"the native river takes int16 activations, not {river.activations}"
        return None

    def exit_rule(self, mode, policy):
        """The step's kernels.Exit for a mode and policy, or None for a policy the native step does not know."""
        last = self.model.cfg.n_layers - 1
        if mode == "quantized":
            return kernels.Exit(1, -1, 0, 2.0)
        if mode == "backbone" or policy is None or isinstance(policy, NeverExit):
            return kernels.Exit(0, last, 0, 2.0)
        if isinstance(policy, FixedExit):
            return kernels.Exit(0, min(policy.layer, last), 0, 2.0)
        if isinstance(policy, ReplayedExit):
            return kernels.Exit(0, min(policy.layer, last), 0, 2.0, replay=1)
        if isinstance(policy, SimilarityExit):
            return kernels.Exit(0, -1, policy.min_layer, min(policy.tau, 2.0))  # tau > 1 never exits either way
        return None

    def forward(self, tokens, start, cache, rule, similarity=None):
        """Engine.forward for one token of a batch of one."""
        cache.check_range(start, 1)  # before the kernel writes
        logits, depth = self.decoder.step(int(tokens[0, 0]), start, cache.k, cache.v, rule, torch.get_num_threads(),
                                          similarity)
        cache.record(slice(0, depth), start, 1, Writer.BACKBONE)
        cache.record(slice(depth, None), start, 1, Writer.RIVER)
        return logits.view(1, 1, -1), depth


def block_weights(block):
    """A block's norms and matrices as kernels.Stack takes them: bf16 weights, or (packed, N, K, group size, bits)."""
    def matrix(linear):
        if isinstance(linear, QuantizedLinear):
            return linear.packed, linear.out_features, linear.in_features, linear.group_size, linear.bits
        return linear.weight
    return {"attn_norm": block.attn_norm.weight, "mlp_norm": block.mlp_norm.weight,
            "qkv": matrix(block.attn.wqkv), "o": matrix(block.attn.wo), "gate_up": matrix(block.mlp.w_gate_up),
            "down": matrix(block.mlp.w_down)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(logits, temperature, top_p, generator):
    """Next id from (vocab,) logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p        # the smallest prefix holding top_p of the mass
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


# ------------------------------------------------------------------------------------------ command line
# A bad argument ends in argparse's usage and one line "error: argument --name: ..." (exit status 2), a bad
# model file in one line "error: ..." (exit status 1); neither in a traceback. bench.py uses these too.

def option(convert, check):
    """An argparse type: convert the text, then run a library check on the value; argparse prints the check's
    ValueError as "argument --name: message" and exits 2."""
    def parse(text):
        value = convert(text)
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    parse.__name__ = convert.__name__  # names the type when convert itself refuses: "invalid float value"
    return parse


def check_argument(parser, name, check, *args):
    """Run a check that needs more than the argument's text (the machine, the model's config); its error ends
    the command line like argparse's own. Returns what the check returns."""
    try:
        return check(*args)
    except (ValueError, RuntimeError) as err:
        parser.error(f"argument {name}: {err}")


def fail(message):
    """End the command line on a file error: one line on stderr, exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def reading_files(step, *args):
    """Run a step that reads model or data files; a missing, corrupt or mismatched file ends in fail()."""
    try:
        return step(*args)
    except (OSError, KeyError, ValueError) as err:
        fail(err.args[0] if isinstance(err, KeyError) and err.args else err)  # str(KeyError) adds quotes


def main(argv=None, other_modes=None):
    """other_modes: more --mode choices, each name -> what builds its engine from (model, compile); kv_strategies.py
    adds the KV strategies this way, so this file never imports it."""
    other_modes = other_modes or {}
    # Local imports: the library part of this file does not need them; only the command line does.
    import calibrate
    from load_weights import chat_prompt, load_config_and_tokenizer, load_model, resolve_device, stop_token_ids
    parser = argparse.ArgumentParser(description="Generate with River-LLM early exit.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--model", default=None, help="HF Llama folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=option(int, check_max_new_tokens), default=64)
    parser.add_argument("--mode", choices=MODES + tuple(other_modes), default="river",
                        help="how the engine runs (kv_strategies.py's command line adds the KV strategies River "
                             "argues against)")
    exit_rule = parser.add_mutually_exclusive_group()
    exit_rule.add_argument("--tau", type=option(float, SimilarityExit), default=DEFAULT_TAU,
                           help="exit threshold on the transition similarity; > 1 never exits")
    exit_rule.add_argument("--quality-budget", type=option(float, calibrate.check_budget), default=None, metavar="B",
                           help="--mode river: pick tau instead of --tau, the fastest (fewest backbone blocks per "
                                f"token) of {' '.join(map(str, calibrate.CALIBRATION_TAUS))} whose mean NLL "
                                "increase over the backbone is at most B nats per token on HumanEval's calibration "
                                f"split (problems {calibrate.CALIBRATION_PROBLEMS}.."
                                f"{2 * calibrate.CALIBRATION_PROBLEMS - 1}, disjoint from "
                                "the ones bench.py scores), teacher-forced once per tau and once through the whole "
                                "backbone before generating")
    parser.add_argument("--max-backbone-depth", type=int, default=None, metavar="D",
                        help="--mode river: every token leaves the backbone after block D - 1 at the latest, and the "
                             "backbone's blocks from D on are never loaded (their river copies are made one block at "
                             "a time as the checkpoint is read; with --quality-budget all are loaded, to calibrate "
                             "on); 0 to the model's layer count (default: all)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="river weights")
    parser.add_argument("--group-size", type=option(int, partial(check_quant_args, 4)), default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--activations", choices=ACTIVATIONS, default=None,
                        help="river activations: int16 per group (default on CPU: integer dot products in the native "
                             "kernels) or bf16 (PyTorch's 4-bit kernel, the paper's W4A16; default on CUDA)")
    parser.add_argument("--eight-bit-layers", type=int, nargs="*", default=None, metavar="LAYER",
                        help="river blocks kept at 8 bits (negative counts from the end; default with int16 "
                             f"activations: {' '.join(map(str, DEFAULT_EIGHT_BIT_LAYERS))}, the last block)")
    parser.add_argument("--no-native", action="store_true",
                        help="run decode steps in plain torch even where the native kernels could")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=option(float, check_temperature), default=0.0)
    parser.add_argument("--top-p", type=option(float, check_top_p), default=1.0)
    parser.add_argument("--seed", type=option(int, check_seed), default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the torch path's one-token decode steps (where the native kernels do "
                             "not run: CUDA, bf16 river activations, --no-native); seconds to start")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("argument --prompt: the prompt is empty")
    if args.max_backbone_depth is not None and args.mode not in ("river", "quantized"):
        parser.error(f"argument --max-backbone-depth: caps River's backbone (--mode river); --mode {args.mode} runs "
                     "every backbone block")
    if args.quality_budget is not None and args.mode != "river":
        parser.error(f"argument --quality-budget: picks River's tau (--mode river); --mode {args.mode} has none")
    device = check_argument(parser, "--device", resolve_device, args.device)

    def read_prompt():  # config and tokenizer only: what the model's size decides fails before its weights load
        cfg, tokenizer = load_config_and_tokenizer(args.model)
        text = chat_prompt(args.prompt, args.model) if args.chat else args.prompt
        return cfg, tokenizer, tokenizer.encode(text).ids, stop_token_ids(tokenizer, args.model)
    cfg, tokenizer, prompt, stop = reading_files(read_prompt)
    check_argument(parser, "--max-new-tokens", check_fits_context, len(prompt), args.max_new_tokens, cfg.max_seq_len)
    if args.max_backbone_depth is not None:
        check_argument(parser, "--max-backbone-depth", check_backbone_depth, args.max_backbone_depth, cfg.n_layers)
    activations = args.activations or default_activations(device)
    check_argument(parser, "--activations", check_quant_args, args.bits, args.group_size, activations)
    eight_bit = args.eight_bit_layers
    if eight_bit is None:
        eight_bit = default_eight_bit_layers(args.bits, activations,
                                             args.max_backbone_depth if args.mode == "river" else None, cfg.n_layers)
    check_argument(parser, "--eight-bit-layers", check_layers, eight_bit, cfg.n_layers)
    if args.mode in ("quantized", "river"):
        check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    calibration_set = None
    if args.quality_budget is not None:  # the problems read before the weights: a missing data set fails at once
        calibration_set = reading_files(calibrate.calibration_sequences, tokenizer, calibrate.CALIBRATION_PROBLEMS,
                                        calibrate.CALIBRATION_MAX_TARGET, None, calibrate.CALIBRATION_PROBLEMS)
    native = False if args.no_native else None
    if args.mode in ("quantized", "river"):
        # Through the streaming loader: each block read, its river copy made, the block dropped; then the backbone
        # blocks kept. The quantized mode keeps none; River all of them to calibrate on (the cap then holds at run
        # time), else its first D.
        depth = 0 if args.mode == "quantized" else None if args.quality_budget is not None else args.max_backbone_depth
        model, river, _ = reading_files(load_river, args.model, device, depth, args.bits, args.group_size,
                                        activations, eight_bit, torch.bfloat16)
    else:
        model, _ = reading_files(load_model, args.model, device, torch.bfloat16)
        river = None
    if args.mode in other_modes:
        engine = other_modes[args.mode](model, args.compile)
    else:  # the quantized mode's model holds no backbone block: its engine's backbone is empty
        engine = Engine(model, river, args.compile, native,
                        max_backbone_depth=args.max_backbone_depth if args.mode == "river" else None)
    tau, calibration = args.tau, None
    if args.quality_budget is not None:  # on the whole backbone: a cap would bias the choice (calibrate_tau)
        uncapped = engine if len(engine.backbone) == cfg.n_layers else Engine(model, river, args.compile, native)
        calibration = calibrate.calibrate_tau(uncapped, calibration_set, calibrate.CALIBRATION_TAUS,
                                              args.quality_budget, log=lambda message: print(message, file=sys.stderr))
        if calibration.tau is None:
            best = min(calibration.nll_increase, key=calibration.nll_increase.get)
            fail(f"no tau of {' '.join(map(str, calibrate.CALIBRATION_TAUS))} meets the quality budget "
                 f"{args.quality_budget:g}: the smallest NLL increase on the calibration split is "
                 f"{calibration.nll_increase[best]:+.4f} (tau {best:g})")
        tau = calibration.tau
        print(f"quality budget {args.quality_budget:g}: tau {tau:g} (NLL increase "
              f"{calibration.nll_increase[tau]:+.4f} on the calibration split, "
              f"{calibration.mean_backbone_blocks[tau]:.2f} backbone blocks per token)", file=sys.stderr)
    policy = SimilarityExit(tau)
    if args.compile:  # compile outside the timed run
        engine.generate(prompt, min(3, args.max_new_tokens), args.mode, policy)
    result = engine.generate(prompt, args.max_new_tokens, args.mode, policy, args.temperature, args.top_p,
                             args.seed, stop)
    reply = tokenizer.decode(result.tokens)
    blocks = sum(result.backbone_blocks) / len(result.backbone_blocks)
    if args.json:
        print(json.dumps({"text": reply, "tokens": result.tokens, "backbone_blocks": result.backbone_blocks,
                          "decode_tokens_per_s": result.decode_tokens_per_s, "prefill_s": result.prefill_s,
                          "mode": args.mode, "tau": tau, "quality_budget": args.quality_budget,
                          "calibration": None if calibration is None else calibration_json(calibration),
                          "max_backbone_depth": args.max_backbone_depth, "backbone_blocks_held": len(model.blocks),
                          "bits": args.bits, "activations": activations, "eight_bit_layers": list(eight_bit),
                          "path": engine.path}, allow_nan=False))
    else:
        rate = result.decode_tokens_per_s
        print(reply)
        print(f"[{args.mode}] " + ("no decode step" if rate is None else f"decode {rate:.1f} tok/s")
              + f", mean backbone blocks per token {blocks:.2f} of {model.cfg.n_layers}")


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
