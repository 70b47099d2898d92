"""The speedup check with quality, in one run: backbone vs whole-model low bit vs River, on HumanEval."""
import argparse
import ctypes
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from calibrate import (CALIBRATION_MAX_TARGET, CALIBRATION_PROBLEMS, CALIBRATION_TAUS, CAP_SHARE, calibrate_tau,
                       calibration_sequences, cap_depth, check_budget, humaneval_problems, mean_nll, quality_sequences,
                       teacher_forced)
from exit_policy import ReplayedExit, SimilarityExit
from kv_cache import Writer
from kv_strategies import STRATEGIES, BaselineEngine
from load_weights import load_config_and_tokenizer, load_model, resolve_device
from model import LlamaConfig, Transformer, check_backbone_depth
from quantize import QuantizedLinear
import kernels
from river import (DEFAULT_GROUP_SIZE, DEFAULT_TAU, Engine, ExitRiver, check_argument, check_group_size_fits,
                   check_quant_args, default_activations, default_eight_bit_layers, fail, load_river, option,
                   reading_files, sync)

SWEEP_TAUS = CALIBRATION_TAUS
QUICK_TAUS = (0.9, 0.97)
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


def log(message):
    print(message, file=sys.stderr, flush=True)


@dataclass
class Variant:
    """One row of the comparison: a mode of the engine (or a baseline KV strategy), the river it uses, exit
    threshold."""
    name: str
    mode: str
    river: str = "main"  # a key of river_kinds(): "main" (River's own), "w4a16" (the paper's control), "8bit", or
    tau: float = 2.0     # "capped" (with the backbone capped at the run's max_backbone_depth); tau > 1: never exits

    @property
    def capped(self):
        return self.river == "capped"

    @property
    def exits(self):
        return self.mode == "river" or self.mode in STRATEGIES

    @property
    def engine(self):
        """Key of the engine that runs this row."""
        return "baseline" if self.mode in STRATEGIES else self.river

    def policy(self):
        return SimilarityExit(self.tau) if self.exits else None


def river_kinds(device, depth_cap=None, n_layers=None):
    """The rivers the rows use, as ExitRiver's arguments. main: River's own, on CPU 4-bit with int16 activations and
    the last block 8-bit (README, "The last block at 8 bits"), on CUDA 4-bit W4A16; w4a16: every block 4-bit through
    PyTorch's kernel with bf16 activations, the paper's W4A16 and the whole-model control; 8bit: every block 8-bit
    (int16 activations: CPU only); capped (given depth_cap): River's own for a backbone capped there, every block from
    the cap on 8-bit (river.default_eight_bit_layers)."""
    activations = default_activations(device)
    kinds = {"main": {"bits": 4, "activations": activations,
                      "eight_bit_layers": default_eight_bit_layers(4, activations)},
             "w4a16": {"bits": 4, "activations": "bf16", "eight_bit_layers": ()}}
    if activations == "int16":
        kinds["8bit"] = {"bits": 8, "activations": "int16", "eight_bit_layers": ()}
    if depth_cap is not None:
        kinds["capped"] = {"bits": 4, "activations": activations,
                           "eight_bit_layers": default_eight_bit_layers(4, activations, depth_cap, n_layers)}
    return kinds


def main_river(model, group_size, refine_steps=10):
    """River's own copies (river_kinds' main)."""
    return ExitRiver(model, group_size=group_size, refine_steps=refine_steps, **river_kinds(model.device)["main"])


def variants(tau, taus, river_names, strategies=False, calibrated_tau=None):
    rows = [Variant("backbone", "backbone"), Variant("quantized", "quantized", "w4a16"),
            Variant("quantized_main", "quantized"), Variant("river", "river", "main", tau),
            Variant("river_w4a16", "river", "w4a16", tau)]
    if "8bit" in river_names:
        rows.append(Variant("river_8bit", "river", "8bit", tau))
    rows.append(Variant("river_capped", "river", "capped", tau))
    if calibrated_tau is not None:
        rows.append(Variant("river_calibrated", "river", "main", calibrated_tau))
    rows += [Variant(f"river_tau{t:g}", "river", "main", t) for t in taus if t != tau]
    if strategies:
        rows += [Variant(s, s, tau=tau) for s in STRATEGIES]
    return rows


# ------------------------------------------------------------------------------------------------ quality

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
            logits, depths, cache = teacher_forced(engines[v.engine], v.mode, v.policy(), context, target)
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


def calibrate(engines, sequences, taus, budget=None):
    """tau from a quality budget on the calibration split (calibrate.calibrate_tau). Default budget: half of the
    whole-model 4-bit NLL increase (the W4A16 control) on the same split."""
    backbone_nll, _ = mean_nll(engines["main"], "backbone", None, sequences)
    whole_model, _ = mean_nll(engines["w4a16"], "quantized", None, sequences)
    increase = whole_model - backbone_nll
    if budget is None and increase <= 0:
        fail(f"the whole-model 4-bit NLL increase on the calibration split is {increase:+.4f}: no default budget; "
             "give --quality-budget")
    source = "--quality-budget" if budget is not None else \
        "half the whole-model 4-bit (W4A16 control) NLL increase on the calibration split"
    budget = increase / 2 if budget is None else budget
    return {"calibration": calibrate_tau(engines["main"], sequences, taus, budget, backbone_nll, log),
            "budget_source": source, "whole_model_4bit_nll_increase": increase}


# ------------------------------------------------------------------------------------------------- memory

def deployment(v, depth_cap):
    """(name, spec) of what a process running this row alone loads: a row's mode, its river and how many backbone
    blocks it holds (a whole-model low-bit mode none, a capped River depth_cap, else all). Rows that differ only in
    tau load the same weights and run the same code: they share one measurement."""
    if v.mode in STRATEGIES:
        return v.name, {"strategy": v.mode, "tau": v.tau}
    if v.mode == "backbone":
        return "backbone", {"mode": "backbone"}
    depth = 0 if v.mode == "quantized" else depth_cap if v.capped else None
    name = f"{v.mode}, river {v.river}" + ("" if depth is None else f", {depth} backbone blocks")
    return name, {"mode": v.mode, "river": v.river, "depth": depth, "tau": v.tau}


# One malloc arena for every thread: with glibc's default of one per thread, temporaries that torch's worker threads
# free (the torch-path prefill's) stay resident in their arenas, up to 100 MB more whatever the weights (README).
PROBE_ENV = {"MALLOC_ARENA_MAX": "1"}
PROBE_REPEATS = 3  # fresh processes per deployment; the least peak counts


def memory_probe(spec):
    """One deployment in a fresh process (bench.py --memory-probe SPEC): load what it needs through the streaming
    loader (load_weights, river.load_river), decode, and print its peak resident memory and weight bytes as JSON.
    kind idle: the same imports, kernels, config, tokenizer and empty model skeleton, no weights -- the runtime's
    own peak, which every probe's peak includes."""
    device, dtype = resolve_device(spec["device"]), getattr(torch, spec["dtype"])
    torch.set_num_threads(spec["threads"])
    kernels.native(spec["isa"])
    cfg, _ = load_config_and_tokenizer(spec["model"])
    with torch.device("meta"):
        Transformer(cfg, backbone_depth=0)  # torch's meta-device machinery, which every load uses
    weights = 0
    if "mode" in spec or "strategy" in spec:
        policy = SimilarityExit(spec.get("tau", 2.0))
        if "river" in spec:
            kind = river_kinds(device, spec["depth"], cfg.n_layers)[spec["river"]]
            model, river, _ = load_river(spec["model"], device, spec["depth"], group_size=spec["group_size"],
                                         dtype=dtype, **kind)
            engine, weights = Engine(model, river, native=spec["isa"]), tensor_bytes(model) + tensor_bytes(river)
        else:
            model, _ = load_model(spec["model"], device, dtype)
            engine = BaselineEngine(model) if "strategy" in spec else Engine(model, native=spec["isa"])
            weights = tensor_bytes(model)
        engine.generate(spec["prompt"], spec["new_tokens"], spec.get("strategy", spec.get("mode")), policy)
    print(json.dumps({**resident_mb(), "weight_mb": weights / 2**20}))


def resident_mb():
    """This process's peak and current resident memory. Linux's VmHWM belongs to the process image, which starts
    afresh at exec; getrusage's ru_maxrss would carry the peak of the process that forked it (the bench) across the
    exec. Elsewhere: ru_maxrss alone."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mb": None}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {"peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024, "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}


def measure_memory(rows, depth_cap, common):
    """Peak resident memory of each row's deployment, each in a fresh process, less the idle process's peak;
    common: what every probe shares (model, device, dtype, threads, isa, group size, prompt, new tokens)."""
    def probe(spec):
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-probe",
                               json.dumps({**common, **spec})], capture_output=True, text=True,
                              env={**os.environ, **PROBE_ENV})
        if done.returncode:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            fail(f"memory probe {spec} failed: {last}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    def least(spec):  # a run's peak now and then holds a transient of ~100 MB nothing here explains: the least of a few
        runs = [probe(spec) for _ in range(PROBE_REPEATS)]
        best = min(runs, key=lambda run: run["peak_rss_mb"])
        return {**best, "peak_rss_mb_per_run": [run["peak_rss_mb"] for run in runs]}
    idle = least({})["peak_rss_mb"]
    probes, row_probe = {}, {}
    for v in rows:
        name, spec = deployment(v, depth_cap)
        if name not in probes:
            log(f"  memory: {name}")
            probes[name] = {**least(spec), "spec": spec}
            probes[name]["peak_rss_mb_over_idle"] = probes[name]["peak_rss_mb"] - idle
        row_probe[v.name] = name
    return {"idle_peak_rss_mb": idle, "probes": probes, "row_probe": row_probe,
            "environment": PROBE_ENV,
            "how": "each deployment alone in a fresh process: the streaming loader, then a greedy decode of "
                   f"{common['new_tokens']} tokens after the speed prompt, {PROBE_REPEATS} times; peak_rss_mb is "
                   "the least of their peak resident memories less that of an idle process (same imports, kernels, "
                   "tokenizer, empty model skeleton)"}


# ------------------------------------------------------------------------ scaling: model size, context length

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
            for d in teacher_forced(engine, "river", SimilarityExit(tau), context, target)[1]]


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


def decode(engine, cache, start, token, mode, policies):
    """Greedy decode after `token` at positions start.. of a prefilled cache, step i under policies[i]; returns each
    step's seconds and backbone blocks. Runs from the same start overwrite the same slots: each sees the prompt
    alone."""
    times, depths = [], []
    for i, policy in enumerate(policies):
        t = time.perf_counter()
        logits, depth = engine.forward(torch.tensor([[token]], device=engine.model.device), start + i, cache, mode,
                                       policy)
        token = int(logits[0, -1].argmax())  # reads the logits: syncs
        times.append(time.perf_counter() - t)
        depths.append(depth)
    return times, depths


def interleaved_rates(engine, cache, start, token, plans, repeats):
    """Median decode tok/s and every step's depth of each plan (name -> (mode, per repeat the policies of its steps)),
    all decoding from the same prefilled cache; plans interleaved, their order rotated per repeat, as in
    measure_speed."""
    names = list(plans)
    for name in names:  # warm-up
        mode, runs = plans[name]
        decode(engine, cache, start, token, mode, runs[0][:4])
    rates, depths = ({name: [] for name in names} for _ in range(2))
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            mode, runs = plans[name]
            times, steps = decode(engine, cache, start, token, mode, runs[r])
            rates[name].append(len(times) / sum(times))
            depths[name] += steps
    return {name: {"decode_tokens_per_s": statistics.median(rates[name]), "decode_tokens_per_s_per_repeat": rates[name],
                   "depths": depths[name]} for name in names}


def read_bandwidth(device):
    """GB/s of summing a 512 MB tensor: how fast a decode step's weights and K/V can stream at best."""
    a = torch.ones(128 * 2**20, device=device)
    return a.numel() * a.element_size() / min(seconds(lambda: a.sum(), device) for _ in range(5)) / 1e9


def block_weight_bytes(block):
    """Bytes of weights kernels.cpp streams for one block: bf16 matrices, or low-bit codes with an fp16 scale and
    low per row and group (QuantizedLinear.packed, kernels.pack_lowbit); its two norms in fp32."""
    total = 2 * 4 * block.attn_norm.weight.numel()
    for linear in (block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down):
        weight = linear.packed if isinstance(linear, QuantizedLinear) else linear.weight
        total += weight.numel() * weight.element_size()
    return total


def step_bytes(model, river, depths, positions):
    """Mean bytes a decode step reads over steps of these depths (backbone blocks run; river copies after) at these
    positions: the blocks' weights, the bf16 LM head, and every layer's bf16 K and V up to the position (once per
    KV head: the query heads sharing it read it from cache). The embedding row is left out."""
    cfg = model.cfg
    backbone = [block_weight_bytes(b) for b in model.blocks]
    copies = [block_weight_bytes(b) for b in river.blocks] if river is not None else []
    weights = statistics.mean(sum(backbone[:d]) + sum(copies[d:]) for d in depths)
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv_per_position = cfg.n_layers * 2 * cfg.kv_dim * model.dtype.itemsize
    return weights + head + kv_per_position * (statistics.mean(positions) + 1)


def bandwidth_model(model, river, depths, positions, read_gb_per_s):
    """Backbone and River steps as bytes read at the measured read bandwidth: their tok/s and ratio."""
    bytes_read = {"backbone": step_bytes(model, None, [model.cfg.n_layers], positions),
                  "river": step_bytes(model, river, depths, positions)}
    return {"bytes_per_token": bytes_read, "read_gb_per_s": read_gb_per_s,
            "tokens_per_s": {name: read_gb_per_s * 1e9 / b for name, b in bytes_read.items()},
            "speedup": bytes_read["backbone"] / bytes_read["river"]}


def speed_row(model, river, rates, positions, read_gb_per_s, **extra):
    """One point of a scaling curve: measured tok/s of backbone and River, their ratio, and the bandwidth model's."""
    depths = rates["river"]["depths"]
    modelled = bandwidth_model(model, river, depths, positions, read_gb_per_s)
    return {**extra, "decode_tokens_per_s": {name: r["decode_tokens_per_s"] for name, r in rates.items()},
            "decode_tokens_per_s_per_repeat": {name: r["decode_tokens_per_s_per_repeat"] for name, r in rates.items()},
            "river_mean_backbone_blocks": statistics.mean(depths),
            "river_exit_histogram": exit_histogram(depths, model.cfg.n_layers),
            "speedup": rates["river"]["decode_tokens_per_s"] / rates["backbone"]["decode_tokens_per_s"],
            "modelled": modelled["speedup"], "bandwidth_model": modelled}


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
    cache = model.new_cache(len(prompt) + new_tokens)
    t = time.perf_counter()
    logits, _ = engine.forward(torch.tensor([prompt]), 0, cache, "backbone")
    prefill_s = time.perf_counter() - t
    plans = {"backbone": ("backbone", [[None] * new_tokens] * repeats),
             "river": ("river", [[ReplayedExit(d - 1) for d in replay[r * new_tokens:(r + 1) * new_tokens]]
                                 for r in range(repeats)])}
    rates = interleaved_rates(engine, cache, len(prompt), int(logits[0, -1].argmax()), plans, repeats)
    positions = range(len(prompt), len(prompt) + new_tokens)
    return speed_row(model, river, rates, positions, read_gb_per_s, weights="random", exits="replayed (depth_source)",
                     config=asdict(cfg), parameters=parameter_count(model), build_s=build_s, context=len(prompt),
                     prefill_s=prefill_s, path=engine.path)


def long_text_ids(tokenizer, text_file):
    """Token ids of a long real text: the file's, or every HumanEval prompt one after another."""
    if text_file is not None:
        return tokenizer.encode(Path(text_file).read_text(encoding="utf-8")).ids
    return [i for prompt, _ in humaneval_problems() for i in tokenizer.encode(prompt).ids]


def context_speed(engine, prompt, new_tokens, repeats, tau, read_gb_per_s):
    """Backbone and River (the similarity rule at tau) decode speed after a prompt of len(prompt) real tokens, beside
    the bandwidth model; the prefill's seconds (the torch path, fp32 activations, one call for the prompt); and on the
    native path the split of a block's time at that position (attention grows in the rest)."""
    model = engine.model
    cache = model.new_cache(len(prompt) + new_tokens)
    t = time.perf_counter()
    logits, _ = engine.forward(torch.tensor([prompt], device=model.device), 0, cache, "backbone")
    prefill_s = time.perf_counter() - t
    log(f"  context {len(prompt)}: prefill {prefill_s:.1f} s")
    plans = {"backbone": ("backbone", [[None] * new_tokens] * repeats),
             "river": ("river", [[SimilarityExit(tau)] * new_tokens] * repeats)}
    rates = interleaved_rates(engine, cache, len(prompt), int(logits[0, -1].argmax()), plans, repeats)
    positions = range(len(prompt), len(prompt) + new_tokens)
    split = block_split_us(engine, len(prompt) + new_tokens // 2) if engine.native is not None else None
    return speed_row(model, engine.river, rates, positions, read_gb_per_s, context=len(prompt), prefill_s=prefill_s,
                     block_split_us=split)


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
              f"{'dNLL':>8}{'top-1':>7}{'KL':>8}{'blocks':>8}{'KV cos':>8}{'wts MB':>7}{'RSS MB':>7}  path")
    print(header)
    print("-" * len(header))
    for v in rows:
        m = modes[v.name]
        tau = f"{v.tau:g}" if v.exits else "-"
        cos = f"{m['kv_cosine_mean']:.3f}" if m["kv_cosine_mean"] is not None else "-"
        print(f"{v.name:<16}{m['weights']:>9}{tau:>6}{m['decode_tokens_per_s']:>8.1f}"
              f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:>8.2f}x{m['prefill_s'] * 1e3:>11.1f}"
              f"{m['nll']:>8.3f}{m['nll'] - base['nll']:>+8.3f}{m['top1_agreement']:>7.3f}{m['kl_to_backbone']:>8.4f}"
              f"{m['mean_backbone_blocks']:>8.2f}{cos:>8}{m['weight_mb']:>7.0f}{m['peak_rss_mb']:>7.0f}  {m['path']}")


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
    sweep = sorted((v for v in rows if v.mode == "river" and v.river == "main" and v.name != "river_calibrated"),
                   key=lambda v: v.tau)
    ax.plot([loss(v.name) for v in sweep], [speed(v.name) for v in sweep], "o-", label="River, tau sweep")
    for i, v in enumerate(sweep):  # labels alternate above and below the curve so neighbours do not overlap
        ax.annotate(f"{v.tau:g}", (loss(v.name), speed(v.name)), textcoords="offset points",
                    xytext=(4, 6 if i % 2 else -12), fontsize=8)
    points = (("quantized", "s", "whole model 4-bit W4A16 (control)"),
              ("quantized_main", "D", "whole model, River's copies"), ("river_w4a16", "v", "River, W4A16 copies"),
              ("river_8bit", "^", "River, 8-bit copies"), ("river_capped", "P", "River, backbone capped (memory)"),
              ("river_calibrated", "X", "River, tau from the quality budget"))
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


def plot_scaling(result, path):
    """River's decode speedup over the backbone against model size (known shapes, random weights, replayed exits) and
    against context length (a real model and text), each measured beside the bandwidth model."""
    import matplotlib  # main checked that it is installed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    panels = [key for key in ("shapes", "context_sweep") if result.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "shapes":
            rows = sorted(result["shapes"].items(), key=lambda item: item[1]["parameters"])
            x = [row["parameters"] / 1e9 for _, row in rows]
            for (name, row), xi in zip(rows, x):
                ax.annotate(name, (xi, row["speedup"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
            rows = [row for _, row in rows]
            source = result["depth_source"]
            ax.set_xscale("log")
            ax.set_xlabel("parameters (billions, log scale)")
            ax.set_title(f"against model size: seeded random weights, {rows[0]['context']}-token prompt,\n"
                         f"exits replayed from {source['model']} at tau {source['tau']:g}", fontsize=9)
        else:
            rows = result["context_sweep"]
            x = [row["context"] for row in rows]
            ax.set_xscale("log")
            ax.set_xlabel("context: prompt tokens before the decode (log scale)")
            ax.set_title(f"against context length: {result['model']},\n{result['text']}, its exit rule at tau "
                         f"{result['tau']:g}", fontsize=9)
        ax.set_xticks(x, [f"{v:.2g}" if key == "shapes" else str(v) for v in x])  # the points measured, no others
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.plot(x, [row["speedup"] for row in rows], "o-", label="measured")
        ax.plot(x, [row["modelled"] for row in rows], "s--", label="bandwidth model (bytes read per token)")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_ylabel("River decode speedup over the backbone")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"River-LLM: where the method pays ({result['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_scaling(result):
    print(f"\nRiver-LLM scaling, speed only: {result['machine']}, torch {result['torch']}, native kernels "
          f"{result['kernels']['isa'] or 'none'}; River's copies 4-bit (last block 8-bit), groups of "
          f"{result['group_size']}, tau {result['tau']:g}; memory read {result['read_gb_per_s']:.1f} GB/s")
    print("modelled: bytes read per token (weights of the blocks run, bf16 LM head, every layer's K/V), "
          "backbone / River")
    if result.get("shapes"):
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
    if result.get("context_sweep"):
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
    print(f"finished in {result['seconds']:.0f} s, peak resident memory {result['peak_resident_gb']:.1f} GB")


def scaling(args, parser, device):
    """--shape and --context: River's decode speedup against model size and against context length, speed only, each
    beside the bandwidth model; prints the tables, writes --json and --plot-scaling."""
    problems, max_target, new_tokens, repeats = (3, 48, 16, 2) if args.quick else (12, 128, 64, 5)
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
        log(f"River's depths at tau {args.tau:g} on {result['model']} ...")
        depths = river_depths(engine, tokenizer, args.tau, problems, max_target)
        result["depth_source"] = {
            "model": result["model"], "tau": args.tau, "n_layers": cfg.n_layers, "tokens": len(depths),
            "data": f"HumanEval canonical solutions, first {problems} problems, up to {max_target} tokens, "
                    "teacher-forced", "mean_backbone_blocks": statistics.mean(depths),
            "exit_histogram": exit_histogram(depths, cfg.n_layers)}
        prompt = tokenizer.encode(humaneval_problems()[0][0]).ids
        result["shapes"] = {name: shape_speed(name, depths, cfg.n_layers, prompt, new_tokens, repeats, args.group_size,
                                              result["read_gb_per_s"]) for name in args.shape}
        largest = max(args.shape, key=lambda name: result["shapes"][name]["parameters"])
        result["speedup"] = {"river_vs_backbone": result["shapes"][largest]["speedup"], "shape": largest,
                             "weights": "random"}
    if args.context:
        result["text"] = args.text or "HumanEval prompts one after another"
        log(f"context sweep: {result['text']}, {len(text)} tokens")
        result["context_sweep"] = [context_speed(engine, text[:n], new_tokens, repeats, args.tau,
                                                 result["read_gb_per_s"]) for n in args.context]
    result["seconds"] = time.perf_counter() - t_start
    result["peak_resident_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB
    print_scaling(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    if args.plot_scaling:
        plot_scaling(result, args.plot_scaling)


def check_context(n):
    if n < 1:
        raise ValueError(f"context must be >= 1 token, got {n}")


def check_context_fits(n, new_tokens, available, context):
    if n > available:
        raise ValueError(f"context {n} is longer than the text's {available} tokens")
    if n + new_tokens > context:
        raise ValueError(f"context {n} plus {new_tokens} decoded tokens exceeds the model's context of {context}")


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
    parser.add_argument("--shape", nargs="+", choices=SHAPES, default=None, metavar="NAME",
                        help=f"speed only, on seeded random weights of known shapes ({', '.join(SHAPES)}), River's "
                             "exits replayed from the depths it takes on the bundled model at --tau")
    parser.add_argument("--context", nargs="+", type=option(int, check_context), default=None, metavar="N",
                        help="speed only: decode after a prompt of N real tokens (HumanEval prompts one after "
                             "another, or --text)")
    parser.add_argument("--plot-scaling", default=None, metavar="PATH",
                        help="draw the --shape and --context speedups, measured beside modelled, as a PNG")
    parser.add_argument("--max-backbone-depth", type=int, default=None, metavar="D",
                        help="the capped River's backbone blocks (default: the depth by which 99%% of the "
                             "calibration split's tokens leave the backbone at --tau)")
    parser.add_argument("--quality-budget", type=option(float, check_budget), default=None, metavar="B",
                        help="the calibrated River's NLL increase allowance, nats per token (default: half the "
                             "whole-model 4-bit increase on the calibration split)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # bench's own fresh processes
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(json.loads(args.memory_probe))
    device = check_argument(parser, "--device", resolve_device,
                            args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Every file is checked before minutes of measuring: inputs here, outputs' folders, the model's config below.
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
    if args.shape or args.context:
        return scaling(args, parser, device)
    if args.plot_scaling:
        parser.error("argument --plot-scaling: draws the --shape and --context runs; name one of them")
    problems, max_target, new_tokens, repeats = (3, 48, 32, 3) if args.quick else (
        CALIBRATION_PROBLEMS, CALIBRATION_MAX_TARGET, 64, 5)
    taus = QUICK_TAUS if args.quick else SWEEP_TAUS

    t_start = time.perf_counter()
    cfg, tokenizer = reading_files(load_config_and_tokenizer, args.model)
    check_argument(parser, "--group-size", check_group_size_fits, cfg, args.group_size)
    if args.max_backbone_depth is not None:
        check_argument(parser, "--max-backbone-depth", check_backbone_depth, args.max_backbone_depth, cfg.n_layers)
    sequences = reading_files(quality_sequences, tokenizer, problems, max_target, args.text)
    calibration_set = reading_files(calibration_sequences, tokenizer, problems, max_target, args.text)
    if not calibration_set:
        fail(f"--text {args.text}: no windows left after the {len(sequences)} scored ones for the calibration split")
    prompt = tokenizer.encode(reading_files(humaneval_problems)[0][0]).ids
    if args.isa is not None and args.isa not in kernels.usable_isas():
        fail(f"--isa {args.isa}: this CPU does not run it (it runs {', '.join(kernels.usable_isas()) or 'neither'})")
    log(f"river bench on {machine_info(device)}, torch {torch.__version__}")
    model = load_backbone(args.model, device, args.dtype)
    log(f"backbone in {args.dtype}; building the rivers (groups of {args.group_size}) ...")
    river_set = {name: ExitRiver(model, group_size=args.group_size, **kind)
                 for name, kind in river_kinds(device).items()}
    compile = not args.no_compile
    engines = {name: Engine(model, river, compile, native=args.isa) for name, river in river_set.items()}

    log(f"calibration: {len(calibration_set)} sequences after the scored ones, teacher-forced")
    calibration = calibrate(engines, calibration_set, sorted(set(taus) | {args.tau}), args.quality_budget)
    depth_cap = args.max_backbone_depth
    if depth_cap is None:
        depth_cap = cap_depth(calibration["calibration"].depths[args.tau])
    river_set["capped"] = ExitRiver(model, group_size=args.group_size,
                                    **river_kinds(device, depth_cap, cfg.n_layers)["capped"])
    engines["capped"] = Engine(model, river_set["capped"], compile, native=args.isa, max_backbone_depth=depth_cap)
    engines["baseline"] = BaselineEngine(model, compile)
    rows = variants(args.tau, taus, river_set, args.strategies, calibration["calibration"].tau)
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
    log("memory: each row's deployment alone in a fresh process ...")
    memory = measure_memory(rows, depth_cap, {
        "model": args.model, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "isa": args.isa, "group_size": args.group_size, "prompt": prompt, "new_tokens": 32})

    def describe(v):
        if v.mode not in ("quantized", "river"):
            return "bf16" if args.dtype == "bfloat16" else "fp32", None
        r = river_set[v.river]
        bits = "/".join(str(b) for b in sorted(set(r.bits)))
        return f"{bits}b/{'i16' if r.activations == 'int16' else 'bf16'}", r.bits

    modes = {v.name: {**speed[v.name], **quality[v.name], "weights": describe(v)[0], "bits_per_block": describe(v)[1],
                      "activations": river_set[v.river].activations if v.mode in ("quantized", "river") else "fp32",
                      "tau": v.tau if v.exits else None, "path": engines[v.engine].path,
                      "peak_rss_mb": memory["probes"][memory["row_probe"][v.name]]["peak_rss_mb_over_idle"],
                      "weight_mb": memory["probes"][memory["row_probe"][v.name]]["weight_mb"],
                      "memory_probe": memory["row_probe"][v.name]} for v in rows}
    base = modes["backbone"]["decode_tokens_per_s"]
    base_nll, base_mb = modes["backbone"]["nll"], modes["backbone"]["peak_rss_mb"]
    deeper = lambda hist: sum(hist[depth_cap + 1:]) / max(1, sum(hist))  # noqa: E731 - share of steps past the cap
    cal = calibration["calibration"]
    modes["river_capped"]["cap"] = {
        "max_backbone_depth": depth_cap, "tau": args.tau,
        "source": "--max-backbone-depth" if args.max_backbone_depth is not None else
        f"the depth by which {CAP_SHARE:.0%} of the calibration split's decode tokens leave the backbone at tau",
        "calibration_share_deeper": deeper(exit_histogram(cal.depths[args.tau], n_layers)),
        "forced_share": deeper(modes["river"]["exit_histogram"]),
        "forced_share_how": "share of the uncapped River's scored decode tokens (same tau) that ran more than "
                            "max_backbone_depth backbone blocks: those the cap sends down the river earlier"}
    calibrated = modes.get("river_calibrated")
    flags = kernels.cpu_flags()
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (bundled)", "machine": machine_info(device),
        "device": str(device), "torch": torch.__version__, "dtype": args.dtype,
        "kernels": {"isa": native.isa if native is not None else None, "usable_isas": kernels.usable_isas(),
                    "cpu_flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                 "avx512_vnni", "avx512_bf16"})},
        "compiled_torch_steps": compile,
        "group_size": args.group_size, "tau": args.tau, "quick": args.quick,
        "eight_bit_layers": [layer for layer, bits in enumerate(river_set["main"].bits) if bits == 8],
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
        "memory": {key: memory[key] for key in ("idle_peak_rss_mb", "probes", "environment", "how")},
        "calibration": {
            "problems": args.text or f"HumanEval problems {problems}..{2 * problems - 1} (disjoint from the scored "
                                     f"0..{problems - 1}), up to {max_target} tokens",
            "budget": cal.budget, "budget_source": calibration["budget_source"],
            "whole_model_4bit_nll_increase": calibration["whole_model_4bit_nll_increase"], "tau": cal.tau,
            "calibration_nll_increase": cal.nll_increase.get(cal.tau),
            "scored_nll_increase": calibrated["nll"] - base_nll if calibrated else None,
            "mean_backbone_blocks": calibrated["mean_backbone_blocks"] if calibrated else None,
            "per_tau": {f"{t:g}": {"nll_increase": cal.nll_increase[t],
                                   "mean_backbone_blocks": cal.mean_backbone_blocks[t]} for t in cal.nll_increase}},
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
    capped, c = modes["river_capped"], result["calibration"]
    print(f"memory (peak RSS over an idle process's {result['memory']['idle_peak_rss_mb']:.0f} MB, each deployment "
          f"alone): backbone {base_mb:.0f} MB, River capped at {capped['cap']['max_backbone_depth']} backbone blocks "
          f"{capped['peak_rss_mb']:.0f} MB = {capped['peak_rss_mb'] / base_mb:.2f}x; the cap forced "
          f"{capped['cap']['forced_share']:.1%} of River's scored tokens out early; its NLL "
          f"{capped['nll'] - base_nll:+.3f} against the whole-model 4-bit {modes['quantized']['nll'] - base_nll:+.3f}")
    if c["tau"] is None:
        print(f"calibration: no tau meets the budget of {c['budget']:.4f} nats/token ({c['budget_source']})")
    else:
        print(f"calibration: budget {c['budget']:.4f} nats/token ({c['budget_source']}) -> tau {c['tau']:g}: "
              f"{c['calibration_nll_increase']:+.4f} on the calibration split, {c['scored_nll_increase']:+.4f} on "
              f"the scored problems, {c['mean_backbone_blocks']:.2f} backbone blocks per token")
    print(f"finished in {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    if args.plot:
        plot(result, rows, args.plot)


if __name__ == "__main__":
    main()
