"""Recursive least squares (specs/rls.yaml) on a CUDA device: chunk_rls, which runs in Triton there (`rls_triton`,
float32, forward and backward; each test with its forward and backward by chunks or token by token), in float32,
float16 and bfloat16 against naive_rls in float64 on the same device (checked against the oracle in the CPU
suite): outputs from a carried state, final states, packed sequences, and the gradients of every input and of the
initial state.

Run on a GPU machine: python -m pytest -m gpu tests/gpu.
"""

from functools import cache

import pytest
import torch
import torch.nn.functional as F

from generated.rls import chunk_rls, naive_rls
from ttr_codegen.testing import RLS_KERNEL_SETTINGS, assert_within, rls_kernel_settings, symmetric_part

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to 1 + max |reference|
H, K, V = 4, 64, 64


@cache
def _problem(T: int, B: int = 2, K: int = K, V: int = V):
    """float64 inputs on the device (unit keys, decays near 1) and a carried state (S, P)."""
    generator = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float64, generator=generator)

    def draw(rows):
        return [randn(B, rows, H, K), F.normalize(randn(B, rows, H, K), dim=-1), randn(B, rows, H, V),
                F.logsigmoid(randn(B, rows, H) + 4)]
    _, state = naive_rls(*draw(100), output_final_state=True)
    return draw(T), state


@pytest.fixture(autouse=True, params=RLS_KERNEL_SETTINGS)
def algorithm(request, monkeypatch):
    """Every test with each setting of the kernels the CPU suite checks (testing.RLS_KERNEL_SETTINGS: forward and
    backward by chunks or token by token, the chunks' gains by rows, columns or warps, unrolled or running)."""
    from generated.rls import rls_triton

    for name, value in rls_kernel_settings(request.param).items():
        monkeypatch.setattr(rls_triton, name, value)
    return request.param


def _rounded(tensors, dtype):
    """q, k, v rounded to dtype and back: the reference sees the kernel's own inputs."""
    return [x.to(dtype).to(torch.float64) for x in tensors[:3]] + tensors[3:]


def _on(dtype, tensors):
    """q, k, v in dtype, the gates in float32 (as a layer passes them)."""
    return [x.to(dtype) for x in tensors[:3]] + [x.float() for x in tensors[3:]]


def test_kernel_takes_the_call():
    inputs, _ = _problem(63)
    from generated.rls import chunk

    assert chunk._rls_in_triton(inputs[0].float(), inputs[2].float())


@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1000, 4096])
def test_chunk_on_cuda(T, dtype):
    inputs, state = _problem(T)
    rounded = _rounded(inputs, dtype)
    o_ref, final_ref = naive_rls(*rounded, initial_state=state, output_final_state=True)
    o, final = chunk_rls(*_on(dtype, rounded), initial_state=tuple(s.float() for s in state), output_final_state=True)
    assert o.dtype == dtype and all(s.dtype == torch.float32 for s in final)
    assert_within(o, o_ref, TOLERANCE[dtype], f"output, T={T}")
    for name, part, part_ref in zip("SP", final, final_ref):
        assert_within(part, part_ref, TOLERANCE[torch.float32], f"final {name}, T={T}")


@DTYPES
def test_packed_sequences_on_cuda(dtype):
    """cu_seqlens: two sequences of different lengths packed along T, each from its own state."""
    inputs, state = _problem(1000)
    rounded = _rounded(inputs, dtype)
    lengths = (1000, 377)
    rows = [[x[b:b + 1, :n] for x in rounded] for b, n in enumerate(lengths)]
    packed = [torch.cat(parts, dim=1) for parts in zip(*rows)]
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], device="cuda")
    o, final = chunk_rls(*_on(dtype, packed), initial_state=tuple(s.float() for s in state), cu_seqlens=cu_seqlens,
                         output_final_state=True)
    runs = [naive_rls(*row, initial_state=tuple(s[b:b + 1] for s in state), output_final_state=True)
            for b, row in enumerate(rows)]
    assert_within(o, torch.cat([r[0] for r in runs], dim=1), TOLERANCE[dtype], "packed output")
    for i, name in enumerate("SP"):
        assert_within(final[i], torch.cat([r[1][i] for r in runs]), TOLERANCE[torch.float32], f"packed final {name}")


@DTYPES
@pytest.mark.parametrize("T", [63, 1000])
def test_gradients_on_cuda(T, dtype):
    """Every input's gradient and the initial state's, with gradients into the output and the final state."""
    _check_gradients(T, dtype, K, V)


@pytest.mark.parametrize("K_, V_", [(128, 128), (96, 32), (32, 128)], ids=["K128V128", "K96V32", "K32V128"])
def test_other_widths_on_cuda(K_, V_):
    """Keys and values of other widths (past K = 64 the backward runs token by token: rls_triton)."""
    _check_gradients(200, torch.float32, K_, V_)


def _check_gradients(T, dtype, K, V):
    inputs, state = _problem(T, K=K, V=V)
    rounded = _rounded(inputs, dtype)
    generator = torch.Generator("cuda").manual_seed(1)
    d_out = torch.randn(2, T, H, V, device="cuda", dtype=torch.float64, generator=generator)
    d_final = [torch.randn(s.shape, device="cuda", dtype=torch.float64, generator=generator) for s in state]

    def run(op, leaves):
        o, final = op(*leaves[:4], initial_state=tuple(leaves[4:]), output_final_state=True)
        loss = (o.double() * d_out).sum() + sum((f.double() * d).sum() for f, d in zip(final, d_final))
        return o, final, torch.autograd.grad(loss, leaves)

    o, final, found = run(chunk_rls, [x.requires_grad_(True) for x in _on(dtype, rounded)]
                          + [s.float().requires_grad_(True) for s in state])
    o_ref, final_ref, expected = run(naive_rls, [x.clone().requires_grad_(True) for x in (*rounded, *state)])
    assert_within(o, o_ref, TOLERANCE[dtype], f"output, T={T} K={K} V={V}")
    for name, part, part_ref in zip("SP", final, final_ref):
        assert_within(part, part_ref, TOLERANCE[torch.float32], f"final {name}, T={T} K={K} V={V}")
    for what, g, g_ref in zip(["q", "k", "v", "g", "S", "P"], found, expected, strict=True):
        if what == "P":  # a covariance is symmetric: only a symmetric change is a state's
            g, g_ref = symmetric_part(g), symmetric_part(g_ref)
        assert_within(g, g_ref, 5 * TOLERANCE[dtype], f"d/d{what}, T={T} K={K} V={V}")
