"""The river's weights: a group-wise low-bit quantizer, the low-bit linear layer, and the packed layout it holds its
codes in (the layout the native kernels read)."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


QUANTIZE_ROWS = 256  # rows quantize_weight works on at a time
ACTIVATIONS = ("int16", "bf16")  # int16 per group: integer dot products (the CPU default); bf16: torch's kernels
INT4_INNER_K_TILES = 2  # tinygemm layout parameter; 2 lets K be any multiple of 32


@dataclass
class QuantizedWeight:
    """w ~ low + scale * q, with one (scale, low) per `group_size` input features of a row."""
    q: torch.Tensor       # (N, K) codes in 0 .. 2^bits - 1 (uint8)
    scale: torch.Tensor   # (N, K // group_size) fp32 step between neighbouring codes
    low: torch.Tensor     # (N, K // group_size) fp32 value of code 0
    bits: int
    group_size: int

    def dequantize(self):
        """(N, K) fp32: the weight the low-bit kernels compute with (up to their 16-bit scales)."""
        return (self.q.float() * self.scale.repeat_interleave(self.group_size, dim=1)
                + self.low.repeat_interleave(self.group_size, dim=1))


def check_quant_args(bits, group_size, activations="int16"):
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (the 4-bit kernels' unit), "
                         f"got {group_size!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "bf16" and bits != 4:
        raise ValueError("bf16 activations run PyTorch's 4-bit kernel; 8-bit weights take int16 activations")
    # A group's dot product is an exact int32 sum of code * activation, |code| <= 2^bits - 1, |activation| <= 32639
    if bits == 8 and group_size > 256:
        raise ValueError(f"8-bit groups hold at most 256 inputs (their int32 dot products must not overflow), "
                         f"got {group_size}")
    if bits == 4 and group_size > 4096:
        raise ValueError(f"4-bit groups hold at most 4096 inputs (their int32 dot products must not overflow), "
                         f"got {group_size}")


def quantize_weight(w, bits=4, group_size=64, refine_steps=10):
    """Quantize an (out_features, in_features) weight: asymmetric, one (scale, low) per group of `group_size`
    input features, codes 0 .. 2^bits - 1.

    Round-to-nearest from each group's min/max, where every weight lands within half a step of its code; then
    `refine_steps` rounds of least squares that alternate between the nearest codes for (scale, low) and the
    (scale, low) that fit those codes best. Neither half-round can raise a group's squared error.
    """
    check_quant_args(bits, group_size)
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {K} of a {N}x{K} weight")
    # Rows are independent: a slice at a time keeps the least squares' fp32 temporaries small.
    parts = [quantize_rows(rows, bits, group_size, refine_steps) for rows in w.detach().split(QUANTIZE_ROWS)]
    return QuantizedWeight(*(torch.cat(t) for t in zip(*parts)), bits, group_size)


def quantize_rows(w, bits, group_size, refine_steps, importance=None):
    """quantize_weight's work on a few rows: (codes uint8, scale, low). importance (K,): how much each input
    feature's error counts in the least squares (GPTQ weighs them by their inputs' energy); default all alike."""
    N, K = w.shape
    top = 2 ** bits - 1
    groups = w.float().view(N, K // group_size, group_size)                 # (N, n_groups, group_size)
    c = torch.ones(K) if importance is None else importance.float().clamp(min=1e-12)
    c = c.view(1, K // group_size, group_size)
    c = c / c.sum(dim=2, keepdim=True)                                       # weights summing to 1 per group
    low = groups.amin(dim=2, keepdim=True)                                   # value of code 0
    scale = ((groups.amax(dim=2, keepdim=True) - low) / top).clamp(min=1e-12)
    codes = ((groups - low) / scale).round().clamp(0, top)
    for _ in range(refine_steps):
        code_mean, w_mean = (c * codes).sum(dim=2, keepdim=True), (c * groups).sum(dim=2, keepdim=True)
        var = (c * (codes - code_mean).pow(2)).sum(dim=2, keepdim=True)
        cov = (c * (codes - code_mean) * (groups - w_mean)).sum(dim=2, keepdim=True)
        scale = torch.where(var > 0, cov / var.clamp(min=1e-12), scale).clamp(min=1e-12)
        low = w_mean - scale * code_mean
        codes = ((groups - low) / scale).round().clamp(0, top)
    return codes.view(N, K).to(torch.uint8), scale[..., 0], low[..., 0]


ACTIVATION_LEVELS = 32639  # int16 activations, symmetric per group; 127 * 256 + 127: the native kernels split them
                            # into int8 halves


def quantize_activations(x, group_size):
    """x (M, K) -> (codes (M, G, group) int16 values held in fp32, step (M, G), exact sum (M, G)): symmetric
    int16 per group of `group_size` inputs, rounded half to even. Each group's sum stays exact: the weights'
    lows multiply it."""
    M, K = x.shape
    groups = x.float().view(M, K // group_size, group_size)
    amax = groups.abs().amax(-1)                                            # (M, G)
    # a true division, as the native kernels' (a number over a tensor is a reciprocal times the number in torch, which
    # rounds differently and would move a near-tie to the other integer)
    inverse = torch.where(amax > 0, torch.full_like(amax, ACTIVATION_LEVELS).div(amax), torch.zeros_like(amax))
    return torch.round(groups * inverse[..., None]), amax / ACTIVATION_LEVELS, groups.sum(-1)


def int_product(x, codes, scale, low):
    """x (M, K) fp32 -> (M, N): sum over groups of scale * step * (codes . int16 activations) + low * sum(x), the
    low-bit weight w = low + scale * code. The native kernels sum the integer dot products exactly first; here the same
    terms are two fp32 matmuls (rounded activations against scaled codes, group sums against lows), which differ
    from it by fp32 rounding alone."""
    N, G = scale.shape
    xq, step, xsum = quantize_activations(x, codes.shape[1] // G)              # (M, G, group), (M, G), (M, G)
    rounded = (xq * step[..., None]).flatten(1)                                # (M, K): what the kernel multiplies
    scaled = (codes.view(N, G, -1).float() * scale[..., None]).flatten(1)      # (N, K)
    return rounded @ scaled.t() + xsum @ low.t()


class QuantizedLinear(nn.Module):
    """Weight-only low-bit linear layer.

    activations "int16" (4- or 8-bit weights): codes with fp16 scale and low per group, held once, in the native
    kernels' packed layout (pack_lowbit: 4 bits take half a byte); activations rounded to int16 per group. The native
    kernels run a CPU decode step on these bytes as they are; plain torch (int_product) unpacks them for each call.
    activations "bf16" (4-bit weights, the paper's W4A16): PyTorch's int4 kernel, whose packed layout depends on the
    device, so build it on the device it runs on.
    """

    def __init__(self, qw, device, activations="int16"):
        super().__init__()
        check_quant_args(qw.bits, qw.group_size, activations)
        self.bits, self.group_size, self.activations = qw.bits, qw.group_size, activations
        self.out_features, self.in_features = qw.q.shape
        device = torch.device(device)
        if activations == "int16":
            packed = pack_lowbit(qw.q, qw.scale, qw.low, qw.bits)                      # (ceil(N / 16), G, bytes)
            self.register_buffer("packed", packed.to(device))
            return
        if self.out_features % 16:
            raise ValueError(f"the int4 kernels need out_features {self.out_features} to be a multiple of 16")
        zero = qw.low + 8 * qw.scale                                        # tinygemm's zero: the value of code 8
        scales_and_zeros = torch.stack([qw.scale.t(), zero.t()], dim=-1)    # (K / group, N, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, torch.bfloat16).contiguous())
        if device.type == "cuda":
            nibbles = (qw.q[:, ::2] << 4 | qw.q[:, 1::2]).to(torch.uint8)               # (N, K / 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(device, torch.int32),
                                                                        INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)

    @classmethod
    def from_packed(cls, packed, out_features, in_features, bits, group_size):
        """An int16-activation layer on pack_lowbit's bytes as they are (a stored river: nothing re-packed)."""
        check_quant_args(bits, group_size)
        width = group_size // (32 // bits) * 64 + 64  # a group's codes of 16 rows, then their fp16 scales and lows
        expected = (-(-out_features // 16), in_features // group_size, width)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"packed {bits}-bit weight of a {out_features}x{in_features} layer must be uint8 of shape "
                             f"{expected}, got {packed.dtype} {tuple(packed.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.bits, layer.group_size, layer.activations = bits, group_size, "int16"
        layer.out_features, layer.in_features = out_features, in_features
        layer.register_buffer("packed", packed)
        return layer

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)                                              # (B*T, K)
        if self.activations == "int16":
            y = int_product(x, *self.unpacked())
        elif x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.view(*shape[:-1], self.out_features).to(dtype)

    def unpacked(self):
        """int16 activations: codes (N, K) uint8, scale and low (N, G) fp32."""
        return unpack_lowbit(self.packed, self.out_features, self.in_features, self.bits)


# --------------------------------------------------------------------------------------- the packed layout

BLOCK_ROWS = 16  # rows side by side in the packed low-bit layout: one 512-bit register holds a lane of each

# Order of the codes inside a chunk's 32-bit lane, as little-endian bytes: for 4 bits, byte i holds codes
# LANE_ORDER[4][i] (low nibble) and LANE_ORDER_HIGH[i] (high nibble), so a mask or a shift gives 4 consecutive
# codes as bytes; for 8 bits, byte i holds code LANE_ORDER[8][i], so a shift and a mask give an int16 pair
# (native/lowbit_products.h).
LANE_ORDER = {4: [0, 1, 2, 3], 8: [0, 2, 1, 3]}
LANE_ORDER_HIGH = [4, 5, 6, 7]


def pack_lowbit(codes, scale, low, bits):
    """codes (N, K) in 0 .. 2^bits - 1, scale and low (N, K / group) -> the bytes of the native kernels' low-bit
    layout, (ceil(N / 16), groups, bytes) uint8: per block of 16 rows and per group, 64-byte chunks (8 codes of each
    row for 4 bits, 4 for 8 bits, one 32-bit lane per row), then the 16 rows' fp16 scales and fp16 lows. Rows past N
    (a last block filled with zeros) exist only for the torch path's sake: the kernels run weights whose N is a
    multiple of 16 (NativeDecoder.unsupported)."""
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
