"""Test-wide settings. Triton decides interpreted vs compiled mode when a kernel is defined, so the interpreter
switch must be set before any test module imports a kernel: here, first. On a CUDA machine run with
TRITON_INTERPRET=0 to test the same kernels compiled."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
