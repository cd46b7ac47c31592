"""Packed-sequence offsets on a CUDA device: the ops that read them on the host anyway (the Triton chunked
forms, the PyTorch chunked forms, the nonlinear memories) check their values there and name the argument;
the CPU suite's table (tests/test_op_inputs.py) covers offsets on the CPU.

Run on a GPU machine: python -m pytest -m gpu tests/gpu.
"""

import pytest
import torch

from tests.test_op_inputs import PACKED_CASES, call, good_inputs, resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPS = [("gla", "chunk_triton.chunk_gla_triton"), ("delta_rule", "chunk_triton.chunk_delta_rule_triton"),
       ("gla", "chunk_gla"), ("titans_linear", "chunk_titans_linear"), ("ttt_linear", "chunk_ttt_linear")]


@pytest.mark.parametrize(("layer", "op_name"), OPS, ids=[op for _, op in OPS])
def test_bad_offsets_on_the_device_are_named(layer, op_name):
    op = resolve(layer, op_name)
    args, inputs = good_inputs(layer)
    packed_args = [x[:1].cuda() for x in args]
    packed_inputs = {n: (x[:1] if x.dim() >= 3 else x).cuda() for n, x in inputs.items()}
    short = op_name.rpartition(".")[2]
    for _, cu_seqlens in PACKED_CASES:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            continue  # refused from metadata alone, on any device (the CPU suite)
        with pytest.raises(ValueError, match=rf"{short}(_triton)?: cu_seqlens must rise from 0 to T"):  # chunk_ routes to the Triton op
            call(op, packed_args, packed_inputs, cu_seqlens=cu_seqlens.cuda())
    o, _ = call(op, packed_args, packed_inputs, cu_seqlens=torch.tensor([0, 4, 10], device="cuda"))
    assert o.shape[:2] == (1, 10) and torch.isfinite(o).all()
