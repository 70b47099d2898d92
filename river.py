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

from exit_policy import NeverExit, SimilarityExit
from kv_cache import Writer
from model import compile_blocks, compile_head

MODES = ("backbone", "quantized", "river")
# Chosen from bench.py's sweep on the bundled model (see README): the lowest tau whose NLL increase stays
# under half of the whole-model 4-bit increase.
DEFAULT_TAU = 0.96
DEFAULT_GROUP_SIZE = 64
INT4_INNER_K_TILES = 2  # tinygemm layout parameter; 2 lets K be any multiple of 32


# ------------------------------------------------------------------------------------------ quantization

@dataclass
class QuantizedWeight:
    """w ~ (q - offset) * scale + zero, with one (scale, zero) per `group_size` input features of a row."""
    q: torch.Tensor       # (N, K) int32 codes: 0..15 for 4 bits, -127..127 for 8 bits
    scale: torch.Tensor   # (N, K // group_size) fp32 step between neighbouring codes
    zero: torch.Tensor    # (N, K // group_size) fp32 value of code `offset` (0 for the symmetric 8-bit)
    bits: int
    group_size: int

    @property
    def offset(self):
        return 8 if self.bits == 4 else 0

    def dequantize(self):
        """(N, K) fp32: the weight the low-bit kernels compute with (up to their bf16 scales)."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero.repeat_interleave(self.group_size, dim=1)
        return (self.q - self.offset).float() * scale + zero


def check_quant_args(bits, group_size):
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (the int4 kernels' unit), "
                         f"got {group_size!r}")


def quantize_weight(w, bits=4, group_size=64, refine_steps=10):
    """Quantize an (out_features, in_features) weight.

    4 bits: asymmetric, one (scale, zero) per group of `group_size` input features (W4A16). Round-to-nearest
    from each group's min/max, where every weight lands within half a step of its code; then `refine_steps`
    rounds of least squares that alternate between the nearest codes for (scale, low) and the (scale, low)
    that fit those codes best. Neither half-round can raise a group's squared error. 8 bits: symmetric, one
    scale per output channel (group_size is then the whole row).
    """
    check_quant_args(bits, group_size)
    N, K = w.shape
    w = w.detach().float()
    if bits == 8:
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # (N, 1)
        q = (w / scale).round().clamp(-127, 127).to(torch.int32)
        return QuantizedWeight(q, scale, torch.zeros_like(scale), 8, K)
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {K} of a {N}x{K} weight")
    groups = w.view(N, K // group_size, group_size)                          # (N, n_groups, group_size)
    low = groups.amin(dim=2, keepdim=True)                                   # value of code 0
    scale = ((groups.amax(dim=2, keepdim=True) - low) / 15).clamp(min=1e-12)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    for _ in range(refine_steps):
        code_mean, w_mean = codes.mean(dim=2, keepdim=True), groups.mean(dim=2, keepdim=True)
        var = (codes - code_mean).pow(2).sum(dim=2, keepdim=True)
        cov = ((codes - code_mean) * (groups - w_mean)).sum(dim=2, keepdim=True)
        scale = torch.where(var > 0, cov / var.clamp(min=1e-12), scale).clamp(min=1e-12)
        low = w_mean - scale * code_mean
        codes = ((groups - low) / scale).round().clamp(0, 15)
    scale, low = scale[..., 0], low[..., 0]                                  # (N, n_groups)
    zero = low + 8 * scale                                                   # tinygemm's zero: the value of code 8
    return QuantizedWeight(codes.view(N, K).to(torch.int32), scale, zero, 4, group_size)


class QuantizedLinear(nn.Module):
    """Weight-only low-bit linear layer: bf16 activations through PyTorch's int4 / int8 kernels.

    The packed layout depends on the device, so build it on the device it runs on.
    """

    def __init__(self, qw, device, act_dtype=torch.bfloat16):
        super().__init__()
        self.bits, self.group_size = qw.bits, qw.group_size
        self.out_features, self.in_features = qw.q.shape
        self.act_dtype = act_dtype
        device = torch.device(device)
        if qw.bits == 8:
            if self.in_features % 16:
                raise ValueError(f"the int8 kernel needs in_features {self.in_features} to be a multiple of 16")
            self.register_buffer("weight", qw.q.to(device, torch.int8))                  # (N, K)
            self.register_buffer("scales", qw.scale[:, 0].to(device, act_dtype))         # (N,)
            return
        if self.out_features % 16:
            raise ValueError(f"the int4 kernels need out_features {self.out_features} to be a multiple of 16")
        scales_and_zeros = torch.stack([qw.scale.t(), qw.zero.t()], dim=-1)           # (K / group, N, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, act_dtype).contiguous())
        if device.type == "cuda":
            nibbles = (qw.q[:, ::2] << 4 | qw.q[:, 1::2]).to(torch.uint8)               # (N, K / 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(device), INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.view(-1, self.in_features).to(self.act_dtype)                              # (B*T, K)
        if self.bits == 8:
            if x.is_cuda:  # no int8 weight-only kernel on CUDA: dequantize on the fly
                y = (x @ self.weight.to(x.dtype).t()) * self.scales
            else:
                y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        elif x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.view(*shape[:-1], self.out_features).to(dtype)


# ---------------------------------------------------------------------------------------------- the river

def river_block(block, bits=4, group_size=64):
    """A low-bit twin of `block`: same interface, same norms, and -- the point -- the same `layer`,
    so it reads and writes the very cache slots its backbone twin would have written."""
    twin = copy.deepcopy(block)
    twin.cache_writer = Writer.RIVER
    device = block.attn_norm.weight.device
    for parent in (twin.attn, twin.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                qw = quantize_weight(child.weight, bits, group_size)
                setattr(parent, name, QuantizedLinear(qw, device))
    return twin


def check_group_size_fits(cfg, group_size):
    """4-bit groups must tile the input width of every block weight: d_model (wqkv, w_gate_up), the attention
    heads' width (wo) and ffn_dim (w_down). Checked from the config, before any weight is read or quantized."""
    widths = {"d_model": cfg.d_model, "n_heads * head_dim": cfg.q_dim, "ffn_dim": cfg.ffn_dim}
    misfits = [f"{name} {width}" for name, width in widths.items() if width % group_size]
    if misfits:
        raise ValueError(f"group_size {group_size} does not divide the model's {', '.join(misfits)}")


class ExitRiver(nn.Module):
    """One low-bit copy of every backbone block, river block j writing layer j's K/V."""

    def __init__(self, model, bits=4, group_size=64):
        super().__init__()
        check_quant_args(bits, group_size)
        if bits == 4:
            check_group_size_fits(model.cfg, group_size)
        self.bits, self.group_size = bits, group_size
        self.blocks = nn.ModuleList(river_block(b, bits, group_size) for b in model.blocks)
        assert all(r.layer == b.layer for r, b in zip(self.blocks, model.blocks))


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

    def __init__(self, model, river=None, compile=False):
        if river is not None and len(river.blocks) != len(model.blocks):
            raise ValueError(f"river has {len(river.blocks)} blocks, the model {len(model.blocks)}")
        self.model, self.river = model, river
        if compile:  # backbone and river alike: the comparison stays fair
            compile_blocks(model.blocks)
            compile_head(model)
            if river is not None:
                compile_blocks(river.blocks)

    def check_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "backbone" and self.river is None:
            raise ValueError(f"mode {mode!r} needs an ExitRiver; build the Engine with one")

    @torch.inference_mode()
    def forward(self, tokens, start, cache, mode="river", policy=None, all_logits=False):
        """tokens (B, T) at positions start..start+T-1 -> (logits, backbone blocks run). Logits are
        (B, 1, vocab) for the last token, or (B, T, vocab) with all_logits: a prefill only needs the last.

        A prefill (T > 1) exits at one depth for all its tokens: the policy sees the minimum over them.
        """
        self.check_mode(mode)
        model, n_layers = self.model, self.model.cfg.n_layers
        x = model.embed_tokens(tokens)                                         # h_0: (B, T, d_model)
        pos = model.positions(start, tokens.shape[1], cache)
        depth = 0
        if mode != "quantized":
            policy = policy if mode == "river" and policy is not None else NeverExit()
            for layer, block in enumerate(model.blocks):
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


def main(argv=None):
    # Local imports: the library part of this file needs neither; only the command line does.
    from kv_strategies import STRATEGIES, BaselineEngine
    from load_weights import chat_prompt, load_config_and_tokenizer, load_model, resolve_device, stop_token_ids
    parser = argparse.ArgumentParser(description="Generate with River-LLM early exit.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--model", default=None, help="HF Llama folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=option(int, check_max_new_tokens), default=64)
    parser.add_argument("--mode", choices=MODES + STRATEGIES, default="river",
                        help="river modes, or a KV strategy River argues against (exits with no river)")
    parser.add_argument("--tau", type=option(float, SimilarityExit), default=DEFAULT_TAU,
                        help="exit threshold on the transition similarity; > 1 never exits")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group-size", type=option(int, partial(check_quant_args, 4)), default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=option(float, check_temperature), default=0.0)
    parser.add_argument("--top-p", type=option(float, check_top_p), default=1.0)
    parser.add_argument("--seed", type=option(int, check_seed), default=None)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step of every block and the LM head "
                             "(faster decode, seconds to start)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("argument --prompt: the prompt is empty")
    device = check_argument(parser, "--device", resolve_device, args.device)
    policy = SimilarityExit(args.tau)

    def read_prompt():  # config and tokenizer only: what the model's size decides fails before its weights load
        cfg, tokenizer = load_config_and_tokenizer(args.model)
        text = chat_prompt(args.prompt, args.model) if args.chat else args.prompt
        return cfg, tokenizer, tokenizer.encode(text).ids, stop_token_ids(tokenizer, args.model)
    cfg, tokenizer, prompt, stop = reading_files(read_prompt)
    check_argument(parser, "--max-new-tokens", check_fits_context, len(prompt), args.max_new_tokens, cfg.max_seq_len)
    if args.mode in ("quantized", "river") and args.bits == 4:
        check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    model, _ = reading_files(load_model, args.model, device, torch.bfloat16)
    if args.mode in STRATEGIES:
        engine = BaselineEngine(model, args.compile)
    else:
        river = ExitRiver(model, args.bits, args.group_size) if args.mode != "backbone" else None
        engine = Engine(model, river, args.compile)
    if args.compile:  # compile outside the timed run
        engine.generate(prompt, min(3, args.max_new_tokens), args.mode, policy)
    result = engine.generate(prompt, args.max_new_tokens, args.mode, policy, args.temperature, args.top_p,
                             args.seed, stop)
    reply = tokenizer.decode(result.tokens)
    blocks = sum(result.backbone_blocks) / len(result.backbone_blocks)
    if args.json:
        print(json.dumps({"text": reply, "tokens": result.tokens, "backbone_blocks": result.backbone_blocks,
                          "decode_tokens_per_s": result.decode_tokens_per_s, "prefill_s": result.prefill_s,
                          "mode": args.mode, "tau": args.tau, "bits": args.bits}, allow_nan=False))
    else:
        rate = result.decode_tokens_per_s
        print(reply)
        print(f"[{args.mode}] " + ("no decode step" if rate is None else f"decode {rate:.1f} tok/s")
              + f", mean backbone blocks per token {blocks:.2f} of {model.cfg.n_layers}")


if __name__ == "__main__":
    main()
