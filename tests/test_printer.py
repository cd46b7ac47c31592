"""The torch printer: the code it prints (as a string) and the numbers that code computes."""

import sympy as sp
import torch
from sympy import DiagMatrix, Inverse, MatrixSymbol, Transpose

from ttr_codegen.derive.algebra import K, V, MatPoly
from ttr_codegen.derive.derivation import S, k, q, v
from ttr_codegen.render.torch_printer import TokenProgram

NAMES = {"S": "S", "k": "k_t", "v": "v_t", "q": "q_t", "beta": "beta_t", "P": "P", "a": "a", "scale": "scale"}


def program():
    return TokenProgram(names=dict(NAMES), dims={K: "K", V: "V"}, python_scalars=frozenset({"scale"}))


def execute(lines, expression, values):
    scope = dict(values, torch=torch, acc=torch.float64)
    exec("\n".join(lines + [f"result = {expression}"]), scope)
    return scope["result"]


def data(B=2, H=3, Kn=5, Vn=4):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, H, Kn, Kn, generator=g, dtype=torch.float64)
    return {
        "S": torch.randn(B, H, Kn, Vn, generator=g, dtype=torch.float64),
        "k_t": torch.randn(B, H, Kn, generator=g, dtype=torch.float64),
        "v_t": torch.randn(B, H, Vn, generator=g, dtype=torch.float64),
        "q_t": torch.randn(B, H, Kn, generator=g, dtype=torch.float64),
        "beta_t": torch.rand(B, H, generator=g, dtype=torch.float64),
        "P": A @ A.transpose(-1, -2) + Kn * torch.eye(Kn, dtype=torch.float64),
        "a": torch.rand(B, H, Kn, generator=g, dtype=torch.float64),
        "scale": 0.5,
    }


def test_delta_update_string_and_value():
    beta = sp.Symbol("beta", real=True)
    update = MatPoly.from_expr(S - beta * k * k.T * S + beta * k * v.T)
    p = program()
    expression = p.poly(update)
    assert p.lines == [
        'k_vT = torch.einsum("...k,...v->...kv", k_t, v_t)',
        'kT_S = torch.einsum("...k,...kv->...v", k_t, S)',
        'k_kT_S = torch.einsum("...k,...v->...kv", k_t, kT_S)',
    ]
    assert expression == "S + beta_t[..., None, None] * k_vT - beta_t[..., None, None] * k_kT_S"
    d = data()
    kk = d["k_t"][..., :, None] * d["k_t"][..., None, :]
    expected = d["S"] - d["beta_t"][..., None, None] * (kk @ d["S"]) + d["beta_t"][..., None, None] * (
        d["k_t"][..., :, None] * d["v_t"][..., None, :])
    torch.testing.assert_close(execute(p.lines, expression, d), expected)
    # matrix-chain order: k (k^T S) costs 2KV, never K^2 V
    assert p.cost == 3 * K * V


def test_inner_products_become_scalar_temporaries():
    beta = sp.Symbol("beta", real=True)
    update = MatPoly.from_expr(k * v.T).scaled(beta / (1 + beta * MatPoly.from_expr(k.T * k).scalar()))
    p = program()
    expression = p.poly(update)
    assert "kT_k = (k_t * k_t).sum(-1)" in p.lines
    assert "c0 = beta_t/(beta_t*kT_k + 1)" in p.lines
    d = data()
    eps = d["beta_t"] / (1 + d["beta_t"] * (d["k_t"] ** 2).sum(-1))
    torch.testing.assert_close(execute(p.lines, expression, d),
                               eps[..., None, None] * d["k_t"][..., :, None] * d["v_t"][..., None, :])


def test_diagonal_inverse_and_transpose():
    P = MatrixSymbol("P", K, K)
    a = MatrixSymbol("a", K, 1)
    p = program()
    gated = p.poly(MatPoly.leaf(DiagMatrix(a)) @ MatPoly.leaf(S))
    solved = p.poly(MatPoly.leaf(Transpose(S)) @ MatPoly.leaf(Inverse(P)) @ MatPoly.leaf(q).scaled(
        sp.Symbol("scale", positive=True)))
    assert "torch.linalg.solve(P, q_t)" in "\n".join(p.lines)
    assert solved.startswith("scale * ")  # a Python number needs no broadcasting
    d = data()
    torch.testing.assert_close(execute(p.lines, gated, d), d["a"][..., :, None] * d["S"])
    expected = 0.5 * (d["S"].transpose(-1, -2) @ torch.linalg.solve(d["P"], d["q_t"][..., None]))[..., 0]
    torch.testing.assert_close(execute(p.lines, solved, d), expected)


def test_products_are_computed_once_and_forgotten_after_reassignment():
    beta = sp.Symbol("beta", real=True)
    p = program()
    first = p.poly(MatPoly.from_expr(beta * k * k.T * S))
    second = p.poly(MatPoly.from_expr(k * k.T * S))
    assert first.endswith("k_kT_S") and second == "k_kT_S"
    assert sum("k_kT_S =" in line for line in p.lines) == 1
    p.forget("S")
    p.lines = []
    p.poly(MatPoly.from_expr(k * k.T * S))
    assert any(line.startswith("kT_S =") for line in p.lines)
