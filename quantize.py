"""The river's weights: a group-wise low-bit quantizer and the low-bit linear layer."""
from dataclasses import dataclass

import torch
import torch.nn as nn

ACTIVATIONS = ("int16", "bf16")  # int16 per group: integer dot products (the CPU default); bf16: torch's kernels
INT4_INNER_K_TILES = 2  # tinygemm layout parameter; 2 lets K be any multiple of 32


@dataclass
class QuantizedWeight:
    """w ~ (q - offset) * scale + zero, with one (scale, zero) per `group_size` input features of a row."""
    q: torch.Tensor       # (N, K) int32 codes: 0..15 for 4 bits, -127..127 for 8 bits
    scale: torch.Tensor   # (N, K // group_size) fp32 step between neighbouring codes
    zero: torch.Tensor    # (N, K // group_size) fp32 value of code `offset` (0 for the symmetric 8-bit)
    bits: int
    group_size: int

    @property
    def offset(self):
        return 8 if self.bits == 4 else 0

    def dequantize(self):
        """(N, K) fp32: the weight the low-bit kernels compute with (up to their 16-bit scales)."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero.repeat_interleave(self.group_size, dim=1)
        return (self.q - self.offset).float() * scale + zero


def check_quant_args(bits, group_size, activations="bf16"):
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (the int4 kernels' unit), "
                         f"got {group_size!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "int16" and bits != 4:
        raise ValueError("int16 activations go with 4-bit weights; 8-bit weights take bf16 activations")


def quantize_weight(w, bits=4, group_size=64, refine_steps=10):
    """Quantize an (out_features, in_features) weight.

    4 bits: asymmetric, one (scale, zero) per group of `group_size` input features. Round-to-nearest from each
    group's min/max, where every weight lands within half a step of its code; then `refine_steps` rounds of
    least squares that alternate between the nearest codes for (scale, low) and the (scale, low) that fit
    those codes best. Neither half-round can raise a group's squared error. 8 bits: symmetric, one scale per
    output channel (group_size is then the whole row).
    """
    check_quant_args(bits, group_size)
    N, K = w.shape
    w = w.detach().float()
    if bits == 8:
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # (N, 1)
        q = (w / scale).round().clamp(-127, 127).to(torch.int32)
        return QuantizedWeight(q, scale, torch.zeros_like(scale), 8, K)
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {K} of a {N}x{K} weight")
    groups = w.view(N, K // group_size, group_size)                          # (N, n_groups, group_size)
    low = groups.amin(dim=2, keepdim=True)                                   # value of code 0
    scale = ((groups.amax(dim=2, keepdim=True) - low) / 15).clamp(min=1e-12)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    for _ in range(refine_steps):
        code_mean, w_mean = codes.mean(dim=2, keepdim=True), groups.mean(dim=2, keepdim=True)
        var = (codes - code_mean).pow(2).sum(dim=2, keepdim=True)
        cov = ((codes - code_mean) * (groups - w_mean)).sum(dim=2, keepdim=True)
        scale = torch.where(var > 0, cov / var.clamp(min=1e-12), scale).clamp(min=1e-12)
        low = w_mean - scale * code_mean
        codes = ((groups - low) / scale).round().clamp(0, 15)
    scale, low = scale[..., 0], low[..., 0]                                  # (N, n_groups)
    zero = low + 8 * scale                                                   # tinygemm's zero: the value of code 8
    return QuantizedWeight(codes.view(N, K).to(torch.int32), scale, zero, 4, group_size)


ACTIVATION_LEVELS = 32767  # int16 activations: symmetric, per group


def quantize_activations(x, group_size):
    """x (M, K) -> (codes (M, G, group) int16 values held in fp64, step (M, G), exact sum (M, G)): symmetric
    int16 per group of `group_size` inputs, rounded half to even. Each group's sum stays exact: the weights'
    lows multiply it."""
    M, K = x.shape
    groups = x.float().view(M, K // group_size, group_size)
    amax = groups.abs().amax(-1)                                            # (M, G)
    inverse = torch.where(amax > 0, ACTIVATION_LEVELS / amax, torch.zeros_like(amax))
    return torch.round(groups * inverse[..., None]).double(), amax / ACTIVATION_LEVELS, groups.sum(-1)


def w4a16_int_product(x, codes, scale, low):
    """x (M, K) fp32 -> (M, N): sum over groups of scale * step * (codes . int16 activations) + low * sum(x), the
    4-bit weight w = low + scale * code. The integer dot products are exact in fp64 and rounded to fp32 as the
    native kernel's int32 -> fp32 conversion rounds them; kernels.cpp computes the same terms."""
    N, G = scale.shape
    xq, step, xsum = quantize_activations(x, codes.shape[1] // G)
    dot = torch.einsum("mgk,ngk->mng", xq, codes.view(N, G, -1).double()).float()   # (M, N, G)
    return (dot * (scale * step[:, None, :]) + low * xsum[:, None, :]).sum(-1)


class QuantizedLinear(nn.Module):
    """Weight-only 4- or 8-bit linear layer.

    activations "bf16" (W4A16, W8A16): PyTorch's int4 / int8 kernels, whose packed layout depends on the device,
    so build it on the device it runs on. activations "int16" (4-bit weights): codes with fp16-rounded scale and
    low per group, activations rounded to int16 per group; here in plain torch (w4a16_int_product), and in
    kernels.cpp for a decode step on CPU.
    """

    def __init__(self, qw, device, activations="bf16"):
        super().__init__()
        check_quant_args(qw.bits, qw.group_size, activations)
        self.bits, self.group_size, self.activations = qw.bits, qw.group_size, activations
        self.out_features, self.in_features = qw.q.shape
        device = torch.device(device)
        if activations == "int16":
            self.register_buffer("codes", qw.q.to(device, torch.uint8))                         # (N, K)
            self.register_buffer("scale", qw.scale.half().float().to(device))                   # (N, G)
            self.register_buffer("low", (qw.zero - 8 * qw.scale).half().float().to(device))     # (N, G) code 0
            return
        if qw.bits == 8:
            if self.in_features % 16:
                raise ValueError(f"the int8 kernel needs in_features {self.in_features} to be a multiple of 16")
            self.register_buffer("weight", qw.q.to(device, torch.int8))                  # (N, K)
            self.register_buffer("scales", qw.scale[:, 0].to(device, torch.bfloat16))     # (N,)
            return
        if self.out_features % 16:
            raise ValueError(f"the int4 kernels need out_features {self.out_features} to be a multiple of 16")
        scales_and_zeros = torch.stack([qw.scale.t(), qw.zero.t()], dim=-1)           # (K / group, N, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, torch.bfloat16).contiguous())
        if device.type == "cuda":
            nibbles = (qw.q[:, ::2] << 4 | qw.q[:, 1::2]).to(torch.uint8)               # (N, K / 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(device), INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)                                              # (B*T, K)
        if self.activations == "int16":
            y = w4a16_int_product(x, self.codes, self.scale, self.low)
        else:
            x = x.to(torch.bfloat16)
            if self.bits == 8:
                if x.is_cuda:  # no int8 weight-only kernel on CUDA: dequantize on the fly
                    y = (x @ self.weight.to(x.dtype).t()) * self.scales
                else:
                    y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
            elif x.is_cuda:
                y = torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                               self.scales_and_zeros)
        return y.view(*shape[:-1], self.out_features).to(dtype)
