"""Micro-benchmark: decode-shaped matmuls on CPU, torch F.linear vs ultraspeed.kernels.cpu_gemm.

    python scripts/bench_cpu_gemm.py                  # SmolLM-135M shapes, M = 1, 8, 16, cold weights
    python scripts/bench_cpu_gemm.py --hot --m 1,2,4  # weights reused every call (cache-resident)
    python scripts/bench_cpu_gemm.py --model          # all matmuls of one decode step of the model

Prints the median time per call and the weight bytes read per second (GB/s) for every path, shape
and M. By default each call uses another copy of the weights, cycling through copies that together
exceed the last-level cache several times, because in real decode the whole model is far larger
than the cache and every weight comes from DRAM; --hot measures the cache-resident case instead.
Timings on a busy machine are noisy; there, --windows W measures W medians and keeps the lowest.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ultraspeed.kernels import cpu_gemm as cg

# (K, N) of the Llama-135M (SmolLM) linears: q/o, up/gate, down, tied LM head.
DEFAULT_SHAPES = "576x576,576x1536,1536x576,576x49152"
# One decode step of that model: 30 layers of q, k, v, o, gate, up, down (3 KV heads of 64), LM head.
MODEL_LAYERS = 30
MODEL_LAYER_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
MODEL_HEAD_SHAPE = (576, 49152)
COLD_BYTES = 256 << 20  # weight copies per path in the cold setting: several times a 32 MiB L3


@dataclass
class Path:
    name: str
    bytes_per_weight: float
    make: Callable[[torch.Tensor], object]  # fp32 W [N, K] -> prepared weights
    call: Callable[[torch.Tensor, object, torch.Tensor], object]  # (x, prepared, out)


def _mxfp4_from(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Random codes with a realistic scale: speed does not depend on the values.
    n, k = w.shape
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8)
    return blocks, torch.full((n, k // 32), 124, dtype=torch.uint8)


def paths(with_torch: bool) -> list[Path]:
    ps = []
    if with_torch:
        def torch_path(dtype: torch.dtype) -> Path:
            # torch has no mixed-dtype linear on CPU: x is cast to the weight dtype (as an engine would).
            # copy=True: every cold copy must be its own memory, even for float32.
            return Path(f"torch-{str(dtype)[6:]}", torch.tensor([], dtype=dtype).element_size(),
                        lambda w: w.to(dtype, copy=True), lambda x, w, out: F.linear(x.to(w.dtype), w))

        ps += [torch_path(torch.float32), torch_path(torch.bfloat16), torch_path(torch.float16)]
    if cg.is_available():
        ps += [
            Path("int8", 1 + 4 / 32, cg.pack_int8, lambda x, p, out: cg.int8_linear(x, p, out=out)),
            Path("mxfp4", 0.5 + 1 / 32, _mxfp4_from, lambda x, p, out: cg.mxfp4_linear(x, *p, out=out)),
            Path("fp16", 2, cg.pack_fp16, lambda x, p, out: cg.fp16_linear(x, p, out=out)),
        ]
    else:
        print("cpu_gemm extension unavailable: torch paths only")
    return ps


def median_seconds(fn: Callable[[int], object], repeats: int, windows: int = 1, warmup: int = 3) -> float:
    """Median seconds per call; with windows > 1, the lowest of that many medians."""
    best = float("inf")
    for _ in range(windows):
        for i in range(warmup):
            fn(i)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        best = min(best, statistics.median(times))
    return best


def memory_bandwidth() -> tuple[float, float]:
    """(read GB/s from a sum, copy GB/s counting read + write) over 256 MiB."""
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    read = a.numel() * 4 / median_seconds(lambda i: a.sum(), 15) / 1e9
    copy = 2 * a.numel() * 4 / median_seconds(lambda i: b.copy_(a), 15) / 1e9
    return read, copy


def bench_model(ms: list[int], rounds: int) -> None:
    """Time all the matmuls of one decode step (135M params, every weight read once, from DRAM).

    Paths take turns each round so that a busy machine slows them alike; prints medians."""
    shapes = MODEL_LAYER_SHAPES * MODEL_LAYERS + [MODEL_HEAD_SHAPE]
    weights = [torch.randn(n, k) / k**0.5 for k, n in dict.fromkeys(shapes)]  # one per distinct shape
    by_shape = dict(zip(dict.fromkeys(shapes), weights))
    print(f"model step: {sum(k * n for k, n in shapes) / 1e6:.1f}M weights in {len(shapes)} matmuls")
    print(f"{'M':>3} {'path':>14} {'ms/step':>9} {'GB/s':>6} {'vs fp32':>8}")
    for m in ms:
        runs = []
        for path in paths(True):
            prepared = [path.make(by_shape[s]) for s in shapes]  # distinct copies, as in a real model
            xs = {k: torch.randn(m, k) for k, _ in shapes}
            outs = {n: torch.empty(m, n) for _, n in shapes}
            args = [(xs[k], p, outs[n]) for (k, n), p in zip(shapes, prepared)]
            nbytes = sum(k * n for k, n in shapes) * path.bytes_per_weight
            runs.append((path, args, nbytes, []))
        for _ in range(rounds):
            for path, args, _, times in runs:
                t = time.perf_counter()
                for a in args:
                    path.call(*a)
                times.append(time.perf_counter() - t)
        base = statistics.median(runs[0][3])
        for path, _, nbytes, times in runs:
            t = statistics.median(times)
            speedup = base / t
            print(f"{m:>3} {path.name:>14} {t * 1e3:>9.2f} {nbytes / t / 1e9:>6.1f} {speedup:>7.2f}x", flush=True)
        del runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN (in x out) list")
    ap.add_argument("--m", default="1,8,16", help="comma-separated row counts")
    ap.add_argument("--repeats", type=int, default=0, help="calls per measurement (default: by size)")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--windows", type=int, default=1, help="report the lowest of this many medians")
    ap.add_argument("--hot", action="store_true", help="reuse one copy of the weights (cache-resident)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch F.linear baselines")
    ap.add_argument("--model", action="store_true", help="time whole decode steps of the 135M model")
    ap.add_argument("--rounds", type=int, default=20, help="decode steps per path with --model")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    read, copy = memory_bandwidth()
    print(f"threads={torch.get_num_threads()}  memory: read {read:.1f} GB/s, copy {copy:.1f} GB/s (r+w)  "
          f"weights: {'hot' if args.hot else 'cold'}")
    ms = [int(m) for m in args.m.split(",")]
    if args.model:
        return bench_model(ms, args.rounds)
    print(f"{'shape KxN':>10} {'M':>3} {'path':>14} {'B/w':>5} {'us/call':>10} {'GB/s':>6} {'vs fp32':>8}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) / k**0.5
        baseline: dict[int, float] = {}
        for path in paths(not args.no_torch):
            nbytes = n * k * path.bytes_per_weight
            copies = 1 if args.hot else max(2, round(COLD_BYTES / nbytes))
            prepared = [path.make(w) for _ in range(copies)]
            for m in ms:
                x, out = torch.randn(m, k), torch.empty(m, n)
                repeats = args.repeats or max(10, min(300, int(3e8 / (n * k * max(m, 4)))))
                t = median_seconds(lambda i: path.call(x, prepared[i % copies], out), repeats, args.windows)
                if path.name == "torch-float32":
                    baseline[m] = t
                speedup = f"{baseline[m] / t:>7.2f}x" if m in baseline else f"{'-':>8}"
                print(f"{shape:>10} {m:>3} {path.name:>14} {path.bytes_per_weight:>5.2f} {t * 1e6:>10.1f} "
                      f"{nbytes / t / 1e9:>6.1f} {speedup}", flush=True)
            del prepared


if __name__ == "__main__":
    main()
