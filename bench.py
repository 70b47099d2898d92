"""The speedup check with quality, in one run: backbone vs whole-model low bit vs River, on HumanEval.

The steps: parse the command line, build the rows of the comparison (each an engine, an exit rule and what a fresh
process loads to run it alone), measure them (measure.py: speed, quality, memory, the native time split), assemble
the result, report it (the table, --json, --plot). --shape and --context measure scaling instead (scaling.py)."""
import argparse
import importlib.util
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import llamacpp
import lossless
import plots
import river_native
import scaling
from calibrate import (CALIBRATION_TAUS, CAP_SHARE, CHOOSING, MAX_TARGET, ROUNDING, SCORED, check_budget,
                       choosing_sequences, humaneval_problems, quality_sequences, rounding_sequences)
from cli import check_argument, fail, option, reading_files
from exit_policy import similarity
from load_weights import load_config_and_tokenizer, resolve_device
from measure import (exit_histogram, log, machine_info, measure_memory, measure_quality, speed_and_rates,
                     tensor_bytes, time_split, torch_path_prefill_s)
from model import check_held
from quantize import check_quant_args
from river import DEFAULT_GROUP_SIZE, DEFAULT_TAU, check_group_size_fits
from rows import build_comparison
from storage import cache_dir


@dataclass(frozen=True)
class Sizes:
    """How much the default comparison measures: scored problems and choosing ones (text windows with --text), their
    targets' length, the speed prompt's new tokens and repeats, River's tau sweep."""
    problems: int
    choosing: int
    max_target: int
    new_tokens: int
    repeats: int
    taus: tuple


QUICK = Sizes(3, 4, 48, 32, 3, (0.9, 0.97))
FULL = Sizes(len(SCORED), len(CHOOSING), MAX_TARGET, 64, 5, CALIBRATION_TAUS)  # River's tau sweep: calibration's


# -------------------------------------------------------------------------------------------- command line

def check_threads(threads):
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp-types", nargs="+", choices=tuple(llamacpp.FTYPES),
                        default=list(llamacpp.DEFAULT_TYPES), metavar="TYPE",
                        help=f"llama.cpp's types compared, where llama_cpp is importable (default: "
                             f"{' '.join(llamacpp.DEFAULT_TYPES)}; of {' '.join(llamacpp.FTYPES)})")
    parser.add_argument("--no-llamacpp", action="store_true", help="no llama.cpp rows")
    parser.add_argument("--quick", action="store_true", help="a smaller run for smoke checks")
    parser.add_argument("--model", default=None, help="HF Llama folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=option(int, check_threads), default=None, help="CPU threads for torch")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="backbone weights (bf16: what the native kernels stream, fp32 accumulation)")
    parser.add_argument("--tau", type=option(float, similarity), default=DEFAULT_TAU)
    parser.add_argument("--group-size", type=option(int, partial(check_quant_args, 4)), default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--text", default=None, help="score this UTF-8 text file instead of HumanEval")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw the tau sweep as a PNG")
    parser.add_argument("--no-compile", action="store_true",
                        help="run everything eagerly (default: torch.compile each block's one-token decode step "
                             "and the LM head where the native kernels do not run; needs a C++ compiler on CPU)")
    parser.add_argument("--isa", choices=tuple(river_native.ISAS), default=None,
                        help="native kernels' instruction set (default: the best this CPU runs), e.g. avx2 on an "
                             "AVX-512 machine to see the other path")
    parser.add_argument("--strategies", action="store_true",
                        help="add the KV strategies River argues against (propagate, mask, recompute, monotonic)")
    parser.add_argument("--shape", nargs="+", choices=scaling.SHAPES, default=None, metavar="NAME",
                        help=f"speed only, on seeded random weights of known shapes ({', '.join(scaling.SHAPES)}), "
                             "River's exits replayed from the depths it takes on the bundled model at --tau")
    parser.add_argument("--context", nargs="+", type=option(int, scaling.check_context), default=None, metavar="N",
                        help="speed only: decode after a prompt of N real tokens (HumanEval prompts one after "
                             "another, or --text)")
    parser.add_argument("--plot-scaling", default=None, metavar="PATH",
                        help="draw the --shape and --context speedups, measured beside modelled, as a PNG")
    parser.add_argument("--max-backbone-depth", type=int, default=None, metavar="D",
                        help="the capped River's backbone blocks (default: the depth by which 99%% of the "
                             "choosing split's tokens leave the backbone at --tau)")
    parser.add_argument("--quality-budget", type=option(float, check_budget), default=None, metavar="B",
                        help="the calibrated River's NLL increase allowance, nats per token (default: half the "
                             "whole-model 4-bit increase on the choosing split)")
    return parser


def parse(argv):
    """(args, parser, device), every check that needs no file done: inputs exist, outputs' folders exist, matplotlib
    is there for a plot, --isa runs here. Sets torch's threads."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    device = check_argument(parser, "--device", resolve_device,
                            args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.text is not None and not Path(args.text).is_file():
        fail(f"--text file {args.text} does not exist")
    for name, path in (("--json", args.json), ("--plot", args.plot), ("--plot-scaling", args.plot_scaling)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            fail(f"{name} {path}: folder {Path(path).absolute().parent} does not exist")
    for name, path in (("--plot", args.plot), ("--plot-scaling", args.plot_scaling)):
        if path is not None and importlib.util.find_spec("matplotlib") is None:
            fail(f"{name} needs matplotlib: pip install -r requirements.txt")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.plot_scaling and not (args.shape or args.context):
        parser.error("argument --plot-scaling: draws the --shape and --context runs; name one of them")
    return args, parser, device


@dataclass
class Inputs:
    """What the comparison reads before any weight: the model's config and tokenizer, the scored and choosing
    sequences, those GPTQ rounds the copies on, the speed prompt."""
    cfg: object
    tokenizer: object
    scored: list
    choosing: list
    rounding: tuple
    prompt: list


def read_inputs(args, parser, sizes):
    """Inputs, every check that needs the config or the data done (a bad one ends the command line)."""
    cfg, tokenizer = reading_files(load_config_and_tokenizer, args.model)
    check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    if args.max_backbone_depth is not None:
        check_argument(parser, "--max-backbone-depth", check_held, args.max_backbone_depth, cfg.n_layers)
    scored = reading_files(quality_sequences, tokenizer, sizes.problems, sizes.max_target, args.text)
    choosing = reading_files(choosing_sequences, tokenizer, sizes.choosing, sizes.max_target, args.text, len(scored))
    if not choosing:
        fail(f"--text {args.text}: no windows left after the {len(scored)} scored ones for the choosing split")
    rounding = reading_files(rounding_sequences, tokenizer)  # River's own copies, as river.py rounds them
    prompt = tokenizer.encode(reading_files(humaneval_problems)[0][0]).ids
    if args.isa is not None and args.isa not in river_native.usable_isas():
        runs = ", ".join(river_native.usable_isas()) or "neither"
        fail(f"--isa {args.isa}: this CPU does not run it (it runs {runs})")
    return Inputs(cfg, tokenizer, scored, choosing, rounding, prompt)


# ------------------------------------------------------------------------------------------------ measuring

@dataclass
class Measured:
    """What measure() found: per row its speed and quality (name -> figures), the memory probes, the native time
    split of River's step (None off the native path), a copy's and a read's GB/s (medians over the speed repeats)."""
    speed: dict
    quality: dict
    memory: dict
    split: dict | None
    copy_gb_per_s: float
    read_gb_per_s: float  # a 2-thread sum over 512 MB: what a step's reads can reach, about half the copy's figure
    speculation: dict | None
    torch_prefill_s: float  # the prompt through the torch path's backbone (measure.torch_path_prefill_s)


def measure(comparison, args, sizes, inputs):
    """Speed, quality, the time split of River's step and each row's memory alone."""
    rows, model = comparison.rows, comparison.backbone.engine.model
    log(f"speed: {len(rows)} rows x {sizes.repeats} repeats x {sizes.new_tokens} new tokens")
    speed, bandwidth, read = speed_and_rates(rows, inputs.prompt, sizes.new_tokens, sizes.repeats, model.device)
    log(f"quality: {len(inputs.scored)} sequences, teacher-forced")
    quality = measure_quality(comparison.backbone, rows, inputs.scored, model.cfg.n_layers)
    if comparison.river.engine.native is not None:
        log("time split of a step (native blocks, products alone) ...")
    split = time_split(comparison.river.engine, len(inputs.prompt) + sizes.new_tokens // 2,
                       speed[comparison.river.name]["generation_mean_backbone_blocks"])
    log("memory: each row's deployment alone in a fresh process ...")
    memory = measure_memory(rows, {
        "model": args.model, "device": str(model.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "isa": args.isa, "group_size": args.group_size, "prompt": inputs.prompt, "new_tokens": 32})
    torch_prefill = torch_path_prefill_s(comparison.backbone.engine, inputs.prompt, sizes.repeats)
    speculation = lossless.measure_speculation(comparison, inputs)
    return Measured(speed, quality, memory, split, bandwidth, read, speculation, torch_prefill)


# ------------------------------------------------------------------------------------------------- assembling

def mode_entry(row, measured, n_weights):
    """One row's figures: speed, quality, its weights, its rule's tau, the code that ran it, its memory alone, and
    its size: resident weight MB (a peer's: its file's), those bytes in bits per model weight (n_weights), the MB a
    decode step reads, and those bytes at the row's speed as a share of the run's memory copy rate (its roofline)."""
    weights, bits, activations = row.description()
    probe = measured.memory["row_probe"].get(row.name)
    memory = measured.memory["probes"][probe] if probe else {}
    weight_mb = memory.get("weight_mb") if row.file is None else row.file["weight_mb"]
    step = measured.speed[row.name]["bytes_per_step"]
    read = None if step is None else step * measured.speed[row.name]["decode_tokens_per_s"] / 1e9  # GB/s
    return {**measured.speed[row.name], **measured.quality[row.name], "weights": weights, "bits_per_block": bits,
            "activations": activations, "tau": row.tau, "path": row.path,
            "peak_rss_mb": memory.get("peak_rss_mb_over_idle"), "weight_mb": weight_mb,
            "bits_per_weight": None if weight_mb is None else weight_mb * 2**20 * 8 / n_weights,
            "step_mb": None if step is None else step / 2**20,
            "roofline_share": None if step is None else read / measured.copy_gb_per_s,
            "read_share": None if step is None else read / measured.read_gb_per_s,
            "tensor_types": None if row.file is None else row.file["tensor_types"], "memory_probe": probe}


def cap_entry(comparison, modes, calibrated, args, depth_cap):
    """What the capped row's cap is, where it came from, and how many tokens it forced out early."""
    n_layers = comparison.backbone.engine.model.cfg.n_layers
    deeper = lambda hist: sum(hist[depth_cap + 1:]) / max(1, sum(hist))  # noqa: E731 - share of steps past the cap
    return {"max_backbone_depth": depth_cap, "tau": args.tau,
            "source": "--max-backbone-depth" if args.max_backbone_depth is not None else
            f"the depth by which {CAP_SHARE:.0%} of the choosing split's decode tokens leave the backbone at tau",
            "choosing_share_deeper": deeper(exit_histogram(calibrated.result.depths[args.tau], n_layers)),
            "forced_share": deeper(modes[comparison.river.name]["exit_histogram"]),
            "forced_share_how": "share of the uncapped River's scored decode tokens (same tau) that ran more than "
                                "max_backbone_depth backbone blocks: those the cap sends down the river earlier"}


def speedup_entry(comparison, modes):
    tps = {name: mode["decode_tokens_per_s"] for name, mode in modes.items()}
    base, river, quantized = (tps[row.name] for row in (comparison.backbone, comparison.river, comparison.quantized))
    return {"river_vs_backbone": river / base, "quantized_vs_backbone": quantized / base,
            "quantized_main_vs_backbone": tps[comparison.quantized_main.name] / base,
            "river_vs_quantized": river / quantized}


def calibration_entry(comparison, modes, calibrated, args, sizes, inputs):
    cal, row = calibrated.result, comparison.calibrated
    mode, base_nll = modes[row.name] if row else None, modes[comparison.backbone.name]["nll"]
    choosing = (f"{args.text}: windows {sizes.problems}..{sizes.problems + sizes.choosing - 1}" if args.text else
                f"HumanEval problems {CHOOSING.start}..{CHOOSING.start + sizes.choosing - 1}")
    return {"problems": f"{choosing} (the choosing split: disjoint from the scored ones and from GPTQ's problems "
                        f"{ROUNDING.start}..{ROUNDING.stop - 1}), up to {sizes.max_target} tokens",
            "choosing_tokens": sum(len(target) for _, target in inputs.choosing),
            "budget": cal.budget, "budget_source": calibrated.budget_source,
            "whole_model_4bit_nll_increase": calibrated.whole_model_increase, "tau": cal.tau,
            "choosing_nll_increase": cal.nll_increase.get(cal.tau),
            "scored_nll_increase": mode["nll"] - base_nll if mode else None,
            "mean_backbone_blocks": mode["mean_backbone_blocks"] if mode else None,
            "per_tau": {f"{t:g}": {"nll_increase": cal.nll_increase[t],
                                   "mean_backbone_blocks": cal.mean_backbone_blocks[t]} for t in cal.nll_increase}}


def bandwidth_entry(model, backbone_tokens_per_s, copy_gb_per_s, read_gb_per_s):
    """The backbone's weight bytes per token, read at its measured speed, against a memory copy and a read."""
    weight_bytes = tensor_bytes(model.blocks) + tensor_bytes(model.lm_head) + tensor_bytes(model.norm)
    return {"weight_bytes_per_token": weight_bytes, "achieved_gb_per_s": weight_bytes * backbone_tokens_per_s / 1e9,
            "copy_gb_per_s_read_plus_write": copy_gb_per_s, "read_gb_per_s": read_gb_per_s,
            "fraction_of_copy_bandwidth": weight_bytes * backbone_tokens_per_s / 1e9 / copy_gb_per_s}


def run_entry(comparison, args, sizes, inputs):
    """What ran: model, machine, software, kernels, River's settings, the data, the cache's size."""
    model, native = comparison.backbone.engine.model, comparison.river.engine.native
    flags = river_native.cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                   "avx512_bf16"}
    return {"model": args.model or "SmolLM2-135M-Instruct (bundled)", "machine": machine_info(model.device),
            "device": str(model.device), "torch": torch.__version__, "dtype": args.dtype,
            "kernels": {"isa": native.isa if native is not None else None, "usable_isas": river_native.usable_isas(),
                        "cpu_flags": sorted(flags)},
            "compiled_torch_steps": not args.no_compile, "group_size": args.group_size, "tau": args.tau,
            "quick": args.quick,
            "eight_bit_layers": [layer for layer, bits in enumerate(comparison.river.river.bits) if bits == 8],
            "data": args.text or f"HumanEval canonical solutions, first {sizes.problems} problems, up to "
                                 f"{sizes.max_target} tokens",
            "kv_cache_mb": model.cfg.n_layers * 2 * model.cfg.kv_dim * (len(inputs.prompt) + sizes.new_tokens)
            * model.dtype.itemsize / 2**20}


def assemble(comparison, measured, calibrated, depth_cap, args, sizes, inputs, t_start):
    """The result: every figure, as strict JSON writes it."""
    model = comparison.backbone.engine.model
    n_weights = sum(p.numel() for p in model.parameters())  # a tied head counted once
    modes = {row.name: mode_entry(row, measured, n_weights) for row in comparison.rows}
    modes[comparison.capped.name]["cap"] = cap_entry(comparison, modes, calibrated, args, depth_cap)
    memory = measured.memory
    return {**run_entry(comparison, args, sizes, inputs), "modes": modes,
            "speedup": speedup_entry(comparison, modes), "block_split_us": measured.split,
            "memory": {key: memory[key] for key in ("idle_peak_rss_mb", "probes", "environment", "how")},
            "calibration": calibration_entry(comparison, modes, calibrated, args, sizes, inputs),
            "backbone_bandwidth": bandwidth_entry(comparison.backbone.engine.model,
                                                  modes[comparison.backbone.name]["decode_tokens_per_s"],
                                                  measured.copy_gb_per_s, measured.read_gb_per_s),
            "speculation": measured.speculation, "torch_path_prefill_s": measured.torch_prefill_s,
            "seconds": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------------- report

def print_table(result, rows, backbone):
    modes = result["modes"]
    base = modes[backbone.name]
    w = max(18, 1 + max(len(row.name) for row in rows))  # the mode column: the longest name
    header = (f"{'mode':<{w}}{'weights':>9}{'tau':>6}{'tok/s':>8}{'speedup':>9}{'prefill ms':>11}{'NLL':>8}"
              f"{'dNLL':>8}{'top-1':>7}{'KL':>8}{'blocks':>8}{'KV cos':>8}{'wts MB':>7}{'bits/w':>7}{'step MB':>8}"
              f"{'roof':>6}{'RSS MB':>7}  path")
    print(header)
    print("-" * len(header))
    for row in rows:
        m = modes[row.name]
        tau = f"{row.tau:g}" if row.tau is not None else "-"
        cos = f"{m['kv_cosine_mean']:.3f}" if m["kv_cosine_mean"] is not None else "-"
        wts, bpw, step, roof, rss = (f"{m[k]:.{digits}f}" if m[k] is not None else "-" for k, digits in (
            ("weight_mb", 0), ("bits_per_weight", 2), ("step_mb", 0), ("roofline_share", 2), ("peak_rss_mb", 0)))
        print(f"{row.name:<{w}}{m['weights']:>9}{tau:>6}{m['decode_tokens_per_s']:>8.1f}"
              f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:>8.2f}x{m['prefill_s'] * 1e3:>11.1f}"
              f"{m['nll']:>8.3f}{m['nll'] - base['nll']:>+8.3f}{m['top1_agreement']:>7.3f}{m['kl_to_backbone']:>8.4f}"
              f"{m['mean_backbone_blocks']:>8.2f}{cos:>8}{wts:>7}{bpw:>7}{step:>8}{roof:>6}{rss:>7}  {m['path']}")


def print_header(result, sizes, prompt_tokens):
    print(f"\nRiver-LLM bench: {result['model']} on {result['machine']}, torch {result['torch']}")
    k = result["kernels"]
    print(f"CPU features {' '.join(k['cpu_flags']) or '-'}; native kernels: {k['isa'] or 'none (pure torch)'}; "
          f"backbone {result['dtype']} weights, fp32 activations; River's copies 4-bit, block(s) "
          f"{result['eight_bit_layers']} 8-bit, groups of {result['group_size']}; decode of {sizes.new_tokens} tokens "
          f"after a {prompt_tokens}-token prompt, median of {sizes.repeats} repeats; quality: {result['data']}\n")


def print_summary(result, comparison):
    modes, s, split = result["modes"], result["speedup"], result["block_split_us"]
    base, river, quantized = (modes[row.name] for row in (comparison.backbone, comparison.river, comparison.quantized))
    print(f"\nriver / backbone {s['river_vs_backbone']:.2f}x; whole model: W4A16 control "
          f"{s['quantized_vs_backbone']:.2f}x, River's copies {s['quantized_main_vs_backbone']:.2f}x")
    if split:
        bb, rv = split["backbone_block"], split["river_block"]
        print(f"per block (us): backbone {bb['whole']:.0f} = products {bb['products']:.0f} + rest {bb['rest']:.0f}; "
              f"river {rv['whole']:.0f} = products {rv['products']:.0f} + rest {rv['rest']:.0f}; LM head "
              f"{split['lm_head']:.0f} (the river's {split['river_lm_head']:.0f}); River's ceiling from products alone at "
              f"{river['generation_mean_backbone_blocks']:.1f} backbone blocks: {split['speedup_ceiling_products']:.2f}x")
    bw = result["backbone_bandwidth"]
    shares = ", ".join(f"{row.name} {modes[row.name]['roofline_share']:.0%} / {modes[row.name]['read_share']:.0%}"
                       for row in (comparison.backbone, comparison.quantized_main, comparison.river))
    print(f"backbone reads {bw['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token: {bw['achieved_gb_per_s']:.1f}"
          f" GB/s, {bw['fraction_of_copy_bandwidth']:.0%} of a {bw['copy_gb_per_s_read_plus_write']:.1f} GB/s memory copy "
          f"(read + write)\nroofline (a step's bytes at the row's speed over the copy rate / over a "
          f"{bw['read_gb_per_s']:.1f} GB/s 2-thread read): {shares}")
    print(f"river exit histogram (backbone blocks per decode token): {river['exit_histogram']}")
    capped, c, base_mb = modes[comparison.capped.name], result["calibration"], base["peak_rss_mb"]
    print(f"memory (peak RSS over an idle process's {result['memory']['idle_peak_rss_mb']:.0f} MB, each deployment "
          f"alone): backbone {base_mb:.0f} MB, River capped at {capped['cap']['max_backbone_depth']} backbone blocks "
          f"{capped['peak_rss_mb']:.0f} MB = {capped['peak_rss_mb'] / base_mb:.2f}x; the cap forced "
          f"{capped['cap']['forced_share']:.1%} of River's scored tokens out early; its NLL "
          f"{capped['nll'] - base['nll']:+.3f} against the whole-model 4-bit {quantized['nll'] - base['nll']:+.3f}")
    if c["tau"] is None:
        print(f"calibration: no tau meets the budget of {c['budget']:.4f} nats/token ({c['budget_source']})")
    else:
        print(f"calibration: budget {c['budget']:.4f} nats/token ({c['budget_source']}) -> tau {c['tau']:g}: "
              f"{c['choosing_nll_increase']:+.4f} on the choosing split, {c['scored_nll_increase']:+.4f} on "
              f"the scored problems, {c['mean_backbone_blocks']:.2f} backbone blocks per token")
    native = [(modes[row.name]["prefill_s"], row.name) for row in comparison.rows
              if row.deployment is not None and row.engine.native is not None]
    if native:
        slowest, name = max(native)
        print(f"prefill of the speed prompt: torch path {result['torch_path_prefill_s'] * 1e3:.1f} ms through the "
              f"backbone; the slowest native row ({name}) {slowest * 1e3:.1f} ms, "
              f"{result['torch_path_prefill_s'] / slowest:.2f}x faster")
    llamacpp.print_peers(result, comparison)
    lossless.print_speculation(result, comparison)
    print(f"finished in {result['seconds']:.0f} s")


def report(result, comparison, args, sizes, prompt_tokens):
    """The table and summary on stdout; --json (strict: no NaN or infinity) and --plot."""
    print_header(result, sizes, prompt_tokens)
    print_table(result, comparison.rows, comparison.backbone)
    print_summary(result, comparison)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    if args.plot:
        plots.plot(result, comparison, args.plot)


def main(argv=None):
    args, parser, device = parse(argv)
    if args.shape or args.context:
        return scaling.run(args, parser, device)
    sizes = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    inputs = read_inputs(args, parser, sizes)
    log(f"river bench on {machine_info(device)}, torch {torch.__version__}")
    model = scaling.load_backbone(args.model, device, args.dtype)
    comparison, calibrated, depth_cap = build_comparison(model, args, sizes, inputs)
    if not (args.no_llamacpp or args.model or args.text) and model.device.type == "cpu":  # the bundled model's peer
        comparison.peers = llamacpp.peer_rows(args.llamacpp_types, cache_dir() / "llamacpp", model.cfg, log)
        comparison.rows += comparison.peers
    measured = measure(comparison, args, sizes, inputs)
    result = assemble(comparison, measured, calibrated, depth_cap, args, sizes, inputs, t_start)
    report(result, comparison, args, sizes, len(inputs.prompt))


if __name__ == "__main__":
    main()
