"""The bench's harness: what is measured of the comparison's rows (rows.py) -- interleaved decode speed,
teacher-forced quality against a reference row, peak memory of each row's deployment alone in a fresh process -- and
the native step's time split. bench.py builds the rows and reports; scaling.py reuses the timing helpers."""
import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import river_native
from calibrate import scored
from cli import fail
from exit_policy import NEVER, ExitRule
from kv_cache import Writer
from kv_strategies import STRATEGIES, BaselineEngine
from load_weights import load_config_and_tokenizer, load_model, resolve_device
from model import Transformer
from river import Engine, load_river, sync


def log(message):
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- quality

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


class Tally:
    """One row's quality sums over the scored sequences."""

    def __init__(self):
        self.nll = self.agree = self.kl = 0.0
        self.tokens, self.depths, self.kv_cos = 0, [], []

    def add(self, logp, nll, base_logp, depths, kv_cos):
        self.nll += nll
        self.agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
        self.kl += (base_logp.exp() * (base_logp - logp)).sum().item()
        self.tokens += len(logp)
        self.depths += depths
        self.kv_cos += kv_cos

    def summary(self, n_layers):
        n, cos = self.tokens, self.kv_cos
        return {"nll": self.nll / n, "top1_agreement": self.agree / n, "kl_to_backbone": self.kl / n,
                "mean_backbone_blocks": statistics.mean(self.depths) if self.depths else float(n_layers),
                "exit_histogram": exit_histogram(self.depths, n_layers),
                "kv_cosine_mean": statistics.mean(cos) if cos else None, "kv_cosine_min": min(cos) if cos else None,
                "scored_tokens": n}


def measure_quality(reference, rows, sequences, n_layers):
    """Each row teacher-forced over the sequences: NLL of the targets, and top-1 agreement, KL and K/V cosine
    against the reference row (the backbone) on the same tokens. rows: row name -> its summary, in rows' order."""
    tallies = {row.name: Tally() for row in rows}
    for i, (context, target) in enumerate(sequences):
        log(f"  quality {i + 1}/{len(sequences)}: {len(context)} context + {len(target)} target tokens")
        logits, depths, base_cache = reference.score(context, target)
        base_logp, nll = scored(logits, target)
        tallies[reference.name].add(base_logp, nll, base_logp, depths, [])
        for row in rows:
            if row is not reference:
                logits, depths, cache = row.score(context, target)
                logp, nll = scored(logits, target)
                cos = [] if cache is None else kv_cosines(cache, base_cache, len(context) + len(target))
                tallies[row.name].add(logp, nll, base_logp, depths, cos)
    return {name: tally.summary(n_layers) for name, tally in tallies.items()}


# --------------------------------------------------------------------------------------------------- speed

def measure_speed(rows, prompt, new_tokens, repeats, between=lambda: None):
    """Decode tokens/s of each row: the median over repeats of (decode steps / their total time), and the
    median prefill seconds. Rows are interleaved, the order rotated per repeat, so that drift of the machine
    hits them all alike; a median over whole repeats keeps the cost of uneven steps (deep exits, catch-up
    recomputation) while shrugging off a repeat hit by a burst of the shared machine. between() runs after each
    repeat (the bench samples the memory's rates there, so that they drift with the rows')."""
    for row in rows:  # warm-up
        row.generate(prompt, 4)
    tps, steps, prefill, blocks = ({row.name: [] for row in rows} for _ in range(4))
    positions = range(len(prompt), len(prompt) + new_tokens - 1)  # the decode steps
    for r in range(repeats):
        log(f"  speed repeat {r + 1}/{repeats}")
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            g = row.generate(prompt, new_tokens)
            tps[row.name].append(g.decode_tokens_per_s)
            steps[row.name] += g.step_s
            prefill[row.name].append(g.prefill_s)
            blocks[row.name] += g.depths[1:]  # the decode steps' (the first is the prefill's)
        between()
    return {row.name: {"decode_tokens_per_s": statistics.median(tps[row.name]),
                       "decode_tokens_per_s_per_repeat": tps[row.name],
                       "decode_step_ms_median": 1e3 * statistics.median(steps[row.name]),
                       "prefill_s": statistics.median(prefill[row.name]),
                       "generation_mean_backbone_blocks": statistics.mean(blocks[row.name]),
                       "bytes_per_step": row.bytes_per_step(blocks[row.name], positions)} for row in rows}


def block_weight_bytes(block):
    """Bytes of weights a step streams for one block: its four matrices as they are held (bf16, or a low-bit copy's
    codes with its scales and lows: QuantizedLinear's buffers) and its two norms in fp32, as the native pass holds
    them."""
    matrices = (block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down)
    return 2 * 4 * block.attn_norm.weight.numel() + sum(tensor_bytes(m) for m in matrices)


def step_bytes(model, river, depths, positions):
    """Mean bytes a decode step reads over steps of these depths (backbone blocks run; river copies after) at these
    positions: the blocks' weights, the LM head it ends at (the model's bf16 head after every backbone block, the
    river's low-bit copy, where it has one, after an exit), and every layer's bf16 K and V up to the position (once
    per KV head: the query heads sharing it read it from cache). The embedding row is left out."""
    cfg = model.cfg
    backbone = [block_weight_bytes(b) for b in model.blocks]
    copies = [block_weight_bytes(b) for b in river.blocks] if river is not None else []
    model_head = model.lm_head.weight.nbytes
    river_head = model_head if river is None or river.head is None else river.head.packed.nbytes
    weights = statistics.mean(sum(backbone[:d]) + sum(copies[d:]) + (model_head if d == cfg.n_layers else river_head)
                              for d in depths)
    kv_per_position = cfg.n_layers * 2 * cfg.kv_dim * model.dtype.itemsize
    return weights + kv_per_position * (statistics.mean(positions) + 1)


def torch_path_prefill_s(engine, prompt, repeats):
    """Median seconds of the prompt's prefill through the whole backbone on the torch path (fp32 activations, the
    same weights and cache): the reference the native rows' prefill column is read against."""
    plain = Engine(engine.model, engine.river, native=False)
    tokens = torch.tensor([prompt], device=engine.model.device)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        cache = engine.model.new_cache(len(prompt))
        start = time.perf_counter()
        plain.forward(tokens, 0, cache, NEVER)
        sync(engine.model.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def seconds(fn, device):
    """Wall time of one call of fn, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_us(fn, per, repeats):
    """Median microseconds of fn over repeats (after one warm-up call), divided by `per`."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times) / per


def block_split_us(engine, context, repeats=20):
    """Microseconds of one decode step's parts on the native path, at position `context`: a backbone block and a
    river block, whole and their weight products alone (everything else a block does -- norms, RoPE, the cache
    write, attention, SwiGLU, thread barriers -- is the rest), and the LM head: the model's and the river's. Each stack runs all
    its blocks in one call, as a step does; medians over repeats."""
    decoder, model = engine.native.decoder, engine.model
    n_layers, cache = model.cfg.n_layers, model.new_cache(context + 1)
    x = torch.zeros(model.cfg.d_model)
    cos, sin = torch.ones(model.cfg.head_dim // 2), torch.zeros(model.cfg.head_dim // 2)
    threads = torch.get_num_threads()
    out = {}
    for name, stack in (("backbone_block", decoder.backbone), ("river_block", decoder.river)):
        whole = median_us(lambda: stack.run(x, cache.k, cache.v, 0, n_layers, context, cos, sin, threads), n_layers,
                          repeats)
        products = median_us(lambda: stack.run_products(0, n_layers, threads), n_layers, repeats)
        out[name] = {"whole": whole, "products": products, "rest": whole - products}
    logits = torch.empty(model.cfg.vocab_size)
    for name, head in (("lm_head", decoder.head), ("river_lm_head", decoder.river_head)):
        out[name] = median_us(lambda: decoder.lib.product(ctypes.byref(head), x.data_ptr(), 1, logits.data_ptr(),
                                                          threads), 1, repeats)
    return out


def time_split(engine, context, depth):
    """block_split_us at `context`, and River's speedup ceiling from the weight products alone at `depth` backbone
    blocks per token (None without the native path)."""
    if engine.native is None:
        return None
    split, n_layers = block_split_us(engine, context), engine.model.cfg.n_layers
    backbone, river = split["backbone_block"]["products"], split["river_block"]["products"]
    backbone_step = n_layers * backbone + split["lm_head"]
    river_step = depth * backbone + (n_layers - depth) * river + split["river_lm_head"]
    split["speedup_ceiling_products"] = backbone_step / river_step
    return split


def copy_bandwidth(device):
    """GB/s of a large tensor copy, counting bytes read and written."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / min(seconds(lambda: b.copy_(a), device) for _ in range(5)) / 1e9


def read_bandwidth(device):
    """GB/s of summing a 512 MB tensor: how fast a decode step's weights and K/V can stream at best."""
    a = torch.ones(128 * 2**20, device=device)
    return a.numel() * a.element_size() / min(seconds(lambda: a.sum(), device) for _ in range(5)) / 1e9


def speed_and_rates(rows, prompt, new_tokens, repeats, device):
    """measure_speed's figures, and the memory's copy and read GB/s sampled after each speed repeat (their medians):
    rates that drift as the rows' median speeds do, for the rows' roofline shares."""
    rates = []
    speed = measure_speed(rows, prompt, new_tokens, repeats,
                          lambda: rates.append((copy_bandwidth(device), read_bandwidth(device))))
    copy, read = (statistics.median(rate) for rate in zip(*rates))
    return speed, copy, read


def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


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


# -------------------------------------------------------------------------------------------------- memory

# One malloc arena for every thread: with glibc's default of one per thread, temporaries that torch's worker threads
# free (the torch-path prefill's) stay resident in their arenas, up to 100 MB more whatever the weights (README).
PROBE_ENV = {"MALLOC_ARENA_MAX": "1"}
PROBE_REPEATS = 3  # fresh processes per deployment; the least peak counts


def resident_mb():
    """This process's peak and current resident memory. Linux's VmHWM belongs to the process image, which starts
    afresh at exec; getrusage's ru_maxrss would carry the peak of the process that forked it (the bench) across the
    exec. Elsewhere: ru_maxrss alone."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mb": None}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {"peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024, "rss_mb": int(fields["VmRSS"].split()[0]) / 1024}


def probe(spec):
    """One fresh process running memory_probe(spec); its JSON line, or a one-line failure."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **PROBE_ENV})
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        fail(f"memory probe {spec} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def least_peak(spec):
    """The probe with the least peak of PROBE_REPEATS: a run's peak now and then holds a transient of ~100 MB
    nothing here explains."""
    runs = [probe(spec) for _ in range(PROBE_REPEATS)]
    best = min(runs, key=lambda run: run["peak_rss_mb"])
    return {**best, "peak_rss_mb_per_run": [run["peak_rss_mb"] for run in runs]}


def measure_memory(rows, common):
    """Peak resident memory of each row's deployment, each in a fresh process, less the idle process's peak;
    common: what every probe shares (model, device, dtype, threads, isa, group size, prompt, new tokens)."""
    idle = least_peak(common)["peak_rss_mb"]
    probes, row_probe = {}, {}
    for row in rows:
        if row.deployment is None:  # a peer's row (llama.cpp): nothing of this project's to load
            continue
        name = row.deployment.name
        if name not in probes:
            log(f"  memory: {name}")
            spec = row.deployment.spec(row.rule)
            probes[name] = {**least_peak({**common, **spec}), "spec": spec}
            probes[name]["peak_rss_mb_over_idle"] = probes[name]["peak_rss_mb"] - idle
        row_probe[row.name] = name
    return {"idle_peak_rss_mb": idle, "probes": probes, "row_probe": row_probe,
            "environment": PROBE_ENV,
            "how": "each deployment alone in a fresh process: the streaming loader, then a greedy decode of "
                   f"{common['new_tokens']} tokens after the speed prompt, {PROBE_REPEATS} times; peak_rss_mb is "
                   "the least of their peak resident memories less that of an idle process (same imports, kernels, "
                   "tokenizer, empty model skeleton)"}


def deployed(spec, device, dtype):
    """(engine, weight bytes) of a probe spec, loaded through the streaming loader (load_weights, river.load_river)."""
    if spec["river"] is not None:
        model, river, _ = load_river(spec["model"], device, spec["held"], group_size=spec["group_size"], dtype=dtype,
                                     **spec["river"])
        return Engine(model, river, native=spec["isa"]), tensor_bytes(model) + tensor_bytes(river)
    model, _ = load_model(spec["model"], device, dtype)
    strategies = {strategy.__name__: strategy for strategy in STRATEGIES}  # the spec's name, back to its class
    engine = BaselineEngine(model, strategies[spec["strategy"]]) if spec["strategy"] else \
        Engine(model, native=spec["isa"])
    return engine, tensor_bytes(model)


def memory_probe(spec):
    """One deployment in a fresh process (measure.py --memory-probe SPEC): load what it needs, decode, and print its
    peak resident memory and weight bytes as JSON. A spec without a rule is the idle probe: the same imports,
    kernels, config, tokenizer and empty model skeleton, no weights -- the runtime's own peak, which every probe's
    peak includes."""
    device, dtype = resolve_device(spec["device"]), getattr(torch, spec["dtype"])
    torch.set_num_threads(spec["threads"])
    river_native.native(spec["isa"])
    cfg, _ = load_config_and_tokenizer(spec["model"])
    with torch.device("meta"):
        Transformer(cfg, held=0)  # torch's meta-device machinery, which every load uses
    weights = 0
    if "rule" in spec:
        rule = spec["rule"]
        engine, weights = deployed(spec, device, dtype)
        engine.generate(spec["prompt"], spec["new_tokens"],
                        ExitRule(math.inf if rule["tau"] is None else rule["tau"], rule["min_layer"],
                                 rule["max_depth"]))
    print(json.dumps({**resident_mb(), "weight_mb": weights / 2**20}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the bench's fresh process measuring one deployment's memory")
    parser.add_argument("--memory-probe", required=True, metavar="SPEC", help="JSON: what to load and run")
    memory_probe(json.loads(parser.parse_args().memory_probe))
