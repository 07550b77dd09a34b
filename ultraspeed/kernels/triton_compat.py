"""Optional Triton: the kernel modules import `triton` and `tl` from here so that they stay importable on
machines without Triton (CPU-only installs, macOS). There the decorators become inert and every wrapper
calls `require_triton()` first, which raises a clear error instead of an AttributeError deep inside.
"""

from __future__ import annotations

from typing import Any, Callable

from ultraspeed.errors import UltraSpeedError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Placeholder:
        """Stands in for `triton` and `triton.language`: any attribute (tl.constexpr in a signature, the
        triton.jit decorator) resolves, and calling it returns the decorated function unchanged."""

        def __getattr__(self, name: str) -> "_Placeholder":
            return self

        def __call__(self, fn: Callable[..., Any] | None = None, **_: Any) -> Any:
            return fn if fn is not None else self

    triton = _Placeholder()  # type: ignore[assignment]
    tl = _Placeholder()  # type: ignore[assignment]


def require_triton() -> None:
    """Raise a user-facing error if Triton is not installed."""
    if not HAS_TRITON:
        raise UltraSpeedError(
            "this operation needs Triton, which is not installed; install it with "
            "`pip install 'ultraspeed[gpu]'` or use the PyTorch reference kernels"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tl.arange needs power-of-two extents)."""
    return 1 << max(n - 1, 0).bit_length()


__all__ = ["HAS_TRITON", "next_power_of_2", "require_triton", "tl", "triton"]
