"""Keeping part of a weight, whether it is a dense Parameter or MXFP4-packed.

A weight is logically [..., N, K] (N output rows, K input columns; leading dims stack experts). Stored dense it is
the Parameter `name`; packed (quant/apply.py, gpt-oss layout) it is the buffers `name_blocks` [..., N, K/32, 16]
and `name_scales` [..., N, K/32]. Rows are independent in both forms; columns of a packed weight can only be
kept in whole 32-column blocks, since a block shares one scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.errors import UltraSpeedError
from ultraspeed.quant.mxfp4 import BLOCK_SIZE


def _whole_blocks(cols: torch.Tensor, where: str) -> torch.Tensor:
    """Column indices -> the block indices they fill exactly, or an error naming the misfit."""
    blocks = cols.view(-1, BLOCK_SIZE) if len(cols) % BLOCK_SIZE == 0 else None
    if (blocks is None or not torch.equal(blocks, blocks[:, :1] + torch.arange(BLOCK_SIZE))
            or bool((blocks[:, 0] % BLOCK_SIZE).any())):
        raise UltraSpeedError(f"{where}: MXFP4 weights split only at multiples of {BLOCK_SIZE} input features; "
                              f"this split keeps {len(cols)} (use fewer ranks, or --ep for experts)")
    return blocks[:, 0] // BLOCK_SIZE


def num_rows(module: nn.Module, name: str) -> int:
    """N of weight `name`, dense or packed."""
    dense = module._parameters.get(name)
    return dense.shape[-2] if dense is not None else getattr(module, f"{name}_blocks").shape[-3]


def keep(module: nn.Module, name: str, axis: str, index: torch.Tensor) -> None:
    """Keep `index` along `axis` ("rows" or "cols") of weight `name` of `module`, in place."""
    rows = axis == "rows"
    dense = module._parameters.get(name)
    if dense is not None:
        kept = dense.index_select(-2 if rows else -1, index)      # index_select copies: the full weight can go
        setattr(module, name, nn.Parameter(kept, requires_grad=False))
    elif hasattr(module, f"{name}_blocks"):
        where = f"{type(module).__name__}.{name}"
        block_index = index if rows else _whole_blocks(index, where)
        blocks, scales = getattr(module, f"{name}_blocks"), getattr(module, f"{name}_scales")
        setattr(module, f"{name}_blocks", blocks.index_select(-3 if rows else -2, block_index))
        setattr(module, f"{name}_scales", scales.index_select(-2 if rows else -1, block_index))
    else:
        raise UltraSpeedError(f"cannot slice {type(module).__name__}.{name}: neither a dense weight nor MXFP4 "
                              "blocks/scales")
    bias = module._parameters.get("bias") if name == "weight" else None
    if rows and bias is not None:                                  # a Linear's bias follows its output rows
        module.bias = nn.Parameter(bias.index_select(0, index), requires_grad=False)
    feature = "out_features" if rows else "in_features"
    if hasattr(module, feature):                                   # Linear-like modules record their shape
        setattr(module, feature, len(index))


def keep_experts(module: nn.Module, index: torch.Tensor) -> None:
    """Keep these experts of every per-expert tensor (dense weights or packed blocks and scales: the expert is
    their leading dim), in place."""
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.dim() and tensor.shape[0] == module.num_experts:
            kept = tensor.index_select(0, index)
            setattr(module, name, nn.Parameter(kept, requires_grad=False) if isinstance(tensor, nn.Parameter)
                    else kept)
    module.num_experts = len(index)
