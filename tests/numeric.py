"""Evaluate canonical matrix polynomials with numbers (numpy), to check rewrites numerically."""

import numpy as np
import sympy as sp
from sympy import DiagMatrix, Inverse, Transpose

from ttr_codegen.derive.algebra import Inner, MatPoly


def leaf_value(leaf, matrices: dict) -> np.ndarray:
    if isinstance(leaf, Transpose):
        return leaf_value(leaf.arg, matrices).T
    if isinstance(leaf, DiagMatrix):
        return np.diag(leaf_value(leaf.args[0], matrices)[:, 0])
    if isinstance(leaf, Inverse):
        return np.linalg.inv(leaf_value(leaf.arg, matrices))
    return matrices[leaf.name]


def chain_value(chain, matrices: dict, n: int) -> np.ndarray:
    if not chain:
        return np.eye(n)
    value = leaf_value(chain[0], matrices)
    for leaf in chain[1:]:
        value = value @ leaf_value(leaf, matrices)
    return value


def evaluate(poly: MatPoly, matrices: dict, scalars: dict, n: int) -> np.ndarray:
    """poly with leaves from `matrices` (by name) and scalar symbols from `scalars` (by name)."""
    total = 0
    for chain, coefficient in poly.terms:
        inner_values = {inner: chain_value(inner.args, matrices, n).item() for inner in coefficient.atoms(Inner)}
        coefficient = coefficient.xreplace(inner_values)
        c = float(coefficient.subs({s: scalars[s.name] for s in coefficient.free_symbols}))
        total = total + c * chain_value(chain, matrices, n)
    return np.asarray(total)


def random_matrices(K: int, V: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((K, K))
    spd = A @ A.T + K * np.eye(K)
    return {
        "S": rng.standard_normal((K, V)), "X": rng.standard_normal((K, V)), "Z": rng.standard_normal((K, V)),
        "k": rng.standard_normal((K, 1)), "q": rng.standard_normal((K, 1)), "v": rng.standard_normal((V, 1)),
        "P": np.linalg.inv(spd), "h_kk": spd, "h_kv": rng.standard_normal((K, V)),
        "exp_g": rng.uniform(0.5, 1.0, (K, 1)),
    }


def scalars_for(*names, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {name: float(rng.uniform(0.1, 0.9)) for name in names} | {"scale": 0.5}


__all__ = ["evaluate", "random_matrices", "scalars_for", "sp"]
