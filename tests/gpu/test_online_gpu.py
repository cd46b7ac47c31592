"""The nonlinear memories (ttt_linear, ttt_mlp, titans_mlp) on a CUDA device: chunk_<name> in float32 and
bfloat16 (it computes in float32 either way) against the oracle of the spec (autograd of each token's loss),
in float64 on the CPU, with gradients through the chunked form.

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
    reference sees the inputs rounded to dtype, so only the computation's rounding counts."""
    checks = _checks(name)
    problem, initial = checks.problem(85, 64, seed=1, positions=[3, 9])
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
