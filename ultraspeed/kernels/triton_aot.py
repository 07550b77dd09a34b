"""Compile every Triton kernel launch of the static runtime for a GPU, on a machine without one.

The CPU test suite runs the kernels under TRITON_INTERPRET=1: that checks what they compute, not that they
compile. The interpreter runs a kernel's body as numpy and accepts what the compiler refuses (a block shape it
cannot lay out, a type it cannot lower), and it never allocates shared memory, so a tile too large for the device
only fails at launch. This module closes that gap before a GPU is lent:

1. `record_launches` runs the static decode steps (runtime/static_step.py: plain and speculative, on the CPU,
   greedy) on random models in real shapes with the triton backend, and records each kernel launch instead of
   running it (outputs stay uninitialised; nothing here reads them).
2. `compile_launch` compiles each distinct launch with Triton's own compiler for the target architecture (sm_90 by
   default: H100 / H200), through to a cubin with the ptxas Triton ships, specialised exactly as a launch on
   that GPU would be (Triton's own argument binder: integer 1 as a constant, 16-byte alignment and divisibility).
3. The report: registers per thread, spilled bytes and shared memory per kernel, against the device's limit.

    TRITON_INTERPRET=0 python -m ultraspeed.kernels.triton_aot            # sm_90
    TRITON_INTERPRET=0 python -m ultraspeed.kernels.triton_aot --arch 80 90 --dtype bfloat16 float32

It uses Triton internals (the JIT's binder), so it checks the Triton installed here; the GPU machine's own
Triton compiles again at first launch. Exit status 1 if any launch fails to compile or needs more shared memory
than the architecture has.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

# Shared memory one block may use (opt-in maximum), by compute capability: what a launch is refused beyond.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function and the arguments it was called with."""
    kernel: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Compiled:
    name: str
    signature: str            # the specialised signature and its 16-divisible arguments, for the report
    seconds: float
    shared: int               # bytes of shared memory per block
    registers: int | None     # per thread, from cuobjdump (None if it is missing)
    spilled: int | None       # bytes of local memory per thread (register spills)
    error: str | None = None


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_aot compiles kernels: run it with TRITON_INTERPRET=0 (the interpreter replaces "
                         "every kernel with a Python function when its module is imported)")
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("triton_aot needs Triton (pip install triton)")


@contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside: every `kernel[grid](...)` is recorded, not run (its outputs keep whatever memory held)."""
    from triton.runtime.jit import JITFunction
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def specialise(launch: Launch, arch: int) -> tuple[Any, dict, dict, dict, Any]:
    """What Triton's JIT would compile for this launch on a GPU of compute capability `arch`: (backend target,
    signature, constexprs, attrs, options), from Triton's own binder (JITFunction.run does the same)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", kernel.debug) or knobs.runtime.debug)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):     # as run() adds them, where they exist
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one launch for sm_<arch> down to a cubin; compile errors are caught into `error`."""
    import triton
    from triton.compiler import ASTSource
    target, signature, constexprs, attrs, options = specialise(launch, arch)
    names = list(signature)
    aligned = [names[path[0]] for path, values in attrs.items() if ["tt.divisibility", 16] in values]
    described = ", ".join(f"{k}={constexprs[(i,)]}" if v == "constexpr" else f"{k}:{v}"
                          for i, (k, v) in enumerate(signature.items()))
    described += f"; 16-divisible: {', '.join(aligned) or 'none'}"
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as error:      # a compile error is the finding: report it, go on with the others
        first = str(error).strip().splitlines()
        return Compiled(launch.name, described, time.perf_counter() - t0, 0, None, None,
                        f"{type(error).__name__}: {first[0] if first else ''}"[:400])
    registers, spilled = cubin_resources(compiled.asm["cubin"])
    return Compiled(launch.name, described, time.perf_counter() - t0, int(compiled.metadata.shared), registers,
                    spilled)


def cubin_resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local bytes per thread) of a cubin's kernel, read with the cuobjdump Triton ships
    (None, None where it is missing)."""
    from triton.backends.nvidia import compiler as nvidia
    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return _resource(out, "REG"), _resource(out, "LOCAL")


def _resource(text: str, key: str) -> int | None:
    for token in text.split():
        if token.startswith(key + ":"):
            return int(token.split(":")[1])
    return None


# ------------------------------------------------------------------------------------------ what runs


def runtime_launches(dtype: torch.dtype, batches: tuple[int, ...] = (1, 4),
                     block_sizes: tuple[int, ...] = (4, 8, 16)) -> list[Launch]:
    """The kernel launches of the static runtime's greedy plain and speculative steps, triton backend, on random
    models in real shapes (two layers each; the layers repeat): the default model (SmolLM2-135M) with bf16 and
    with MXFP4 MLP weights (the ultraspeed tier of a dense model), and a Qwen3-30B-A3B-shaped MoE with MXFP4
    experts (16 experts instead of 128: kernel arguments, not specialisations, change with the count). Block
    sizes matter (the attention kernel's query tile grows with the block: 16, 32, 64 rows), batch sizes barely."""
    from ultraspeed.engine.speculative import new_draft_cache
    from ultraspeed.models.random_weights import (qwen3_30b_a3b_config, random_decoder, random_drafter,
                                                  smollm2_135m_config)
    from ultraspeed.quant.apply import quantize_experts
    from ultraspeed.runtime.backend import TritonBackend
    from ultraspeed.runtime.graphs import load_rows
    from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep

    dense = smollm2_135m_config(max_position=256, num_layers=2)
    moe = dataclasses.replace(qwen3_30b_a3b_config(num_layers=2, max_position=256), vocab_size=4096, num_experts=16)
    dense_mxfp4 = random_decoder(dense, "cpu", dtype)
    quantize_experts(dense_mxfp4)
    models = [random_decoder(dense, "cpu", dtype), dense_mxfp4, random_decoder(moe, "cpu", dtype)]
    backend = TritonBackend()
    with record_launches() as launches:
        for model in models:
            drafters = [random_drafter(model, "cpu", dtype, block, num_layers=1) for block in block_sizes]
            for b in batches:
                cache = model.new_cache(b, 128)
                steps = [DecodeStep(model, cache, b, backend)]
                steps += [SpeculativeStep(model, d, cache, new_draft_cache(d, b, 128), b, backend) for d in drafters]
                for step in steps:
                    load_rows(step, [1] * b, [40 + 7 * r for r in range(b)])
                    step.step()
    return launches


def distinct(launches: list[Launch], arch: int) -> list[Launch]:
    """One launch per distinct specialisation (kernel, signature, constant values, attributes)."""
    seen, out = set(), []
    for launch in launches:
        _, signature, constexprs, attrs, _ = specialise(launch, arch)
        key = (launch.name, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def check(archs: list[int], dtypes: list[torch.dtype]) -> list[tuple[int, Compiled]]:
    """Record the runtime's launches for each dtype, compile each distinct one for each arch."""
    from tqdm import tqdm
    launches = [launch for dtype in dtypes for launch in runtime_launches(dtype)]
    jobs = [(arch, launch) for arch in archs for launch in distinct(launches, arch)]
    return [(arch, compile_launch(launch, arch)) for arch, launch in tqdm(jobs, desc="compiling", unit="kernel")]


def problems(results: list[tuple[int, Compiled]]) -> list[str]:
    out = []
    for arch, c in results:
        if c.error:
            out.append(f"sm_{arch} {c.name}({c.signature}): {c.error}")
        elif c.shared > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
            out.append(f"sm_{arch} {c.name}: {c.shared} bytes of shared memory, over the "
                       f"{SHARED_LIMIT.get(arch, SHARED_LIMIT[80])} a block may use")
    return out


def render(results: list[tuple[int, Compiled]]) -> str:
    lines = ["| arch | kernel | registers | spilled B | shared B | compile s | specialisation |",
             "|---|---|---:|---:|---:|---:|---|"]
    for arch, c in results:
        regs = "-" if c.registers is None else str(c.registers)
        spill = "-" if c.spilled is None else str(c.spilled)
        status = f"FAILED: {c.error}" if c.error else c.signature
        lines.append(f"| sm_{arch} | {c.name} | {regs} | {spill} | {c.shared} | {c.seconds:.1f} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100/H200)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"],
                   help="activation dtypes of the models")
    args = p.parse_args(argv)
    _require_compiler()
    torch.manual_seed(0)
    results = check(args.arch, [getattr(torch, d) for d in args.dtype])
    print(render(results))
    found = problems(results)
    for line in found:
        print("PROBLEM:", line, file=sys.stderr)
    print(f"{len(results)} launches compiled, {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
