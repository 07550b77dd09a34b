"""Weight-only low-precision matmuls for CPU decode: int8 (Q8_0), MXFP4 and fp16 weights.

Decoding M = 1..32 tokens on a CPU is bound by reading the weights: ``F.linear`` with fp32 weights
moves 4 bytes per weight (and torch's bf16/fp16 CPU paths are slower still). These kernels read
1.125 (int8 + an fp32 scale per 32), 0.53 (MXFP4) or 2 (fp16) bytes per weight and compute in fp32,
so they match "dequantize, then F.linear" to fp32 rounding.

All functions take ``x`` of shape [..., K] (float32) and return [..., N] (float32), for weights in
nn.Linear layout [N, K]. K must be a multiple of 32. The C++ kernels (csrc/cpu_gemm.cpp, AVX2 +
FMA + F16C, OpenMP over N) are compiled on first use with torch.utils.cpp_extension and cached under
~/.cache/torch_extensions; ``is_available()`` says whether that worked, and when it did not the
caller keeps its torch path (``F.linear`` on the dequantized weight; the ``*_ref`` functions spell
out the exact semantics and are what the tests compare against).

Recommended default: int8 (``pack_int8`` + ``int8_linear``). It is near lossless, 3-4x faster
than fp32 ``F.linear`` over a decode step of the 135M model at M = 1..4, and the fastest format from
M = 8 up (there fp32 FMA throughput is the limit and int8 decodes cheapest), which covers the
16-token blocks of speculative decoding. MXFP4 reads half the bytes of int8 and is the fastest at
M = 1..4 (1.3-1.5x int8) when the checkpoint is MXFP4 anyway (gpt-oss experts, MXFP4 QAT); its
nibble decoding makes it slower than int8 from M = 8. fp16 wins only when the weights sit in cache.
Numbers: scripts/bench_cpu_gemm.py.

Call with ``out=`` in hot loops: allocating the output costs more than the checks and the launch.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ultraspeed.quant.mxfp4 import dequantize_mxfp4  # the format's definition; the reference uses it

log = logging.getLogger(__name__)

GROUP = 32  # weights per quantization scale, along K (llama.cpp Q8_0 and OCP MX block size)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_gemm.cpp"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


# --------------------------------------------------------------------------------------------
# Build


@functools.lru_cache(maxsize=None)
def _ext():
    """Compile (first call in a fresh cache only, ~5 s) and import the extension."""
    from torch.utils.cpp_extension import load

    # -fopenmp at link time records libgomp.so.1, which resolves to the copy torch already loaded,
    # so these kernels and torch's own ops share one OpenMP thread pool.
    return load(
        name="ultraspeed_cpu_gemm",
        sources=[str(_SOURCE)],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True if the compiled kernels can run here; builds them on the first call."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("cpu_gemm kernels disabled: %s is not x86-64", platform.machine())
        return False
    # torch reports AVX2 only when the CPU has AVX2 and FMA; every such CPU also has F16C.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.info("cpu_gemm kernels disabled: CPU capability is %s, need AVX2", capability)
        return False
    try:
        _ext()
    except Exception as e:  # compiler missing or failing: the engine must keep working on torch
        log.warning("cpu_gemm kernels unavailable, falling back to torch: %s", e)
        return False
    return True


def _kernels():
    """The extension, or a quick error when it cannot be built (instead of retrying the build)."""
    if not is_available():
        raise RuntimeError("cpu_gemm kernels are unavailable on this machine (see the log); use torch")
    return _ext()


# --------------------------------------------------------------------------------------------
# Argument checks. The kernels get raw pointers, so everything that makes them safe is checked
# here: weights once when packed, x and out on every call (a few attribute reads).


def _check_weight(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of shape {list(shape)}, got "
            f"{t.dtype} {list(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
        )


def _io(
    x: torch.Tensor, n: int, k: int, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns (x made contiguous, out [..., n], rows M). Written for the per-call cost: ~1 us."""
    shape = x.shape
    if x.dtype != torch.float32 or not x.is_cpu or not shape or shape[-1] != k:
        raise ValueError(f"x must be a CPU float32 tensor [..., {k}]"
                         f", got {x.dtype} {list(shape)} on {x.device}")
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // k
    if out is None:
        out = x.new_empty((*shape[:-1], n))
    elif out.dtype != torch.float32 or not out.is_cpu or not out.is_contiguous() or out.numel() != m * n:
        raise ValueError(f"out must be a contiguous CPU float32 tensor with {m}x{n} elements")
    return x, out, m


def _check_nk(t: torch.Tensor, name: str) -> tuple[int, int]:
    """(N, K) of a 2-D weight whose K is a positive multiple of GROUP."""
    if t.dim() != 2 or t.shape[1] <= 0 or t.shape[1] % GROUP:
        raise ValueError(f"{name} must be [N, K] with K a positive multiple of {GROUP}, got {list(t.shape)}")
    return t.shape[0], t.shape[1]


# --------------------------------------------------------------------------------------------
# int8, one fp32 scale per 32 weights along K (llama.cpp Q8_0)


@dataclass(frozen=True)
class PackedInt8:
    """int8 weights with one fp32 scale per group of 32 along K: W ~= qweight * scales."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, K // 32]
    out_features: int = field(init=False)  # N, K as ints: cheaper per call than reading .shape
    in_features: int = field(init=False)

    def __post_init__(self) -> None:
        n, k = _check_nk(self.qweight, "qweight")
        _check_weight(self.qweight, "qweight", torch.int8, (n, k))
        _check_weight(self.scales, "scales", torch.float32, (n, k // GROUP))
        object.__setattr__(self, "out_features", n)
        object.__setattr__(self, "in_features", k)


def pack_int8(w: torch.Tensor) -> PackedInt8:
    """Quantizes W [N, K] symmetrically to int8 with a scale per 32 weights (round to nearest)."""
    n, k = _check_nk(w, "w")
    groups = w.detach().to(device="cpu", dtype=torch.float32).reshape(n, k // GROUP, GROUP)
    scales = groups.abs().amax(dim=-1) / 127.0
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))  # all-zero group -> q = 0
    q = torch.round(groups * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return PackedInt8(q.reshape(n, k).contiguous(), scales.contiguous())


def dequantize_int8(packed: PackedInt8) -> torch.Tensor:
    n, k = packed.qweight.shape
    w = packed.qweight.reshape(n, k // GROUP, GROUP).float() * packed.scales[..., None]
    return w.reshape(n, k)


def int8_linear(x: torch.Tensor, packed: PackedInt8, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_int8(packed).T -> [..., N], fp32."""
    n, k = packed.out_features, packed.in_features
    x, out, m = _io(x, n, k, out)
    if m:
        q, s = packed.qweight, packed.scales
        _kernels().int8_linear(x.data_ptr(), q.data_ptr(), s.data_ptr(), out.data_ptr(), m, n, k)
    return out


def int8_linear_ref(x: torch.Tensor, packed: PackedInt8) -> torch.Tensor:
    return F.linear(x, dequantize_int8(packed))


# --------------------------------------------------------------------------------------------
# fp16 storage (2 bytes per weight, widened with F16C)


@dataclass(frozen=True)
class PackedFP16:
    weight: torch.Tensor  # float16 [N, K]
    out_features: int = field(init=False)
    in_features: int = field(init=False)

    def __post_init__(self) -> None:
        n, k = _check_nk(self.weight, "weight")
        _check_weight(self.weight, "weight", torch.float16, (n, k))
        object.__setattr__(self, "out_features", n)
        object.__setattr__(self, "in_features", k)


def pack_fp16(w: torch.Tensor) -> PackedFP16:
    _check_nk(w, "w")
    return PackedFP16(w.detach().to(device="cpu", dtype=torch.float16).contiguous())


def fp16_linear(x: torch.Tensor, packed: PackedFP16, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ packed.weight.float().T -> [..., N], fp32."""
    n, k = packed.out_features, packed.in_features
    x, out, m = _io(x, n, k, out)
    if m:
        _kernels().fp16_linear(x.data_ptr(), packed.weight.data_ptr(), out.data_ptr(), m, n, k)
    return out


def fp16_linear_ref(x: torch.Tensor, packed: PackedFP16) -> torch.Tensor:
    return F.linear(x, packed.weight.float())


# --------------------------------------------------------------------------------------------
# 4-bit with an fp16 scale and minimum per 32 (llama.cpp Q4_1): 0.625 bytes per weight


@dataclass(frozen=True)
class PackedQ4:
    q: torch.Tensor   # uint8 [N, K/2]: per group of 32, byte j = code j | code j+16 << 4
    dm: torch.Tensor  # float16 [N, 2, K/32]: each row's scales d, then its minimums m; weight = d * code + m
    out_features: int = field(init=False)
    in_features: int = field(init=False)

    def __post_init__(self) -> None:
        if self.q.dim() != 2 or self.q.shape[1] <= 0 or self.q.shape[1] % (GROUP // 2):
            raise ValueError(f"q must be [N, K/2] with K a positive multiple of {GROUP}, got {list(self.q.shape)}")
        n, half = self.q.shape
        _check_weight(self.q, "q", torch.uint8, (n, half))
        _check_weight(self.dm, "dm", torch.float16, (n, 2, 2 * half // GROUP))
        object.__setattr__(self, "out_features", n)
        object.__setattr__(self, "in_features", 2 * half)


def pack_q4(w: torch.Tensor) -> PackedQ4 | None:
    """Re-packs W [N, K] whose every group of 32 weights is already d * code + m (codes 0..15, d and m fp16: a
    dequantized Q4_1 tensor, as GGUF checkpoints ship) in 4 bits, without loss. None where some group is not:
    quantizing a finer checkpoint to 4 bits would change the model, which only the MXFP4 path does, on purpose."""
    n, k = _check_nk(w, "w")
    groups = w.detach().to(device="cpu", dtype=torch.float32).reshape(n, k // GROUP, GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    d, m = ((hi - lo) / 15).half(), lo.half()     # Q4_1 maps every group's minimum to 0 and maximum to 15
    df, mf = d.float()[..., None], m.float()[..., None]
    codes = torch.where(df > 0, torch.round((groups - mf) / torch.where(df > 0, df, 1.0)), 0.0).clamp_(0, 15)
    error = (codes * df + mf - groups).abs().max()
    if not torch.isfinite(error) or error > 1e-6 * groups.abs().max():
        return None
    codes = codes.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)
    q = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n, k // 2)
    return PackedQ4(q.contiguous(), torch.stack([d, m], dim=1).contiguous())


def dequantize_q4(packed: PackedQ4) -> torch.Tensor:
    n, k = packed.out_features, packed.in_features
    q = packed.q.reshape(n, k // GROUP, GROUP // 2)
    codes = torch.cat([q & 15, q >> 4], dim=-1).float()
    d, m = packed.dm.float().unbind(dim=1)
    return (codes * d[..., None] + m[..., None]).reshape(n, k)


def q4_linear(x: torch.Tensor, packed: PackedQ4, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize_q4(packed).T -> [..., N], fp32."""
    n, k = packed.out_features, packed.in_features
    x, out, m = _io(x, n, k, out)
    if m:
        _kernels().q4_linear(x.data_ptr(), packed.q.data_ptr(), packed.dm.data_ptr(), out.data_ptr(), m, n, k)
    return out


def q4_linear_ref(x: torch.Tensor, packed: PackedQ4) -> torch.Tensor:
    return F.linear(x, dequantize_q4(packed))


def weight_pointers(packed) -> tuple[str, int, int]:
    """(format, first pointer, second pointer) of a packed matrix (PackedInt8, PackedQ4, or MXFP4 blocks and
    scales as a tuple), as dense_layer takes them."""
    if isinstance(packed, PackedQ4):
        return "q4", packed.q.data_ptr(), packed.dm.data_ptr()
    if isinstance(packed, tuple):
        _check_mxfp4(*packed)
        return "mxfp4", packed[0].data_ptr(), packed[1].data_ptr()
    return "int8", packed.qweight.data_ptr(), packed.scales.data_ptr()


# dense_layer's weight_format: (attention matrices' format, MLP matrices' format) -> its code
LAYER_FORMATS = {("int8", "int8"): 0, ("q4", "q4"): 1, ("int8", "mxfp4"): 2}


# --------------------------------------------------------------------------------------------
# MXFP4 (OCP MX, gpt-oss layout; format defined in ultraspeed.quant.mxfp4)


def _check_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """(N, K) of gpt-oss MXFP4 weights; runs on every call, so it is one cheap condition."""
    bs, ss = blocks.shape, scales.shape
    if (
        len(bs) != 3 or bs[1] == 0 or bs[2] != GROUP // 2
        or len(ss) != 2 or ss[0] != bs[0] or ss[1] != bs[1]
        or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8
        or not blocks.is_cpu or not scales.is_cpu
        or not blocks.is_contiguous() or not scales.is_contiguous()
    ):
        raise ValueError(
            f"MXFP4 weights must be contiguous CPU uint8 blocks [N, K/32, 16] and scales [N, K/32], got "
            f"{blocks.dtype} {list(bs)} and {scales.dtype} {list(ss)} on {blocks.device}"
        )
    return bs[0], bs[1] * GROUP


def mxfp4_linear(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ dequantize_mxfp4(blocks, scales).T -> [..., N], fp32.

    blocks: uint8 [N, K/32, 16], byte j of a block = element 2j (low nibble) | element 2j+1 (high);
    scales: uint8 [N, K/32], E8M0 (value 2^(s-127), 255 = NaN). Both contiguous, as stored by
    gpt-oss (for an expert stack [E, N, K/32, 16], pass blocks[e] and scales[e]); the kernel reads
    this layout as is, so there is nothing to repack.
    """
    n, k = _check_mxfp4(blocks, scales)
    x, out, m = _io(x, n, k, out)
    if m:
        _kernels().mxfp4_linear(x.data_ptr(), blocks.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k)
    return out


def mxfp4_linear_ref(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_mxfp4(blocks, scales))


# --------------------------------------------------------------------------------------------
# One dense decoder layer (kernels/cpu_layer.py builds the arguments once per layer)


def dense_layer(x: torch.Tensor, starts: torch.Tensor, batch: int, tokens: int, hidden: int, heads: int,
                kv_heads: int, head_dim: int, intermediate: int, cache_len: int, window: int, pointers: list[int],
                keys_ptr: int, values_ptr: int, eps: float, scale: float, causal: bool = True,
                weight_format: int = 0, end: int | None = None) -> None:
    """In place on x [batch, tokens, hidden] (contiguous fp32): one decoder layer, the new keys/values written
    into the cache rows at `starts` [batch] (int64). `pointers`: the norm weights, QK-norm weights (0, 0 for
    none), the rope cos/sin tables and the four matrices (two pointers each: weight_pointers), all owned by the
    caller; `weight_format`: LAYER_FORMATS[attention format, MLP format]. `causal=False`: a step's tokens all
    see each other (a DFlash draft block) instead of only those before. `end`: max(starts) + tokens where the
    caller knows it (a decoder's StepContext does), which saves reading it back per layer."""
    if x.dtype != torch.float32 or not x.is_contiguous() or tuple(x.shape) != (batch, tokens, hidden):
        raise ValueError(f"x must be a contiguous float32 [{batch}, {tokens}, {hidden}] tensor")
    if starts.dtype != torch.int64 or not starts.is_contiguous() or starts.numel() != batch:
        raise ValueError(f"starts must be {batch} contiguous int64 values")
    end = int(starts.max()) + tokens if end is None else end
    if end > cache_len:
        raise ValueError(f"positions up to {end} exceed the cache of {cache_len}")
    _kernels().dense_layer(x.data_ptr(), starts.data_ptr(), batch, tokens, hidden, heads, kv_heads, head_dim,
                           intermediate, cache_len, window, int(causal), weight_format, *pointers, keys_ptr,
                           values_ptr, eps, scale)
