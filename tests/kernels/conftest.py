"""Shared setup for the kernel tests.

Triton kernels run on the CPU interpreter: TRITON_INTERPRET must be set before any kernel module is
imported (kernels pick interpreted or compiled mode when they are decorated). Set TRITON_INTERPRET=0 on a
CUDA machine to run the same tests compiled on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

MxWeight = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Written out independently of ultraspeed so the helpers below check the library, not themselves.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def pack_mxfp4(codes: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes [..., K] (0..15) and E8M0 exponents [..., K//32] -> gpt-oss (blocks, scales)."""
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    packed = (lo | (hi << 4)).to(torch.uint8)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 16), exponents.to(torch.uint8)


def decode_by_hand(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """What the packed weight means, in float64: LUT[code] * 2^(exponent - 127) per 32-element block."""
    values = torch.tensor(E2M1, dtype=torch.float64)[codes.long()]
    scale = torch.pow(2.0, exponents.double() - 127).repeat_interleave(32, dim=-1)
    return values * scale


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def device() -> str:
    return "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"


@pytest.fixture
def mxfp4_weight(rng: torch.Generator) -> Callable[..., MxWeight]:
    """Factory: a random packed weight [*lead, N, K] as (blocks, scales, its dense float64 value). Exponents
    default to [124, 129] so products stay well inside fp32 range."""

    def make(*shape: int, low: int = 124, high: int = 129) -> MxWeight:
        *lead, k = shape
        codes = torch.randint(0, 16, (*lead, k), generator=rng, dtype=torch.uint8)
        exponents = torch.randint(low, high + 1, (*lead, k // 32), generator=rng, dtype=torch.uint8)
        return (*pack_mxfp4(codes, exponents), decode_by_hand(codes, exponents))

    return make
