"""A static KV cache: one preallocated buffer per layer, rows are sequences, rollback is a length change.

Row r holds sequence r's keys/values at positions 0..lengths[r]-1. Writing appends at lengths[r]; cropping (the
rollback speculative decoding needs after every verify) only lowers lengths[r]: stale entries past it are
overwritten by the next write and masked out until then, so rollback costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]      # per layer: [max_batch, kv_heads, max_len, key_dim]
    values: list[torch.Tensor]    # per layer: [max_batch, kv_heads, max_len, value_dim]
    lengths: torch.Tensor         # [max_batch] int64 on the CPU: committed positions per row

    @classmethod
    def allocate(cls, layer_shapes: list[tuple[int, int, int]], max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """layer_shapes: (kv_heads, key_dim, value_dim) for each layer."""
        keys = [torch.zeros(max_batch, h, max_len, kd, dtype=dtype, device=device) for h, kd, _ in layer_shapes]
        values = [torch.zeros(max_batch, h, max_len, vd, dtype=dtype, device=device) for h, _, vd in layer_shapes]
        return cls(keys, values, torch.zeros(max_batch, dtype=torch.long))

    @property
    def max_batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def crop(self, row: int, length: int) -> None:
        """Roll row back to its first `length` positions."""
        if not 0 <= length <= int(self.lengths[row]):
            raise ValueError(f"cannot crop row {row} of length {int(self.lengths[row])} to {length}")
        self.lengths[row] = length

    def reset(self, row: int | None = None) -> None:
        if row is None:
            self.lengths.zero_()
        else:
            self.lengths[row] = 0

    def move_row(self, src: int, dst: int, source: "KVCache | None" = None) -> None:
        """Copy sequence `src` (of `source`, default this cache) into row `dst`: keeps the running batch in rows
        0..B-1, forks a shared prompt, or moves a sequence between two caches of the same model."""
        source = source if source is not None else self
        n = int(source.lengths[src])
        for k, v, sk, sv in zip(self.keys, self.values, source.keys, source.values):
            k[dst, :, :n] = sk[src, :, :n]
            v[dst, :, :n] = sv[src, :, :n]
        self.lengths[dst] = n
