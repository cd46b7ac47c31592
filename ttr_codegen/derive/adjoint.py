"""The adjoint of a derived per-token rule: its reverse-mode derivative, symbolically.

Training runs the recurrence backwards in time. With dS the adjoint of the state after a token (the
gradient of the loss with respect to it) and do the adjoint of the token's output, every input's
gradient is a vector-Jacobian product of the token's update or read-out:

    d x = d/dx [ <dS, update(S, k, v, beta, ...)> + <do, readout(S, q)> ],   <A, B> = tr(A^T B).

On the canonical form this is exact bookkeeping on chains: an occurrence L X R of a leaf X in a term
contributes L^T dS R^T (R dS^T L for an occurrence of X^T), and a per-key gate x inside Diag(x) gets the
diagonal of that, a `RowDot`. A coefficient that depends on an input through an inner product
(Longhorn's beta / (1 + beta k^T k)) adds the chain rule through that inner product (SymPy
differentiates the coefficient); a scalar input's gradient is the sum over terms of d(coefficient)/dx
times the term's pairing with dS. A pairing <dS, chain> is rotated (the trace is cyclic) to start at a
row vector, so it is an `Inner` like the forward's scalars; a chain with no vector (a decay term's S)
pairs through `Frobenius`.

Scope: rules with one K x V state (the linear family, per-key gates included). Stacked states (Titans'
momentum) and the second-order rules raise NotImplementedError for now.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy import DiagMatrix, MatrixSymbol, Transpose

from .algebra import Inner, K, MatPoly, V, _tidy
from .derivation import S, q
from .rule import UpdateRule

STATE_ADJOINT = MatrixSymbol("dS", K, V)  # the adjoint of the state after the token
OUTPUT_ADJOINT = MatrixSymbol("do", V, 1)  # the adjoint of the token's output


class Frobenius(sp.Function):
    """<A, B> = tr(A^T B) of two matrices of one shape: e.g. a decay's gradient <dS, S>."""

    is_commutative = True
    is_real = True

    def _sympystr(self, printer):
        return f"<{printer._print(self.args[0])}, {printer._print(self.args[1])}>"


@dataclass(frozen=True)
class RowDot:
    """The vector with entries sum_j left_ij right_ij: the gradient of a per-key gate vector x inside
    Diag(x) (the diagonal of left right^T)."""

    left: MatPoly
    right: MatPoly
    times: MatrixSymbol | None = None  # then the result times this vector, entry by entry

    def __str__(self) -> str:
        text = f"rowsum(({self.left}) o ({self.right}))"
        return f"{self.times} o {text}" if self.times is not None else text


@dataclass(frozen=True)
class Adjoint:
    """The reverse-mode step of one token (one sub-step for rules with several per token).

    `state` pulls dS back through the update (the adjoint of the state before the token); `inputs` maps
    each per-token input to its gradient, a MatPoly for vectors (k, v) and a SymPy scalar for scalars
    (beta, g, ...), in dS and S (the state before the token). `readout_state` is what the token's output
    adds to dS (in do and q) and `readout_query` is dq (in do and S, the state the query reads).
    """

    state: MatPoly
    inputs: dict
    readout_state: MatPoly
    readout_query: MatPoly

    def lines(self) -> list[str]:
        """One token's reverse step in order, one line per gradient, for `ttr explain`."""
        rows = [f"dS += {self.readout_state}  (the token's output)",
                f"dq = {self.readout_query}  (S after the token)"]
        rows += [f"d{name} = {value}" for name, value in self.inputs.items()]
        return rows + [f"dS <- {self.state}  (the adjoint of the state before the token)"]


def pairing(adjoint: MatrixSymbol, chain: tuple) -> sp.Expr:
    """<adjoint, chain> as a scalar: tr(adjoint^T chain), rotated to start at a row vector."""
    cycle = (Transpose(adjoint),) + tuple(chain)
    for start, leaf in enumerate(cycle):
        if leaf.shape[0] == 1:  # a row vector: the rotated cycle runs row ... column, a 1 x 1 chain
            rotated = cycle[start:] + cycle[:start]
            return MatPoly.build(1, 1, [(rotated, sp.Integer(1))]).scalar()
    if len(chain) == 1:
        return Frobenius(adjoint, chain[0])
    raise NotImplementedError(f"no adjoint pairing for the chain {chain}")


def _product(chain: tuple, rows) -> MatPoly:
    """A chain as a MatPoly (the identity of size `rows` when empty)."""
    if not chain:
        return MatPoly.identity(rows)
    return MatPoly.build(chain[0].shape[0], chain[-1].shape[1], [(tuple(chain), sp.Integer(1))])


def _chain_vjp(chain: tuple, adjoint: MatPoly, wrt) -> MatPoly | RowDot | None:
    """d/d wrt <adjoint, chain> for one chain: for each occurrence L X R, L^T adjoint R^T (transposed for
    an occurrence of X^T); for a diagonal Diag(x), the diagonal of that, a RowDot. None: wrt is absent."""
    total = None
    for i, leaf in enumerate(chain):
        left = _product(chain[:i], adjoint.rows)
        right = _product(chain[i + 1:], leaf.shape[1])
        if leaf == wrt:
            term = left.T() @ adjoint @ right.T()
        elif leaf == Transpose(wrt):
            term = right @ adjoint.T() @ left
        elif isinstance(leaf, DiagMatrix) and leaf.args[0] == wrt:
            if total is not None:
                raise NotImplementedError(f"{wrt} appears twice in {chain}")
            return RowDot(left.T() @ adjoint, right)  # diag(L^T G R^T)_i = sum_j (L^T G)_ij R_ij
        else:
            continue
        total = term if total is None else total + term
    return total


def _coefficient_derivative(coeff: sp.Expr, wrt) -> list[tuple[sp.Expr, Inner]]:
    """(d coeff / d inner, inner) for every inner product in coeff that reads the matrix symbol `wrt`."""
    terms = []
    for inner in sorted(coeff.atoms(Inner), key=sp.srepr):
        if wrt in inner.atoms(MatrixSymbol):
            placeholder = sp.Dummy("inner")
            derivative = sp.diff(coeff.xreplace({inner: placeholder}), placeholder).xreplace({placeholder: inner})
            terms.append((derivative, inner))
    return terms


def vjp(poly: MatPoly, adjoint: MatrixSymbol, wrt: MatrixSymbol) -> MatPoly | RowDot:
    """d/d wrt <adjoint, poly>, with the chain rule through coefficients' inner products."""
    adjoint_poly = MatPoly.leaf(adjoint)
    result = MatPoly.build(*wrt.shape, [])
    diagonal = []  # per-key gates: a RowDot from each term whose diagonal holds wrt
    for chain, coeff in poly.terms:
        direct = _chain_vjp(chain, adjoint_poly, wrt)
        if isinstance(direct, RowDot):
            diagonal.append(RowDot(direct.left.scaled(coeff), direct.right))
        elif direct is not None:
            result = result + direct.scaled(coeff)
        for derivative, inner in _coefficient_derivative(coeff, wrt):
            through_inner = _chain_vjp(tuple(inner.args), MatPoly.identity(1), wrt)
            result = result + through_inner.scaled(derivative * pairing(adjoint, chain))
    if diagonal:
        if len(diagonal) > 1 or result.terms:
            raise NotImplementedError(f"{wrt} outside a single diagonal has no adjoint here yet")
        return diagonal[0]
    return result


def vjp_scalar(poly: MatPoly, adjoint: MatrixSymbol, wrt: sp.Symbol) -> sp.Expr:
    """d/d wrt <adjoint, poly> for a scalar symbol (a step size, a log-gate)."""
    total = sp.Integer(0)
    for chain, coeff in poly.terms:
        derivative = sp.diff(coeff, wrt)
        if derivative != 0:
            total += derivative * pairing(adjoint, chain)
    return _tidy(total)


def derive_adjoint(rule: UpdateRule) -> Adjoint:
    """The adjoint of a rule with one K x V state (see the module's scope)."""
    if rule.form != "recurrent" or len(rule.states) != 1 or len(rule.update) != 1:
        raise NotImplementedError(f"{rule.name}: only rules with a single state have an adjoint here yet")
    update = rule.update[0].value
    leaves = {leaf for chain in update.chains() for leaf in sp.MatMul(*chain).atoms(MatrixSymbol)} if update.terms else set()
    leaves |= {leaf for _, coeff in update.terms for inner in coeff.atoms(Inner) for leaf in inner.atoms(MatrixSymbol)}
    scalars = sorted({x for _, coeff in update.terms for x in coeff.free_symbols if isinstance(x, sp.Symbol)
                      and not isinstance(x, MatrixSymbol) and x not in (K, V)}, key=lambda x: x.name)
    gates = dict(rule.vectors)  # a per-key gate leaf exp_g -> its log-gate input g
    inputs: dict = {}
    for leaf in sorted(leaves - {S}, key=lambda x: x.name):
        gradient = vjp(update, STATE_ADJOINT, leaf)
        if leaf.name in gates:  # d g = exp(g) o d exp_g
            inputs[gates[leaf.name]] = RowDot(gradient.left, gradient.right, times=leaf)
        else:
            inputs[leaf.name] = gradient
    for symbol in scalars:
        inputs[symbol.name] = vjp_scalar(update, STATE_ADJOINT, symbol)
    readout = rule.readout[-1].value
    return Adjoint(
        state=vjp(update, STATE_ADJOINT, S),
        inputs=inputs,
        readout_state=vjp(readout, OUTPUT_ADJOINT, S),
        readout_query=vjp(readout, OUTPUT_ADJOINT, q),
    )


__all__ = ["OUTPUT_ADJOINT", "STATE_ADJOINT", "Adjoint", "Frobenius", "RowDot", "derive_adjoint", "pairing", "vjp",
           "vjp_scalar"]
