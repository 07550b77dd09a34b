"""A kernel that shows what the interpreter lets through and the compiler does not (tests/kernels/test_triton_aot.py):
`calls_python` calls a plain Python function, which the interpreter simply runs and the compiler refuses.

Run as a script (TRITON_INTERPRET=0) it records one launch, compiles it for sm_90 with
ultraspeed.kernels.triton_aot and prints what it found as JSON."""

from __future__ import annotations

import json

import torch

from ultraspeed.kernels.triton_compat import tl, triton


def double(x):
    return x * 2


@triton.jit
def calls_python(a_ptr, out_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(out_ptr + r, double(tl.load(a_ptr + r)))


def launch() -> None:
    a = torch.randn(32)
    calls_python[(1,)](a, torch.empty_like(a), N=32)


if __name__ == "__main__":
    from ultraspeed.kernels.triton_aot import compile_launch, problems, record_launches
    with record_launches() as launches:
        launch()
    results = [(90, compile_launch(launch, 90)) for launch in launches]
    print(json.dumps({"compiled": {c.name: {"error": c.error, "shared": c.shared} for _, c in results},
                      "problems": problems(results)}))
