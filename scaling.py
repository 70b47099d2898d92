"""bench.py --shape and --context: River's decode speedup over the backbone against model size (known shapes on seeded
random weights, River's exits replayed) and against context length (a real model and text), speed only, each beside
a bandwidth model (bytes read per token)."""
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import llamacpp
import plots
from calibrate import humaneval_problems, quality_sequences, teacher_forced
from cli import check_argument, reading_files
from exit_policy import NEVER, ExitRule, similarity
from generation import greedy
from storage import cache_dir
from load_weights import load_config_and_tokenizer, load_model
from measure import block_split_us, exit_histogram, log, machine_info, read_bandwidth, step_bytes
from model import LlamaConfig, Transformer
from river import Engine, check_group_size_fits
from rows import own_river

# Published shapes of known checkpoints, run on seeded random weights for speed alone (--shape).
SHAPES = {
    "smollm2-135m": LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                head_dim=64, rope_theta=100000.0, max_seq_len=8192),
    "smollm2-360m": LlamaConfig(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560,
                                head_dim=64, rope_theta=100000.0, max_seq_len=8192),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                head_dim=64, rope_theta=500000.0, max_seq_len=131072,
                                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def check_context(n):
    if n < 1:
        raise ValueError(f"context must be >= 1 token, got {n}")


def check_context_fits(n, new_tokens, available, context):
    if n > available:
        raise ValueError(f"context {n} is longer than the text's {available} tokens")
    if n + new_tokens > context:
        raise ValueError(f"context {n} plus {new_tokens} decoded tokens exceeds the model's context of {context}")


def load_backbone(path, device, dtype):
    """The backbone in bf16 (default: the native kernels stream bf16 weights with fp32 accumulation; fp32 weights
    would read twice the bytes) or fp32."""
    return reading_files(load_model, path, device, getattr(torch, dtype))[0]


def main_river(model, group_size, refine_steps=10):
    """River's own copies of the model's blocks (measure.own_river)."""
    return own_river(model.device).build(model, group_size, refine_steps)


# ---------------------------------------------------------------------------------------- model size, replayed

def random_model(cfg, seed=0):
    """A Transformer of `cfg` with seeded N(0, 0.02) weights and unit norms, built in bf16 directly: a 1B model built
    in fp32 first would hold twice its bytes at once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gave the tied head a tensor of its own: tie it again
        model.lm_head.weight = model.embed.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    return model.eval()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once


def river_depths(engine, tokenizer, tau, problems, max_target):
    """Backbone blocks run per decode token by River at tau, teacher-forced over HumanEval canonical solutions: the
    depth distribution --shape replays."""
    return [d for context, target in quality_sequences(tokenizer, problems, max_target)
            for d in teacher_forced(engine, similarity(tau), context, target)[1]]


def replayed_depths(depths, n_layers, source_layers, count, seed):
    """`count` exit depths for a model of n_layers blocks, drawn with replacement (seeded) from depths measured on a
    model of source_layers blocks and scaled: d becomes d * n_layers / source_layers, rounded down or up at random in
    proportion to its fraction (so the mean share of backbone blocks is kept), and at least 1 (the rule's first
    check follows block 0)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.tensor(depths, dtype=torch.float64)[torch.randint(len(depths), (count,), generator=generator)]
    scaled = drawn * n_layers / source_layers                                            # (count,)
    up = torch.rand(count, generator=generator, dtype=torch.float64) < scaled - scaled.floor()
    return (scaled.floor() + up).clamp(1, n_layers).long().tolist()


def replayed(depth):
    """The rule that leaves after `depth` backbone blocks with the similarity rule's own work done (s_l computed
    after every block; a tau above 1 never fires): a replayed exit costs what a real one does."""
    return ExitRule(tau=2.0, max_depth=depth)


# ------------------------------------------------------------------------------------ timing decode steps

@dataclass(frozen=True)
class Plan:
    """A series of decode runs from one prefilled cache: per repeat, the rule of each step."""
    name: str
    runs: list


def decode(engine, cache, start, token, rules):
    """Greedy decode after `token` at positions start.. of a prefilled cache, step i under rules[i]; returns each
    step's seconds and backbone blocks. Runs from the same start overwrite the same slots: each sees the prompt
    alone."""
    times, depths = [], []
    for i, rule in enumerate(rules):
        t = time.perf_counter()
        logits, depth = engine.forward(torch.tensor([[token]], device=engine.model.device), start + i, cache, rule)
        token = greedy(logits[0, -1])  # reads the logits: syncs
        times.append(time.perf_counter() - t)
        depths.append(depth)
    return times, depths


def interleaved_rates(engine, cache, start, token, plans, repeats):
    """Per plan (in order): its name, median decode tok/s, tok/s per repeat and every step's depth, all decoding
    from the same prefilled cache; plans interleaved, their order rotated per repeat, as in measure.measure_speed."""
    for plan in plans:  # warm-up
        decode(engine, cache, start, token, plan.runs[0][:4])
    rates, depths = ({plan.name: [] for plan in plans} for _ in range(2))
    for r in range(repeats):
        for plan in plans[r % len(plans):] + plans[:r % len(plans)]:
            times, steps = decode(engine, cache, start, token, plan.runs[r])
            rates[plan.name].append(len(times) / sum(times))
            depths[plan.name] += steps
    return [{"name": plan.name, "decode_tokens_per_s": statistics.median(rates[plan.name]),
             "decode_tokens_per_s_per_repeat": rates[plan.name], "depths": depths[plan.name]} for plan in plans]


def prefill(engine, prompt, capacity):
    """(cache holding the prompt's K/V through the whole backbone, the greedy next token, seconds)."""
    cache = engine.model.new_cache(capacity)
    t = time.perf_counter()
    logits, _ = engine.forward(torch.tensor([prompt], device=engine.model.device), 0, cache, NEVER)
    return cache, greedy(logits[0, -1]), time.perf_counter() - t


# --------------------------------------------------------------------------------------------- bandwidth model

def bandwidth_model(model, river, depths, positions, read_gb_per_s):
    """Backbone and River steps as bytes read at the measured read bandwidth: their tok/s and ratio."""
    bytes_read = {"backbone": step_bytes(model, None, [model.cfg.n_layers], positions),
                  "river": step_bytes(model, river, depths, positions)}
    return {"bytes_per_token": bytes_read, "read_gb_per_s": read_gb_per_s,
            "tokens_per_s": {name: read_gb_per_s * 1e9 / b for name, b in bytes_read.items()},
            "speedup": bytes_read["backbone"] / bytes_read["river"]}


def speed_row(model, river, backbone_rates, river_rates, positions, read_gb_per_s, **extra):
    """One point of a scaling curve: measured tok/s of backbone and River, their ratio, and the bandwidth model's."""
    depths, rates = river_rates["depths"], (backbone_rates, river_rates)
    modelled = bandwidth_model(model, river, depths, positions, read_gb_per_s)
    return {**extra, "decode_tokens_per_s": {r["name"]: r["decode_tokens_per_s"] for r in rates},
            "decode_tokens_per_s_per_repeat": {r["name"]: r["decode_tokens_per_s_per_repeat"] for r in rates},
            "river_mean_backbone_blocks": statistics.mean(depths),
            "river_exit_histogram": exit_histogram(depths, model.cfg.n_layers),
            "speedup": river_rates["decode_tokens_per_s"] / backbone_rates["decode_tokens_per_s"],
            "modelled": modelled["speedup"], "bandwidth_model": modelled}


# ----------------------------------------------------------------------------------------------- the two sweeps

def shape_speed(name, depths, source_layers, prompt, new_tokens, repeats, group_size, read_gb_per_s):
    """Backbone and River decode speed of a known shape on seeded random weights, River's exits replayed from `depths`
    (measured on a model of source_layers blocks), beside the bandwidth model. River's copies as River's own (4-bit,
    the last block 8-bit) but without the quantizer's least squares: random weights say nothing about quality."""
    cfg = SHAPES[name]
    t = time.perf_counter()
    model = random_model(cfg)
    build_s = {"weights": time.perf_counter() - t}
    river = main_river(model, group_size, refine_steps=0)
    engine = Engine(model, river)
    build_s["river_and_native_layouts"] = time.perf_counter() - t - build_s["weights"]
    log(f"  {name}: {parameter_count(model) / 1e6:.0f}M random weights in {build_s['weights']:.0f} s, river and "
        f"native layouts in {build_s['river_and_native_layouts']:.0f} s")
    replay = replayed_depths(depths, cfg.n_layers, source_layers, new_tokens * repeats, seed=0)
    cache, token, prefill_s = prefill(engine, prompt, len(prompt) + new_tokens)
    plans = [Plan("backbone", [[NEVER] * new_tokens] * repeats),
             Plan("river", [[replayed(d) for d in replay[r * new_tokens:(r + 1) * new_tokens]] for r in range(repeats)])]
    rates = interleaved_rates(engine, cache, len(prompt), token, plans, repeats)
    positions = range(len(prompt), len(prompt) + new_tokens)
    return speed_row(model, river, *rates, positions, read_gb_per_s, weights="random", exits="replayed (depth_source)",
                     config=asdict(cfg), parameters=parameter_count(model), build_s=build_s, context=len(prompt),
                     prefill_s=prefill_s, path=engine.path)


def long_text_ids(tokenizer, text_file):
    """Token ids of a long real text: the file's, or every HumanEval prompt one after another."""
    if text_file is not None:
        return tokenizer.encode(Path(text_file).read_text(encoding="utf-8")).ids
    return [i for prompt, _ in humaneval_problems() for i in tokenizer.encode(prompt).ids]


def context_speed(engine, prompt, new_tokens, repeats, tau, read_gb_per_s):
    """Backbone and River (the similarity rule at tau) decode speed after a prompt of len(prompt) real tokens, beside
    the bandwidth model; the prefill's seconds (one call for the prompt, native where the engine runs it); and on the
    native path the split of a block's time at that position (attention grows in the rest)."""
    cache, token, prefill_s = prefill(engine, prompt, len(prompt) + new_tokens)
    log(f"  context {len(prompt)}: prefill {prefill_s:.1f} s")
    plans = [Plan("backbone", [[NEVER] * new_tokens] * repeats),
             Plan("river", [[similarity(tau)] * new_tokens] * repeats)]
    rates = interleaved_rates(engine, cache, len(prompt), token, plans, repeats)
    positions = range(len(prompt), len(prompt) + new_tokens)
    split = block_split_us(engine, len(prompt) + new_tokens // 2) if engine.native is not None else None
    return speed_row(engine.model, engine.river, *rates, positions, read_gb_per_s, context=len(prompt),
                     prefill_s=prefill_s, block_split_us=split)


def peer_contexts(args, text, new_tokens):
    """llama.cpp BF16 at each --context length on the same text (llamacpp.context_speed), for the bundled model where
    llama_cpp imports; None otherwise (one line on how to install it)."""
    if args.no_llamacpp or args.model is not None:
        return None
    llama_cpp = llamacpp.llama_cpp_or_none(log)
    if llama_cpp is None:
        return None
    gguf = llamacpp.requantized(llama_cpp, "BF16", cache_dir() / "llamacpp")
    rows = []
    for n in args.context:
        rows.append(llamacpp.context_speed(llama_cpp, gguf, text[:n + new_tokens], new_tokens, torch.get_num_threads()))
        log(f"  llama.cpp BF16, context {n}: prefill {rows[-1]['prefill_s']:.1f} s")
    return rows


def shapes_sweep(result, engine, tokenizer, args, sizes):
    """--shape: River's depths on the real model at --tau, then each shape's row; fills result's depth_source,
    shapes and speedup."""
    problems, max_target, new_tokens, repeats = sizes
    n_layers = engine.model.cfg.n_layers
    log(f"River's depths at tau {args.tau:g} on {result['model']} ...")
    depths = river_depths(engine, tokenizer, args.tau, problems, max_target)
    result["depth_source"] = {
        "model": result["model"], "tau": args.tau, "n_layers": n_layers, "tokens": len(depths),
        "data": f"HumanEval canonical solutions, first {problems} problems, up to {max_target} tokens, "
                "teacher-forced", "mean_backbone_blocks": statistics.mean(depths),
        "exit_histogram": exit_histogram(depths, n_layers)}
    prompt = tokenizer.encode(humaneval_problems()[0][0]).ids
    result["shapes"] = {name: shape_speed(name, depths, n_layers, prompt, new_tokens, repeats, args.group_size,
                                          result["read_gb_per_s"]) for name in args.shape}
    largest = max(args.shape, key=lambda name: result["shapes"][name]["parameters"])
    result["speedup"] = {"river_vs_backbone": result["shapes"][largest]["speedup"], "shape": largest,
                         "weights": "random"}


def run(args, parser, device):
    """--shape and --context: checks, then the sweeps; prints the tables, writes --json and --plot-scaling."""
    sizes = (3, 48, 16, 2) if args.quick else (12, 128, 64, 5)  # problems, max target, new tokens, repeats
    new_tokens, repeats = sizes[2:]
    cfg, tokenizer = reading_files(load_config_and_tokenizer, args.model)
    check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    for name in args.shape or ():
        check_argument(parser, "--group-size", check_group_size_fits, SHAPES[name], args.group_size)
    text = reading_files(long_text_ids, tokenizer, args.text)
    for n in args.context or ():
        check_argument(parser, "--context", check_context_fits, n, new_tokens, len(text), cfg.max_seq_len)
    t_start = time.perf_counter()
    log(f"river scaling bench on {machine_info(device)}, torch {torch.__version__}")
    model = load_backbone(args.model, device, args.dtype)
    engine = Engine(model, main_river(model, args.group_size))
    result = {"model": args.model or "SmolLM2-135M-Instruct (bundled)", "machine": machine_info(device),
              "device": str(device), "torch": torch.__version__, "dtype": args.dtype,
              "kernels": {"isa": engine.native.isa if engine.native is not None else None}, "tau": args.tau,
              "group_size": args.group_size, "quick": args.quick, "new_tokens": new_tokens, "repeats": repeats,
              "read_gb_per_s": read_bandwidth(device)}
    if args.shape:
        shapes_sweep(result, engine, tokenizer, args, sizes)
    if args.context:
        result["text"] = args.text or "HumanEval prompts one after another"
        log(f"context sweep: {result['text']}, {len(text)} tokens")
        result["context_sweep"] = [context_speed(engine, text[:n], new_tokens, repeats, args.tau,
                                                 result["read_gb_per_s"]) for n in args.context]
        result["llama_cpp_bf16_contexts"] = peer_contexts(args, text, new_tokens)
    result["seconds"] = time.perf_counter() - t_start
    result["peak_resident_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB
    print_scaling(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    if args.plot_scaling:
        plots.plot_scaling(result, args.plot_scaling)


def print_shapes(result):
    source = result["depth_source"]
    print(f"\nagainst model size: seeded random weights (no quality), River's exits replayed from "
          f"{source['model']} at tau {source['tau']:g} ({source['mean_backbone_blocks']:.2f} of "
          f"{source['n_layers']} backbone blocks over {source['tokens']} tokens), scaled to each depth")
    header = (f"{'shape':<14}{'params':>8}{'blocks':>10}{'prefill s':>10}{'backbone':>10}{'River':>8}"
              f"{'speedup':>9}{'modelled':>10}")
    print(header + "\n" + "-" * len(header))
    for name, row in result["shapes"].items():
        tps = row["decode_tokens_per_s"]
        print(f"{name:<14}{row['parameters'] / 1e6:>7.0f}M{row['river_mean_backbone_blocks']:>6.2f}/"
              f"{row['config']['n_layers']:<3}{row['prefill_s']:>10.1f}{tps['backbone']:>10.1f}{tps['river']:>8.1f}"
              f"{row['speedup']:>8.2f}x{row['modelled']:>9.2f}x")


def print_contexts(result):
    print(f"\nagainst context length: {result['model']}, {result['text']}, River's own exit rule")
    header = (f"{'context':>8}{'prefill s':>10}{'blocks':>8}{'backbone':>10}{'River':>8}{'speedup':>9}"
              f"{'modelled':>10}{'gap':>7}   per block, us: backbone (products + rest), river (products + rest)")
    print(header + "\n" + "-" * len(header))
    for row in result["context_sweep"]:
        tps, split = row["decode_tokens_per_s"], row["block_split_us"]
        blocks = "" if split is None else "   " + ", ".join(
            f"{split[k]['whole']:.0f} ({split[k]['products']:.0f} + {split[k]['rest']:.0f})"
            for k in ("backbone_block", "river_block"))
        print(f"{row['context']:>8}{row['prefill_s']:>10.1f}{row['river_mean_backbone_blocks']:>8.2f}"
              f"{tps['backbone']:>10.1f}{tps['river']:>8.1f}{row['speedup']:>8.2f}x{row['modelled']:>9.2f}x"
              f"{row['speedup'] / row['modelled'] - 1:>+7.0%}{blocks}")
    for row, peer in zip(result["context_sweep"], result.get("llama_cpp_bf16_contexts") or ()):
        ours = row["decode_tokens_per_s"]["backbone"]
        print(f"llama.cpp BF16 at {peer['context']}: prefill {peer['prefill_s']:.1f} s "
              f"({peer['prefill_tokens_per_s']:.0f} tok/s; the backbone takes {row['prefill_s'] / peer['prefill_s']:.2f}x "
              f"its time), decode {peer['decode_tokens_per_s']:.1f} tok/s (the backbone "
              f"{ours / peer['decode_tokens_per_s']:.2f}x)")


def print_scaling(result):
    print(f"\nRiver-LLM scaling, speed only: {result['machine']}, torch {result['torch']}, native kernels "
          f"{result['kernels']['isa'] or 'none'}; River's copies 4-bit (last block 8-bit), groups of "
          f"{result['group_size']}, tau {result['tau']:g}; memory read {result['read_gb_per_s']:.1f} GB/s")
    print("modelled: bytes read per token (weights of the blocks run, the LM head run, every layer's K/V), "
          "backbone / River")
    if result.get("shapes"):
        print_shapes(result)
    if result.get("context_sweep"):
        print_contexts(result)
    print(f"finished in {result['seconds']:.0f} s, peak resident memory {result['peak_resident_gb']:.1f} GB")
