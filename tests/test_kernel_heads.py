"""Head sizes at the kernels' limit: K = 256 and a V that is no power of two match the oracle (under the
Triton interpreter on a CPU), and a larger head is refused with a message instead of a wrong result."""

import importlib
from pathlib import Path

import pytest
import torch

from ttr_codegen.testing import LayerChecks

ROOT = Path(__file__).resolve().parents[1]
CHUNKED = sorted(p.parent.name for p in (ROOT / "generated").glob("*/chunk_triton.py"))
RECURRENT = sorted(p.parent.name for p in (ROOT / "generated").glob("*/fused_recurrent.py"))


def _checks(name: str, **kernels) -> LayerChecks:
    module = importlib.import_module(f"generated.{name}")
    return LayerChecks(ROOT / "specs" / f"{name}.yaml", getattr(module, f"naive_{name}"), None, **kernels)


def _chunk_kernel(name: str):
    return getattr(importlib.import_module(f"generated.{name}.chunk_triton"), f"chunk_{name}_triton")


@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_triton_largest_head(name):
    _checks(name).triton_chunk_matches_oracle(_chunk_kernel(name), T=40, chunk_size=32, K=256, V=200)


@pytest.mark.parametrize("name", RECURRENT)
def test_fused_recurrent_largest_head(name):
    fused = getattr(importlib.import_module(f"generated.{name}"), f"fused_recurrent_{name}")
    _checks(name, fused_recurrent=fused).fused_recurrent_matches_oracle(T=9, K=256, V=200)


@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_triton_refuses_larger_head(name):
    problem = _checks(name).problem(8, 264, 16, B=1, H=1).to(torch.float32)
    with pytest.raises(ValueError, match="must be at most 256"):
        _chunk_kernel(name)(*problem.args())
