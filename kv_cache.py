"""One static, preallocated KV cache for all layers, with a record of which path wrote each (layer, position)."""
from enum import IntEnum

import numpy as np
import torch


class Writer(IntEnum):
    """Who wrote a cache slot. EMPTY is a hole: a later token attending to it would read garbage."""
    EMPTY = 0
    BACKBONE = 1
    RIVER = 2
    PROPAGATED = 3  # projected from another layer's state (the CALM-style baseline)


class KVCache:
    """K/V for every layer at fixed capacity; blocks write at explicit positions, reads keep a fixed shape.

    The backbone block of layer l and its river twin both write into layer l's slots: that shared
    addressing is what lets a token exit early without leaving a hole for later tokens.
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, capacity, *, batch_size=1,
                 dtype=torch.float32, device="cpu"):
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"KVCache capacity and batch_size must be >= 1, got {capacity} and {batch_size}")
        shape = (n_layers, batch_size, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, n_kv_heads, capacity, head_dim)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Bookkeeping lives on the host in numpy: one tiny write per block per step, no device sync.
        self._writer = np.zeros((n_layers, capacity), dtype=np.uint8)  # Writer per (layer, position)
        self._write_count = np.zeros((n_layers, capacity), dtype=np.int32)
        self.capacity = capacity
        self.passes = []  # native passes recorded but not yet written into the arrays (record_pass)

    @property
    def writer(self):
        """(n_layers, capacity) uint8: the Writer of each (layer, position)."""
        self.settle()
        return self._writer

    @property
    def write_count(self):
        """(n_layers, capacity) int32: how many times each (layer, position) was written."""
        self.settle()
        return self._write_count

    def check_range(self, start, length):
        if start < 0 or start + length > self.capacity:
            raise IndexError(f"KV cache write at positions {start}..{start + length - 1} is outside its capacity "
                             f"{self.capacity}; the cache never wraps or grows")

    def record(self, layers, start, length, writer):
        """Check and record a write of positions start..start+length-1 into `layers` (an int or a slice)."""
        self.check_range(start, length)
        end = start + length
        self.writer[layers, start:end] = writer
        self.write_count[layers, start:end] += 1

    def record_pass(self, depth, start, length):
        """Record a native pass of positions start..start+length-1 through every layer: the backbone's blocks wrote
        layers 0..depth-1, the river's copies the rest. Kept as a tuple until the record is read: right after a native
        step has swept the CPU's caches with its weights, even three small numpy writes cost a visible share of it."""
        self.check_range(start, length)
        self.passes.append((depth, start, start + length))

    def settle(self):
        """Write the passes recorded since the last read into the arrays, in order."""
        for depth, start, end in self.passes:
            self._writer[:depth, start:end] = Writer.BACKBONE
            self._writer[depth:, start:end] = Writer.RIVER
            self._write_count[:, start:end] += 1
        self.passes.clear()

    def claim(self, layer, start, length, writer):
        """Record a write of positions start..start+length-1 of `layer`; return the layer's whole K and V
        (B, n_kv_heads, capacity, head_dim), for the block to write its slots into and attend over."""
        self.record(layer, start, length, writer)
        return self.k[layer], self.v[layer]

    def write(self, layer, start, k, v, writer):
        """Store k, v (B, n_kv_heads, T, head_dim) at positions start..start+T-1 of `layer`."""
        k_layer, v_layer = self.claim(layer, start, k.shape[2], writer)
        k_layer[:, :, start:start + k.shape[2]] = k
        v_layer[:, :, start:start + k.shape[2]] = v

    def drop(self, start):
        """Forget every layer's positions from `start` on (a speculative round's rejected drafts): their slots count as
        never written, and the next token at `start` writes its own."""
        self.writer[:, start:] = Writer.EMPTY
        self.write_count[:, start:] = 0

    def causal_mask(self, start, length):
        """(length, capacity) bool: query at position start+i may read key positions 0..start+i."""
        query = torch.arange(start, start + length, device=self.k.device)[:, None]
        key = torch.arange(self.capacity, device=self.k.device)[None, :]
        return key <= query

    def filled(self, layer):
        """(capacity,) bool on the cache's device: which positions of `layer` hold K/V."""
        return torch.from_numpy(self.writer[layer] != Writer.EMPTY).to(self.k.device)

    def holes(self, upto):
        """(layer, position) pairs below `upto` that no block has written."""
        layers, positions = np.nonzero(self.writer[:, :upto] == Writer.EMPTY)
        return list(zip(layers.tolist(), positions.tolist()))
