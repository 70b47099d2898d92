"""Native CPU kernels (kernels.cpp): a pass of T tokens through the model, built on first use for this CPU's
instruction set, loaded with ctypes."""
import ctypes
import hashlib
import mmap
import os
import secrets
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels.cpp")
CACHE_ENV = "RIVER_CACHE_DIR"
KIND_BF16, KIND_Q4, KIND_Q8 = 0, 1, 2
BLOCK_ROWS = 16  # rows side by side in the packed low-bit layout: one 512-bit register holds a lane of each
MAX_HEAD_DIM = 128  # kernels.cpp's attention keeps a head's output in registers

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
    and with 4 KB pages it walks a page table every 4 KB (on the bundled model: backbone decode 76 -> 88 tok/s, one
    sitting). Each tensor object is kept, its .data replaced, so modules and the torch path see the same weights;
    tensors already moved stay where they are, since native decoders keep raw pointers to them. Does nothing below
    `least` bytes in all, or where the OS offers no such advice. Returns the bytes moved.
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


def cache_dir():
    """Where river keeps what it makes once, the native builds here and the converted bundled model
    (load_weights): $RIVER_CACHE_DIR, else ~/.cache/river."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "river")


def write_whole(path, write):
    """write(tmp) to a name of this process's own beside `path`, then renamed into place: the file is whole or
    absent, even with two writers at once (what river keeps in its cache folder: GPTQ rounding, requantized GGUFs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """An exit rule as kernels.cpp reads it (river_step): after backbone block l, leave when checks and
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
    """Compile kernels.cpp for `isa` (cached under the cache folder, keyed by the source, the flags and torch) and
    load it. Raises on a failed build."""
    from torch.utils.cpp_extension import load  # imports setuptools: only when a build is needed
    _, flags = ISAS[isa]
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", *flags]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(cflags).encode() + torch.__version__.encode()).hexdigest()
    folder = cache_dir() / "kernels" / f"{isa}-{key[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    path = load(name=f"river_kernels_{isa}", sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                build_directory=str(folder), is_python_module=False, verbose=False)
    return Kernels(isa, path)


def compile_object(isa, out):
    """Compile kernels.cpp for `isa` into the object file `out`, without linking or loading it: how a path this
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


# Order of the codes inside a chunk's 32-bit lane, as little-endian bytes: for 4 bits, byte i holds codes
# LANE_ORDER[4][i] (low nibble) and LANE_ORDER_HIGH[i] (high nibble), so a mask or a shift gives 4 consecutive
# codes as bytes; for 8 bits, byte i holds code LANE_ORDER[8][i], so a shift and a mask give an int16 pair
# (kernels.cpp, group_dot).
LANE_ORDER = {4: [0, 1, 2, 3], 8: [0, 2, 1, 3]}
LANE_ORDER_HIGH = [4, 5, 6, 7]


def pack_lowbit(codes, scale, low, bits):
    """codes (N, K) in 0 .. 2^bits - 1, scale and low (N, K / group) -> the bytes of kernels.cpp's low-bit layout,
    (ceil(N / 16), groups, bytes) uint8: per block of 16 rows and per group, 64-byte chunks (8 codes of each row for
    4 bits, 4 for 8 bits, one 32-bit lane per row), then the 16 rows' fp16 scales and fp16 lows. Rows past N (a last
    block filled with zeros) exist only for the torch path's sake: the kernels run weights whose N is a multiple of
    16 (NativeDecoder.unsupported)."""
    N, K = codes.shape
    G = scale.shape[1]
    gs, per_lane = K // G, 32 // bits
    if gs % per_lane:
        raise ValueError(f"the low-bit layout packs inputs in chunks of {per_lane}; got groups of {gs}")
    pad = -N % BLOCK_ROWS
    codes, scale, low = (F.pad(t, (0, 0, 0, pad)) for t in (codes.to(torch.uint8), scale, low))
    blocks = (N + pad) // BLOCK_ROWS
    c = codes.view(blocks, BLOCK_ROWS, G, gs // per_lane, per_lane)                    # (blocks, row, group, chunk, .)
    byte = c[..., LANE_ORDER[bits]]
    if bits == 4:
        byte = byte | (c[..., LANE_ORDER_HIGH] << 4)
    byte = byte.permute(0, 2, 3, 1, 4).reshape(blocks, G, gs // per_lane * 64)        # (blocks, group, bytes)

    def halves(t):  # (N, G) -> (blocks, G, 32 bytes) of fp16
        t = t.to(torch.float16).view(blocks, BLOCK_ROWS, G).transpose(1, 2).contiguous()
        return t.view(torch.uint8).view(blocks, G, 2 * BLOCK_ROWS)
    return torch.cat([byte, halves(scale), halves(low)], dim=-1).contiguous()


def unpack_lowbit(packed, n, k, bits):
    """pack_lowbit's inverse: the packed bytes of an (n, k) weight -> codes (n, k) uint8, scale and low (n, groups)
    fp32 (their fp16 values)."""
    blocks, G, width = packed.shape
    per_lane = 32 // bits
    chunks = (width - 4 * BLOCK_ROWS) // 64
    c = packed[..., :chunks * 64].reshape(blocks, G, chunks, BLOCK_ROWS, 4)  # (blocks, group, chunk, row, byte)
    if bits == 4:
        lanes = torch.cat([c & 15, c >> 4], dim=-1)      # codes 0-3 in the low nibbles, 4-7 in the high ones
    else:
        lanes = c[..., LANE_ORDER[8]]                     # the order is its own inverse
    codes = lanes.permute(0, 3, 1, 2, 4).reshape(blocks * BLOCK_ROWS, G * chunks * per_lane)[:n]

    def rows(t):  # (blocks, G, 32 bytes) of fp16 -> (n, G) fp32
        return t.contiguous().view(torch.float16).transpose(1, 2).reshape(blocks * BLOCK_ROWS, G)[:n].float()
    tail = packed[..., chunks * 64:]
    assert codes.shape[1] == k
    return codes, rows(tail[..., :2 * BLOCK_ROWS]), rows(tail[..., 2 * BLOCK_ROWS:])


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
    """A stack of blocks as kernels.cpp runs them.

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
        Right after a step has streamed its weights through the CPU's caches each Python statement costs tens of us
        (0.7 ms of Python around a 6 ms step, measured on a Zen 3): so the ids go in as they come, and the cache's
        table and the scratch are kept from one call to the next."""
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
