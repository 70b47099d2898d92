"""The native engine's Python side: native/river.cpp built on first use for this CPU's instruction set and loaded with
ctypes; the weights laid out as it reads them; a model's pass of T tokens in one call (Decoder), and the adapter that
runs an Engine's passes through it (NativeDecoder)."""
import ctypes
import hashlib
import mmap
import sys
from pathlib import Path

import torch

from model import token_ids_error
from quantize import BLOCK_ROWS, QuantizedLinear
from storage import cache_dir

SOURCES = Path(__file__).with_name("native")  # river.cpp, the one unit, includes the other files there
SOURCE = SOURCES / "river.cpp"
KIND_BF16, KIND_Q4, KIND_Q8 = 0, 1, 2
MAX_HEAD_DIM = 128  # the native attention keeps a head's output in registers

# Each instruction set the source is built for: the /proc/cpuinfo flags it needs and the compiler flags.
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "fma", "f16c"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mfma", "-mf16c",
                "-DRIVER_AVX512"]),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
}


HUGE_PAGE = 2 << 20
HUGE_PAGES_FROM = 64 << 20  # below this many bytes of weights a step's page walks are too few to matter
TRIM_EVERY = 8 << 20         # bytes moved between hand-backs of the old copies' memory
_libc = ctypes.CDLL(None)    # this process's C library (malloc_trim on glibc)
_huge_ranges = []  # (start, end) of the mappings on_huge_pages made: what lies inside is never moved again


def on_huge_pages(tensors, least=HUGE_PAGES_FROM):
    """Move CPU tensors' data into one anonymous mapping Linux backs with 2 MB pages where it may (madvise
    MADV_HUGEPAGE; transparent huge pages are often madvise-only): every decode step streams all the weights once,
    and with 4 KB pages it walks a page table every 4 KB (KERNELS.md has what it gained). Each tensor object is kept,
    its .data replaced, so modules and the torch path see the same weights; tensors already moved stay where they
    are, since native decoders keep raw pointers to them. Does nothing below `least` bytes in all, or where the OS
    offers no such advice. Returns the bytes moved.
    Memory: glibc keeps freed heap memory resident, so each old copy is handed back to the OS (malloc_trim) once
    some MB are moved: the peak grows by about that much, not by a second copy of the weights."""
    def moved(t):
        return any(start <= t.data_ptr() < end for start, end in _huge_ranges)
    todo = list({id(t): t for t in tensors if t.device.type == "cpu" and t.numel() and not moved(t)}.values())
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in todo]  # each tensor on a cache line of its own
    if not hasattr(mmap, "MADV_HUGEPAGE") or sum(sizes) < least:
        return 0
    region = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive while any view of it lives
    offset = -arena.data_ptr() % HUGE_PAGE
    _huge_ranges.append((arena.data_ptr(), arena.data_ptr() + arena.numel()))
    unreturned = 0
    for t, size in zip(todo, sizes):
        view = arena[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        t.data = view  # the old copy is freed here, unless something else holds it
        offset += size
        unreturned += size
        if unreturned >= TRIM_EVERY:
            give_back_freed_memory()
            unreturned = 0
    give_back_freed_memory()
    return sum(sizes)


def give_back_freed_memory():
    """Return the C heap's free pages to the OS where the C library can (glibc's malloc_trim)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def cpu_flags():
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def usable_isas(flags=None):
    """The instruction sets this CPU runs, best first."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, (needs, _) in ISAS.items() if needs <= flags]


class Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("group", ctypes.c_int32)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", Mat), ("o", Mat),
                ("gate_up", Mat), ("down", Mat)]


class Dims(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int32), ("n_heads", ctypes.c_int32), ("n_kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("ffn", ctypes.c_int32), ("eps", ctypes.c_float)]


class Cache(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("layer_stride", ctypes.c_int64),
                ("head_stride", ctypes.c_int64)]


class Model(ctypes.Structure):
    _fields_ = [("dims", Dims), ("n_layers", ctypes.c_int32), ("backbone", ctypes.c_void_p), ("river", ctypes.c_void_p),
                ("embed", ctypes.c_void_p), ("inv_freq", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("head", Mat),
                ("river_head", Mat)]


class Exit(ctypes.Structure):
    """An exit rule as native/river.cpp reads it (river_forward): after backbone block l, leave when checks and
    l >= min_layer and s_l > tau, or once max_depth blocks have run; never after the last block."""
    _fields_ = [("checks", ctypes.c_int32), ("tau", ctypes.c_float), ("min_layer", ctypes.c_int32),
                ("max_depth", ctypes.c_int32)]


class Kernels:
    """The built library of one instruction set, with its C signatures declared."""

    def __init__(self, isa, path):
        self.isa, self.path = isa, path
        lib = ctypes.CDLL(path)
        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self.forward = lib.river_forward
        self.forward.argtypes = [ptr, ptr, i32, i32, ptr, ptr, ptr, ptr, i32, ptr, i32]
        self.forward.restype = i32
        self.forward_scratch_floats = lib.river_forward_scratch_floats
        self.forward_scratch_floats.argtypes = [ptr, i32, i32, i32]
        self.forward_scratch_floats.restype = i64
        self.product = lib.river_product
        self.product.argtypes = [ptr, ptr, i32, ptr, i32]
        self.product.restype = None
        self.exp2 = lib.river_exp2
        self.exp2.argtypes = [ptr, i32, ptr]
        self.exp2.restype = None
        # for measuring: blocks and products alone
        self.run_blocks = lib.river_run_blocks
        self.run_blocks.argtypes = [ptr, ptr, i32, i32, ptr, ptr, i32, ptr, ptr, ptr, i32]
        self.run_blocks.restype = None
        self.run_products = lib.river_run_products
        self.run_products.argtypes = [ptr, ptr, i32, i32, ptr, i32]
        self.run_products.restype = None
        self.blocks_scratch_floats = lib.river_blocks_scratch_floats
        self.blocks_scratch_floats.argtypes = [ptr, i32, i32]
        self.blocks_scratch_floats.restype = i64


def build(isa):
    """Compile native/river.cpp for `isa` (cached under the cache folder, keyed by every native source, the flags and
    torch) and load it. Raises on a failed build."""
    from torch.utils.cpp_extension import load  # imports setuptools: only when a build is needed
    _, flags = ISAS[isa]
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", *flags]
    sources = b"".join(path.name.encode() + path.read_bytes() for path in sorted(SOURCES.iterdir()) if path.is_file())
    key = hashlib.sha256(sources + " ".join(cflags).encode() + torch.__version__.encode()).hexdigest()
    folder = cache_dir() / "kernels" / f"{isa}-{key[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    path = load(name=f"river_kernels_{isa}", sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                build_directory=str(folder), is_python_module=False, verbose=False)
    return Kernels(isa, path)


def compile_object(isa, out):
    """Compile native/river.cpp for `isa` into the object file `out`, without linking or loading it: how a path this
    CPU cannot run is still checked here. Raises on a compile error."""
    import subprocess
    _, flags = ISAS[isa]
    subprocess.run(["c++", "-std=c++17", "-O2", "-fopenmp", "-fPIC", *flags, "-c", str(SOURCE), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return Path(out)


_loaded = {}


def native(isa=None):
    """Kernels for `isa` (default: the best this CPU runs), built on first use; None where none can run here or
    the build fails (a note says why, once: callers then take the pure-torch path)."""
    isas = usable_isas()
    if isa is not None and isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; known: {', '.join(ISAS)}")
    isa = isa or (isas[0] if isas else None)
    if isa is None or isa not in isas:
        return None
    if isa not in _loaded:
        try:
            _loaded[isa] = build(isa)
        except Exception as err:  # noqa: BLE001 - any build failure means: fall back, and say so
            print(f"river: could not build the native {isa} kernels ({type(err).__name__}: {err}); "
                  "using the pure-torch path", file=sys.stderr)
            _loaded[isa] = None
    return _loaded[isa]


# --------------------------------------------------------------------------------------------- weight layouts

def bf16_mat(w):
    """A bf16 (N, K) weight as the kernels see it (no copy: the tensor must stay alive)."""
    assert w.dtype == torch.bfloat16 and w.is_contiguous() and w.device.type == "cpu"
    return Mat(w.data_ptr(), KIND_BF16, w.shape[0], w.shape[1], w.shape[1])


def lowbit_mat(packed, n, k, group, bits):
    return Mat(packed.data_ptr(), KIND_Q4 if bits == 4 else KIND_Q8, n, k, group)


def matrix(w, keep):
    """A Mat for a bf16 (N, K) tensor or a low-bit (packed, N, K, group size, bits) tuple (pack_lowbit's layout);
    no copy of a contiguous weight: what it points at goes into keep."""
    if isinstance(w, torch.Tensor):
        keep.append(w.contiguous())
        return bf16_mat(keep[-1])
    packed, n, k, group, bits = w
    if n % BLOCK_ROWS:
        raise ValueError(f"the low-bit kernel runs rows in blocks of {BLOCK_ROWS}; got a {n}x{k} weight")
    keep.append(packed)
    return lowbit_mat(packed, n, k, group, bits)


def cache_of(k_cache, v_cache):
    """The whole KV cache (layers, 1, n_kv_heads, capacity, head_dim) bf16 as the kernels address it."""
    assert k_cache.dtype == torch.bfloat16 and k_cache.shape[1] == 1 and k_cache.is_contiguous()
    return Cache(k_cache.data_ptr(), v_cache.data_ptr(), k_cache[0].numel(), k_cache.shape[3] * k_cache.shape[4])


class Stack:
    """A stack of blocks as the native pass runs them.

    layers: per block a dict of attn_norm and mlp_norm (d,) and the matrices qkv, o, gate_up, down (each bf16 or
    a low-bit tuple, see `matrix`)."""

    def __init__(self, lib, dims, layers):
        self.lib, self.dims, self.keep = lib, dims, []
        norms = [(l["attn_norm"].float().contiguous(), l["mlp_norm"].float().contiguous()) for l in layers]
        self.keep += [t for pair in norms for t in pair]
        self.layers = (Layer * len(layers))(*[
            Layer(a.data_ptr(), m.data_ptr(), *(matrix(l[name], self.keep) for name in ("qkv", "o", "gate_up", "down")))
            for (a, m), l in zip(norms, layers)])
        self.scratch = torch.empty(0)

    def __len__(self):
        return len(self.layers)

    # For measuring (bench.py's split of a step's time); a pass itself is Decoder.forward.
    def run(self, x, k_cache, v_cache, first, last, pos, cos, sin, threads):
        """Blocks first..last-1 on x (d,) fp32, in place, for one token at `pos`; block j writes cache layer j at
        pos. cos, sin: (head_dim / 2,) fp32."""
        self.check_range(first, last)
        self.lib.run_blocks(ctypes.byref(self.dims), self.layers, first, last, x.data_ptr(),
                            ctypes.byref(cache_of(k_cache, v_cache)), pos, cos.data_ptr(), sin.data_ptr(),
                            self.scratch_for(pos, threads), threads)

    def run_products(self, first, last, threads):
        """The weight products of blocks first..last-1 alone, as a step runs them, on whatever the scratch holds."""
        self.check_range(first, last)
        self.lib.run_products(ctypes.byref(self.dims), self.layers, first, last, self.scratch_for(0, threads), threads)

    def scratch_for(self, pos, threads):
        self.scratch = grown(self.scratch, self.lib.blocks_scratch_floats(ctypes.byref(self.dims), pos, threads))
        return self.scratch.data_ptr()

    def check_range(self, first, last):
        if not 0 <= first <= last <= len(self.layers):
            raise IndexError(f"blocks {first}..{last - 1} are outside this stack of {len(self.layers)}")


SCRATCH_AHEAD = 1024  # positions a pass's scratch is sized past its last one, so that decode steps rarely resize


def grown(buffer, floats):
    """`buffer`, or a zeroed one of at least `floats` floats (twice the old size at least) where it is smaller."""
    return buffer if buffer.numel() >= floats else torch.zeros(max(floats, 2 * buffer.numel()))


class Decoder:
    """A model's pass of T tokens in one native call (river_forward): embedding, backbone blocks with the exit rule,
    river copies, final norm and LM head. Takes tensors only: bf16 embedding (vocab, d), RoPE frequencies
    (head_dim / 2,) float64, final norm (d,), the model's LM head (bf16), the river's (a low-bit tuple, see `matrix`;
    None: the model's serves both), and per block the dicts Stack takes. A pass that ran every backbone block ends at
    the model's head, one that left at the river's. With a river, the backbone may hold only its first blocks (a
    depth-capped River): every rule must leave by then."""

    def __init__(self, lib, dims, backbone, river, embed, inv_freq, norm, head, river_head=None):
        self.lib, self.dims = lib, dims
        self.backbone = Stack(lib, dims, backbone)
        self.river = Stack(lib, dims, river) if river is not None else None
        self.keep = [embed.contiguous(), torch.as_tensor(inv_freq, dtype=torch.float64).contiguous(),
                     norm.float().contiguous()]
        embed, inv_freq, norm = self.keep
        n_layers = len(river) if river is not None else len(backbone)
        if len(backbone) > n_layers:
            raise ValueError(f"{len(backbone)} backbone blocks but a river of {n_layers}")
        self.head = matrix(head, self.keep)
        self.river_head = self.head if river_head is None else matrix(river_head, self.keep)
        if self.river_head.n != self.head.n:
            raise ValueError(f"the river's head has {self.river_head.n} rows, the model's {self.head.n}")
        self.model = Model(dims, n_layers, ctypes.addressof(self.backbone.layers),
                           ctypes.addressof(self.river.layers) if self.river is not None else None,
                           embed.data_ptr(), inv_freq.data_ptr(), norm.data_ptr(), self.head, self.river_head)
        self.scratch, self.scratch_covers = torch.empty(0), None
        self.similarity = torch.empty(n_layers)  # where a pass's similarities go when the caller wants none
        self.cache, self.cache_key = None, None

    def forward(self, tokens, pos, k_cache, v_cache, rule, threads, all_logits=False, similarity=None):
        """tokens: (T,) int64 ids at positions pos..pos+T-1 -> (logits, backbone blocks run): the last token's
        (1, 1, vocab) fp32, or with all_logits every token's (1, T, vocab); depth -1, nothing run or written, where
        an id is not in [0, vocab). rule: an Exit. similarity: optional (n_layers,) fp32 tensor that gets s_l (its
        minimum over the tokens the block updated) of every backbone block run, when the rule checks it.
        Right after a step has streamed its weights through the CPU's caches each Python statement runs cold, a
        visible share of a step (KERNELS.md): so the ids go in as they come, and the cache's table and the scratch are
        kept from one call to the next."""
        n_layers, held = self.model.n_layers, len(self.backbone)
        if self.river is None and (rule.checks or rule.max_depth < n_layers):
            raise ValueError("this decoder has no river: only the whole backbone (no check, max_depth n_layers) runs")
        if rule.max_depth > held:
            raise ValueError(f"the rule may run {rule.max_depth} backbone blocks; this decoder holds {held}")
        ids = tokens if tokens.dtype == torch.int64 and tokens.is_contiguous() else tokens.long().contiguous()
        T = ids.numel()
        if self.scratch_covers is None or self.scratch_covers[:2] != (T, threads) or pos > self.scratch_covers[2]:
            covered = pos + SCRATCH_AHEAD  # the scratch a pass needs grows with its last position
            self.scratch = grown(self.scratch, self.lib.forward_scratch_floats(ctypes.byref(self.dims), T, covered,
                                                                               threads))
            self.scratch_covers = (T, threads, covered)
        key = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape, k_cache.dtype)
        if key != self.cache_key:
            self.cache, self.cache_key = cache_of(k_cache, v_cache), key
        logits = torch.empty((1, T if all_logits else 1, self.head.n))
        depth = self.lib.forward(ctypes.byref(self.model), ids.data_ptr(), T, pos, ctypes.byref(self.cache),
                                 ctypes.byref(rule), self.scratch.data_ptr(), logits.data_ptr(), int(all_logits),
                                 (self.similarity if similarity is None else similarity).data_ptr(), threads)
        return logits, depth


# ------------------------------------------------------------------------------------ an engine's passes

class NativeDecoder:
    """Passes of a batch of one on CPU through native/river.cpp, a decode step's one token or a prompt's many: the whole
    pass (embedding, backbone blocks with the exit rule, river copies, final norm and LM head) in one native call, one
    thread team. The torch path of Engine.forward is its twin (fp32 residual stream, bf16 K/V, int16-activation river
    products); the same cache, the same record of who wrote each slot."""

    def __init__(self, lib, model, river):
        cfg = model.cfg
        self.model, self.isa = model, lib.isa
        dims = Dims(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.norm_eps)
        on_huge_pages([*model.parameters(), *(() if river is None else (*river.parameters(), *river.buffers()))])
        backbone = [block_weights(b) for b in model.blocks]
        blocks = None if river is None else [block_weights(b) for b in river.blocks]
        river_head = None if river is None or river.head is None else matrix_of(river.head)
        self.decoder = Decoder(lib, dims, backbone, blocks, model.embed.weight, model.inv_freq, model.norm.weight,
                               model.lm_head.weight, river_head)
        self.exits = {}  # ExitRule -> its C struct, filled once (a decode step runs the same rule again and again)

    @staticmethod
    def unsupported(model, river):
        """Why the native path cannot run this model and river, or None when it can."""
        cfg = model.cfg
        if model.device.type != "cpu" or model.dtype != torch.bfloat16:
            return f"the native path runs bf16 weights on CPU, not {model.dtype} on {model.device.type}"
        if cfg.d_model % BLOCK_ROWS or cfg.ffn_dim % BLOCK_ROWS or cfg.head_dim % 16:
            return f"d_model {cfg.d_model}, ffn_dim {cfg.ffn_dim} or head_dim {cfg.head_dim} is not a multiple of 16"
        if cfg.head_dim > MAX_HEAD_DIM:
            return f"head_dim {cfg.head_dim} is above the kernels' {MAX_HEAD_DIM}"
        if river is not None and river.activations != "int16":
            return f"the native river takes int16 activations, not {river.activations}"
        if river is not None and river.head is not None and cfg.vocab_size % BLOCK_ROWS:
            return f"the river's low-bit head has {cfg.vocab_size} rows, not a multiple of {BLOCK_ROWS}"
        return None

    def forward(self, tokens, start, cache, rule, all_logits=False, similarity=None):
        """Engine.forward for a batch of one, tokens (1, T). similarity: see Decoder.forward."""
        T = tokens.shape[1]
        if T == 0:
            raise ValueError("a pass needs at least one token")
        cache.check_range(start, T)  # before the kernel writes
        if rule not in self.exits:
            self.exits[rule] = native_exit(rule, self.model)
        logits, depth = self.decoder.forward(tokens[0], start, cache.k, cache.v, self.exits[rule],
                                             torch.get_num_threads(), all_logits, similarity)
        if depth < 0:  # the kernel checks the ids before anything else, and ran nothing
            raise token_ids_error(tokens, self.model.cfg.vocab_size)
        cache.record_pass(depth, start, T)
        return logits, depth


def native_exit(rule, model):
    """An ExitRule as native/river.cpp reads it: the one place the C struct is filled."""
    max_depth = model.cfg.n_layers if rule.max_depth is None else min(rule.max_depth, model.cfg.n_layers)
    return Exit(int(rule.checks_similarity), rule.tau if rule.checks_similarity else 0.0, rule.min_layer, max_depth)


def matrix_of(linear):
    """A linear layer's weight as the kernels take it: bf16, or (packed, N, K, group size, bits)."""
    if isinstance(linear, QuantizedLinear):
        return linear.packed, linear.out_features, linear.in_features, linear.group_size, linear.bits
    return linear.weight


def block_weights(block):
    """A block's norms and matrices as Stack takes them."""
    return {"attn_norm": block.attn_norm.weight, "mlp_norm": block.mlp_norm.weight,
            "qkv": matrix_of(block.attn.wqkv), "o": matrix_of(block.attn.wo),
            "gate_up": matrix_of(block.mlp.w_gate_up), "down": matrix_of(block.mlp.w_down)}
