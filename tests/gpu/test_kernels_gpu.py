"""Generated Triton kernels on a CUDA device, in float32, float16 and bfloat16, against the float64 reference.

Run on a GPU machine: python -m pytest -m gpu tests/gpu. The reference is `naive_<name>` in float64 on
the same device (checked against the oracle in the CPU suite); the oracle's O(T^2) solve is too slow
for T = 4096.
"""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from ttr_codegen.testing import (LayerChecks, TwoLayers, assert_within, compiled_matches_eager, naive_per_sequence, pack,
                                 state_tuple, triton_trained_layers)

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _release_cached_memory():
    """Give each test's cached blocks back to the device: several pytest workers share one GPU, and memory one
    worker's allocator keeps can leave another's kernel launch short of memory. A test that leaves the CUDA
    context broken (a faulting kernel: every later CUDA call fails) ends its process: under pytest-xdist a
    fresh worker takes the remaining tests, so one fault fails one test instead of all that worker runs."""
    yield
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except (RuntimeError, torch.AcceleratorError) as error:
            if "illegal" in str(error) or "unspecified launch failure" in str(error):
                sys.stderr.write(f"CUDA context lost ({error}); ending this test process\n")
                os._exit(3)
            raise
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to 1 + max |reference|
LAYERS = sorted(p.parent.name for p in (ROOT / "generated").glob("*/fused_recurrent.py"))
DEVICE = torch.device("cuda")  # (a dry run of the tests' plumbing may set "cpu" under the Triton interpreter)


def random_state(checks, rows: int, H: int, K: int, V: int, generator, scale: float = 1.0):
    """A random float64 initial state on DEVICE shaped as the layer's: one [rows, H, K, V] tensor, or a tuple of
    them where the layer carries several (Titans' (S, Z))."""
    parts = checks.state_parts()
    states = tuple(torch.randn(rows, H, K, V, device=DEVICE, dtype=torch.float64, generator=generator) * scale
                   for _ in range(parts))
    return states if parts > 1 else states[0]


def _cast(state, dtype):
    parts = tuple(x.to(dtype) for x in state_tuple(state))
    return parts if len(parts) > 1 else parts[0]


def _paired(found, reference) -> float:
    """<found, reference> summed over the state's parts, in float64 (a loss term on the final state)."""
    return sum((f.double() * r).sum() for f, r in zip(state_tuple(found), state_tuple(reference)))


def load(name):
    module = importlib.import_module(f"generated.{name}")
    return LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None,
                       fused_recurrent=getattr(module, f"fused_recurrent_{name}"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1000, 4096])
@pytest.mark.parametrize("name", LAYERS)
def test_fused_recurrent(name, T, dtype):
    checks = load(name)
    problem = checks.problem(T, 128, 100, B=2, H=3, seed=T)  # V = 100: not a power of two
    prefix = checks.problem(7, 128, 100, B=2, H=3, seed=T + 1)
    prefix.inputs.update({n: x for n, x in problem.inputs.items() if not checks.spec.input(n).per_token})
    device = DEVICE
    _, state = checks.naive(*prefix.to(torch.float64, device).args(), output_final_state=True)
    run = problem.to(dtype, device)
    reference, reference_state = checks.naive(*run.to(torch.float64, device).args(), initial_state=state,
                                              output_final_state=True)
    carried = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
    o, final = checks.fused_recurrent(*run.args(), initial_state=carried, output_final_state=True)
    assert_within(o, reference, TOLERANCE[dtype], "output")
    state_tolerance = TOLERANCE[dtype] * (1 + reference.abs().max().item())  # states grow with the outputs
    for s, s_ref in zip(final if isinstance(final, tuple) else (final,),
                        reference_state if isinstance(reference_state, tuple) else (reference_state,)):
        assert_within(s, s_ref, state_tolerance, "final state")
    # the two batch rows as packed sequences, each from its own state
    packed, cu_seqlens = pack([run.row(b, checks.spec) for b in range(2)], checks.spec)
    o_packed, _ = checks.fused_recurrent(*packed.args(), initial_state=carried, cu_seqlens=cu_seqlens)
    assert_within(o_packed, reference.reshape(1, -1, *reference.shape[2:]), TOLERANCE[dtype], "packed output")


CHUNKED = sorted(p.parent.name for p in (ROOT / "generated").glob("*/chunk_triton.py"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@DTYPES
@pytest.mark.parametrize("T", [1, 63, 1000, 4096])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_triton(name, T, dtype):
    module = importlib.import_module(f"generated.{name}")
    kernel = getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None)
    device = DEVICE
    problem = checks.problem(T, 128, 100, B=2, H=3, seed=T)
    run = problem.to(dtype, device)
    state = random_state(checks, 2, 3, 128, 100, torch.Generator(device=device).manual_seed(T), 0.1)
    reference, reference_state = checks.naive(*run.to(torch.float64, device).args(), initial_state=state,
                                              output_final_state=True)
    with torch.no_grad():
        o, final = kernel(*run.args(), initial_state=_cast(state, torch.float32), output_final_state=True)
        routed, _ = getattr(module, f"chunk_{name}")(*run.args(), initial_state=_cast(state, torch.float32))
    assert_within(o, reference, TOLERANCE[dtype], "output")
    for s, s_ref in zip(state_tuple(final), state_tuple(reference_state), strict=True):
        assert_within(s, s_ref, TOLERANCE[dtype] * (1 + reference.abs().max().item()), "final state")
    if "from .chunk_triton import" in (ROOT / "generated" / name / "chunk.py").read_text():  # it dispatches here
        torch.testing.assert_close(routed, o)
    else:
        assert_within(routed, reference, TOLERANCE[dtype], "chunk_<name> output")
    packed, cu_seqlens = pack([run.row(b, checks.spec) for b in range(2)], checks.spec)
    o_packed, _ = kernel(*packed.args(), initial_state=_cast(state, torch.float32), cu_seqlens=cu_seqlens)
    assert_within(o_packed, reference.reshape(1, -1, *reference.shape[2:]), TOLERANCE[dtype], "packed output")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@DTYPES
@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_triton_largest_head(name, dtype):
    """K = 256 (the kernels' limit) and V = 200 (no power of two), against the float64 reference."""
    module = importlib.import_module(f"generated.{name}")
    kernel = getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None)
    run = checks.problem(300, 256, 200, B=2, H=2, seed=3).to(dtype, DEVICE)
    reference, _ = checks.naive(*run.to(torch.float64).args())
    with torch.no_grad():
        o, _ = kernel(*run.args())
    assert_within(o, reference, TOLERANCE[dtype], "output")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("K", "V"), [(4, 4), (8, 12)])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_triton_small_heads(name, K, V):
    """Heads narrower than a tensor-core tile (16): the kernels pad their blocks to 16, masked."""
    module = importlib.import_module(f"generated.{name}")
    kernel = getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None)
    run = checks.problem(70, K, V, B=2, H=2, seed=K).to(torch.float32, DEVICE)
    reference, reference_state = checks.naive(*run.to(torch.float64).args(), output_final_state=True)
    with torch.no_grad():
        o, final = kernel(*run.args(), output_final_state=True)
    assert_within(o, reference, TOLERANCE[torch.float32], "output")
    for s, s_ref in zip(state_tuple(final), state_tuple(reference_state), strict=True):
        assert_within(s, s_ref, TOLERANCE[torch.float32] * (1 + reference.abs().max().item()), "final state")


TRAINED = triton_trained_layers(ROOT / "generated")
BACKWARD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # gate gradients sum over T


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@DTYPES
@pytest.mark.parametrize("T", [63, 1000])
@pytest.mark.parametrize("name", TRAINED)
def test_chunk_triton_backward(name, T, dtype):
    """chunk_<name> with autograd on CUDA (the Triton forward and the derived backward's kernels) against
    float64 autograd of the reference, for every input, the initial state and the final state."""
    _check_backward(name, T, dtype, K=128, V=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", TRAINED)
def test_chunk_triton_backward_largest_head(name, dtype):
    """The backward at K = 256 (the kernels' limit) and V = 200 (no power of two)."""
    _check_backward(name, 300, dtype, K=256, V=200)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TRAINED)
def test_chunk_triton_backward_small_heads(name):
    """The backward with heads narrower than a tensor-core tile (K = 8, V = 12)."""
    _check_backward(name, 70, torch.float32, K=8, V=12)


def _check_backward(name: str, T: int, dtype: torch.dtype, K: int, V: int) -> None:
    module = importlib.import_module(f"generated.{name}")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None)
    device = DEVICE
    run = checks.problem(T, K, V, B=2, H=3, seed=T).to(dtype, device)
    generator = torch.Generator(device=device).manual_seed(T)
    state = random_state(checks, 2, 3, K, V, generator, 0.1)
    d_out = torch.randn(2, T, 3, V, device=device, dtype=torch.float64, generator=generator)
    d_final = random_state(checks, 2, 3, K, V, generator)

    def gradients(op, args, initial):
        n = len(args)
        leaves = [x.clone().requires_grad_(True) for x in (*args, *state_tuple(initial))]
        parts = tuple(leaves[n:])
        o, final = op(*leaves[:n], initial_state=parts if len(parts) > 1 else parts[0], output_final_state=True)
        loss = (o.double() * d_out).sum() + _paired(final, d_final)
        return torch.autograd.grad(loss, leaves)

    expected = gradients(checks.naive, run.to(torch.float64, device).args(), state)
    found = gradients(getattr(module, f"chunk_{name}"), run.args(), _cast(state, torch.float32))
    names = ["q", "k", "v", *run.inputs, *(f"initial_state[{i}]" for i in range(len(state_tuple(state))))]
    for what, g, g_ref in zip(names, found, expected, strict=True):
        assert_within(g, g_ref, BACKWARD_TOLERANCE[dtype], f"d/d{what}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", TRAINED)
def test_chunk_triton_backward_packed(name, dtype):
    """Packed sequences (cu_seqlens) on the Triton training path: gradients of every input and of each
    sequence's initial state against float64 autograd of the reference run sequence by sequence."""
    module = importlib.import_module(f"generated.{name}")
    checks = LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None)
    device = DEVICE
    _, packed, cu_seqlens = checks.packed_problems((1, 200, 1000, 77), 128, 100, H=3, seed=80)
    cu_seqlens = cu_seqlens.to(device)
    generator = torch.Generator(device=device).manual_seed(5)
    state = random_state(checks, 4, 3, 128, 100, generator, 0.1)
    d_out = torch.randn(1, packed.q.shape[1], 3, 100, device=device, dtype=torch.float64, generator=generator)
    d_final = random_state(checks, 4, 3, 128, 100, generator)

    def gradients(run, args, initial):
        n = len(args)
        leaves = [x.clone().requires_grad_(True) for x in (*args, *state_tuple(initial))]
        parts = tuple(leaves[n:])
        o, final = run(leaves[:n], parts if len(parts) > 1 else parts[0])
        loss = (o.double() * d_out).sum() + _paired(final, d_final)
        return torch.autograd.grad(loss, leaves)

    expected = gradients(lambda args, initial: naive_per_sequence(checks.naive, args, initial, cu_seqlens),
                         packed.to(torch.float64, device).args(), state)
    chunk = getattr(module, f"chunk_{name}")
    found = gradients(lambda args, initial: chunk(*args, initial_state=initial, output_final_state=True,
                                                  cu_seqlens=cu_seqlens),
                      packed.to(dtype, device).args(), _cast(state, torch.float32))
    names = ["q", "k", "v", *packed.inputs, *(f"initial_state[{i}]" for i in range(len(state_tuple(state))))]
    for what, g, g_ref in zip(names, found, expected, strict=True):
        assert_within(g, g_ref, BACKWARD_TOLERANCE[dtype], f"d/d{what}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_of_generated_layers_compiles_fullgraph_on_cuda():
    """A two-layer model (GLA, then simple GLA) on CUDA in bf16 under torch.compile(fullgraph=True) with
    inductor: forward and backward run the Triton custom ops and match eager."""
    from generated.gla import Gla
    from generated.simple_gla import SimpleGla

    torch.manual_seed(0)
    compiled_matches_eager(TwoLayers(Gla, SimpleGla, width=256).cuda(), torch.randn(2, 300, 256, device="cuda"), 1e-3)
