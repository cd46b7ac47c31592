"""The derived adjoint of each per-token rule against torch autograd of the same token (float64).

The forward token (update, then the read-out of the new state) and the derived gradients are both
printed by the torch printer and run on random tensors; autograd of the forward is the independent
check of the symbolic differentiation.
"""

from pathlib import Path

import pytest
import torch

from ttr_codegen.derive.adjoint import Frobenius, RowDot, derive_adjoint
from ttr_codegen.derive.algebra import K, V
from ttr_codegen.pipeline import derive_spec
from ttr_codegen.render.torch_printer import TokenProgram

SPECS = Path(__file__).resolve().parents[1] / "specs"
SINGLE_STATE = ["linear_attention", "retnet", "simple_gla", "gla", "delta_rule", "gated_delta_rule",
                "gated_delta_rule_l2", "longhorn", "delta_product"]
SCALE = 0.7


def evaluate(value, values: dict, names: dict) -> torch.Tensor:
    """Print a MatPoly or a scalar with the torch printer and run it on `values`."""
    if isinstance(value, RowDot):  # a per-key gate's gradient
        rows = (evaluate(value.left, values, names) * evaluate(value.right, values, names)).sum(-1)
        return rows * values[value.times.name] if value.times is not None else rows
    program = TokenProgram(names=names, dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}))
    expression = program.scalar(value) if not hasattr(value, "terms") else program.poly(value)
    scope = dict(values, torch=torch, acc=torch.float64, scale=SCALE)
    exec("\n".join(program.lines + [f"result = {expression}"]), scope)
    return scope["result"]


@pytest.mark.parametrize("name", SINGLE_STATE)
def test_adjoint_matches_autograd(name):
    _, rule = derive_spec(SPECS / f"{name}.yaml")
    adjoint = derive_adjoint(rule)
    g = torch.Generator().manual_seed(0)
    B, H, Kn, Vn = 2, 3, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    values = {"S": rand(B, H, Kn, Vn), "k": rand(B, H, Kn) / 2, "v": rand(B, H, Vn), "q": rand(B, H, Kn),
              "dS": rand(B, H, Kn, Vn), "do": rand(B, H, Vn)}
    scalars = [n for n, x in adjoint.inputs.items() if not hasattr(x, "terms")]
    for n in scalars:  # step sizes in (0, 1), log-gates below 0 (per key for a RowDot gradient)
        shape = (B, H, Kn) if isinstance(adjoint.inputs[n], RowDot) else (B, H)
        values[n] = torch.rand(*shape, generator=g, dtype=torch.float64) * (-1 if n.startswith("g") else 1)
    gates = dict(rule.vectors)  # per-key gate leaves, exp_g = exp(g)
    names = {n: n for n in values} | {"scale": "scale"} | {leaf: leaf for leaf in gates}

    leaves = {n: values[n].clone().requires_grad_() for n in ["S", "k", "v", "q", *scalars]}
    forward = dict(values, **leaves) | {leaf: torch.exp(leaves[gate]) for leaf, gate in gates.items()}
    values |= {leaf: torch.exp(values[gate]) for leaf, gate in gates.items()}
    new_state = evaluate(rule.update[0].value, forward, names)
    output = evaluate(rule.readout[-1].value, dict(forward, S=new_state), names)
    loss = (values["dS"] * new_state).sum() + (values["do"] * output).sum()
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    total = values["dS"] + evaluate(adjoint.readout_state, values, names)  # the output's share of dS
    after = dict(values, dS=total)
    torch.testing.assert_close(evaluate(adjoint.state, after, names), expected["S"])
    torch.testing.assert_close(evaluate(adjoint.readout_query, dict(values, S=new_state.detach()), names),
                               expected["q"])
    for n, gradient in adjoint.inputs.items():
        torch.testing.assert_close(evaluate(gradient, after, names), expected[n], msg=f"d{n}")
    assert {"k", "v"} <= set(adjoint.inputs)


def test_decay_gradient_pairs_through_frobenius():
    _, rule = derive_spec(SPECS / "simple_gla.yaml")
    assert derive_adjoint(rule).inputs["g"].atoms(Frobenius)


@pytest.mark.parametrize("name", ["titans_linear", "mesa"])
def test_unsupported_rules_say_so(name):
    _, rule = derive_spec(SPECS / f"{name}.yaml")
    with pytest.raises(NotImplementedError):
        derive_adjoint(rule)
