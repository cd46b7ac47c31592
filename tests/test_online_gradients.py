"""The derived gradients of nonlinear memories' losses (ttr_codegen.derive.online) against torch autograd of
an independent forward written with torch's own layer norm and activations, in float64."""

import pytest
import torch
import torch.nn.functional as F

from ttr_codegen.derive import online

LEAD, N, D, HIDDEN = (2, 3), 5, 8, 16  # (batch, head), rows of a mini-batch, model width, MLP width


def _inputs(names_and_shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*LEAD, *shape, generator=generator, dtype=torch.float64) * 0.5
            for name, shape in names_and_shapes.items()}


def _ttt_linear_forward(x, W, b, ln_weight, ln_bias):
    z = x @ W + b
    return F.layer_norm(z, (D,), eps=1e-6) * ln_weight + ln_bias


def _ttt_mlp_forward(x, W1, b1, W2, b2, ln_weight, ln_bias):
    hidden = F.gelu(x @ W1 + b1, approximate="tanh")
    return F.layer_norm(hidden @ W2 + b2, (D,), eps=1e-6) * ln_weight + ln_bias


def _titans_mlp_forward(x, W1, W2):
    return F.silu(x @ W1) @ W2


CASES = {
    "ttt_linear": (online.ttt_linear, _ttt_linear_forward,
                   {"x": (N, D), "W": (D, D), "b": (1, D), "ln_weight": (1, D), "ln_bias": (1, D)}),
    "ttt_mlp": (online.ttt_mlp, _ttt_mlp_forward,
                {"x": (N, D), "W1": (D, HIDDEN), "b1": (1, HIDDEN), "W2": (HIDDEN, D), "b2": (1, D),
                 "ln_weight": (1, D), "ln_bias": (1, D)}),
    "titans_mlp": (online.titans_mlp, _titans_mlp_forward, {"x": (N, D), "W1": (D, HIDDEN), "W2": (HIDDEN, D)}),
}


@pytest.mark.parametrize("name", CASES)
def test_derived_gradients_match_autograd(name):
    """Every fast weight's gradient of 1/2 sum_i eta_i ||f(x_i) - y_i||^2, from the printed lines, equals
    autograd's; so does the printed forward's output."""
    build, forward, shapes = CASES[name]
    program, output, fast_weights = build()
    target, eta = program.input("target", online.ROWS), program.input("eta", online.COLUMN)
    values = _inputs(shapes)
    values["target"] = torch.randn(*LEAD, N, D, dtype=torch.float64)
    values["eta"] = torch.rand(*LEAD, N, 1, dtype=torch.float64)

    code = "\n".join(online.forward_lines(program) + online.gradient_lines(program, output, target, eta, fast_weights))
    assert "grad" not in code and "backward" not in code  # explicit formulas only
    namespace = {"torch": torch, **values}
    exec(code, namespace)

    leaves = {w.name: values[w.name].clone().requires_grad_(True) for w in fast_weights}
    out = forward(**{k: leaves.get(k, v) for k, v in values.items() if k in shapes})
    loss = 0.5 * (values["eta"] * (out - values["target"]) ** 2).sum()
    expected = torch.autograd.grad(loss, list(leaves.values()))
    torch.testing.assert_close(namespace[output.name], out.detach(), rtol=1e-10, atol=1e-10)
    for w, g in zip(fast_weights, expected, strict=True):
        torch.testing.assert_close(namespace[f"d_{w.name}"], g, rtol=1e-9, atol=1e-10, msg=f"d_{w.name}")


def test_gradient_of_a_weight_the_output_ignores_is_refused():
    program, output, _ = online.titans_mlp()
    unused = program.input("unused", online.MATRIX)
    target, eta = program.input("target", online.ROWS), program.input("eta", online.COLUMN)
    with pytest.raises(ValueError, match="does not depend"):
        online.gradient_lines(program, output, target, eta, [unused])


def test_elementwise_functions_print_as_torch_with_numeric_constants():
    """GELU's sqrt(2 / pi) becomes a number (torch.sqrt takes tensors only); its derivative prints too."""
    printed = online.print_elementwise(online.GELU_TANH, "z")
    assert "pi" not in printed and "torch.sqrt" not in printed and "torch.tanh(" in printed
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(eval(printed, {"torch": torch, "z": z}), F.gelu(z, approximate="tanh"))


def test_silu_gradient_stays_finite_where_exp_overflows():
    """Pre-activations of -100 overflow exp(-x) in float32: the derived SiLU derivative (through sigmoid)
    stays finite and equal to autograd's."""
    program, output, fast_weights = online.titans_mlp()
    target, eta = program.input("target", online.ROWS), program.input("eta", online.COLUMN)
    code = "\n".join(online.forward_lines(program) + online.gradient_lines(program, output, target, eta, fast_weights))
    x = torch.zeros(1, 2, D)
    x[..., 0] = 1.0
    W1 = torch.zeros(1, D, HIDDEN)
    W1[0, 0] = torch.linspace(-100.0, 100.0, HIDDEN)  # the pre-activations, -100 .. 100
    W2 = torch.randn(1, HIDDEN, D, generator=torch.Generator().manual_seed(0))
    values = {"x": x, "W1": W1, "W2": W2, "target": torch.zeros(1, 2, D), "eta": torch.ones(1, 2, 1)}
    namespace = {"torch": torch, **values}
    exec(code, namespace)
    leaves = [W1.clone().requires_grad_(True), W2.clone().requires_grad_(True)]
    loss = 0.5 * (_titans_mlp_forward(x, *leaves) ** 2).sum()
    for name, g in zip(["W1", "W2"], torch.autograd.grad(loss, leaves)):
        assert torch.isfinite(namespace[f"d_{name}"]).all(), name
        torch.testing.assert_close(namespace[f"d_{name}"], g, rtol=1e-5, atol=1e-5)
