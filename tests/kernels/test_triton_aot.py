"""The compile check of ultraspeed/kernels/triton_aot.py: every kernel launch of the static runtime (plain and
speculative steps on the default model's shapes, with bf16 and MXFP4 MLP weights, and on a Qwen3-30B-A3B-shaped
MoE with MXFP4 experts) compiles for sm_90 (H100 / H200) with Triton's own compiler, on this CPU machine, within the
shared memory a block may use. And the check has teeth: a kernel the interpreter runs happily but the compiler
refuses is reported, and so is a kernel that needs more shared memory than the architecture gives a block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia import compiler as nvidia
    HAS_PTXAS = (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()
except ImportError:
    HAS_PTXAS = False
pytestmark = pytest.mark.skipif(not HAS_PTXAS, reason="this Triton has no NVIDIA backend with ptxas")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("_rms_norm_kernel", "_rope_kernel", "_decode_attention_kernel", "_silu_and_mul_kernel",
           "_mxfp4_matmul_kernel", "_grouped_mxfp4_kernel", "_moe_sum_kernel")


def compiled_run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_runtime_kernel_compiles_for_hopper():
    run = compiled_run("-m", "ultraspeed.kernels.triton_aot", "--arch", "90", "--dtype", "bfloat16", "float32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| sm_90 |")]
    assert {name for name in KERNELS if any(f"| {name} |" in row for row in rows)} == set(KERNELS)
    assert not any("FAILED" in row for row in rows) and "0 problem(s)" in run.stdout
    assert any(":*fp32" in row for row in rows) and any(":*bf16" in row for row in rows)


def test_the_check_reports_what_the_interpreter_lets_through():
    from tests.kernels import triton_compile_cases as cases       # interpreted here (TRITON_INTERPRET=1)
    a = torch.randn(32)
    out = torch.empty_like(a)
    cases.calls_python[(1,)](a, out, N=32)
    torch.testing.assert_close(out, 2 * a)                          # the interpreter runs it

    run = compiled_run(str(ROOT / "tests" / "kernels" / "triton_compile_cases.py"))
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Unsupported function" in found["compiled"]["calls_python"]["error"]
    assert len(found["problems"]) == 1 and "calls_python" in found["problems"][0]


def test_shared_memory_over_the_architecture_limit_is_a_problem():
    from ultraspeed.kernels.triton_aot import SHARED_LIMIT, Compiled, problems
    fits = Compiled("k", "sig", 0.1, SHARED_LIMIT[90], 64, 0)
    over = Compiled("k", "sig", 0.1, SHARED_LIMIT[90] + 1, 64, 0)
    assert problems([(90, fits)]) == []
    assert problems([(80, fits)]) != []                  # an A100 gives a block less than an H100
    assert len(problems([(90, over)])) == 1 and "shared memory" in problems([(90, over)])[0]
