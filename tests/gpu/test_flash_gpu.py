"""The attention kernels (flash_<name>_triton: local-constant forward and backward, local-linear's
conjugate-gradient forward) on a CUDA device, in float32, float16 and bfloat16.

Run on a GPU machine: python -m pytest -m gpu tests/gpu/test_flash_gpu.py. Up to T = 1000 the reference is the
float64 oracle (the regression solved per query); at T = 4096 its per-query loop is too slow, and the
reference is `naive_<name>` in float64 on the same device (checked against the oracle in the CPU suite).
"""

import importlib
from pathlib import Path

import pytest
import torch

from ttr_codegen.testing import LayerChecks, assert_within

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to 1 + max |reference|
LAYERS = sorted(p.parent.name for p in (ROOT / "generated").glob("*/flash_triton.py"))


def _layer(name: str):
    package = importlib.import_module(f"generated.{name}")
    kernel = getattr(importlib.import_module(f"generated.{name}.flash_triton"), f"flash_{name}_triton")
    return LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(package, f"naive_{name}"), None), kernel


def _has_backward(name: str) -> bool:
    """Whether the layer's kernels have a backward (local-linear's conjugate-gradient kernels do not yet)."""
    return hasattr(importlib.import_module(f"generated.{name}.flash_triton"), "_backward")


def test_layers_found():
    assert {"softmax_attention", "sliding_window_attention", "forgetting_attention",
            "gaussian_kernel_attention"} <= set(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("T", [1, 63, 1000])
@DTYPES
def test_matches_oracle(name, T, dtype):
    """Outputs and every input's gradient, grouped query heads, packed sequences and a cache (see the check)."""
    checks, kernel = _layer(name)
    checks.flash_triton_matches_oracle(kernel, T, K=64, V=48, group=2, device="cuda", dtype=dtype,
                                       gradients=_has_backward(name))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("N", [1, 1000])
@DTYPES
def test_decodes(name, N, dtype):
    """One query against a cache (the split-key decoding kernel), against the oracle's last row."""
    checks, kernel = _layer(name)
    checks.flash_triton_decodes(kernel, N, K=64, V=48, group=4, device="cuda", dtype=dtype)


@pytest.mark.parametrize("name", LAYERS)
@DTYPES
def test_long_sequence(name, dtype):
    """T = 4096 at the head size the benchmarks time: output and gradients against naive_<name> in float64."""
    checks, kernel = _layer(name)
    problem = checks.problem(4096, 128, 128, B=1, H=2, seed=5).to(torch.float64, "cuda")
    d_out = torch.randn(1, 4096, 2, 128, dtype=torch.float64, device="cuda")
    gradients = _has_backward(name)
    results = []
    for run, kind in ((checks.naive, torch.float64), (kernel, dtype)):
        leaves = [x.to(kind).requires_grad_(gradients) for x in problem.args()]
        o, _ = run(*leaves)
        results.append((o, torch.autograd.grad((o * d_out.to(o.dtype)).sum(), leaves) if gradients else ()))
    (o_ref, grads_ref), (o, grads) = results
    assert_within(o.cpu(), o_ref.cpu(), TOLERANCE[dtype], "o")
    for name, g, g_ref in zip(["q", "k", "v", *problem.inputs], grads, grads_ref, strict=True):
        assert torch.isfinite(g).all(), f"d/d{name} is not finite"
        assert_within(g.cpu(), g_ref.cpu(), TOLERANCE[dtype], f"d/d{name}")


@pytest.mark.parametrize("name", LAYERS)
def test_the_flash_form_routes_to_the_kernels(name):
    """flash_<name> on CUDA runs the Triton kernels (with autograd): the same output and gradients."""
    checks, kernel = _layer(name)
    flash = getattr(importlib.import_module(f"generated.{name}"), f"flash_{name}")
    problem = checks.problem(100, 32, 16, B=2, H=2, seed=6).to(torch.float32, "cuda")
    gradients = _has_backward(name)  # without a backward, flash_<name> routes to the kernels under no_grad only
    results = []
    for run in (flash, kernel):
        leaves = [x.clone().requires_grad_(gradients) for x in problem.args()]
        with torch.set_grad_enabled(gradients):
            o, _ = run(*leaves)
        results.append((o, torch.autograd.grad(o.square().sum(), leaves) if gradients else ()))
    torch.testing.assert_close(results[0], results[1])
