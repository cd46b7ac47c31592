"""A per-query K x K system solved by the spec's iterative solver (`optimiser.solver: {method: cg, iterations: n}`):
a local-linear fit's, or a linear or affine memory's ridge solution (MesaNet as it is computed). The generated
ops compute n conjugate-gradient steps, as the oracle does on its own, and differentiate the system implicitly
(the adjoint system solved by the same n steps); the exact solve, outputs and gradients, is the reference they
converge to (K steps are exact in exact arithmetic)."""

from pathlib import Path

import pytest
import torch
import yaml

from ttr_codegen import oracle
from ttr_codegen.fuzz import _import_package, check_document
from ttr_codegen.spec import parse_spec

SPEC = ("name: cg_attention\nregressor: {class: local_polynomial, degree: 1}\nweights: {kernel: exp_dot}\n"
        "optimiser: {method: exact, ridge: 0.2%s}\n")


def _problem(T=12, K=4, V=3):
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(2, T, 2, d, dtype=torch.float64, generator=generator) for d in (K, K, V)]


@pytest.mark.parametrize("iterations", [1, 3])
def test_the_generated_ops_take_the_specs_steps(iterations, tmp_path):
    """Every op of the package (naive, flash, the layer) against the oracle's own conjugate gradients,
    outputs and gradients (the fuzzer's checks)."""
    document = yaml.safe_load(SPEC % f", solver: {{method: cg, iterations: {iterations}}}")
    outcome = check_document(document, tmp_path)
    assert outcome.status == "passed", f"{outcome.check}: {outcome.error}"
    assert {"naive", "naive_gradients", "flash", "layer"} <= set(outcome.checks)


def test_k_steps_reach_the_exact_solve_and_fewer_do_not(tmp_path):
    q, k, v = _problem()
    exact, _ = oracle.solve(parse_spec(SPEC % "", "x.yaml"), q, k, v, {})
    gaps = {}
    for iterations in (1, 2, 4):
        spec = parse_spec(SPEC % f", solver: {{method: cg, iterations: {iterations}}}", "x.yaml")
        found, _ = oracle.solve(spec, q, k, v, {})
        gaps[iterations] = (found - exact).abs().max().item()
    assert gaps[4] < 1e-10 and gaps[1] > 1e-3 and gaps[2] < gaps[1], gaps
    # The generated naive op with K steps is the exact solve too.
    document = yaml.safe_load(SPEC % ", solver: {method: cg, iterations: 4}")
    assert check_document(document, tmp_path).status == "passed"
    package = _import_package(tmp_path / "out" / "cg_attention")
    o, _ = package.naive_cg_attention(q, k, v)
    torch.testing.assert_close(o, exact, atol=1e-10, rtol=1e-9)


def test_implicit_gradients_reach_the_exact_solves():
    """At K steps the gradients are the exact solve's; at one step they are not (both solves implicit)."""
    q, k, v = _problem()
    d_out = torch.randn(2, 12, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def gradients(solver: str):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o, _ = oracle.solve(parse_spec(SPEC % solver, "x.yaml"), *leaves, {})
        return torch.autograd.grad((o * d_out).sum(), leaves)

    exact = gradients("")
    for iterations, close in ((4, True), (1, False)):
        found = gradients(f", solver: {{method: cg, iterations: {iterations}}}")
        gap = max((g - e).abs().max().item() for g, e in zip(found, exact))
        assert (gap < 1e-9) == close, (iterations, gap)



@pytest.mark.parametrize("document", [
    # A Gaussian kernel: a key-norm term in the log-weights.
    "name: cg_gauss\nregressor: {class: local_polynomial, degree: 1}\nweights: {kernel: gaussian, bandwidth: 2.0}\n"
    "optimiser: {method: exact, ridge: 0.3, solver: {method: cg, iterations: 3}}\n",
    # A window, a decay and sample weights: both biases of the log-weights.
    "name: cg_biased\nregressor: {class: local_polynomial, degree: 1}\n"
    "weights: {kernel: exp_dot, window: 6, decay: g, sample_weight: c}\n"
    "optimiser: {method: exact, ridge: 0.2, solver: {method: cg, iterations: 4}}\n"
    "inputs:\n  g: {shape: [B, T, H], role: log_decay}\n  c: {shape: [B, T, H], role: sample_weight}\n",
], ids=["gaussian", "window_decay_sample_weight"])
def test_the_kernels_gradients_reach_every_input(document, tmp_path):
    """The Triton kernels (under the interpreter on a CPU) against the oracle, outputs and the gradient of every
    input, with fewer steps than K (unconverged: both differentiate implicitly)."""
    outcome = check_document(yaml.safe_load(document), tmp_path)
    assert outcome.status == "passed", f"{outcome.check}: {outcome.error}"
    assert "flash_triton" in outcome.checks


RIDGE_MEMORIES = {
    # MesaNet's form: a decay, sample weights and a ridge per key channel.
    "linear": "name: cg_ridge\nregressor: linear\nweights: {decay: g, sample_weight: c}\n"
              "optimiser: {method: exact, ridge: lam, solver: {method: cg, iterations: 2}}\ninputs:\n"
              "  g: {shape: [B, T, H], role: log_decay}\n  c: {shape: [B, T, H], role: sample_weight}\n"
              "  lam: {shape: [H, K], role: ridge}\n",
    # An intercept: the fit's centred slope system.
    "affine": "name: cg_affine\nregressor: {class: affine}\nweights: {decay: g}\n"
              "optimiser: {method: exact, ridge: 0.5, solver: {method: cg, iterations: 2}}\ninputs:\n"
              "  g: {shape: [B, T, H], role: log_decay}\n",
}


@pytest.mark.parametrize("regressor", RIDGE_MEMORIES)
def test_ridge_memories_take_the_specs_steps(regressor, tmp_path):
    """Two steps (unconverged) against the oracle's own: every op, outputs and gradients, the derived backward, the
    steps in Triton (under the interpreter)."""
    outcome = check_document(yaml.safe_load(RIDGE_MEMORIES[regressor]), tmp_path)
    assert outcome.status == "passed", f"{outcome.check}: {outcome.error}"
    chunked = {"chunk", "chunk_gradients", "chunk_cg_triton"} if regressor == "linear" else set()
    expected = {"naive", "naive_gradients", "naive_backward", "layer"} | chunked
    assert expected <= set(outcome.checks)


def test_mesa_cg_converges_to_mesa():
    """The catalogue's mesa_cg (30 steps) at K = 8 is the exact mesa, outputs and gradients; at 3 steps it is not."""
    from generated.mesa import naive_mesa
    from generated.mesa_cg import chunk_mesa_cg, naive_mesa_cg

    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 20, 2, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, 20, 2, dtype=torch.float64, generator=generator) + 2)
    beta = torch.rand(2, 20, 2, dtype=torch.float64, generator=generator)
    lamb = 0.2 + torch.rand(2, 8, dtype=torch.float64, generator=generator)
    d_out = torch.randn(2, 20, 2, 8, dtype=torch.float64, generator=generator)

    def run(op):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, lamb)]
        o, _ = op(*leaves, chunk_size=8) if op is chunk_mesa_cg else op(*leaves)
        return (o, *torch.autograd.grad((o * d_out).sum(), leaves))

    exact = run(naive_mesa)
    for op in (naive_mesa_cg, chunk_mesa_cg):
        for found, expected in zip(run(op), exact):
            torch.testing.assert_close(found, expected, atol=1e-9, rtol=1e-8)
    spec = parse_spec((Path(__file__).parents[1] / "specs" / "mesa_cg.yaml").read_text().replace("iterations: 30", "iterations: 3"), "x.yaml")
    three_steps, _ = oracle.solve(spec, q, k, v, {"g": g, "beta": beta, "lamb": lamb})
    assert (three_steps - exact[0]).abs().max() > 1e-3
