"""MesaNet by conjugate gradients (specs/mesa_cg.yaml) and the affine memory by them (specs/affine_mesa_cg.yaml, its
centred system) on a CUDA device: chunk_<name>, whose steps run in Triton there (`cg_triton`), in float32, float16
and bfloat16 against naive_<name> in float64 on the same device (checked against the oracle in the CPU suite; the
oracle's O(T^2) solve is too slow for T = 4096): outputs from a carried state, final states, packed sequences, and
the gradients of every input.

Run on a GPU machine: python -m pytest -m gpu tests/gpu.
"""

import importlib
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from ttr_codegen.testing import assert_within, symmetric_part

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to 1 + max |reference|
H, K, V = 4, 64, 64
LAYERS = pytest.mark.parametrize("name", ["mesa_cg", "affine_mesa_cg"])


def _ops(name: str):
    """(chunk_<name>, naive_<name>)."""
    package = importlib.import_module(f"generated.{name}")
    return getattr(package, f"chunk_{name}"), getattr(package, f"naive_{name}")


@cache
def _problem(name: str, T: int, B: int = 2):
    """float64 inputs on the device (unit keys, decays near 1, a ridge per key channel) and a carried state."""
    naive = _ops(name)[1]
    generator = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float64, generator=generator)

    def draw(rows):
        return [randn(B, rows, H, K), F.normalize(randn(B, rows, H, K), dim=-1), randn(B, rows, H, V),
                F.logsigmoid(randn(B, rows, H) + 4), torch.sigmoid(randn(B, rows, H))]
    lamb = 0.25 + torch.rand(H, K, device="cuda", dtype=torch.float64, generator=generator)
    _, state = naive(*draw(7), lamb, output_final_state=True)
    return draw(T), lamb, state


def _rounded(tensors, dtype):
    """Each tensor rounded to dtype and back: the reference sees the kernel's own inputs."""
    return [x.to(dtype).to(torch.float64) for x in tensors]


@LAYERS
@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1000, 4096])
def test_chunk_on_cuda(name, T, dtype):
    chunk, naive = _ops(name)
    inputs, lamb, state = _problem(name, T)
    rounded = _rounded(inputs[:3], dtype) + inputs[3:]
    o_ref, final_ref = naive(*rounded, lamb, initial_state=state, output_final_state=True)
    args = [x.to(dtype) for x in rounded[:3]] + [x.float() for x in rounded[3:]]
    o, final = chunk(*args, lamb.float(), initial_state=tuple(s.float() for s in state), output_final_state=True)
    assert o.dtype == dtype
    assert_within(o, o_ref, TOLERANCE[dtype], f"output, T={T}")
    for part, part_ref in zip(final, final_ref):
        assert_within(part, part_ref, TOLERANCE[torch.float32], f"final state, T={T}")


@LAYERS
@DTYPES
def test_packed_sequences_on_cuda(name, dtype):
    """cu_seqlens: two sequences of different lengths packed along T, each from its own state."""
    chunk, naive = _ops(name)
    inputs, lamb, state = _problem(name, 1000)
    rounded = _rounded(inputs[:3], dtype) + inputs[3:]
    lengths = (1000, 377)
    rows = [[x[b:b + 1, :n] for x in rounded] for b, n in enumerate(lengths)]
    packed = [torch.cat(parts, dim=1) for parts in zip(*rows)]
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], device="cuda")
    args = [x.to(dtype) for x in packed[:3]] + [x.float() for x in packed[3:]]
    o, _ = chunk(*args, lamb.float(), initial_state=tuple(s.float() for s in state), cu_seqlens=cu_seqlens)
    o_ref = torch.cat([naive(*row, lamb, initial_state=tuple(s[b:b + 1] for s in state))[0]
                       for b, row in enumerate(rows)], dim=1)
    assert_within(o, o_ref, TOLERANCE[dtype], "packed output")


@LAYERS
@DTYPES
@pytest.mark.parametrize("T", [63, 1000])
def test_gradients_on_cuda(name, T, dtype):
    """Every input's gradient, the initial state's included (the adjoint solve runs in the kernel too)."""
    chunk, naive = _ops(name)
    inputs, lamb, state = _problem(name, T)
    rounded = _rounded(inputs[:3], dtype) + inputs[3:]
    d_out = torch.randn(2, T, H, V, device="cuda", dtype=torch.float64, generator=torch.Generator("cuda").manual_seed(1))

    def gradients(op, leaves):
        o, _ = op(*leaves[:6], initial_state=tuple(leaves[6:]))
        return torch.autograd.grad((o.double() * d_out).sum(), leaves)

    found = gradients(chunk, [x.to(dtype).requires_grad_(True) for x in rounded[:3]]
                      + [x.float().requires_grad_(True) for x in (*rounded[3:], lamb, *state)])
    expected = gradients(naive, [x.clone().requires_grad_(True) for x in (*rounded, lamb, *state)])
    names = ["q", "k", "v", "g", "beta", "lamb", *(f"initial_state[{i}]" for i in range(len(state)))]
    for what, g, g_ref in zip(names, found, expected, strict=True):
        if g.dim() == 4 and g.shape[-1] == g.shape[-2] == K:  # h_kk: only a symmetric change is a state's
            g, g_ref = symmetric_part(g), symmetric_part(g_ref)
        assert_within(g, g_ref, 5 * TOLERANCE[dtype], f"{name} d/d{what}, T={T}")
