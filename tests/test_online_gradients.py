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


def test_derived_lines_run_as_ttt_linear_reproduce_fla_reference():
    """TTT-Linear, token by token from the derived lines: per mini-batch, the loss's gradient at each key
    row's pre-activation z (asked for as an intermediate adjoint), row i's weights the start weights minus
    eta_i times the gradients of rows j <= i, the output z + LN(z) at the query (fla's reading), the state
    moved by the mini-batch's last eta. Against fla-core's chunk_ttt_linear_ref (float32 inside)."""
    from fla.ops.ttt.naive import chunk_ttt_linear_ref

    B, T, H, n, eps = 2, 32, 2, 16, 1e-6
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, D, generator=generator, dtype=torch.float64) for _ in range(3))
    eta = torch.rand(B, T, H, 1, generator=generator, dtype=torch.float64) * 0.1
    ln_weight = 1 + 0.1 * torch.randn(H, D, generator=generator, dtype=torch.float64)
    ln_bias = 0.1 * torch.randn(H, D, generator=generator, dtype=torch.float64)
    W0 = 0.1 * torch.randn(B, H, D, D, generator=generator, dtype=torch.float64)
    b0 = 0.1 * torch.randn(B, H, 1, D, generator=generator, dtype=torch.float64)

    program, _, _ = online.ttt_linear(eps)
    z = next(op.out for op in program.ops if op.out.name == "z")
    target, rate = program.input("target", online.ROWS), program.input("eta", online.COLUMN)
    ln = next(op.out for op in program.ops if op.out.name == "ln")
    code = "\n".join(online.forward_lines(program) + online.gradient_lines(program, ln, target, rate, [z]))

    rows = lambda x: x.transpose(1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    qs, ks, vs, etas = rows(q) * D ** -0.5, rows(k), rows(v), rows(eta)
    W, b, outputs = W0.clone(), b0.clone(), []
    for start in range(0, T, n):
        batch = slice(start, start + n)
        x, y = ks[:, :, batch], vs[:, :, batch]
        namespace = {"torch": torch, "x": x, "W": W, "b": b, "ln_weight": ln_weight[:, None], "ln_bias": ln_bias[:, None],
                     "target": y - x, "eta": torch.ones_like(x[..., :1])}
        exec(code, namespace)
        dz = namespace["d_z"]  # [B, H, n, D]: row j's gradient at its pre-activation
        step = etas[:, :, batch]  # [B, H, n, 1]
        W_rows = W[:, :, None] - step[..., None] * torch.cumsum(x[..., :, None] * dz[..., None, :], dim=2)
        b_rows = b - step * torch.cumsum(dz, dim=2)
        z_q = (qs[:, :, batch, None, :] @ W_rows).squeeze(-2) + b_rows
        outputs.append(z_q + F.layer_norm(z_q, (D,), eps=eps) * ln_weight[:, None] + ln_bias[:, None])
        W, b = W_rows[:, :, -1], b_rows[:, :, -1:]
    ours = torch.cat(outputs, dim=2).transpose(1, 2)

    theirs, final, final_bias = chunk_ttt_linear_ref(
        q.float().clone(), k.float(), v.float(), ln_weight.float(), ln_bias.float(), eta.float(), eps=eps,
        mini_batch_size=n, initial_state=W0.float(), initial_state_bias=b0.float(), output_final_state=True)
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(W.float(), final, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(b.float(), final_bias, rtol=2e-4, atol=2e-4)
