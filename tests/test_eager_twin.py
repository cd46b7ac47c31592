"""The Triton layers' custom ops run as plain autograd Functions in eager mode (`_eager_twin`, templates/
_ops_macros.j2): the same kernels, outputs and gradients as the ops, without PyTorch's dispatcher; tracing
(fake tensors, torch.compile) still gets the ops. Checked on a tuple-returning op (the gated delta rule's chunk
op) and a list-returning one (mesa_cg's whole layer), under Triton's interpreter on the CPU."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

B, T, H, K = 1, 20, 2, 16


def gated_delta_rule_case(make):
    """chunk_op's arguments (q, k, v, beta, log_decay, scale, initial_state, cu_seqlens, chunk_size)."""
    q, k, v = (make(B, T, H, K) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta, log_decay = make(B, T, H).sigmoid(), -make(B, T, H).abs()
    return [q, k, v, beta, log_decay, K ** -0.5, make(B, H, K, K), None, 16]


def mesa_cg_case(make):
    """layer_op's arguments (q, k, v, g, weight, ridge, h_kk, h_kv, omega, m_k, m_v, centred, scale, iterations,
    chunk_size, precision)."""
    q, k, v = (make(B, T, H, K) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g, weight, ridge = -make(B, T, H).abs(), make(B, T, H).sigmoid(), make(H, K).abs() + 0.5
    return [q, k, v, g, weight, ridge, None, None, None, None, None, False, 1.0, 8, 16, "tf32x3"]


CASES = {"gated_delta_rule": ("chunk_triton", "chunk", gated_delta_rule_case),
         "mesa_cg": ("cg_triton", "layer", mesa_cg_case)}


def ops(layer: str):
    module, name, case = CASES[layer]
    kernels = importlib.import_module(f"generated.{layer}.{module}")
    return getattr(kernels, f"{name}_apply"), getattr(kernels, f"{name}_op"), case


@pytest.mark.parametrize("layer", sorted(CASES))
def test_eager_calls_skip_the_dispatcher_with_the_ops_results(layer):
    twin, op, case = ops(layer)
    generator = torch.Generator().manual_seed(0)
    args = case(lambda *shape: torch.randn(*shape, generator=generator))
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    for x in leaves:
        x.requires_grad_(True)
    found, expected = twin(*args), op(*args)
    assert type(found) is type(expected)
    assert type(found[0].grad_fn).__name__ == "EagerBackward"  # a plain autograd.Function: no dispatcher
    assert type(expected[0].grad_fn).__name__ != "EagerBackward"
    cotangent = torch.randn(found[0].shape, generator=generator)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = torch.autograd.grad(found[0], leaves, cotangent)
    expected_grads = torch.autograd.grad(expected[0], leaves, cotangent)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.isfinite(a).all() and a.abs().sum() > 0


@pytest.mark.parametrize("layer", sorted(CASES))
def test_fake_tensors_take_the_op(layer):
    """Under fake tensors (as torch.compile traces) only the op's fake implementation can run: the kernels would
    fail on tensors without data."""
    twin, op, case = ops(layer)
    with FakeTensorMode():
        args = case(lambda *shape: torch.empty(*shape))
        found = twin(*args)
    assert found[0].shape == (B, T, H, K)


def test_a_second_derivative_is_refused_as_the_op_refuses_it():
    """The kernels' backward has no derivative of its own: with create_graph the twin's backward runs the backward
    op, whose missing autograd formula PyTorch reports, rather than first-order gradients that silently require
    no grad."""
    twin, _, case = ops("gated_delta_rule")
    generator = torch.Generator().manual_seed(0)
    args = case(lambda *shape: torch.randn(*shape, generator=generator))
    q, k = args[0].requires_grad_(True), args[1].requires_grad_(True)
    (dq,) = torch.autograd.grad(twin(*args)[0].sum(), [q], create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(dq.sum(), [k])
