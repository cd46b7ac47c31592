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
LINEAR = ["linear_attention", "retnet", "simple_gla", "gla", "delta_rule", "gated_delta_rule",
          "gated_delta_rule_l2", "longhorn", "delta_product", "titans_linear",
          "rls", "mesa", "affine_mesa"]  # K x K, vector and scalar states too; the mesas read out through a solve
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


@pytest.mark.parametrize("name", LINEAR)
def test_adjoint_matches_autograd(name):
    _, rule = derive_spec(SPECS / f"{name}.yaml")
    adjoint = derive_adjoint(rule)
    g = torch.Generator().manual_seed(0)
    B, H, Kn, Vn = 2, 3, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    states = [s.name for s in rule.states]
    size = {"K": Kn, "V": Vn}
    values = {"k": rand(B, H, Kn) / 2, "v": rand(B, H, Vn), "q": rand(B, H, Kn), "do": rand(B, H, Vn),
              "K": Kn, "V": Vn}  # the sizes, for printed identities
    size["1"] = None
    for state in rule.states:
        shape = (B, H, *(size[d] for d in (state.rows, state.cols) if d != "1"))
        if (state.rows, state.cols) == ("1", "1"):  # a weight total: positive
            values[state.name] = 1 + torch.rand(*shape, generator=g, dtype=torch.float64)
        elif state.rows == state.cols:  # a K x K state is a covariance: symmetric positive definite
            root = rand(*shape)
            values[state.name] = root @ root.transpose(-1, -2) / Kn + torch.eye(Kn, dtype=torch.float64)
        else:
            values[state.name] = rand(*shape)
        values[f"d{state.name}"] = rand(*shape)
    gradients = {n: x for step in adjoint.steps for n, x in step.inputs.items()} | adjoint.readout_inputs
    scalars = [n for n, x in gradients.items() if not hasattr(x, "terms")]
    for n in scalars:  # step sizes in (0, 1), log-gates below 0 (per key for a RowDot gradient)
        shape = (B, H, Kn) if isinstance(gradients[n], RowDot) else (B, H)
        values[n] = torch.rand(*shape, generator=g, dtype=torch.float64) * (-1 if n.startswith("g") else 1)
    gates = dict(rule.vectors)  # per-key gate leaves, exp_g = exp(g)
    names = {n: n for n in values} | {"scale": "scale"} | {leaf: leaf for leaf in gates}
    names |= {a.target: a.target for a in rule.readout} | {f"d{a.target}": f"d{a.target}" for a in rule.readout}

    # Forward with autograd: the assignments in order, then the read-out of the new states.
    leaves = {n: values[n].clone().requires_grad_() for n in [*states, "k", "v", "q", *scalars]}
    forward = dict(values, **leaves) | {leaf: torch.exp(leaves[gate]) for leaf, gate in gates.items()}
    values |= {leaf: torch.exp(values[gate]) for leaf, gate in gates.items()}
    current, before = {x: leaves[x] for x in states}, []
    for assign in rule.update:
        before.append({x: y.detach() for x, y in current.items()})
        current[assign.target] = evaluate(assign.value, dict(forward, **current), names)
    scope = dict(forward, **current)
    for assign in rule.readout:  # intermediates (mesa's h_reg), then the output
        scope[assign.target] = evaluate(assign.value, scope, names)
    output = scope[rule.readout[-1].target]
    loss = sum((values[f"d{x}"] * current[x]).sum() for x in states) + (values["do"] * output).sum()
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    # The derived reverse step.
    after = dict(values, **{x: y.detach() for x, y in current.items()})
    for assign in rule.readout[:-1]:
        after[assign.target] = evaluate(assign.value, after, names)
    for name, value in adjoint.readout_intermediates:
        after[f"d{name}"] = evaluate(value, after, names)
    adjoints = {x: values[f"d{x}"] + (evaluate(adjoint.readout[x], after, names) if x in adjoint.readout else 0)
                for x in states}
    torch.testing.assert_close(evaluate(adjoint.readout_query, after, names), expected["q"])
    found = {n: evaluate(value, after, names) for n, value in adjoint.readout_inputs.items()}
    for step, snapshot in zip(adjoint.steps, reversed(before)):
        context = dict(values, **snapshot, **{f"d{x}": y for x, y in adjoints.items()})
        for other, value in step.others.items():
            adjoints[other] = adjoints[other] + evaluate(value, context, names)
        for n, value in step.inputs.items():
            found[n] = found.get(n, 0) + evaluate(value, context, names)
        adjoints[step.name] = evaluate(step.target, context, names)
    for x in states:
        torch.testing.assert_close(adjoints[x], expected[x], msg=f"d{x}")
    for n, gradient in found.items():
        torch.testing.assert_close(gradient, expected[n], msg=f"d{n}")
    assert {"k", "v", *scalars} <= set(found)


def test_decay_gradient_pairs_through_frobenius():
    _, rule = derive_spec(SPECS / "simple_gla.yaml")
    assert derive_adjoint(rule).steps[0].inputs["g"].atoms(Frobenius)


def test_attention_forms_have_no_recurrent_adjoint():
    _, rule = derive_spec(SPECS / "softmax_attention.yaml")
    with pytest.raises(NotImplementedError):
        derive_adjoint(rule)
