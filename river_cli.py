"""river.py's command line: generate with River (or the backbone, or the whole model on River's copies) from a prompt,
streaming the text or printing one JSON object; tau from a quality budget; lossless generation."""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from cli import check_argument, fail, option, reading_files
from exit_policy import NEVER, RIVER_ONLY, similarity
from generation import check_fits_context, check_max_new_tokens, check_seed, check_temperature, check_top_p
from model import check_held
from quantize import ACTIVATIONS, check_quant_args
from river import (DEFAULT_EIGHT_BIT_LAYERS, DEFAULT_GROUP_SIZE, DEFAULT_HEAD_BITS, DEFAULT_TAU, Engine,
                   check_group_size_fits, check_layers, default_activations, default_eight_bit_layers, load_river)
from speculative import check_draft_length, check_speculative, default_draft_length, generate_speculative


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
                        help="the river's LM head, where every token that left the backbone ends (16: the model's own "
                             "bf16 head; a token that ran every backbone block always ends at the model's)")
    parser.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                        help="how the river's weights are rounded: GPTQ on HumanEval's rounding split (default; "
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
                        help="--speculative: the exit rule that drafts: every block a river copy (quantized, with "
                             "River's default copies and head) or River's similarity rule at --tau")
    parser.add_argument("--no-lookup", action="store_true",
                        help="--speculative: every draft River's; by default a round whose text repeats its last "
                             "tokens drafts what followed them before, running no block (speculative.Lookup)")
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
                                      on_token=stream, lookup=not args.no_lookup)
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
            "looked_up": result.looked_up, "looked_up_accepted": result.looked_up_accepted,
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
