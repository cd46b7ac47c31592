"""Stage 2: the derivation, checked symbolically and numerically (identities of ttr-math.md §7)."""

from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
from sympy import MatrixSymbol, Trace, Transpose

from numeric import evaluate, random_matrices, scalars_for
from ttr_codegen.derive import derive
from ttr_codegen.derive.algebra import K, V, MatPoly, sherman_morrison, trace_gradient
from ttr_codegen.derive.derivation import S, k, q, v
from ttr_codegen.spec import load_spec, parse_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
KN, VN = 5, 3


def rule(name):
    return derive(load_spec(SPECS / f"{name}.yaml"))


def update_of(name, target="S"):
    return next(a.value for a in rule(name).update if a.target == target)


def numeric_update(name, scalars, target="S"):
    return evaluate(update_of(name, target), random_matrices(KN, VN), scalars, KN)


def test_gradient_of_the_sample_loss():
    residual = S.T * k - v
    gradient = trace_gradient([(sp.Rational(1, 2), Trace(residual.T * residual))], S)
    expected = MatPoly.from_expr(k * k.T * S - k * v.T)
    assert gradient == expected


def test_sums_of_traces_are_differentiated_term_by_term():
    # SymPy alone returns 0 for this sum; the derivation must not.
    X = MatrixSymbol("X", K, V)
    beta = sp.Symbol("beta")
    residual = S.T * k - v
    terms = [(sp.Rational(1, 2), Trace((S - X).T * (S - X))), (beta / 2, Trace(residual.T * residual))]
    gradient = trace_gradient(terms, S)
    assert gradient == MatPoly.from_expr(S - X + beta * k * k.T * S - beta * k * v.T)


def test_sherman_morrison_numerically():
    m = random_matrices(KN, VN)
    s = 0.7
    inverse = sherman_morrison(MatPoly.identity(K, scale=sp.Rational(1, 2)), k, q, s)
    expected = np.linalg.inv(2 * np.eye(KN) + s * m["k"] @ m["q"].T)
    np.testing.assert_allclose(evaluate(inverse, m, {}, KN), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear_attention", "retnet", "simple_gla"])
def test_gated_linear_attention_is_minus_the_gradient_at_zero(name):
    g = {"linear_attention": None, "retnet": "g_gamma", "simple_gla": "g"}[name]
    scalars = scalars_for(*(["g", "g_gamma"]))
    m = random_matrices(KN, VN)
    alpha = np.exp(scalars[g]) if g else 1.0
    np.testing.assert_allclose(numeric_update(name, scalars), alpha * m["S"] + m["k"] @ m["v"].T, rtol=1e-12)


def test_gla_decays_key_channels():
    m = random_matrices(KN, VN)
    expected = np.diag(m["exp_g"][:, 0]) @ m["S"] + m["k"] @ m["v"].T
    np.testing.assert_allclose(numeric_update("gla", {}), expected, rtol=1e-12)


def test_delta_rule():
    m, scalars = random_matrices(KN, VN), scalars_for("beta")
    b = scalars["beta"]
    expected = (np.eye(KN) - b * m["k"] @ m["k"].T) @ m["S"] + b * m["k"] @ m["v"].T
    np.testing.assert_allclose(numeric_update("delta_rule", scalars), expected, rtol=1e-12)


def test_gated_delta_rule_is_decay_then_step():
    m, scalars = random_matrices(KN, VN), scalars_for("beta", "g")
    a, b = np.exp(scalars["g"]), scalars["beta"]
    expected = a * (np.eye(KN) - b * m["k"] @ m["k"].T) @ m["S"] + b * m["k"] @ m["v"].T
    np.testing.assert_allclose(numeric_update("gated_delta_rule", scalars), expected, rtol=1e-12)


def test_weight_decay_reading_equals_gdn_after_reparameterising():
    m, scalars = random_matrices(KN, VN), scalars_for("beta", "g")
    a, b = np.exp(scalars["g"]), scalars["beta"]
    l2 = numeric_update("gated_delta_rule_l2", scalars)
    # GDN form with beta' = beta / alpha and v' = alpha v
    b2, v2 = b / a, a * m["v"]
    gdn = a * (np.eye(KN) - b2 * m["k"] @ m["k"].T) @ m["S"] + b2 * m["k"] @ v2.T
    np.testing.assert_allclose(l2, gdn, rtol=1e-12)
    assert any("beta' = beta*exp(-g)" in e and "v' = (exp(g)) v" in e for e in rule("gated_delta_rule_l2").equivalences)


def test_implicit_step_solves_its_normal_equations():
    m, scalars = random_matrices(KN, VN), scalars_for("beta")
    b = scalars["beta"]
    closed_form = numeric_update("longhorn", scalars)
    # normal equations of argmin 1/2||Y - S||^2 + b/2 ||Y^T k - v||^2
    expected = np.linalg.solve(np.eye(KN) + b * m["k"] @ m["k"].T, m["S"] + b * m["k"] @ m["v"].T)
    np.testing.assert_allclose(closed_form, expected, rtol=1e-12)
    assert rule("longhorn").structure == "delta"
    assert any("delta rule" in e and "beta/(beta*(k^T k) + 1)" in e for e in rule("longhorn").equivalences)


def test_recursive_least_squares_matches_the_math():
    m, scalars = random_matrices(KN, VN), scalars_for("g")
    a = np.exp(scalars["g"])
    P, kk = m["P"], m["k"]
    denominator = a + (kk.T @ P @ kk).item()
    P_new = (P - P @ kk @ kk.T @ P / denominator) / a
    np.testing.assert_allclose(numeric_update("rls", scalars, "P"), P_new, rtol=1e-11)
    S_new = m["S"] + P_new @ kk @ (m["v"].T - kk.T @ m["S"])
    np.testing.assert_allclose(numeric_update("rls", scalars, "S"), S_new, rtol=1e-11)
    # and P_new is the inverse of the decayed statistics a P^-1 + k k^T
    np.testing.assert_allclose(P_new, np.linalg.inv(a * np.linalg.inv(P) + kk @ kk.T), rtol=1e-10)


def test_momentum():
    m, scalars = random_matrices(KN, VN), scalars_for("theta", "eta", "alpha")
    gradient = m["k"] @ (m["k"].T @ m["S"] - m["v"].T)
    Z = scalars["eta"] * m["Z"] - scalars["theta"] * gradient
    np.testing.assert_allclose(numeric_update("titans_linear", scalars, "Z"), Z, rtol=1e-12)
    assert str(update_of("titans_linear")) == "(1 - alpha) S + Z"
    assert rule("titans_linear").structure == "stacked-affine"


def test_exact_solution_statistics_and_readout():
    r = rule("mesa")
    m, scalars = random_matrices(KN, VN), scalars_for("g", "beta")
    a, b = np.exp(scalars["g"]), scalars["beta"]
    h_kk = evaluate(r.update[0].value, m, scalars, KN)
    np.testing.assert_allclose(h_kk, a * m["h_kk"] + b * m["k"] @ m["k"].T, rtol=1e-12)
    readout = r.readout[-1].value
    m["h_reg"] = m["h_kk"]
    o = evaluate(readout, m, scalars, KN)
    np.testing.assert_allclose(o, scalars["scale"] * m["h_kv"].T @ np.linalg.solve(m["h_kk"], m["q"]), rtol=1e-12)


@pytest.mark.parametrize(("name", "structure"), [
    ("linear_attention", "additive"), ("retnet", "additive"), ("simple_gla", "additive"), ("gla", "diagonal"),
    ("delta_rule", "delta"), ("gated_delta_rule", "delta"), ("gated_delta_rule_l2", "delta"),
    ("longhorn", "delta"), ("delta_product", "delta-product"), ("titans_linear", "stacked-affine"),
    ("mesa", "second-order"), ("rls", "second-order"),
])
def test_classification(name, structure):
    assert rule(name).structure == structure


def test_schedule_never_changes_the_math():
    text = (SPECS / "gated_delta_rule.yaml").read_text()
    other = text.replace("chunk_size: 64", "chunk_size: 32")
    assert other != text
    a, b = parse_spec(text, "a.yaml"), parse_spec(other, "b.yaml")
    assert a.math_hash() == b.math_hash()
    assert derive(a) == derive(b)


def test_per_key_decay_with_a_step_is_diagonal_plus_rank_one():
    spec = parse_spec("""
name: kda_like
inputs:
  g: {shape: [B, T, H, K], role: log_decay}
  beta: {shape: [B, T, H], role: step_size}
regressor: linear
weights: {decay: g}
optimiser: {method: online_gradient_step, step_size: beta}
""")
    r = derive(spec)
    assert r.structure == "diagonal-plus-rank-one"
    m, scalars = random_matrices(KN, VN), scalars_for("beta")
    D = np.diag(m["exp_g"][:, 0])
    X = D @ m["S"]
    expected = X - scalars["beta"] * m["k"] @ (m["k"].T @ X - m["v"].T)
    np.testing.assert_allclose(evaluate(r.update[0].value, m, scalars, KN), expected, rtol=1e-12)


def test_canonical_form_contracts_inner_products():
    poly = MatPoly.from_expr(k * k.T * k * v.T)
    (chain, coefficient), = poly.terms
    assert chain == (k, Transpose(v))
    assert str(coefficient) == "(k^T k)"


@pytest.mark.parametrize(("name", "error_read"), [
    ("gated_delta_rule", "decayed"),  # S_t = e^g (I - beta k k^T) S + beta k v^T
    ("gated_delta_rule_l2", "previous"),  # S_t = (e^g I - beta k k^T) S + beta k v^T
    ("delta_rule", "decayed"),
])
def test_delta_chunks_keep_beta_free_of_one_over_the_gate(name, error_read):
    # Reading the decayed state would give the L2 reading beta * exp(-g): infinite as the gate closes.
    from ttr_codegen.lower import lower_chunk

    chunk = lower_chunk(load_spec(SPECS / f"{name}.yaml"), rule(name))
    assert chunk.family == "delta" and chunk.error_read == error_read
    assert not any(line.startswith("beta =") and "exp(-" in line for line in chunk.prep_lines)
    assert not any(line.startswith("v =") for line in chunk.prep_lines)


def test_longhorn_step_runs_in_the_prepare_kernel():
    # beta / (1 + beta k.k) becomes Triton lines on a block of key rows; the torch form keeps its host lines.
    from types import SimpleNamespace

    from ttr_codegen.lower import lower_chunk

    chunk = lower_chunk(load_spec(SPECS / "longhorn.yaml"), rule("longhorn"))
    assert chunk.step_input == "beta" and chunk.kernel_step[-1].startswith("beta = ")
    assert any("kT_k" in line for line in chunk.prep_lines)
    assert chunk.triton_prep_lines == ()  # nothing left for the host
    tl = SimpleNamespace(sum=lambda x, axis: x.sum(axis), exp=torch.exp)
    g = torch.Generator().manual_seed(0)
    rows_k, beta = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    scope = {"tl": tl, "k": rows_k, "beta": beta}
    exec("\n".join(chunk.kernel_step), scope)
    torch.testing.assert_close(scope["beta"], beta / (1 + beta * (rows_k * rows_k).sum(-1)))
    plain = lower_chunk(load_spec(SPECS / "delta_rule.yaml"), rule("delta_rule"))
    assert plain.kernel_step == () and plain.triton_prep_lines == plain.prep_lines
