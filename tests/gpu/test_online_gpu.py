"""The nonlinear memories (ttt_linear, ttt_mlp, titans_mlp) on a CUDA device: chunk_<name> in float32 and
bfloat16 (it computes in float32 either way) against the oracle of the spec (autograd of each token's loss),
in float64 on the CPU, with gradients through the chunked form (PyTorch); then its Triton inference kernel
(online_triton.py, the path without gradients) in float32, float16 and bfloat16: outputs and every part of the
final state against the oracle, through calls cut at and inside mini-batches and with packed sequences, and
at T = 4096 against chunk.py's PyTorch dual form in float64 on the device.

Run on a GPU machine: python -m pytest -m gpu tests/gpu.
"""

import importlib
from pathlib import Path

import pytest
import torch

from ttr_codegen.spec import load_spec
from ttr_codegen.testing import OnlineChecks, Problem, assert_within

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
ONLINE = ["titans_mlp", "ttt_linear", "ttt_mlp"]
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2}  # relative to 1 + max |reference|
KERNEL_LAYERS = sorted(p.parent.name for p in (ROOT / "generated").glob("*/online_triton.py"))
KERNEL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _checks(name: str) -> OnlineChecks:
    module = importlib.import_module(f"generated.{name}")
    spec_path = ROOT / "specs" / f"{name}.yaml"
    return OnlineChecks(spec_path, getattr(module, f"naive_{name}"), getattr(module, f"chunk_{name}"),
                        getattr(module, load_spec(spec_path).camel_name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ONLINE)
def test_chunk_on_cuda_matches_oracle(name, dtype):
    """Outputs, final state and the gradients of q, k, v and every input, at K = 64 over 5 mini-batches and a
    part one, from a state carried into the middle of a mini-batch (two sequences at different points). The
    reference sees the inputs rounded to dtype, so only the computation's rounding counts; bfloat16 at calm
    rates (at the typical ones Titans' memory grows to 1e23 by token 85, and amplifies every rounding)."""
    checks = _checks(name)
    problem, initial = checks.problem(85, 64, seed=1, positions=[3, 9], calm=dtype != torch.float32)
    rounded = problem.to(dtype).to(torch.float64)
    o_ref, final_ref = checks.oracle(rounded, initial)
    leaves = [x.to("cuda", dtype).requires_grad_(True) for x in rounded.args()]
    cuda = Problem(*leaves[:3], dict(zip(problem.inputs, leaves[3:])))
    on_cuda = tuple((x.float() if x.is_floating_point() else x).cuda() for x in initial)
    o, final = checks.chunk(*cuda.args(), initial_state=on_cuda, output_final_state=True)
    assert o.dtype == dtype and o.is_cuda
    assert_within(o.cpu(), o_ref, TOLERANCE[dtype], "output")
    for name, part, part_ref in zip(checks.state_names, final, final_ref, strict=True):
        if part.is_floating_point():
            assert_within(part.cpu(), part_ref, TOLERANCE[torch.float32], f"final state {name}")
        else:
            assert torch.equal(part.cpu(), part_ref), f"final state {name}"
    d_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * d_out.cuda()).sum(), leaves)
    ref_leaves = [x.clone().requires_grad_(True) for x in rounded.args()]
    o_ref, _ = checks.oracle(Problem(*ref_leaves[:3], dict(zip(problem.inputs, ref_leaves[3:]))), initial)
    grads_ref = torch.autograd.grad((o_ref * d_out).sum(), ref_leaves)
    for what, g, g_ref in zip(["q", "k", "v", *problem.inputs], grads, grads_ref, strict=True):
        assert_within(g.cpu(), g_ref, TOLERANCE[dtype] * 5, f"d/d{what}")  # gradients sum over T


def _layer(name: str):
    package = importlib.import_module(f"generated.{name}")
    chunk_module = importlib.import_module(f"generated.{name}.chunk")
    checks = OnlineChecks(ROOT / "specs" / f"{name}.yaml", getattr(package, f"naive_{name}"),
                          getattr(package, f"chunk_{name}"), None)
    return checks, chunk_module


def test_kernel_layers_found():
    assert {"ttt_linear", "ttt_mlp", "titans_mlp"} <= set(KERNEL_LAYERS)


@pytest.mark.parametrize("name", KERNEL_LAYERS)
@pytest.mark.parametrize("T", [1, 63, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_oracle(name, T, dtype):
    """One launch per call on the device (the kernel is chosen, not forced), against the oracle on the inputs
    the kernel sees (q, k, v rounded to dtype), so that only the computation's rounding counts; half precision
    at calm rates, where the memory does not diverge (a diverging one amplifies every rounding)."""
    checks, chunk_module = _layer(name)
    problem, initial = checks.problem(T, 64, B=2, H=2, seed=T, calm=dtype != torch.float32)
    leaves = [x.to("cuda", dtype if i < 3 else torch.float32) for i, x in enumerate(problem.args())]  # q, k, v first
    assert chunk_module._in_triton(leaves[0], leaves[2], False), "the kernel should take this call"
    with torch.no_grad():
        o, final = checks.chunk(*leaves, initial_state=tuple(x.float().cuda() for x in initial),
                                output_final_state=True)
    seen = [x.cpu().double() for x in leaves]
    o_ref, final_ref = checks.oracle(Problem(*seen[:3], dict(zip(problem.inputs, seen[3:]))), initial)
    assert o.dtype == dtype
    assert_within(o.cpu().double(), o_ref, KERNEL_TOLERANCE[dtype], f"{name} {dtype} output")
    for part_name, part, part_ref in zip(checks.state_names, final, final_ref):
        if part.is_floating_point():
            assert_within(part.cpu().double(), part_ref, KERNEL_TOLERANCE[dtype], f"{name} {dtype} final {part_name}")
        else:
            assert torch.equal(part.cpu(), part_ref), part_name


@pytest.mark.parametrize("apart", [False, True], ids=["read_out_in_walk", "read_out_apart"])
@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_calls_and_packed_sequences(name, apart):
    """The interpreter's check (calls cut inside mini-batches, packed sequences) with the compiled kernels,
    float32, the read-out in the walk and in its own launch."""
    checks, chunk_module = _layer(name)
    original_chunk = checks.chunk
    checks.chunk = lambda *args, **kwargs: _on_device(original_chunk, args, kwargs)
    checks.triton_matches_oracle(chunk_module, T=63, K=64, tf32=True, read_out_apart=apart)


def _on_device(op, args, kwargs):
    """op on CUDA copies of its tensors, its results back on the CPU."""
    def cuda(x):
        return x.cuda() if isinstance(x, torch.Tensor) else tuple(map(cuda, x)) if isinstance(x, tuple) else x

    o, final = op(*map(cuda, args), **{k: cuda(v) for k, v in kwargs.items()})
    return o.cpu(), None if final is None else tuple(x.cpu() for x in final)


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_long_sequences(name):
    """T = 4096 in bfloat16 against the PyTorch dual form in float64 on the device, at calm rates (at the typical
    ones Titans' memory diverges within a few hundred tokens, in float64 too)."""
    checks, chunk_module = _layer(name)
    problem, initial = checks.problem(4096, 64, B=1, H=4, seed=1, calm=True)
    leaves = [x.cuda() for x in problem.args()]
    state = tuple(x.cuda() for x in initial)
    with torch.no_grad():
        o_ref, final_ref = checks.chunk(*leaves, initial_state=state, output_final_state=True)  # float64: PyTorch
        o, final = checks.chunk(*[x.to(torch.bfloat16 if i < 3 else torch.float32) for i, x in enumerate(leaves)],
                                initial_state=tuple(x.float() for x in state), output_final_state=True)
    assert_within(o.double(), o_ref, KERNEL_TOLERANCE[torch.bfloat16], f"{name} T=4096 output")
    assert_within(final[0].double(), final_ref[0], KERNEL_TOLERANCE[torch.bfloat16], f"{name} T=4096 final weights")


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_trains_like_oracle(name):
    """Training on the compiled kernels (checkpoints, the derived backward), float32, K = 32: every gradient
    against the oracle's, two sequences ending inside a mini-batch and packed sequences."""
    checks, chunk_module = _layer(name)
    original_chunk = checks.chunk
    checks.chunk = lambda *args, **kwargs: _on_device(original_chunk, args, kwargs)
    checks.triton_gradients_match_oracle(chunk_module, T=63, K=32)


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_trains_at_width_64(name):
    """The same at K = 64, the benchmarks' width, with the kernels forced whatever `supported` says: ttt_mlp's
    33 088 live entries (its backward asks 148 KiB of shared memory on sm_90a) set online_triton.MAX_TRAINING_STATE,
    which this test's passing on an H100 raised to them."""
    checks, chunk_module = _layer(name)
    original_chunk = checks.chunk
    checks.chunk = lambda *args, **kwargs: _on_device(original_chunk, args, kwargs)
    checks.triton_gradients_match_oracle(chunk_module, T=37, K=64)
